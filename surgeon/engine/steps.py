"""Step kinds: how each recipe step plans (headers only) and executes.

A step kind turns the step's spec and its inputs (checkpoints, or planned
:class:`VirtualCheckpoint` s of earlier steps) into a :class:`StepPlan`
describing its output, and later executes that plan into a destination folder
through the atomic writer.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from ..errors import InvalidInputError, StepError
from ..io.writer import CheckpointWriter, TensorSpec, parse_size
from ..recipe.schema import Step
from .merge_step import MergePlan, MergeRuntime, execute_merge, output_checkpoint, plan_merge
from .piecewise import PIECE_BYTES
from .virtual import VirtualCheckpoint

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass
class StepPlan:
    output: VirtualCheckpoint
    bytes_in: int
    tensors: int
    peak_bytes: int
    notes: list[str] = field(default_factory=list)
    detail: Any = None

    @property
    def bytes_out(self) -> int:
        return self.output.total_bytes

    def summary(self, step: Step, prefetch: int) -> dict[str, Any]:
        return {
            "id": step.id,
            "kind": step.kind,
            "reads": step.references(),
            "tensors": self.tensors,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "peak_bytes_estimate": self.peak_bytes,
            "notes": self.notes,
        }


class StepKind(Protocol):
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], pipeline: "Pipeline") -> StepPlan: ...

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path, pipeline: "Pipeline",
                fingerprint: str) -> dict[str, Any]: ...


def _merge_threads(pipeline: "Pipeline") -> int:
    """Reader and compute threads of a merge: --threads, else the cores torch sees (at most 4)."""
    return pipeline.opts.threads or max(1, min(4, torch.get_num_threads()))


def _piece_bytes(pipeline: "Pipeline") -> int:
    """--piece-size in bytes (0: whole tensors), default PIECE_BYTES."""
    size = pipeline.opts.piece_size
    if size is None:
        return PIECE_BYTES
    return 0 if str(size).strip() == "0" else parse_size(size)


class MergeKind:
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], pipeline: "Pipeline") -> StepPlan:
        mp = plan_merge(step.id, step.merge, inputs, where)  # type: ignore[arg-type]
        peak = mp.peak_bytes(pipeline.opts.prefetch, piece_bytes=_piece_bytes(pipeline), workers=_merge_threads(pipeline))
        return StepPlan(output_checkpoint(mp, inputs), mp.bytes_in, len(mp.tasks), peak, mp.notes, mp)

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path, pipeline: "Pipeline",
                fingerprint: str) -> dict[str, Any]:
        mp: MergePlan = plan.detail
        for note in mp.notes:
            if note.startswith("warning: ") and pipeline.opts.quiet and pipeline.coord.is_main:
                print(f"step {step.id}: {note}", file=sys.stderr)  # what would otherwise pass silently survives -q
            else:
                pipeline._say(f"step {step.id}: {note}")
        threads = _merge_threads(pipeline)
        with CheckpointWriter(dest, mp.specs, max_shard_size=pipeline.max_shard_size, overwrite=True,
                              metadata={"surgeon.step": step.id}, coordinator=pipeline.coord) as writer:
            bar = tqdm(total=mp.bytes_out, unit="B", unit_scale=True, desc=f"merge {step.id}",
                       disable=not pipeline.show_progress)
            done = [t for t in mp.tasks if writer.is_written(t.name) or not writer.owns(t.name)]
            count = [len(done)]

            def advance(nbytes: int, tensor_done: bool = True) -> None:
                count[0] += int(tensor_done)
                bar.set_postfix_str(f"{count[0]}/{len(mp.tasks)} tensors", refresh=False)
                bar.update(nbytes)

            advance(sum(t.spec.nbytes for t in done))
            count[0] -= 1
            rt = MergeRuntime(pipeline.device, pipeline.recipe.seed, prefetch=pipeline.opts.prefetch, threads=threads,
                              allow_nonfinite=pipeline.opts.allow_nonfinite, progress=advance,
                              coordinator=pipeline.coord, piece_bytes=_piece_bytes(pipeline),
                              compute_workers=int(os.environ.get("SURGEON_COMPUTE_WORKERS", threads)))
            try:
                details = execute_merge(mp, inputs, writer, rt)
            finally:
                bar.close()
            template = inputs[mp.template_id]
            tok = inputs[mp.tokenizer_id] if mp.tokenizer_id else template
            if mp.tokenizer_dir is not None:  # a built tokenizer (tokenizer_source, tokenizer:, chat_template)
                tok = plan.output
            pipeline.finish_checkpoint(writer, step, plan.output.config, tok, template, fingerprint, mp.notes)
        return details


def _main_only(pipeline: "Pipeline", dest: Path, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a single-process step on rank 0 while the other ranks wait for its output."""
    if not pipeline.coord.distributed:
        return work()
    error, details = None, {}
    if pipeline.coord.is_main:
        try:
            details = work()
        except Exception as exc:  # re-raised on every rank below
            error = f"{type(exc).__name__}: {exc}"
    error = pipeline.coord.broadcast_object(error)
    if error is not None:
        raise StepError(f"step failed on rank 0: {error}")
    return details


class TransplantKind:
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], pipeline: "Pipeline") -> StepPlan:
        from ..transplant import plan_transplant

        spec = step.transplant
        assert spec is not None
        return plan_transplant(inputs[spec.model], inputs[spec.donor], where=where, step_id=step.id)

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path, pipeline: "Pipeline",
                fingerprint: str) -> dict[str, Any]:
        from ..transplant import transplant

        spec = step.transplant
        assert spec is not None
        return _main_only(pipeline, dest, lambda: transplant(
            inputs[spec.model].path, inputs[spec.donor].path, dest, method=spec.method, k=spec.k,
            device=pipeline.opts.device, overwrite=True, screen=spec.screen, batch_size=spec.batch_size,
            progress=pipeline.show_progress,
            finish=lambda writer, config, notes: pipeline.finish_checkpoint(
                writer, step, config, inputs[spec.donor], inputs[spec.model], fingerprint, notes),
        ))


class FuseKind:
    def plan(self, step: Step, inputs: dict[str, Any], where: Callable[..., str], pipeline: "Pipeline") -> StepPlan:
        spec = step.fuse
        assert spec is not None
        pivot = inputs[spec.pivot]
        for src in [spec.pivot] + [s.model for s in spec.sources]:
            if not inputs[src].has_tokenizer:
                raise InvalidInputError(f"{where()}: {src!r} has no tokenizer files; fusion needs every model's tokenizer")
        data = Path(pipeline.loaded.resolve_path(spec.data))
        if not data.is_file():
            raise InvalidInputError(f"{where('data')}: {data}: no such data file")
        out = VirtualCheckpoint(f"step {step.id!r}", {i.name: TensorSpec(i.name, i.shape, i.dtype) for i in pivot.infos()},
                                pivot.config, pivot.tokenizer_files[0].parent if pivot.tokenizer_files else None)
        peak, notes = fuse_peak_estimate(pivot, [inputs[s.model] for s in spec.sources], spec)
        return StepPlan(out, sum(inputs[s].total_bytes for s in step.references()), len(out), peak, notes)

    def execute(self, step: Step, plan: StepPlan, inputs: dict[str, Any], dest: Path, pipeline: "Pipeline",
                fingerprint: str) -> dict[str, Any]:
        from ..fusion import fuse

        spec = step.fuse
        assert spec is not None
        return fuse(
            pivot_dir=inputs[spec.pivot].path,
            sources=[{"path": inputs[s.model].path, "weight": s.weight, "align": s.align, "id": s.model}
                     for s in spec.sources],
            dataset_path=pipeline.loaded.resolve_path(spec.data),
            out_dir=dest,
            seed=pipeline.recipe.seed,
            device=pipeline.opts.device,
            progress=pipeline.show_progress,
            **{k: v for k, v in spec.model_dump(by_alias=False).items() if k not in ("pivot", "sources", "data")},
            finish=lambda writer, config, notes: pipeline.finish_checkpoint(
                writer, step, config, inputs[spec.pivot], inputs[spec.pivot], fingerprint, notes),
        )


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
