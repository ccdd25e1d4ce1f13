"""Lazy checkpoint reader: names, shapes and dtypes from headers, tensors on demand.

A :class:`Checkpoint` is opened over a folder holding ``model.safetensors`` or
a sharded ``model.safetensors.index.json`` (or over a single ``.safetensors``
file). Opening reads only the headers; :meth:`Checkpoint.get` maps the one
tensor asked for (one ``pread`` into the tensor's own memory; nothing else of
the file is loaded, and nothing stays resident after the tensor is freed). Pickled checkpoints (``*.bin``, ``*.pt``) are refused
unless the caller opts in, and are then loaded with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..arch import layer_index, tied_embeddings
from ..errors import CheckpointError
from .header import Header, dtype_size, read_header
from .mapped import FileMaps, Release
from .safe_files import check_inside, check_regular, open_regular, read_regular

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
AUX_FILES = ("generation_config.json",)
MAX_JSON_BYTES = 256 * 2**20  # config.json / index: far above any real one, bounded against a hostile file


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor; reading it costs nothing."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A lazily read model checkpoint. Use :meth:`open`."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict[str, Any] | None,
                 pickled: dict[str, torch.Tensor] | None = None, label: str | None = None):
        self.path = path
        self.label = label or str(path)
        self._tensors = tensors
        self.config = config
        self._pickled = pickled
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # reader threads open files side by side
        self._maps = FileMaps()

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False, label: str | None = None) -> "Checkpoint":
        """Open a checkpoint folder or a single ``.safetensors`` file."""
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder")
        if not p.is_dir():
            check_regular(p)  # a FIFO, device or socket is refused by name, never opened
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{p}: not a .safetensors file")
            return cls(p.parent, _tensors_of(read_header(p)), _read_config(p.parent), label=label)
        check_folder_files(p)
        config = _read_config(p)
        index = p / INDEX_NAME
        if index.exists():
            return cls(p, _read_index(index), config, label=label)
        single = p / SINGLE_NAME
        files = [single] if single.exists() else sorted(p.glob("*.safetensors"))
        if files:
            tensors: dict[str, TensorInfo] = {}
            for f in files:
                check_inside(f, p)
                for name, info in _tensors_of(read_header(f)).items():
                    if name in tensors:
                        raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
                    tensors[name] = info
            return cls(p, tensors, config, label=label)
        pickles = sorted({f for pat in PICKLE_PATTERNS for f in p.glob(pat)})
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{p}: only pickled weights found ({', '.join(f.name for f in pickles)}); pickle files can run code "
                    "when loaded, so surgeon refuses them by default. Convert them to safetensors, or pass "
                    "--allow-pickle (they are then loaded with torch.load(weights_only=True))."
                )
            return cls._open_pickled(p, pickles, config, label)
        raise CheckpointError(f"{p}: no model.safetensors, {INDEX_NAME} or *.safetensors file in this folder")

    @classmethod
    def _open_pickled(cls, p: Path, files: list[Path], config: dict[str, Any] | None, label: str | None) -> "Checkpoint":
        state: dict[str, torch.Tensor] = {}
        for f in files:
            check_inside(f, p)
            check_regular(f)
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise CheckpointError(f"{f}: cannot load with weights_only=True ({exc})") from None
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(loaded).__name__}")
            state.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
        tensors = {
            k: TensorInfo(k, tuple(v.shape), v.dtype, files[0], 0, v.numel() * v.element_size()) for k, v in state.items()
        }
        return cls(p, tensors, config, pickled=state, label=label)

    # -- metadata -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor {name!r}") from None

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._tensors.values())

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self._tensors.values()})

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self._tensors.values())

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    @property
    def has_tokenizer(self) -> bool:
        return any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in self.tokenizer_files)

    @property
    def tied_embeddings(self) -> bool:
        """Whether the config ties the output head to the input embeddings (:func:`surgeon.arch.tied_embeddings`)."""
        return tied_embeddings(self.config, self._tensors)

    @property
    def num_layers(self) -> int | None:
        cfg = self.config or {}
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        idx = [i for i in (layer_index(n) for n in self._tensors) if i is not None]
        return max(idx) + 1 if idx else None

    # -- reading --------------------------------------------------------------
    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """Read one tensor (a private copy), optionally cast and moved."""
        info = self.info(name)
        t = self._pickled[name].clone() if self._pickled is not None else self._read(info)
        return cast_to(t, dtype, device)

    def get_rows(self, name: str, start: int, stop: int, pin: bool = False,
                 out: torch.Tensor | None = None, keep: bool = True) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor along its first dimension, in its
        stored dtype: one ``pread`` of that contiguous byte range (safetensors
        stores tensors row-major), so a merge can stream a tensor larger than
        it wants to hold. ``pin`` reads into page-locked memory, for an
        asynchronous copy to a GPU; ``out`` (a uint8 tensor at least that
        large) is a buffer to read into instead of a fresh one. ``keep=False``
        tells a reader that caches what it fetches (hub streaming) that these
        bytes will not be asked for again; a file needs no such hint."""
        info = self.info(name)
        offset, nbytes, shape = self._row_bytes(info, start, stop)
        if self._pickled is not None or type(self).get is not Checkpoint.get:
            t = self.get(name)
            return t[start:stop].clone() if info.shape else t.reshape(1)[start:stop].reshape(())
        buf = self._read_bytes(info, offset, nbytes, pin=pin, out=out, keep=keep)
        return buf.view(info.dtype).reshape(shape)

    def _row_bytes(self, info: TensorInfo, start: int, stop: int) -> tuple[int, int, tuple[int, ...]]:
        """Rows ``[start, stop)`` of a tensor: their file offset, byte count and shape (checked in range)."""
        rows = info.shape[0] if info.shape else 1
        if not 0 <= start <= stop <= rows:
            raise CheckpointError(f"{self.label}: rows {start}:{stop} out of range for tensor {info.name!r} ({rows} rows)")
        row_bytes = info.nbytes // rows if rows else 0
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return info.offset + start * row_bytes, (stop - start) * row_bytes, shape

    def _plain_reads(self) -> bool:
        """Whether a tensor's bytes are read straight from its file (not pickled weights, not a
        reader that overrides how bytes are read): what :meth:`map_rows` and
        :meth:`read_row_bytes` need."""
        return (self._pickled is None and type(self).get is Checkpoint.get
                and type(self).get_rows is Checkpoint.get_rows and type(self)._read_bytes is Checkpoint._read_bytes)

    def map_rows(self, name: str, start: int, stop: int) -> tuple[torch.Tensor, Release] | None:
        """Rows ``[start, stop)`` as :meth:`get_rows` gives them, but viewing
        the file's cached pages instead of a copy (:mod:`surgeon.io.mapped`),
        with the :class:`~surgeon.io.mapped.Release` that hands those pages back
        once the caller is done with the rows (the view stays readable after);
        pages map as they are read.
        None where a view does not apply (pickled weights, a reader that
        overrides how bytes are read, a range a mapping cannot serve): read
        with :meth:`get_rows` then."""
        info = self.info(name)
        if not self._plain_reads():
            return None
        offset, nbytes, shape = self._row_bytes(info, start, stop)
        mapped = self._maps.view(info.file, self._fd(info), offset, nbytes, info.dtype.itemsize)
        if mapped is None:
            return None
        t, release = mapped
        return t.view(info.dtype).reshape(shape), release

    def read_row_bytes(self, name: str, start: int, stop: int) -> bytearray | None:
        """Rows ``[start, stop)`` of a tensor as their stored bytes (row-major, the
        header's dtype), read with ``pread`` into a new bytearray: for small reads (a few
        KB) where a torch buffer's per-call cost or a mapping's faults and page-table
        teardown would cost more than the copy. None where :meth:`map_rows` would
        be None too (pickled weights, a reader that overrides how bytes are read)."""
        info = self.info(name)
        if not self._plain_reads():
            return None
        offset, nbytes, _ = self._row_bytes(info, start, stop)
        data = bytearray(nbytes)
        self._pread_into(info, memoryview(data), offset)
        return data

    def _fd(self, info: TensorInfo) -> int:
        with self._fds_lock:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = open_regular(info.file)
                self._fds[info.file] = fd
            return fd

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self._read_bytes(info, info.offset, info.nbytes).view(info.dtype).reshape(info.shape)

    def _read_bytes(self, info: TensorInfo, offset: int, nbytes: int, pin: bool = False,
                    out: torch.Tensor | None = None, keep: bool = True) -> torch.Tensor:
        """Read a tensor's bytes straight into a fresh buffer with ``pread``
        (``keep``, :meth:`get_rows`' hint, is for readers that cache).

        A tensor read here is the caller's own memory, freed with the tensor.
        (The piece engine views its pieces through :meth:`map_rows` instead and
        hands their pages back itself: no copy.)
        """
        buf = byte_buffer(nbytes, pin, out)
        if nbytes:
            self._pread_into(info, memoryview(buf.numpy()), offset)
        return buf

    def _pread_into(self, info: TensorInfo, view: memoryview, offset: int) -> None:
        """Fill ``view`` with tensor ``info``'s file bytes from ``offset`` on (``pread``
        until full; a failed or short read is a :class:`CheckpointError`)."""
        fd = self._fd(info)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise CheckpointError(f"{info.file}: reading tensor {info.name!r} failed ({exc.strerror or exc})") from None
            if n == 0:
                raise CheckpointError(f"{info.file}: file ended while reading tensor {info.name!r} (truncated?)")
            done += n

    def close(self) -> None:
        self._maps.forget()  # a mapping goes with its last view (closing it would unmap live views)
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self)} tensors)"


def cast_to(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
    """``t`` cast to ``dtype`` and moved to ``device`` where given and different (what every ``get`` ends with)."""
    if dtype is not None and dtype != t.dtype:
        t = t.to(dtype)
    if device is not None and torch.device(device) != t.device:
        t = t.to(device)
    return t


def byte_buffer(nbytes: int, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` to read into: a view of ``out`` when it is a large enough contiguous
    uint8 tensor, else a fresh one (page-locked when ``pin``)."""
    if out is not None and out.dtype == torch.uint8 and out.numel() >= nbytes and out.is_contiguous():
        return out.reshape(-1)[:nbytes]
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin and nbytes > 0)


def _tensors_of(header: Header) -> dict[str, TensorInfo]:
    return {
        e.name: TensorInfo(e.name, e.shape, e.dtype, header.path, header.data_start + e.start, e.nbytes)
        for e in header.entries.values()
    }


def check_folder_files(folder: Path) -> None:
    """Refuse a model folder whose config, index, tokenizer or auxiliary file is not a regular file
    inside it (a FIFO, a device, a symlink to a file elsewhere): see surgeon.io.safe_files."""
    for name in ("config.json", INDEX_NAME, SINGLE_NAME, *TOKENIZER_FILES, *AUX_FILES):
        f = folder / name
        if os.path.lexists(f):
            check_inside(f, folder)
            check_regular(f)


def _read_config(folder: Path) -> dict[str, Any] | None:
    f = folder / "config.json"
    if not f.exists():
        return None
    check_inside(f, folder)
    try:
        cfg = json.loads(read_regular(f, limit=MAX_JSON_BYTES).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting, huge integers
        raise CheckpointError(f"{f}: not valid JSON ({exc or 'nested too deeply'})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return cfg


def _read_index(index: Path) -> dict[str, TensorInfo]:
    raw = read_regular(index, limit=MAX_JSON_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, RecursionError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({exc or 'nested too deeply'})") from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index}: tensor {name!r}: shard name must be a string, got {fname!r}")
        # the name must stay inside the folder; the file itself may be a symlink (huggingface-hub's cache
        # links every snapshot file to a blob elsewhere), so check the path without resolving links
        folder = Path(os.path.abspath(index.parent))
        shard = Path(os.path.normpath(folder / str(fname)))
        if folder not in shard.parents:
            raise CheckpointError(f"{index}: tensor {name!r} points outside the checkpoint folder ({fname!r})")
        if fname not in headers:
            if not shard.exists():
                raise CheckpointError(f"{index}: tensor {name!r} is in shard {fname!r}, which does not exist")
            check_inside(shard, folder)  # a link may lead into the hub cache's blobs, nowhere else
            headers[fname] = _tensors_of(read_header(shard))
        if name not in headers[fname]:
            raise CheckpointError(f"{index}: tensor {name!r} is not in shard {fname!r}")
        tensors[name] = headers[fname][name]
    return tensors


def element_size(dtype: torch.dtype) -> int:
    return dtype_size(dtype)
