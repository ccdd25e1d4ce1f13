"""Step kinds: how each recipe step plans (headers only) and executes.

A step kind turns the step's spec and its inputs (checkpoints, or planned
:class:`VirtualCheckpoint` s of earlier steps) into a :class:`StepPlan`
describing its output, and later executes that plan into a destination folder
through the writer its :class:`StepContext` opens (the engine's: shard size,
coordination, resume key) and finishes through ``context.finish``. A step
kind never sees the pipeline (docs/architecture.md, "Steps").
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .. import settings
from ..errors import InvalidInputError, StepError
from ..io.distributed import SINGLE
from ..io.virtual import VirtualCheckpoint
from ..io.writer import TensorSpec, parse_size
from ..recipe.schema import Step
from ..step import StepContext, StepPlan
from .merge_step import (
    MergePlan,
    MergeRuntime,
    execute_merge,
    output_checkpoint,
    plan_merge,
)
from .piecewise import PIECE_BYTES


class StepKind(Protocol):
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], ctx: StepContext) -> StepPlan: ...

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path,
                ctx: StepContext) -> dict[str, Any]: ...


def _merge_threads(ctx: StepContext) -> int:
    """Reader and compute threads of a merge: --threads, else the cores torch sees (at most 4)."""
    return ctx.options.threads or max(1, min(4, torch.get_num_threads()))


#: reads a merge keeps in flight, and threads making them, when an input streams from the hub:
#: each read waits a round trip and is paced by the server, so one or two at a time leave the link
#: idle; the bytes read ahead stay bounded by MergeRuntime.prefetch_bytes (docs/hub.md, "Streaming")
STREAMED_READ_AHEAD = 8


def _read_ahead(ctx: StepContext, inputs: dict[str, Any]) -> tuple[int, int]:
    """(reader threads, reads queued ahead) of a merge: --threads and the run's prefetch, or
    STREAMED_READ_AHEAD of each when any input streams from the hub."""
    threads, prefetch = _merge_threads(ctx), ctx.options.prefetch
    if any(getattr(ck, "streaming", False) for ck in inputs.values()):
        return max(threads, STREAMED_READ_AHEAD), max(prefetch, STREAMED_READ_AHEAD)
    return threads, prefetch


def _piece_bytes(ctx: StepContext) -> int:
    """--piece-size in bytes (0: whole tensors), default PIECE_BYTES."""
    size = ctx.options.piece_size
    if size is None:
        return PIECE_BYTES
    return 0 if str(size).strip() == "0" else parse_size(size)


class MergeKind:
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], ctx: StepContext) -> StepPlan:
        mp = plan_merge(step.id, step.merge, inputs, where)  # type: ignore[arg-type]
        peak = mp.peak_bytes(_read_ahead(ctx, inputs)[1], piece_bytes=_piece_bytes(ctx), workers=_merge_threads(ctx))
        return StepPlan(output_checkpoint(mp, inputs), mp.bytes_in, len(mp.tasks), peak, mp.notes, mp)

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path,
                ctx: StepContext) -> dict[str, Any]:
        mp: MergePlan = plan.detail
        for note in mp.notes:
            if note.startswith("warning: ") and ctx.quiet and ctx.coordinator.is_main:
                print(f"step {step.id}: {note}", file=sys.stderr)  # what would otherwise pass silently survives -q
            else:
                ctx.say(f"step {step.id}: {note}")
        threads = _merge_threads(ctx)
        with ctx.open_writer(dest, mp.specs, metadata={"surgeon.step": step.id}) as writer:
            bar = tqdm(total=mp.bytes_out, unit="B", unit_scale=True, desc=f"merge {step.id}",
                       disable=not ctx.show_progress)
            done = [t for t in mp.tasks if writer.is_written(t.name) or not writer.owns(t.name)]
            count = [len(done)]

            def advance(nbytes: int, tensor_done: bool = True) -> None:
                count[0] += int(tensor_done)
                bar.set_postfix_str(f"{count[0]}/{len(mp.tasks)} tensors", refresh=False)
                bar.update(nbytes)

            advance(sum(t.spec.nbytes for t in done))
            count[0] -= 1
            readers, prefetch = _read_ahead(ctx, inputs)
            rt = MergeRuntime(ctx.device, ctx.seed, prefetch=prefetch, threads=readers,
                              allow_nonfinite=ctx.allow_nonfinite, progress=advance,
                              coordinator=ctx.coordinator, piece_bytes=_piece_bytes(ctx),
                              compute_workers=settings.current().compute_workers or threads)
            try:
                details = execute_merge(mp, inputs, writer, rt)
            finally:
                bar.close()
            template = inputs[mp.template_id]
            tok = inputs[mp.tokenizer_id] if mp.tokenizer_id else template
            if mp.tokenizer_dir is not None:  # a built tokenizer (tokenizer_source, tokenizer:, chat_template)
                tok = plan.output
            ctx.bound(tok, template).finish(writer, plan.output.config, mp.notes)  # type: ignore[misc]
        return details


def _main_only(ctx: StepContext, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a single-process step on rank 0 while the other ranks wait for its output."""
    coord = ctx.coordinator
    if not coord.distributed:
        return work()
    error, details = None, {}
    if coord.is_main:
        try:
            details = work()
        except Exception as exc:  # re-raised on every rank below
            error = f"{type(exc).__name__}: {exc}"
    error = coord.broadcast_object(error)
    if error is not None:
        raise StepError(f"step failed on rank 0: {error}")
    return details


class TransplantKind:
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], ctx: StepContext) -> StepPlan:
        from ..transplant import plan_transplant

        spec = step.transplant
        assert spec is not None
        return plan_transplant(inputs[spec.model], inputs[spec.donor], where=where, step_id=step.id)

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path,
                ctx: StepContext) -> dict[str, Any]:
        from ..transplant import transplant

        spec = step.transplant
        assert spec is not None
        # rank 0 alone writes this output: its writer coordinates no other process
        context = ctx.bound(inputs[spec.donor], inputs[spec.model], coordinator=SINGLE)
        return _main_only(ctx, lambda: transplant(
            inputs[spec.model].path, inputs[spec.donor].path, dest, method=spec.method, k=spec.k,
            device=ctx.options.device, overwrite=True, screen=spec.screen, batch_size=spec.batch_size,
            progress=ctx.show_progress, context=context,
        ))


class FuseKind:
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], ctx: StepContext) -> StepPlan:
        spec = step.fuse
        assert spec is not None
        pivot = inputs[spec.pivot]
        for src in [spec.pivot] + [s.model for s in spec.sources]:
            if not inputs[src].has_tokenizer:
                raise InvalidInputError(f"{where()}: {src!r} has no tokenizer files; fusion needs every model's tokenizer")
        data = Path(ctx.resolve_path(spec.data))
        if not data.is_file():
            raise InvalidInputError(f"{where('data')}: {data}: no such data file")
        held_out = fuse_paths(spec.options, ctx.resolve_path).get("eval_path")
        if held_out is not None and not Path(held_out).is_file():
            raise InvalidInputError(f"{where('options', 'eval_path')}: options.eval_path {held_out}: no such file")
        out = VirtualCheckpoint(f"step {step.id!r}", {i.name: TensorSpec(i.name, i.shape, i.dtype) for i in pivot.infos()},
                                pivot.config, pivot.tokenizer_files[0].parent if pivot.tokenizer_files else None)
        peak, notes = fuse_peak_estimate(pivot, [inputs[s.model] for s in spec.sources], spec)
        return StepPlan(out, sum(inputs[s].total_bytes for s in step.references()), len(out), peak, notes)

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path,
                ctx: StepContext) -> dict[str, Any]:
        from ..fusion import fuse

        spec = step.fuse
        assert spec is not None
        return fuse(
            pivot_dir=inputs[spec.pivot].path,
            sources=[{"path": inputs[s.model].path, "weight": s.weight, "align": s.align, "id": s.model}
                     for s in spec.sources],
            dataset_path=ctx.resolve_path(spec.data),
            out_dir=dest,
            seed=ctx.seed,
            device=ctx.options.device,
            progress=not ctx.quiet and ctx.coordinator.is_main,  # phase lines also in a log (bars only on a terminal)
            **{k: v for k, v in spec.model_dump(by_alias=False).items() if k not in ("pivot", "sources", "data", "options")},
            options=fuse_paths(spec.options, ctx.resolve_path),
            # only the main process writes (fuse's own rule): its writer coordinates no other process
            context=ctx.bound(inputs[spec.pivot], inputs[spec.pivot], coordinator=SINGLE),
        )


#: fuse options that name local paths: like ``data``, relative to the recipe's folder
FUSE_PATH_OPTIONS = ("eval_path", "work_dir")


def fuse_paths(options: Any, resolve: Callable[[str], str]) -> dict[str, Any]:
    """A fuse step's options as a dict, with :data:`FUSE_PATH_OPTIONS` resolved by ``resolve``
    (the recipe's path rule)."""
    out = dict(options.__dict__ if not isinstance(options, dict) else options)
    for key in FUSE_PATH_OPTIONS:
        if isinstance(out.get(key), str):
            out[key] = resolve(out[key])
    return out


def fuse_peak_estimate(pivot: Any, sources: list[Any], spec: Any, cache_batch: int = 8) -> tuple[int, list[str]]:
    """Peak memory of a fuse step from configs and headers: the larger of training (the pivot's
    float32 weights, gradients and AdamW moments = 16 bytes a parameter; activations kept for the
    backward pass, ~(6 h + 3 i + heads * T) floats per token and layer; logits, their log-softmax
    and gradient at batch x max_length) and caching the teachers' top-k logits (one teacher at a
    time in float32 with its logits for 8 sequences). An estimate to within a factor of about 2;
    (0, [why]) when a config lacks the sizes it needs (the plan then prints n/a)."""
    def dims(ck: Any) -> tuple[int, int, int, int, int] | None:
        cfg = ck.config or {}
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        h, n, v = cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("vocab_size")
        if not all(isinstance(x, int) and x > 0 for x in (h, n, v)):
            return None
        inter = cfg.get("intermediate_size") if isinstance(cfg.get("intermediate_size"), int) else 4 * h
        heads = cfg.get("num_attention_heads") if isinstance(cfg.get("num_attention_heads"), int) else 1
        return h, n, v, inter, heads

    d = dims(pivot)
    if d is None:
        return 0, ["peak memory: n/a (the pivot's config.json lacks hidden_size, num_hidden_layers or vocab_size)"]
    h, n, v, inter, heads = d
    b, t = spec.batch_size, spec.max_length
    state = 16 * pivot.num_parameters
    acts = 4 * b * t * n * (6 * h + 3 * inter + heads * t)
    logits = 3 * 4 * b * t * v
    train = state + acts + logits
    teacher = 0
    for src in sources:
        sd = dims(src)
        sv = sd[2] if sd else v
        teacher = max(teacher, 4 * src.num_parameters + 2 * 4 * cache_batch * t * sv)
    from ..inspection import human_bytes

    note = (f"peak memory estimate {human_bytes(max(train, teacher))}: training {human_bytes(train)} (pivot weights, "
            f"gradients and AdamW state {human_bytes(state)}, activations {human_bytes(acts)}, logits "
            f"{human_bytes(logits)} at batch {b} x {t} tokens); caching the teachers {human_bytes(teacher)}, "
            "one at a time; plus the Python and torch process itself")
    return max(train, teacher), [note]


_KINDS: dict[str, StepKind] = {"merge": MergeKind(), "transplant": TransplantKind(), "fuse": FuseKind()}


def get_kind(name: str) -> StepKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise InvalidInputError(f"unknown step kind {name!r}") from None
