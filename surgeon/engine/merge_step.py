"""The merge step: plan (headers only) and execute (streaming).

Planning checks that every model has every tensor the template (the base, or
the first model) has, with the same shape (vocabulary-sized tensors may differ
and are aligned, see :mod:`surgeon.merge.vocab`), resolves the method's
parameters for every tensor — so a bad gradient or range fails before any
weight is read — and describes the output.

Execution streams. Block-wise methods (:mod:`surgeon.merge.kernels.base`) go
through :mod:`surgeon.engine.piecewise`: row pieces in the stored dtype,
cache-sized float32 blocks, memory bounded by a few pieces. The other
methods get whole float32 tensors: a small thread pool reads and casts the
next tensors (``prefetch`` deep, byte-bounded) while the current one is
merged. Either way a background thread writes finished tensors or pieces.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import InvalidInputError, StepError
from ..io.writer import CheckpointWriter, TensorSpec
from ..merge.method import MergeMethod
from ..merge.params import resolve_params
from ..merge.registry import get_method
from ..merge.tensor import TensorMerge
from ..merge.tokenizer_build import plan_merge_tokenizer
from ..merge.vocab import RowMap, build_row_map, is_vocab_tensor, tensor_role
from ..recipe.schema import MergeSpec
from .piecewise import PIECE_BYTES, execute_pieces, iter_pieces, plan_jobs, prefetched
from .slices import SlicedPlan, plan_slices
from ..io.virtual import VirtualCheckpoint

log = logging.getLogger("surgeon")

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}

#: merged results that may wait for the writer thread before the engine stops handing out work.
#: Each holds one output piece (at most the piece size, 32 MiB by default), so this bounds the
#: extra memory whatever the model. A shared disk's writes slow down now and then (right after
#: another process wrote and deleted a checkpoint, a 1.1B DELLA merge waited on them: 2 results
#: 6.0-6.1 s wall, 8 results 5.7-5.9, alternating runs); more room absorbs that, and in a quiet
#: hour changes nothing (the same times and peak RSS for 2, 4 and 8).
WRITE_QUEUE_DEPTH = 6


@dataclass
class TensorTask:
    name: str
    spec: TensorSpec
    merged: bool  # False: copied from the template (non-float buffers)
    model_params: list[dict[str, Any]]
    params: dict[str, Any]


@dataclass
class MergePlan:
    step_id: str
    method: MergeMethod
    template_id: str
    base_id: str | None
    model_ids: list[str]
    tasks: list[TensorTask]
    row_maps: dict[tuple[str, str], RowMap] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tokenizer_id: str | None = None
    # tokenizer_source / tokenizer / chat_template (surgeon.merge.tokenizer_build): the output
    # vocabulary's layout of the embedding rows, and the folder holding the output tokenizer
    vocab_layout: Any = None
    tokenizer_dir: Path | None = None
    out_dtype: torch.dtype | None = None
    bytes_in: int = 0

    @property
    def specs(self) -> list[TensorSpec]:
        return [t.spec for t in self.tasks]

    @property
    def bytes_out(self) -> int:
        return sum(t.spec.nbytes for t in self.tasks)

    def peak_bytes(self, prefetch: int, prefetch_bytes: int = 512 * 2**20, piece_bytes: int = PIECE_BYTES,
                   workers: int = 1) -> int:
        """Estimated working memory of the merge (the interpreter and torch, ~0.35 GB, come on top).

        Block-wise methods: a piece of every input for each read queued
        (``prefetch`` + 1) and each compute thread, the output pieces waiting for the writer
        (:data:`WRITE_QUEUE_DEPTH`) and the one being written, and
        the float32 blocks — independent of the model's size. Whole-tensor
        methods: the largest tensor's float32 inputs, ~3 working copies, and
        the read-ahead.
        """
        n_in = len(self.model_ids) + (1 if self.base_id else 0)
        largest_numel = max((math.prod(t.spec.shape) for t in self.tasks), default=0)
        if self.method.blockwise and piece_bytes > 0:
            piece = min(largest_numel * 2, piece_bytes)  # bf16-sized; float32 inputs make pieces of half the rows
            queued = min(prefetch + 1, 1 + prefetch_bytes // max(1, n_in * piece))
            blocks = workers * (n_in + 8) * (1 << 18) * 4
            return n_in * piece * (queued + workers) + (WRITE_QUEUE_DEPTH + 1) * piece + blocks
        largest = largest_numel * 4
        return largest * (n_in + 3) + min(prefetch_bytes, largest * n_in * prefetch)


def plan_merge(step_id: str, spec: MergeSpec, inputs: dict[str, Any], where: Callable[..., str],
               tokenizer: Any = None) -> MergePlan:
    """Validate a merge step against its inputs' headers and lay out its output.

    ``tokenizer``: a step-level output tokenizer shared by several merges and the map from this
    merge's input ids to the step's models (layer slices; see merge.tokenizer_build.plan_merge_tokenizer).
    """
    if spec.slices:  # layer surgery: sub-merges over renamed views (surgeon.engine.slices)
        return plan_slices(step_id, spec, inputs, where, plan_merge)  # type: ignore[return-value]
    method = get_method(spec.method)
    model_ids = [m.model for m in spec.models]
    base_id = spec.base
    template_id = base_id or model_ids[0]
    template = inputs[template_id]
    num_layers = template.num_layers
    out_dtype = DTYPE_NAMES[spec.dtype] if spec.dtype else None
    plan = MergePlan(step_id, method, template_id, base_id, model_ids, [], out_dtype=out_dtype)
    tok_id = spec.tokenizer_source
    plan.tokenizer_id = template_id if tok_id in (None, "base", "union") else tok_id
    plan.vocab_layout, plan.tokenizer_dir, tok_notes = plan_merge_tokenizer(spec, inputs, base_id, model_ids, where,
                                                                            is_vocab_tensor, shared=tokenizer)
    plan.notes += tok_notes
    involved = ([base_id] if base_id else []) + model_ids
    for mid in involved:
        plan.bytes_in += inputs[mid].total_bytes
    tied = bool((template.config or {}).get("tie_word_embeddings"))
    for name in template.names:
        tinfo = template.info(name)
        if tied and tensor_role(name) == "lm_head" and any(tensor_role(n) == "embedding" for n in template.names):
            plan.notes.append(f"{name} left out: the config ties it to the input embeddings")
            continue
        for mid in involved:
            ck = inputs[mid]
            if name not in ck:
                raise InvalidInputError(
                    f"{where('models')}: model {mid!r} ({ck.label}) has no tensor {name!r}, which {template_id!r} has"
                )
            info = ck.info(name)
            if info.dtype.is_floating_point and info.dtype not in FLOAT_DTYPES:
                raise InvalidInputError(f"{where('models')}: tensor {name!r} is {_dt(info.dtype)} in model {mid!r} "
                                        f"({ck.label}); float8 weights cannot be merged (dequantize them first)")
            if (info.dtype in FLOAT_DTYPES) != (tinfo.dtype in FLOAT_DTYPES):  # float16 vs bfloat16 is fine
                raise InvalidInputError(f"{where('models')}: tensor {name!r} is {_dt(info.dtype)} in model {mid!r} "
                                        f"({ck.label}) but {_dt(tinfo.dtype)} in {template_id!r}")
            if info.shape != tinfo.shape:
                same_width = info.shape[1:] == tinfo.shape[1:] and len(info.shape) == len(tinfo.shape)
                if plan.vocab_layout is not None and name in plan.vocab_layout.tensors and same_width:
                    continue  # laid out in the output vocabulary (VocabLayout.assemble)
                if is_vocab_tensor(name) and same_width and info.shape:
                    if spec.vocab == "refuse":
                        raise InvalidInputError(
                            f"{where('models')}: model {mid!r}: tensor {name!r} has {info.shape[0]} rows, "
                            f"{template_id!r} has {tinfo.shape[0]} (vocab: refuse)"
                        )
                    rm = build_row_map(tinfo.shape[0], info.shape[0], template.tokenizer_files, ck.tokenizer_files,
                                       f"{mid!r} ({ck.label})", name)
                    plan.row_maps[(mid, name)] = rm
                    plan.notes.append(
                        f"{mid}: {name} has {info.shape[0]} rows vs {tinfo.shape[0]}; aligned {rm.how}, "
                        f"{rm.missing} rows take the base's values"
                    )
                    continue
                raise InvalidInputError(
                    f"{where('models')}: tensor {name!r} has shape {list(info.shape)} in model {mid!r} "
                    f"({ck.label}) but {list(tinfo.shape)} in {template_id!r}"
                )
        is_float = tinfo.dtype in FLOAT_DTYPES
        dtype = (out_dtype or tinfo.dtype) if is_float else tinfo.dtype
        if is_float:
            try:
                params = resolve_params(method.global_params, _global_params(spec, method), name, num_layers,
                                        where("parameters"))
                model_params = [
                    resolve_params(method.model_params, [m.params, _step_level_model_defaults(spec, method)],
                                   name, num_layers, where("models"))
                    for m in spec.models
                ]
            except InvalidInputError as exc:
                raise InvalidInputError(str(exc)) from None
        else:
            params, model_params = {}, []
        shape = plan.vocab_layout.shape_of(name, tinfo.shape) if plan.vocab_layout is not None else tinfo.shape
        plan.tasks.append(TensorTask(name, TensorSpec(name, shape, dtype), is_float, model_params, params))
    extra = sorted({n for mid in involved for n in inputs[mid].names} - set(template.names))
    if extra:
        plan.notes.append(f"{len(extra)} tensors not in {template_id!r} are left out (e.g. {extra[0]!r})")
    return plan


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _global_params(spec: MergeSpec, method: MergeMethod) -> dict[str, Any]:
    names = {p.name for p in method.global_params} | {a for p in method.global_params for a in p.aliases}
    return {k: v for k, v in spec.parameters.items() if k in names}


def _step_level_model_defaults(spec: MergeSpec, method: MergeMethod) -> dict[str, Any]:
    names = {p.name for p in method.model_params} | {a for p in method.model_params for a in p.aliases}
    return {k: v for k, v in spec.parameters.items() if k in names}


def output_checkpoint(plan: MergePlan, inputs: dict[str, Any]) -> VirtualCheckpoint:
    template = inputs[plan.template_id]
    tok = inputs[plan.tokenizer_id] if plan.tokenizer_id else template
    return VirtualCheckpoint(
        label=f"step {plan.step_id!r}",
        specs={t.name: t.spec for t in plan.tasks},
        config=output_config(template.config, plan),
        tokenizer_dir=plan.tokenizer_dir or (tok.tokenizer_files[0].parent if tok.tokenizer_files else None),
    )


def output_config(config: dict[str, Any] | None, plan: MergePlan) -> dict[str, Any] | None:
    if config is None:
        return None
    cfg = dict(config)
    cfg.update(getattr(plan, "config_overrides", None) or {})  # sliced merges: layer count, per-layer lists
    if plan.out_dtype is not None:
        name = str(plan.out_dtype).removeprefix("torch.")
        key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
        cfg[key] = name
    if plan.vocab_layout is not None:  # the output vocabulary's row count (padded)
        if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": plan.vocab_layout.rows}
        else:
            cfg["vocab_size"] = plan.vocab_layout.rows
    return cfg


# ---------------------------------------------------------------------------
@dataclass
class MergeRuntime:
    device: torch.device
    seed: int
    prefetch: int = 2
    prefetch_bytes: int = 512 * 2**20
    threads: int = 2
    allow_nonfinite: bool = False
    progress: Callable[..., None] | None = None  # called with bytes written (and whether a tensor is complete)
    coordinator: Any = None  # surgeon.io.distributed.Coordinator when several processes share the step
    piece_bytes: int = PIECE_BYTES  # block-wise methods: stored bytes per input per piece (0: whole tensors)
    # CPU block-wise merges: threads that each merge a whole one-piece tensor with
    # single-threaded torch ops (see piecewise.execute_pieces); the pipeline sets it to --threads
    # (or SURGEON_COMPUTE_WORKERS)
    compute_workers: int = 1


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, in one reduction pass.

    A NaN or Inf anywhere makes the sum non-finite; a finite sum proves all
    entries finite. Only when the sum is not finite do we pay for the exact,
    allocating check (which also tells the true answer if the sum merely
    overflowed). The sum is float32: a float64 accumulation ran 3x slower.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class _Loader:
    """Reads one tensor's inputs as float32 on the compute device."""

    def __init__(self, plan: MergePlan, inputs: dict[str, Any], device: torch.device):
        self.plan, self.inputs, self.device = plan, inputs, device

    def _get(self, mid: str, name: str) -> torch.Tensor:
        # Move the stored dtype (half the bytes of float32 for bf16) and cast on the compute device.
        t = self.inputs[mid].get(name)
        if self.device.type != "cpu":
            t = t.to(self.device)
        t = t.to(torch.float32)
        rm = self.plan.row_maps.get((mid, name))
        if rm is not None:
            fill_id = self.plan.base_id or self.plan.template_id
            fill = self.inputs[fill_id].get(name, dtype=torch.float32, device=self.device)
            t = rm.apply(t, fill)
        return t

    def __call__(self, task: TensorTask) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        layout = self.plan.vocab_layout
        if layout is not None and task.name in layout.tensors:  # every input in the output vocabulary
            raw = {m: self.inputs[m].get(task.name, dtype=torch.float32, device=self.device) for m in layout.models}
            rows = layout.assemble(task.name, raw)
            return (rows[self.plan.base_id] if self.plan.base_id else None), [rows[m] for m in self.plan.model_ids]
        base = self._get(self.plan.base_id, task.name) if self.plan.base_id else None
        return base, [self._get(mid, task.name) for mid in self.plan.model_ids]


def iter_merges(plan: MergePlan, inputs: dict[str, Any], rt: MergeRuntime, tasks: list[TensorTask],
                state: Any = None) -> Iterator[tuple[TensorTask, TensorMerge]]:
    """Yield (task, TensorMerge) for each task, prefetching the next inputs.

    Prefetching is bounded twice (:func:`piecewise.prefetched`): at most
    ``rt.prefetch`` tensors ahead, and no more than ``rt.prefetch_bytes`` of
    float32 inputs waiting beyond the tensor being merged — so the embedding
    and head matrices, which dwarf every other tensor, are never read ahead on
    top of each other.
    """
    load = _Loader(plan, inputs, rt.device)
    n_in = len(plan.model_ids) + (1 if plan.base_id else 0)

    def cost(task: TensorTask) -> int:
        return n_in * math.prod(task.spec.shape) * 4

    for task, (base, models) in prefetched(iter(tasks), load, rt, cost):
        yield task, TensorMerge(task.name, base, models, task.model_params, task.params,
                                seed=rt.seed, role=tensor_role(task.name), state=state)


class _Restream:
    """Re-iterable stream of a plan's merges (for whole-model ``prepare`` passes).

    In a distributed run each rank streams only the tensors it owns and
    ``all_reduce_sum`` combines the methods' whole-model statistics.
    """

    def __init__(self, plan: MergePlan, inputs: dict[str, Any], rt: MergeRuntime,
                 owns: Callable[[str], bool] = lambda name: True):
        self.plan, self.inputs, self.rt, self.owns = plan, inputs, rt, owns
        self.num_models = len(plan.model_ids)
        merged = [t for t in plan.tasks if t.merged]
        self.densities = [p.get("density", 1.0) for p in merged[0].model_params] if merged else []
        coord = rt.coordinator
        self.all_reduce_sum = coord.all_reduce_sum if coord is not None and coord.distributed else None

    def __iter__(self) -> Iterator[TensorMerge]:
        """One TensorMerge per row piece (float32), so a whole-model pass holds
        a few pieces, never a whole embedding matrix in float32."""
        merged = [t for t in self.plan.tasks if t.merged and self.owns(t.name)]
        f32 = torch.float32
        for task, piece in iter_pieces(self.plan, self.inputs, self.rt, merged, _Loader(self.plan, self.inputs, self.rt.device)):
            base = piece.base.to(f32) if piece.base is not None else None
            yield TensorMerge(task.name, base, [m.to(f32) for m in piece.models], task.model_params, task.params,
                              seed=self.rt.seed, role=tensor_role(task.name), offset=piece.start)


def _same_everywhere(plan: MergePlan, inputs: dict[str, Any], name: str, value: torch.Tensor) -> None:
    """A tensor that is copied, not merged (integer, bool), must be the same in every input: keeping one
    model's values of a tensor the others changed (int8 quantized weights) would drop their change silently."""
    for mid in ([plan.base_id] if plan.base_id else []) + plan.model_ids:
        if mid == plan.template_id or mid not in inputs or name not in inputs[mid]:
            continue
        other = inputs[mid].get(name)
        if other.shape == value.shape and not torch.equal(other, value):
            raise InvalidInputError(
                f"step {plan.step_id!r}: tensor {name!r} is {str(value.dtype).removeprefix('torch.')} and differs "
                f"between {plan.template_id!r} and {mid!r}; integer tensors are not merged, and surgeon will not keep "
                f"one model's values silently (quantized weights? dequantize them first)")


def _raise_nonfinite(plan: MergePlan, inputs: dict[str, Any], task: TensorTask, out: torch.Tensor) -> None:
    """Name the input that brought NaN/Inf into a merged tensor, or the merge itself.

    Inputs are not scanned on the hot path (a pass over every input byte cost a
    third of a merge's time); a non-finite input is found here as soon as it
    reaches an output, which for every method but the random-drop ones is the
    tensor it is in.
    """
    for mid in ([plan.base_id] if plan.base_id else []) + plan.model_ids:
        t = inputs[mid].get(task.name)
        if t.dtype == torch.float64 and bool(torch.isfinite(t).all()):
            big = float(t.abs().max())
            if big > torch.finfo(torch.float32).max:  # finite, but not in float32, where merges compute
                raise InvalidInputError(
                    f"step {plan.step_id!r}: input model {mid!r} ({getattr(inputs[mid], 'label', mid)}): tensor "
                    f"{task.name!r} is float64 with values beyond float32's range (largest |x| = {big:.3g}); "
                    "surgeon merges in float32: rescale or convert that model first")
        t = t.to(torch.float32)
        if not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise StepError(f"step {plan.step_id!r}: input model {mid!r} ({getattr(inputs[mid], 'label', mid)}): "
                            f"tensor {task.name!r} has {bad} NaN/Inf values (--allow-nonfinite merges it anyway)")
    bad = int((~torch.isfinite(out)).sum())
    raise StepError(f"step {plan.step_id!r}: tensor {task.name!r} has {bad} NaN/Inf values after merging "
                    "(check the inputs and parameters; --allow-nonfinite writes it anyway)")


class _BackgroundWriter:
    """Writes merged tensors on one background thread while the next is computed.

    At most ``depth`` results wait (bounded memory); a write error is raised
    in the merging thread at the next ``put`` or when the block ends.
    """

    def __init__(self, writer: CheckpointWriter, progress: Callable[[int], None] | None,
                 depth: int = WRITE_QUEUE_DEPTH):
        self.writer, self.progress = writer, progress
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgeon-write")
        self.pending: deque[Future] = deque()
        self.depth = depth

    def _write(self, task: TensorTask, out: torch.Tensor) -> None:
        self.writer.write(task.name, out.cpu() if out.device.type != "cpu" else out)
        if self.progress:
            self.progress(task.spec.nbytes)

    def _write_rows(self, task: TensorTask, start: int, rows: torch.Tensor,
                    release: Callable[[], None] | None = None) -> None:
        try:
            self.writer.write_rows(task.name, start, rows.cpu() if rows.device.type != "cpu" else rows)
        finally:
            if release is not None:
                release()  # the rows' buffer may be reused: the bytes are in the file
        if self.progress:
            self.progress(rows.numel() * rows.element_size(), self.writer.is_written(task.name))

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def put(self, task: TensorTask, out: torch.Tensor) -> None:
        self._submit(self._write, task, out)

    def file_offset(self, task: TensorTask, start: int) -> int:
        """Where row ``start`` of ``task`` lands in its shard file (bytes)."""
        return self.writer.byte_offset(task.name, start)

    def put_rows(self, task: TensorTask, start: int, rows: torch.Tensor,
                 release: Callable[[], None] | None = None) -> None:
        """Write rows of a tensor; ``release`` is called once their buffer is no longer needed."""
        self._submit(self._write_rows, task, start, rows, release)

    def __enter__(self) -> "_BackgroundWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            while self.pending:
                fut = self.pending.popleft()
                if exc_type is None:
                    fut.result()
                else:
                    fut.cancel() or fut.exception()
        finally:
            self.pool.shutdown(wait=True)


def _block_jobs(plan: MergePlan, inputs: dict[str, Any], rt: MergeRuntime, tasks: list[TensorTask],
                state: Any) -> tuple[list[Any], list[TensorTask]]:
    """Split tasks into block-wise jobs (the method has a kernel for them) and whole-tensor ones."""
    if not plan.method.blockwise or rt.piece_bytes <= 0:
        return [], tasks
    kernels, whole = [], []
    for task in tasks:
        meta = TensorMerge.header(task.name, tuple(task.spec.shape), task.model_params, task.params,
                                  plan.base_id is not None, seed=rt.seed, role=tensor_role(task.name), state=state,
                                  device=rt.device)
        kernel = plan.method.block_kernel(meta)
        if kernel is None:
            whole.append(task)
        else:
            kernels.append((task, kernel, meta))
    return plan_jobs(plan, kernels, inputs, rt.piece_bytes), whole


def execute_merge(plan: MergePlan, inputs: dict[str, Any], writer: CheckpointWriter, rt: MergeRuntime) -> dict[str, Any]:
    """Merge every pending tensor into ``writer``; returns timing figures."""
    if isinstance(plan, SlicedPlan):
        return plan.execute(inputs, writer, rt, execute_merge)
    t0 = time.perf_counter()
    state = None
    if plan.method.prepare is not None:
        state = plan.method.prepare(_Restream(plan, inputs, rt, writer.owns), plan.tasks[0].params if plan.tasks else {})
    t_prep = time.perf_counter() - t0
    pending = sorted((t for t in plan.tasks if writer.owns(t.name) and not writer.is_written(t.name)),
                     key=lambda t: writer.position(t.name))  # bytes in file order: hashed as they are written
    template = inputs[plan.template_id]
    merged_tasks = [t for t in pending if t.merged]
    for t in pending:
        if not t.merged:
            value = template.get(t.name)
            _same_everywhere(plan, inputs, t.name, value)
            writer.write(t.name, value)
            if rt.progress:
                rt.progress(t.spec.nbytes)
    jobs, whole_tasks = _block_jobs(plan, inputs, rt, merged_tasks, state)
    compute = 0.0  # summed over the compute threads: can exceed the wall time
    t_loop = time.perf_counter()
    with _BackgroundWriter(writer, rt.progress) as out_queue:
        # Whole-tensor tasks first: with a block-wise method they are the few
        # tensors its kernel declines (WIDEN's norms and biases). Written last,
        # they sat in the middle of the shards and held back the writer's
        # hashed prefix, so nothing was dropped from the page cache and most
        # of the output was read back at the end (WIDEN 1.1B: 7 s in pwrite).
        for task, tm in iter_merges(plan, inputs, rt, whole_tasks, state):
            c0 = time.perf_counter()
            try:
                out = plan.method.fn(tm)
            except (InvalidInputError, StepError):
                raise
            except (ValueError, RuntimeError) as exc:
                raise StepError(f"step {plan.step_id!r}: method {plan.method.name!r} failed on tensor {task.name!r}: {exc}") from None
            if tuple(out.shape) != task.spec.shape:
                raise StepError(f"step {plan.step_id!r}: method {plan.method.name!r} returned shape {tuple(out.shape)} for {task.name!r}, expected {task.spec.shape}")
            if not rt.allow_nonfinite and not _all_finite(out):
                _raise_nonfinite(plan, inputs, task, out)
            out = out.to(task.spec.dtype)
            del tm
            compute += time.perf_counter() - c0
            out_queue.put(task, out)
        if jobs:
            compute += execute_pieces(plan, inputs, jobs, rt, out_queue, _Loader(plan, inputs, rt.device),
                                      lambda task, out: _raise_nonfinite(plan, inputs, task, out))
    # compute_s is wall time (never more than the step's seconds); compute_thread_s sums the threads
    wall = time.perf_counter() - t_loop
    return {"prepare_s": round(t_prep, 3), "compute_s": round(min(compute, wall), 3),
            "compute_thread_s": round(compute, 3), "tensors": len(pending),
            "resumed_tensors": writer.resumed_tensors}
