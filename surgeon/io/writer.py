"""Sharded, atomic safetensors writer.

The writer is given the full list of output tensors (name, shape, dtype) up
front — the engine's plan knows it before any weight is read. That lets it lay
out every shard and write every header immediately, then place each tensor at
its final offset with ``pwrite`` as it arrives, in any order. Memory therefore
never holds more than the tensor being written (no shard buffering), no byte
is copied twice, and several processes could fill different shards. One
process writes its shards past the page cache (:mod:`surgeon.io.direct_write`);
several, or ``SURGEON_KEEP_WRITE_CACHE=1``, write buffered (:class:`DropBehind`).

Everything happens in a staging folder beside the destination
(``.NAME.surgeon-partial``); :meth:`CheckpointWriter.commit` renames it into
place only when every tensor and file is written and synced. A failed run
removes the staging folder; an interrupted one (Ctrl-C, SIGKILL) leaves it, and
a new writer with the same layout resumes it, skipping the tensors its journal
lists as written. The output therefore is either absent, the previous
version, or complete — never half-written.

The shard naming and index format follow transformers: ``model.safetensors``
or ``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``
with ``metadata.total_size`` and a sorted ``weight_map``.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import settings
from ..errors import InvalidInputError, StepError
from .direct_write import AlignedBuffer, DirectFile, open_direct
from .destination import MARKER, check_destination, destination_lock, written_by_surgeon
from .header import CODES, dtype_size
from .safe_files import check_inside, read_regular
from .stream_hash import ShardDigest, ShardHashStream
from .vocab_check import check_tokenizer_fits

DEFAULT_MAX_SHARD = 5 * 10**9
#: files whose ``auto_map`` points at Python code; outputs never carry that code, so never the map
_CODE_MAP_FILES = ("config.json", "tokenizer_config.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """``'2GB'`` -> 2_000_000_000; ``'500MiB'``; plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidInputError(f"size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise InvalidInputError(f"cannot read size {value!r} (use bytes or units like 500MB, 2GB, 1GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise InvalidInputError(f"size must be positive, got {value!r}")
    return size


#: stored dtypes narrower in range than float32: a finite float32 result can overflow when cast to them
_NARROW = tuple(getattr(torch, n) for n in ("float16", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass
class _Slot:
    file: str
    offset: int  # absolute offset in the shard file
    spec: TensorSpec


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Cut the tensors, in order, into shards of at most ``max_shard_size``.

    A tensor larger than the limit gets a shard of its own (as transformers
    does); shards are never empty.
    """
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header for one shard and each tensor's offset in its data section.

    Tensors are laid out by decreasing element size then name, like the
    safetensors library, so every tensor starts aligned to its element size.
    """
    ordered = sorted(specs, key=lambda s: (-dtype_size(s.dtype), s.name))
    offsets: dict[str, int] = {}
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for s in ordered:
        header[s.name] = {"dtype": CODES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class DropBehind:
    """Write back the output early and drop it from the page cache behind us.

    Why. Written bytes sit in the page cache as dirty pages until the final
    ``fsync``; a multi-GB output therefore takes that much fresh memory from
    the kernel, evicts the inputs' cached pages, and pays to set up every new
    page. On the 2-core development VM buffered writes ran at ~0.3 GB/s of
    system time (``copy_folio_from_iter_atomic``: 7 of a TIES merge's 65 CPU
    seconds) but at 1.4-1.8 GB/s, ``fsync`` included, with this scheme, which
    recycles the same few hundred MB of pages. Each range gets
    ``POSIX_FADV_DONTNEED`` twice: right after its ``pwrite`` (the kernel
    starts writing it back: dirty pages are not dropped) and again
    :data:`LAG` writes later, when it is clean and can go. Nothing changes on
    disk and the final ``fsync`` still makes it durable; platforms without
    ``posix_fadvise`` write as before.
    """

    #: writes (pieces or tensors) a range stays cached before it is dropped
    LAG = 8

    def __init__(self) -> None:
        self._recent: collections.deque[tuple[int, int, int]] = collections.deque()
        self._on = hasattr(os, "posix_fadvise") and not settings.current().keep_write_cache

    def wrote(self, fd: int, offset: int, length: int) -> None:
        if not self._on or length <= 0:
            return
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            self._recent.append((fd, offset, length))
            while len(self._recent) > self.LAG:
                os.posix_fadvise(*self._recent.popleft(), os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only: a file system that refuses it just keeps its cache
            self._on = False


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor without an extra copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class CheckpointWriter:
    """Writes one checkpoint folder atomically. Use as a context manager.

    >>> with CheckpointWriter(dest, specs) as w:     # doctest: +SKIP
    ...     for name, t in results: w.write(name, t)
    ...     w.write_json("config.json", cfg)
    ...     w.commit()
    """

    JOURNAL = ".surgeon-written"
    LAYOUT = ".surgeon-layout.json"

    def __init__(
        self,
        dest: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        resume: bool = True,
        coordinator: Any = None,
        resume_key: str | None = None,
        allow_nonfinite: bool = False,
        watch: Callable[[str, tuple[int, ...], int, torch.Tensor], None] | None = None,
        hash_shards: bool = True,
    ):
        self.dest = Path(dest)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidInputError(f"output tensor {dup!r} is planned twice")
        self.max_shard_size = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self.resume = resume
        self.resume_key = resume_key  # the engine passes each step's fingerprint (StepContext.open_writer)
        self.staging = self.dest.parent / f".{self.dest.name}.surgeon-partial"
        from .distributed import SINGLE, assign_owners

        self.coord = coordinator or SINGLE
        owners = assign_owners([s.nbytes for s in self.specs], self.coord.world)
        self._owner = {s.name: r for s, r in zip(self.specs, owners)}
        self._slots: dict[str, _Slot] = {}
        self._files: list[str] = []
        self._fds: dict[str, int] = {}
        self._direct: dict[str, DirectFile] = {}  # shard files written with O_DIRECT (open_direct)
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}  # bytes placed so far of tensors written in parts
        self._journal: Any = None
        self._behind = DropBehind()
        self._streams: dict[str, ShardHashStream] = {}  # sha256 of each shard, hashed as it is written
        self._committed = False
        self._lock: contextlib.ExitStack | None = None
        # write Inf/NaN in float16/float8 tensors instead of refusing them (--allow-nonfinite;
        # the engine passes the run's choice through StepContext.open_writer)
        self.allow_nonfinite = bool(allow_nonfinite)
        #: after commit: shard file name -> its sha256, hashed while it was written (shards the
        #: writer could not hash as a stream, e.g. resumed ones, are absent); the engine's report uses them
        self.digests: dict[str, ShardDigest] = {}
        self.resumed_tensors = 0
        #: hash each shard while writing it (:attr:`digests`); False: no digests (nothing asked for them:
        #: SHA-256 runs at ~1.7 GB/s a core, a third of a 1.1B linear merge's compute)
        self.hash_shards = bool(hash_shards)
        #: called as ``watch(name, shape, start_row, rows)`` after rows of a tensor are placed
        #: (a whole tensor: start 0, all rows), on the writing thread (StepContext.watch_output)
        self.watch = watch

    # -- lifecycle --------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None and not self._committed:
            self.abort()
            raise StepError(f"{self.dest}: writer closed without commit; nothing was written")
        if exc_type is not None:
            keep = issubclass(exc_type, KeyboardInterrupt) and self.resume
            self.abort(keep_partial=keep)
            if keep and exc is not None and self.coord.is_main:
                note = f"{len(self._written)} of {len(self.specs)} tensors of {self.dest.name} ({self.staging})"
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # add_note() needs Python 3.11

    def open(self) -> None:
        """Lay out the shards (rank 0) or join them (other ranks); resume a matching partial write.

        Rank 0 first checks the destination (surgeon.io.destination: a folder, surgeon's own if it is to
        be replaced) and takes its lock, held until commit or abort: one writer per destination.
        """
        if self.coord.is_main:
            check_destination(self.dest, overwrite=self.overwrite)
            self._lock = contextlib.ExitStack()
            try:
                self._lock.enter_context(destination_lock(self.dest))
            except BaseException:
                self._lock = None
                raise
        elif self.dest.exists() and not self.overwrite:
            raise InvalidInputError(f"{self.dest}: already exists (pass --overwrite to replace it)")
        shards = plan_shards(self.specs, self.max_shard_size)
        self._files = shard_names(len(shards))
        layout = self._layout_fingerprint(shards)
        error = None
        if self.coord.is_main:
            try:
                self._prepare_staging(shards, layout)
            except StepError as exc:
                error = str(exc)
        error = self.coord.broadcast_object(error)  # also a barrier: the files exist now
        if error is not None:
            self.abort()
            raise StepError(error)
        try:
            self._open_shards(shards)
            self._written = self._journaled()
            self.resumed_tensors = len(self._written)
            if self._written or self.coord.world > 1:
                self._streams.clear()  # bytes this process will not place: hash the files at the end instead
            self._journal = open(self._journal_path(self.coord.rank), "a", encoding="ascii")
        except OSError as exc:
            self.abort()
            raise StepError(f"{self.staging}: cannot open the partial output ({exc.strerror or exc})") from None

    def _prepare_staging(self, shards: list[list[TensorSpec]], layout: dict[str, Any]) -> None:
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StepError(f"{self.dest.parent}: cannot create output folder ({exc.strerror or exc})") from None
        if self.staging.exists():
            if self.resume and self._same_layout(layout):
                return
            shutil.rmtree(self.staging, ignore_errors=True)
        path = self.staging
        try:
            self.staging.mkdir(parents=True)
            for fname, shard in zip(self._files, shards):
                header, _ = _header_bytes(shard, self.metadata)
                path = self.staging / fname
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.pwrite(fd, header, 0)
                    os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
                finally:
                    os.close(fd)
            path = self.staging / self.LAYOUT
            path.write_text(json.dumps(layout))
        except OSError as exc:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise StepError(f"{path}: cannot prepare output ({exc.strerror or exc})") from None

    def _open_shards(self, shards: list[list[TensorSpec]]) -> None:
        buffer = None  # the direct writes' copy buffer, one for every shard
        for fname, shard in zip(self._files, shards):
            header, offsets = _header_bytes(shard, self.metadata)
            self._fds[fname] = os.open(self.staging / fname, os.O_RDWR)
            size = len(header) + sum(s.nbytes for s in shard)
            if self._direct_writes():
                buffer = buffer or AlignedBuffer()
                direct = open_direct(self.staging / fname, size, self._fds[fname], buffer)
                if direct is not None:
                    self._direct[fname] = direct
            if self.hash_shards:
                self._streams[fname] = ShardHashStream(self._fds[fname], size, header)
            for s in shard:
                self._slots[s.name] = _Slot(fname, len(header) + offsets[s.name], s)

    def _direct_writes(self) -> bool:
        """Whether shards go past the page cache: one process writes them (several would
        patch the blocks they share at once) and nobody asked to keep the output cached."""
        return self.coord.world == 1 and not settings.current().keep_write_cache

    def _journal_path(self, rank: int) -> Path:
        return self.staging / (self.JOURNAL if rank == 0 else f"{self.JOURNAL}.{rank}")

    def _journaled(self) -> set[str]:
        """Tensors every rank's journal lists (a kill can cut the last line: only full lines count)."""
        done: set[str] = set()
        for journal in self.staging.glob(self.JOURNAL + "*"):
            lines = journal.read_text(encoding="utf-8").split("\n")
            for line in lines[:-1]:  # one JSON string a line: names may hold newlines (docs/reliability.md)
                try:
                    n = json.loads(line)
                except ValueError:
                    continue  # a journal of an older format: those tensors are written again
                if isinstance(n, str) and n in self._slots:
                    done.add(n)
        return done

    def _layout_fingerprint(self, shards: list[list[TensorSpec]]) -> dict[str, Any]:
        desc = [[(s.name, list(s.shape), CODES[s.dtype]) for s in shard] for shard in shards]
        key = [desc, self.metadata] + ([self.resume_key] if self.resume_key else [])
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        return {"sha256": digest, "files": self._files}

    def _same_layout(self, layout: dict[str, Any]) -> bool:
        try:
            return json.loads((self.staging / self.LAYOUT).read_text()) == layout
        except (OSError, ValueError):
            return False

    # -- writing ----------------------------------------------------------------
    @property
    def pending(self) -> list[str]:
        """Tensors this process still has to write, in plan order (its share when distributed)."""
        return [s.name for s in self.specs if s.name not in self._written and self.owns(s.name)]

    def owns(self, name: str) -> bool:
        return self._owner.get(name, 0) == self.coord.rank

    def is_written(self, name: str) -> bool:
        return name in self._written

    def position(self, name: str) -> tuple[int, int]:
        """Where a planned tensor lands: (shard, byte offset). Work done in this
        order places bytes in file order, where each shard's running sha256 takes
        them as they come (out of order, they wait and are read back:
        :mod:`surgeon.io.stream_hash`); a shard lays its tensors out by name,
        not in the plan's order."""
        slot = self._slots[name]
        return self._files.index(slot.file), slot.offset

    def byte_offset(self, name: str, start_row: int = 0) -> int:
        """Where row ``start_row`` of a planned tensor lands in its shard file, in bytes (callers
        that can choose where a piece sits in memory put it at the same offset modulo
        :data:`surgeon.io.direct_write.BLOCK`: it is then written without a copy)."""
        slot = self._slots[name]
        rows = slot.spec.shape[0] if slot.spec.shape else 1
        return slot.offset + start_row * (slot.spec.nbytes // rows if rows else 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Place one tensor at its final offset (shape and dtype must match the plan)."""
        slot = self._slots.get(name)
        if slot is None:
            raise StepError(f"{self.dest}: tensor {name!r} was not planned for this checkpoint")
        if tuple(tensor.shape) != slot.spec.shape or tensor.dtype != slot.spec.dtype:
            raise StepError(
                f"{self.dest}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {slot.spec.shape} {slot.spec.dtype}"
            )
        self._check_stored(name, tensor)
        self._place(slot, name, tensor_bytes(tensor), 0)
        if self.watch is not None:
            self.watch(name, slot.spec.shape, 0, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Place rows ``[start, start + len(rows))`` of a tensor (first dimension).

        The tensor counts as written (journal, resume) once all its bytes have
        been placed; parts may come in any order but must not overlap.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise StepError(f"{self.dest}: tensor {name!r} was not planned for this checkpoint")
        shape = slot.spec.shape
        total_rows = shape[0] if shape else 1
        row_shape = tuple(shape[1:]) if shape else ()
        if rows.dtype != slot.spec.dtype or (shape and tuple(rows.shape[1:]) != row_shape) \
                or not 0 <= start <= start + (rows.shape[0] if shape else 1) <= total_rows:
            raise StepError(f"{self.dest}: rows {start}+{tuple(rows.shape)} {rows.dtype} do not fit tensor {name!r} "
                            f"planned {shape} {slot.spec.dtype}")
        row_bytes = slot.spec.nbytes // total_rows if total_rows else 0
        self._check_stored(name, rows)
        self._place(slot, name, tensor_bytes(rows), start * row_bytes)
        if self.watch is not None:
            self.watch(name, shape, start, rows)

    def _check_stored(self, name: str, t: torch.Tensor) -> None:
        """Refuse Inf/NaN in the stored values of a narrow float dtype (float16, float8).

        Merges check their float32 results; the cast to a narrower dtype can still overflow
        (float16 holds at most 65504), so the values are checked again as they will be stored.
        """
        if self.allow_nonfinite or t.dtype not in _NARROW or t.numel() == 0:
            return
        finite = torch.isfinite(t) if t.dtype == torch.float16 else torch.isfinite(t.float())
        if bool(finite.all()):
            return
        bad = int((~finite).sum())
        dtype = str(t.dtype).removeprefix("torch.")
        raise StepError(f"{self.dest}: tensor {name!r} has {bad} Inf/NaN values when stored as {dtype} "
                        f"(its range is +-{torch.finfo(t.dtype).max:g}): the values overflow on the final cast; "
                        "use `dtype: bfloat16` (or --dtype bfloat16), or --allow-nonfinite to write it anyway")

    def _place(self, slot: _Slot, name: str, data: memoryview, at: int) -> None:
        """``pwrite`` bytes ``at`` bytes into a tensor's slot; journal the tensor once all of it is placed."""
        fd = self._fds[slot.file]
        direct = self._direct.get(slot.file)
        try:
            if direct is not None:
                direct.pwrite(data, slot.offset + at)
            else:
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], slot.offset + at + done)
            stream = self._streams.get(slot.file)
            if direct is not None:
                if stream is not None:  # waiting ranges are read back (from the device) through ``fd``
                    stream.placed(slot.offset + at, data)
            elif stream is None:
                self._behind.wrote(fd, slot.offset + at, len(data))
            else:  # drop only what is hashed: waiting ranges are read back from the cache
                before = stream.prefix
                self._behind.wrote(fd, before, stream.placed(slot.offset + at, data) - before)
            filled = self._filled.pop(name, 0) + len(data)
            if filled >= slot.spec.nbytes:
                self._journal.write(json.dumps(name) + "\n")  # ASCII: a newline or lone surrogate cannot split it
                self._journal.flush()
                self._written.add(name)
            else:
                self._filled[name] = filled
        except OSError as exc:
            raise StepError(
                f"{self.staging / slot.file}: writing tensor {name!r} failed ({exc.strerror or exc})"
            ) from None

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write an auxiliary file (config, tokenizer, card) into the checkpoint (rank 0 only)."""
        if not self.coord.is_main:
            return
        path = self.staging / relpath
        if path.resolve().parent != self.staging.resolve() and self.staging.resolve() not in path.resolve().parents:
            raise StepError(f"{relpath!r}: refusing to write outside the output folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            raise StepError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def write_json(self, relpath: str, obj: Any) -> None:
        if relpath in _CODE_MAP_FILES and isinstance(obj, dict) and "auto_map" in obj:
            obj = {k: v for k, v in obj.items() if k != "auto_map"}  # it points at code no output contains
        self.write_bytes(relpath, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())

    def write_text(self, relpath: str, text: str) -> None:
        self.write_bytes(relpath, text.encode("utf-8"))

    def copy_file(self, src: Path, relpath: str | None = None, folder: Path | None = None) -> None:
        """Copy an input's auxiliary file (tokenizer, generation config) into the checkpoint.

        ``src`` must be a regular file inside ``folder`` (default: its own
        folder): a symlink leading out of the model folder, a FIFO or a device
        is refused by name (see surgeon.io.safe_files). ``auto_map`` is dropped
        from a copied ``tokenizer_config.json`` / ``config.json``.
        """
        src = Path(src)
        check_inside(src, folder if folder is not None else src.parent)
        data = read_regular(src)
        name = relpath or src.name
        if Path(name).name in _CODE_MAP_FILES and b"auto_map" in data:
            try:
                obj = json.loads(data.decode("utf-8"))
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict) and "auto_map" in obj:
                self.write_json(name, obj)
                return
        self.write_bytes(name, data)

    # -- finishing --------------------------------------------------------------
    def commit(self) -> Path:
        """Check completeness, sync, write the index, and rename into place (rank 0, after every rank).

        Returns the destination; :attr:`digests` then holds the shards' sha256 hashed while writing."""
        try:
            while self._direct:
                self._direct.popitem()[1].close()
            for fd in self._fds.values():
                os.fsync(fd)
                os.close(fd)
            self._fds.clear()
            if self._journal is not None:
                self._journal.close()
                self._journal = None
        except OSError as exc:
            self.abort()
            raise StepError(f"{self.staging}: syncing the shards failed ({exc.strerror or exc})") from None
        self.coord.barrier()
        error = None
        if self.coord.is_main:
            try:
                self._finish_main()
            except (StepError, InvalidInputError) as exc:
                error = str(exc)
        error = self.coord.broadcast_object(error)
        if error is not None:
            self.abort()
            raise StepError(error)
        self._committed = True
        self._unlock()
        return self.dest

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _finish_main(self) -> None:
        written = self._journaled()
        missing = [s.name for s in self.specs if s.name not in written]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise StepError(f"{self.dest}: {len(missing)} planned tensors were never written: {', '.join(missing[:3])}{more}")
        check_tokenizer_fits(self.staging, self.specs, self.dest)  # a tokenizer beyond the embedding rows
        try:
            if len(self._files) > 1:
                weight_map = {name: slot.file for name, slot in sorted(self._slots.items())}
                total = sum(s.nbytes for s in self.specs)
                self.write_json("model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
            for extra in [self.LAYOUT, *(j.name for j in self.staging.glob(self.JOURNAL + "*"))]:
                (self.staging / extra).unlink(missing_ok=True)
            (self.staging / MARKER).write_text('{"written_by": "surgeon"}\n')  # --overwrite may replace it later
            sync_dir(self.staging)
            self._swap_into_place()
            for fname, stream in self._streams.items():
                sha = stream.hexdigest()
                known = ShardDigest.of(self.dest / fname, sha) if sha is not None else None
                if known is not None:
                    self.digests[fname] = known
        except OSError as exc:
            raise StepError(f"{self.dest}: finishing the checkpoint failed ({exc.strerror or exc})") from None

    def _swap_into_place(self) -> None:
        old = None
        if self.dest.exists():
            if not self.overwrite:
                raise InvalidInputError(f"{self.dest}: appeared while writing; not replacing it")
            if not self.dest.is_dir() or not written_by_surgeon(self.dest):
                raise InvalidInputError(f"{self.dest}: appeared while writing and was not written by surgeon; "
                                        "not replacing it")
            old = self.dest.parent / f".{self.dest.name}.surgeon-old"
            _remove_tree(old)
            os.rename(self.dest, old)
        os.rename(self.staging, self.dest)
        sync_dir(self.dest.parent)
        if old is not None:
            _remove_tree(old)


    def abort(self, keep_partial: bool = False) -> None:
        """Close files; remove the staging folder (rank 0) unless asked to keep it for resuming."""
        while self._direct:
            self._direct.popitem()[1].abandon()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError:
                pass
            self._journal = None
        if not keep_partial and self.coord.is_main and not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()


def _remove_tree(path: Path) -> None:
    """Remove a folder surgeon wrote, read-only parts included (a previous output made read-only)."""
    def writable_then_retry(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o755)
            func(p)

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=writable_then_retry)


def sync_dir(path: Path) -> None:
    """fsync a folder so renames inside it survive a crash (best effort: errors are ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
