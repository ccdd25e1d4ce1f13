"""Bounded, validating reader of safetensors headers.

safetensors files start with an 8-byte little-endian header length and a JSON
header mapping tensor names to ``{dtype, shape, data_offsets}``. We parse it
ourselves (rather than only through ``safe_open``) so that every defect gets a
message naming the file and tensor, and so that a hostile header cannot make us
allocate without bound: the header length is capped before anything is read.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
#: tensors one header may list: far above any real shard (the largest models have ~100k tensors in
#: all), bounding the time and memory a hostile header of millions of empty tensors costs
MAX_TENSORS = 300_000
#: a dimension torch can index (int64)
MAX_DIM = 2**63 - 1

# safetensors dtype codes -> torch dtypes (fp8 only where this torch has them)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (``torch.dtype.itemsize``: torch >= 2.1; an empty
    tensor per call cost ~0.1 s of a merge's writer thread, which asks per piece)."""
    return dtype.itemsize


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # absolute offset of the data section
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]


def parse_header_bytes(raw: bytes, file_size: int, where: str) -> Header:
    """Validate a complete safetensors prefix (length + JSON) already read."""
    if len(raw) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or hostile file)")
    if 8 + n > file_size:
        raise CheckpointError(f"{where}: header length {n} runs past the end of the file ({file_size} bytes): truncated file")
    body = raw[8 : 8 + n]
    count = body.count(b'"data_offsets"')
    if count > MAX_TENSORS:
        raise CheckpointError(f"{where}: header lists {count} tensors, more than the {MAX_TENSORS} one file may hold "
                              "(corrupt or hostile file)")
    try:
        meta = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of over 4300 digits
        raise CheckpointError(f"{where}: header is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: header JSON is nested too deeply (corrupt or hostile file)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    data_len = file_size - 8 - n
    entries: dict[str, HeaderEntry] = {}
    metadata: dict[str, str] = {}
    for name, info in meta.items():
        _check_text(name, where, "a tensor name")
        if name == "__metadata__":
            if info is None:  # the safetensors library reads null as no metadata
                continue
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{where}: __metadata__ must map names to strings, got {_short(info)}")
            for k, v in info.items():
                _check_text(k, where, "a metadata key")
                _check_text(v, where, f"metadata {k!r}")
            metadata = dict(info)
            continue
        entries[name] = _entry(name, info, data_len, where)
    _check_layout(entries, data_len, where)
    return Header(Path(where), 8 + n, entries, metadata)


def _entry(name: str, info: object, data_len: int, where: str) -> HeaderEntry:
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: tensor {name!r}: header entry is not an object")
    code = info.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(f"{where}: tensor {name!r}: unknown or unsupported dtype {code!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r}: invalid shape {_short(shape)}")
    if any(d > MAX_DIM for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r}: shape {_short(shape)} has a dimension beyond 2^63-1 "
                              "(corrupt or hostile file)")
    offs = info.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise CheckpointError(f"{where}: tensor {name!r}: invalid data_offsets {offs!r}")
    if offs[1] > data_len:
        raise CheckpointError(
            f"{where}: tensor {name!r}: data_offsets {offs} run past the end of the file (data section is {data_len} bytes): truncated file"
        )
    dtype = DTYPES[code]
    expected = math.prod(shape) * dtype_size(dtype)
    if offs[1] - offs[0] != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r}: {offs[1] - offs[0]} bytes stored but shape {shape} of {code} needs {expected}"
        )
    return HeaderEntry(name, dtype, tuple(shape), offs[0], offs[1])


def _check_layout(entries: dict[str, HeaderEntry], data_len: int, where: str) -> None:
    """The tensors, in offset order, tile the data section exactly (the safetensors library's rule):
    no overlap, no gap, nothing after the last one."""
    ordered = sorted(entries.values(), key=lambda e: (e.start, e.end))
    prev: HeaderEntry | None = None
    pos = 0
    for e in ordered:
        if e.start < pos and prev is not None:
            raise CheckpointError(f"{where}: tensors {prev.name!r} and {e.name!r} overlap in the file")
        if e.start > pos:
            raise CheckpointError(f"{where}: tensor {e.name!r}: bytes {pos} to {e.start} of the data section belong "
                                  "to no tensor (a gap: corrupt file)")
        pos, prev = e.end, e
    if pos != data_len:
        raise CheckpointError(f"{where}: the data section has {data_len - pos} bytes after the last tensor "
                              "(junk or a corrupt header)")


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Duplicate(f"{dup!r} appears twice in the header (corrupt or hostile file)")
    return out


def _check_text(text: str, where: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{where}: {what} {text!r} holds a lone surrogate (not valid Unicode)") from None


def _short(obj: object) -> str:
    r = repr(obj)
    return r if len(r) <= 80 else r[:77] + "..."


def read_header(path: Path) -> Header:
    """Read and validate the header of one safetensors file (bounded read)."""
    where = str(path)
    from .safe_files import open_regular

    fd = open_regular(path)  # regular files only: a FIFO or device is refused by name, never blocks
    try:
        size = os.fstat(fd).st_size
        with open(fd, "rb", closefd=False) as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or hostile file)"
                )
            if 8 + n > size:
                raise CheckpointError(f"{where}: header length {n} runs past the end of the file ({size} bytes): truncated file")
            body = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return parse_header_bytes(head + body, size, where)
