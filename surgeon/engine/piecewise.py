"""Streaming execution of block-wise merge methods, in row pieces.

For a method with a block kernel (:mod:`surgeon.merge.kernels.base`) the engine
never holds a whole tensor: each tensor is cut along its first dimension into
*pieces* of at most ``piece_bytes`` stored bytes per input, each a view of
the input file's cached pages on CPU (:meth:`Checkpoint.map_rows`: no copy;
handed back once merged) or one ``pread`` into a reused buffer where a file
cannot be mapped (in the stored dtype, bf16 stays bf16), merged (whole, by a
compiled kernel that reads the stored dtype, or block by block in float32)
into an output piece in the output dtype, and written at its final offset
(:meth:`CheckpointWriter.write_rows`). Peak memory is therefore a few pieces
per input, whatever the size of the model or of its largest tensor (the
embedding matrix of a large vocabulary used to dominate).

Read-ahead: reader threads fetch the next pieces (bounded in count and in
bytes; a mapped piece's pages fault in as the compute thread reads them:
:mod:`surgeon.io.mapped`) while the current one is merged; one-piece tensors
are merged side by side on compute threads and each cut tensor on a lane of
its own beside them (:class:`_Schedule`); a background thread writes finished
pieces (from a pool of output buffers the writer hands back). A kernel that
needs statistic passes (TIES' exact selection) sees each tensor once per
pass it needs: a tensor that fits in one piece is read once and kept for all
its passes, a larger one is re-read per pass (from the page cache, at memory
speed), and passes the kernel turns out not to need are skipped.

Vocabulary-aligned tensors (row maps) are read whole, aligned and cast to
float32, as in the whole-tensor path.
"""
from __future__ import annotations

import contextlib
import gc
import math
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, TypeVar

import torch

from ..allocator import HeapTrim
from ..errors import InvalidInputError, StepError
from ..io.checkpoint import Checkpoint
from ..io.direct_write import BLOCK
from ..merge.kernels.base import Kernel, PieceInputs, merge_piece, observe_piece
from ..merge.tensor import TensorMerge

if TYPE_CHECKING:  # merge_step imports this module: its types are named for the checker only
    from .merge_step import MergePlan, MergeRuntime, TensorTask

#: reads one task's inputs whole, in float32, rows aligned (``merge_step._Loader``): (base, models)
WholeLoader = Callable[["TensorTask"], "tuple[torch.Tensor | None, list[torch.Tensor]]"]


class RowSink(Protocol):
    """Where merged pieces go (``merge_step._BackgroundWriter``)."""

    def put_rows(self, task: TensorTask, start: int, rows: torch.Tensor,
                 release: Callable[[], None] | None = None) -> None:
        """Write ``rows`` of ``task`` from row ``start``; call ``release`` once their buffer is free."""

    def file_offset(self, task: TensorTask, start: int) -> int:
        """Where row ``start`` of ``task`` lands in its file, in bytes (an output piece placed at
        the same address modulo :data:`surgeon.io.direct_write.BLOCK` is written without a copy)."""


class Prefetch(Protocol):
    """The read-ahead bounds of a run (``merge_step.MergeRuntime`` has them)."""

    threads: int        # reader threads
    prefetch: int       # reads queued beyond the current one
    prefetch_bytes: int  # bytes queued beyond the current one

#: stored bytes of one input in one piece (32 MiB: a 2048-wide bf16 matrix in 8192-row pieces).
#: With the default read-ahead (two reads) a merge of four inputs holds ~0.5 GB of pieces.
PIECE_BYTES = 32 * 2**20


@dataclass
class _Job:
    """One tensor's block-wise merge: its kernel and how it is cut."""

    task: TensorTask
    kernel: Kernel
    meta: TensorMerge  # header only (no tensors)
    pieces: list[tuple[int, int]]  # row ranges
    row_elems: int
    whole_fp32: bool  # read whole through the row-aligning loader
    n_in: int         # inputs read per piece
    itemsize: int     # bytes per entry as read: the widest input dtype (float32 when aligned)

    def out_piece_bytes(self, piece: int) -> int:
        """Bytes of ``piece``'s merged output."""
        r0, r1 = self.pieces[piece]
        return (r1 - r0) * self.row_elems * self.task.spec.dtype.itemsize

    def piece_bytes(self, piece: int) -> int:
        """Bytes one read of ``piece`` brings in (all inputs)."""
        r0, r1 = self.pieces[piece]
        return self.n_in * (r1 - r0) * self.row_elems * self.itemsize


@dataclass
class _Read:
    job: _Job
    piece: int
    passes: tuple[int, ...]
    nbytes: int
    lane: int | None = None  # a cut job's lane (:class:`_Schedule`); None: any compute thread


def plan_jobs(plan: MergePlan, kernels: list[tuple[TensorTask, Kernel, TensorMerge]], inputs: dict[str, Checkpoint],
              piece_bytes: int = PIECE_BYTES) -> list[_Job]:
    """Cut each (task, kernel, meta) into row pieces of at most ``piece_bytes`` per input."""
    jobs = []
    involved = ([plan.base_id] if plan.base_id else []) + plan.model_ids
    for task, kernel, meta in kernels:
        shape = task.spec.shape
        rows = shape[0] if shape else 1
        numel = math.prod(shape)
        row_elems = numel // rows if rows else 0
        aligned = any((mid, task.name) in plan.row_maps for mid in involved) or (
            plan.vocab_layout is not None and task.name in plan.vocab_layout.tensors)
        item = max(inputs[mid].info(task.name).dtype.itemsize for mid in involved)
        if aligned or rows <= 1 or row_elems * item * rows <= piece_bytes:
            pieces = [(0, rows)]
        else:
            # a piece holds whole units of the kernel's alignment (DELLA ranks a 1-D tensor as one row)
            unit = max(1, -(-max(1, kernel.align) // max(1, row_elems)))
            per = max(unit, (piece_bytes // max(1, row_elems * item)) // unit * unit)
            pieces = [(r, min(r + per, rows)) for r in range(0, rows, per)]
        jobs.append(_Job(task, kernel, meta, pieces, row_elems, aligned, len(involved), 4 if aligned else item))
    return jobs


_END = object()
#: merged pieces at least this large are written from pooled buffers
_POOLED_OUTPUT = 1 << 20
#: in the read sequence: read nothing further until every read before it has been processed
_SETTLE = None


def _reads(jobs: list[_Job]) -> Iterator[_Read]:
    """Each job's reads, job after job, for jobs without statistic passes
    or in one piece: a one-piece job is one read that serves all of its
    passes (a tensor that fits in one piece is read once). Cut jobs with
    statistic passes are read by :class:`_Schedule`."""
    for job in jobs:
        if len(job.pieces) == 1:
            yield _Read(job, 0, tuple(range(job.kernel.stat_passes + 1)), job.piece_bytes(0))
            continue
        if job.kernel.stat_passes:
            raise RuntimeError(f"tensor {job.task.name!r}: a cut job with statistic passes needs the schedule")
        for i in range(len(job.pieces)):
            yield _Read(job, i, (0,), job.piece_bytes(i))


_BLOCKED = object()  # a cut job at a later statistic pass whose previous pass is still being processed


class _CutStream:
    """The reads of one cut job (a tensor in several pieces), on one lane: each
    piece once per pass; a statistic pass after the first only when the kernel
    needs it (TIES' selection usually settles in its first pass: the rest are
    neither read nor computed)."""

    def __init__(self, job: _Job, lane: int):
        self.job, self.lane = job, lane
        self.pass_no, self.piece = 0, 0
        self.emitted = 0
        self.processed = 0  # counted by the lane (:meth:`_Schedule.processed`)

    def next(self) -> _Read | object | None:
        """The next read, :data:`_BLOCKED`, or None once every read is out."""
        job = self.job
        stat = job.kernel.stat_passes
        while self.pass_no <= stat:
            if self.piece == 0 and 0 < self.pass_no < stat:
                if self.processed < self.emitted:
                    return _BLOCKED  # the kernel cannot say yet whether it needs this pass
                if not job.kernel.pass_needed(self.pass_no):
                    self.pass_no += 1
                    continue
            read = _Read(job, self.piece, (self.pass_no,), job.piece_bytes(self.piece), self.lane)
            self.piece += 1
            if self.piece == len(job.pieces):
                self.pass_no, self.piece = self.pass_no + 1, 0
            self.emitted += 1
            return read
        return None


class _Schedule:
    """The order of reads when cut jobs run on lanes beside the one-piece jobs.

    A one-piece job is one read (all of its passes), computed on any compute
    thread. A cut job is read piece by piece, pass by pass, and each of its
    reads goes to its lane: one thread that processes them in that order
    (kernels see a tensor's pieces in flat order, pass after pass). Up to
    ``lanes`` cut jobs are open at a time, and reads go round-robin over the
    open cut jobs and the one-piece jobs, so a large tensor is computed
    beside the others instead of alone (the embedding and head matrices of a
    1.1B model held one of two cores idle for ~1.7 s of a TIES merge; in a
    7B model most tensors are cut). A cut job at the start of a later
    statistic pass waits until every read of its previous pass has been
    processed (only then can its kernel say whether it needs the pass:
    :meth:`Kernel.pass_needed`) while the others go on; when none can go on,
    a :data:`_SETTLE` mark makes the read-ahead wait for the consumer, then
    the schedule waits for the lanes.
    """

    def __init__(self, jobs: list[_Job], lanes: int):
        self._whole: Iterator[_Read] = _reads([j for j in jobs if len(j.pieces) == 1])
        self._waiting_cut = deque(j for j in jobs if len(j.pieces) > 1)
        self._free_lanes = list(range(max(1, lanes)))
        self._open: list[_CutStream] = []
        self._streams: dict[int, _CutStream] = {}
        self._turn = 0
        self._changed = threading.Condition()

    def processed(self, read: _Read) -> None:
        """Count a processed read of a cut job (from its lane: call it even when processing failed)."""
        if read.lane is None:
            return
        with self._changed:
            self._streams[id(read.job)].processed += 1
            self._changed.notify_all()

    def _open_jobs(self) -> None:
        while self._free_lanes and self._waiting_cut:
            job = self._waiting_cut.popleft()
            stream = _CutStream(job, self._free_lanes.pop(0))
            self._open.append(stream)
            self._streams[id(job)] = stream

    def __iter__(self) -> Iterator[_Read | None]:
        whole_done = False
        while True:
            self._open_jobs()
            if whole_done and not self._open:
                return
            candidates: list[_CutStream | None] = [*self._open, None]  # None: the one-piece jobs
            found = None
            blocked: list[_CutStream] = []
            for k in range(len(candidates)):
                stream = candidates[(self._turn + k) % len(candidates)]
                if stream is None:
                    if whole_done:
                        continue
                    found = next(self._whole, _END)
                    if found is _END:
                        whole_done, found = True, None
                        continue
                else:
                    found = stream.next()
                    if found is None:  # every read of this job is out: its lane takes the next cut job
                        self._open.remove(stream)
                        self._free_lanes.append(stream.lane)
                        break
                    if found is _BLOCKED:
                        blocked.append(stream)
                        found = None
                        continue
                self._turn = (self._turn + k + 1) % len(candidates)
                break
            if found is not None:
                yield found
            elif blocked and len(blocked) == len(self._open) and whole_done:
                yield _SETTLE  # the read-ahead waits until everything before is handed over ...
                with self._changed:  # ... then the lanes finish the blocked jobs' passes
                    self._changed.wait_for(lambda: any(s.processed >= s.emitted for s in blocked))


class _BufferPool:
    """Buffers of one size, reused piece after piece: merged output pieces, and
    read buffers for inputs that are not mapped (hub streaming, adapted or
    pickled inputs, platforms other than Linux).

    A fresh buffer costs a page fault per page on first touch (the kernel
    zeroes it): reading 10 GB into fresh 32 MiB buffers ran at ~1 GB/s on
    the development VM, against several GB/s for a copy into memory already
    mapped. At most as many buffers exist as pieces are in flight.
    """

    def __init__(self, size: int):
        self.size = size
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor | None:
        if nbytes > self.size:
            return None
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self.size, dtype=torch.uint8)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(b for b in buffers if b.numel() == self.size)


class _PieceLoader:
    """Reads one piece of every input, in the stored dtype (through ``whole_loader`` when aligned)."""

    def __init__(self, plan: MergePlan, inputs: dict[str, Checkpoint], device: torch.device,
                 whole_loader: WholeLoader, pool: _BufferPool | None = None):
        self.plan, self.inputs, self.device, self.whole = plan, inputs, device, whole_loader
        self.pool = pool if device.type == "cpu" else None

    def __call__(self, read: _Read) -> PieceInputs:
        job = read.job
        r0, r1 = job.pieces[read.piece]
        if job.whole_fp32:
            base, models = self.whole(job.task)
            return PieceInputs(0, base.reshape(-1) if base is not None else None, [m.reshape(-1) for m in models])

        cuda = self.device.type == "cuda"
        release: list[Callable[[], None]] = []
        # read again later: a piece of a cut job before its last pass (a streamed input keeps it)
        again = len(job.pieces) > 1 and job.kernel.stat_passes not in read.passes

        def get(mid: str) -> torch.Tensor:
            ck = self.inputs[mid]
            name = job.task.name
            if self.pool is not None:  # CPU: view the file's cached pages where it can be mapped, else read
                mapped = ck.map_rows(name, r0, r1)
                if mapped is not None:
                    t, give_back = mapped
                    release.append(give_back)
                else:
                    buf = self.pool.take((r1 - r0) * job.row_elems * ck.info(name).dtype.itemsize)
                    if buf is not None:
                        release.append(lambda buf=buf: self.pool.give([buf]))  # type: ignore[union-attr]
                    t = ck.get_rows(name, r0, r1, out=buf, keep=again)
            else:
                # page-locked buffers let the copy to the GPU run asynchronously (the
                # caching host allocator keeps a buffer until its copy has finished)
                t = ck.get_rows(name, r0, r1, pin=cuda, keep=again)
            t = t.reshape(-1)
            if not t.is_floating_point():
                raise InvalidInputError(f"tensor {name!r} of model {mid!r} is {t.dtype}, not a float")
            return t.to(self.device, non_blocking=cuda) if self.device.type != "cpu" else t

        base = get(self.plan.base_id) if self.plan.base_id else None
        return PieceInputs(r0 * job.row_elems, base, [get(mid) for mid in self.plan.model_ids], release)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector: the piece loop makes a few objects per
    block and frees them by reference counting, but the allocation counts
    still triggered full collections that walked every object of torch and
    numba (~2 % of a TIES merge's CPU time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


NonfiniteHandler = Callable[["TensorTask", torch.Tensor], None]
#: one processed read: compute seconds, and each merged piece (task, first row, rows, buffers to give back)
_Done = tuple[float, list[tuple["TensorTask", int, torch.Tensor, list[torch.Tensor]]]]


def execute_pieces(plan: MergePlan, inputs: dict[str, Checkpoint], jobs: list[_Job], rt: MergeRuntime,
                   out_queue: RowSink, whole_loader: WholeLoader, on_nonfinite: NonfiniteHandler) -> float:
    """Run every job; finished pieces go to ``out_queue.put_rows``. Returns compute seconds."""
    with _collector_paused():
        return _execute_pieces(plan, inputs, jobs, rt, out_queue, whole_loader, on_nonfinite)


def _execute_pieces(plan: MergePlan, inputs: dict[str, Checkpoint], jobs: list[_Job], rt: MergeRuntime,
                    out_queue: RowSink, whole_loader: WholeLoader, on_nonfinite: NonfiniteHandler) -> float:
    # one buffer per input per piece in flight, each as large as the largest input piece
    read_buffers = _BufferPool(max((j.piece_bytes(i) // j.n_in for j in jobs if not j.whole_fp32
                                    for i in range(len(j.pieces))), default=0))
    load = _PieceLoader(plan, inputs, rt.device, whole_loader, read_buffers)
    # merged pieces go to the writer thread in buffers that come back once written: a fresh
    # output buffer per piece page-faulted (and zeroed) every output byte again
    # each output buffer has room to start its piece at the piece's file offset modulo a block
    out_buffers = _BufferPool(max((j.out_piece_bytes(i) for j in jobs for i in range(len(j.pieces))), default=0)
                              + BLOCK)
    compute = 0.0
    last_piece_of_pass = {id(j): len(j.pieces) - 1 for j in jobs}
    trim = HeapTrim()

    def new_output(job: _Job, numel: int, device: torch.device, r0: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dtype = job.task.spec.dtype
        nbytes = numel * dtype.itemsize
        # small outputs (norms, biases) come from malloc's heaps, which reuse them anyway
        buf = out_buffers.take(nbytes + BLOCK) if device.type == "cpu" and nbytes >= _POOLED_OUTPUT else None
        if buf is None:
            return torch.empty(numel, dtype=dtype, device=device), []
        # the piece starts where its file offset falls within a block, so that a direct write sends its
        # whole blocks from here (surgeon.io.direct_write); both are multiples of the element size
        shift = (out_queue.file_offset(job.task, r0) - buf.data_ptr()) % BLOCK
        return buf[shift:shift + nbytes].view(dtype), [buf]

    def process(read: _Read, piece: PieceInputs) -> _Done:
        job = read.job
        c0 = time.perf_counter()
        done = []
        for p in read.passes:
            if p < job.kernel.stat_passes:
                if not job.kernel.pass_needed(p):
                    continue  # the kernel's statistics settled in an earlier pass
                observe_piece(job.kernel, job.meta, p, piece)
                if read.piece == last_piece_of_pass[id(job)]:
                    job.kernel.end_pass(p)
                continue
            if read.piece == 0 and job.kernel.stat_passes and rt.device.type == "cpu":
                trim()  # the tensor's statistics are done: their heap holes go back (if they grew)
            r0, r1 = job.pieces[read.piece]
            shape = job.task.spec.shape
            out, held = new_output(job, piece.numel, piece.models[0].device, r0)
            try:
                finite = merge_piece(job.kernel, job.meta, piece, out)
            except (InvalidInputError, StepError):
                raise
            except (ValueError, RuntimeError) as exc:
                raise StepError(f"step {plan.step_id!r}: method {plan.method.name!r} failed on tensor "
                                f"{job.task.name!r}: {exc}") from None
            if not finite and not rt.allow_nonfinite:
                on_nonfinite(job.task, out)
            done.append((job.task, r0, out.reshape((r1 - r0, *shape[1:]) if shape else ()), held))
        for give_back in piece.release:  # nothing reads the piece any more (outputs are other buffers)
            give_back()
        return time.perf_counter() - c0, done

    def put(result: _Done) -> None:
        nonlocal compute
        compute += result[0]
        for task, r0, rows, held in result[1]:
            out_queue.put_rows(task, r0, rows, (lambda held=held: out_buffers.give(held)) if held else None)

    # On the CPU, several compute threads, each single-threaded: one-piece tensors
    # run side by side on a pool, and each cut tensor on a lane of its own (one
    # thread, its pieces in order), beside them (_Schedule). At most `workers`
    # reads are computed at once; finished ones are handed to the writer as they
    # finish (it places rows at their offsets, in any order).
    # Why not torch's own (OpenMP) threads: a block's ops are small (~30-500 us),
    # so OpenMP's fork/join per op costs a share of every op, and when the cores
    # are shared with other processes a descheduled team member stalls every op
    # (a TIES merge of base + 3 x 1.26B took 61 s with 2 OpenMP threads and 49 s
    # with 2 compute threads on a quiet 2-core machine; a small merge on a busy
    # one 27.9 s against 4.8 s).
    workers = max(1, rt.compute_workers) if rt.device.type == "cpu" else 1
    schedule = _Schedule(jobs, workers)

    def run(read: _Read, piece: PieceInputs) -> _Done:
        try:
            return process(read, piece)
        finally:
            schedule.processed(read)

    with contextlib.ExitStack() as stack:
        pool, lanes = None, []
        if workers > 1:
            stack.enter_context(_torch_threads(1))
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surgeon-merge"))
            lanes = [stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"surgeon-lane{i}"))
                     for i in range(workers)]
        inflight: list[Future[_Done]] = []
        for read, piece in prefetched(iter(schedule), load, rt, _read_bytes):
            if pool is None:
                put(run(read, piece))
            else:
                inflight.append((pool if read.lane is None else lanes[read.lane]).submit(run, read, piece))
            del piece
            while inflight:
                done = [f for f in inflight if f.done()]
                if not done and len(inflight) < workers:
                    break
                if not done:
                    wait(inflight, return_when=FIRST_COMPLETED)
                    continue
                for f in done:
                    inflight.remove(f)
                    put(f.result())
        for f in inflight:
            put(f.result())
    return compute


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _read_bytes(read: _Read) -> int:
    return read.nbytes


T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterator[T | None], load: Callable[[T], R], rt: Prefetch,
               cost: Callable[[T], int]) -> Iterator[tuple[T, R]]:
    """Yield each item with ``load(item)``, loading ahead on ``rt.threads`` threads.

    The one read-ahead loop of the merge step (whole tensors in
    ``merge_step.iter_merges``, row pieces here). Bounded twice: at most
    ``rt.prefetch`` items and ``rt.prefetch_bytes`` (by ``cost``) beyond the
    current one, so the embedding and head matrices, which dwarf every other
    tensor, are never read ahead on top of each other. Nothing past a
    :data:`_SETTLE` mark (``None`` in ``items``) is loaded until the consumer
    has taken every item before it (a consumer that hands items to other
    threads waits for them itself after the mark: :class:`_Schedule`).
    """
    with ThreadPoolExecutor(max_workers=max(1, rt.threads), thread_name_prefix="surgeon-read") as pool:
        queue: deque[tuple[T, int, Future[R]]] = deque()
        waiting: list[T | None] = []
        ahead = 0  # cost queued beyond the head of the queue
        exhausted = False

        def fill(settled: bool) -> None:
            nonlocal ahead, exhausted
            while len(queue) <= rt.prefetch:
                if not waiting:
                    nxt = next(items, _END)
                    if nxt is _END:
                        exhausted = True
                        return
                    waiting.append(nxt)
                item = waiting[0]
                if item is _SETTLE:
                    if queue or not settled:
                        return
                    waiting.clear()
                    continue
                nbytes = cost(item)
                if queue and ahead + nbytes > rt.prefetch_bytes:
                    return
                waiting.clear()
                if queue:
                    ahead += nbytes
                queue.append((item, nbytes, pool.submit(load, item)))

        fill(True)
        while queue:
            item, _, fut = queue.popleft()
            if queue:
                ahead -= queue[0][1]
            loaded = fut.result()
            fill(False)
            yield item, loaded
            del loaded
            if not queue and not exhausted:
                fill(True)  # everything yielded so far is processed: past a settle mark


def iter_pieces(plan: MergePlan, inputs: dict[str, Checkpoint], rt: MergeRuntime, tasks: list[TensorTask],
                whole_loader: WholeLoader) -> Iterator[tuple[TensorTask, PieceInputs]]:
    """Each task's row pieces in order, read ahead (for whole-model statistic
    passes such as TIES' ``trim_scope: model`` pre-pass)."""
    kernels = [(t, Kernel(), TensorMerge.header(t.name, tuple(t.spec.shape), t.model_params, t.params,
                                                plan.base_id is not None)) for t in tasks]
    jobs = plan_jobs(plan, kernels, inputs, rt.piece_bytes or PIECE_BYTES)
    load = _PieceLoader(plan, inputs, rt.device, whole_loader)
    for read, piece in prefetched(_reads(jobs), load, rt, _read_bytes):
        yield read.job.task, piece
