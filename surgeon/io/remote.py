"""Header-only checkpoints of hub models: shapes and dtypes without the weights.

``surgeon validate`` and ``surgeon plan`` on a recipe that names hub models must
not download gigabytes to find out that two models have different widths. A
:class:`RemoteCheckpoint` is built from the safetensors headers of the model's
shards, read with HTTP range requests (the same ``/resolve/`` URLs, session,
authentication and redirects ``huggingface_hub`` uses for its own
``get_safetensors_metadata``), plus the small files (``config.json``,
tokenizer files, ``generation_config.json``, the shard index) downloaded into
huggingface-hub's cache. It has the read surface of
:class:`surgeon.io.Checkpoint` (names, ``info``, ``infos``, ``total_bytes``,
``config``, ``tokenizer_files``, ``tied_embeddings``, ``num_layers``, ``path``,
``label``), so every step plans against it unchanged; only :meth:`get` refuses.

Each shard costs two small requests: the 8-byte length prefix, then exactly the
JSON header. No tensor byte is transferred (``huggingface_hub`` speculatively
fetches the first 100 kB, which for small headers is mostly tensor data), and
the header goes through surgeon's own bounded, validating parser, so a corrupt
or hostile header is reported with the shard and tensor named, and the header
length is capped before anything is allocated.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint, TensorInfo, _tensors_of
from .header import MAX_HEADER_BYTES, Header, parse_header_bytes

# A reader of byte ranges: (filename, start, end_inclusive) -> (bytes, total file size)
RangeReader = Callable[[str, int, int], "tuple[bytes, int]"]


class RemoteCheckpoint(Checkpoint):
    """A hub checkpoint known from its headers only (``headers_only = True``)."""

    headers_only = True

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict[str, Any] | None, *,
                 label: str, repo_id: str, revision: str, shard_sizes: dict[str, int]):
        super().__init__(path, tensors, config, label=label)
        self.repo_id = repo_id
        self.revision = revision
        self.shard_sizes = shard_sizes  # remote file sizes, by shard name

    @property
    def download_bytes(self) -> int:
        """What downloading the weights would transfer."""
        return sum(self.shard_sizes.values())

    def get(self, name: str, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        self.info(name)  # unknown names get the usual message
        raise CheckpointError(
            f"{self.label}: opened from safetensors headers only (validate/plan); tensor {name!r} has not been "
            "downloaded. Resolve the model with headers_only=False to read weights.")

    def __repr__(self) -> str:
        return f"RemoteCheckpoint({self.label!r}, {len(self)} tensors, headers only)"


def read_remote_header(read_range: RangeReader, filename: str, local_path: Path, where: str) -> tuple[Header, int]:
    """Read and validate one shard's header with two range requests; returns it and the file size."""
    prefix, size = read_range(filename, 0, 7)
    if len(prefix) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or hostile file)")
    if 8 + n > size:
        raise CheckpointError(f"{where}: header length {n} runs past the end of the file ({size} bytes): truncated file")
    if len(prefix) >= 8 + n:  # a server that ignored the range sent it all already
        raw = prefix[: 8 + n]
    else:
        body, _ = read_range(filename, 8, 8 + n - 1) if n else (b"", size)
        raw = prefix[:8] + body
    header = parse_header_bytes(raw, size, where)
    return replace(header, path=local_path), size


def open_remote(*, repo_id: str, revision: str, folder: Path, shards: list[str], index: dict[str, str] | None,
                config: dict[str, Any] | None, read_range: RangeReader, label: str,
                max_workers: int = 8) -> RemoteCheckpoint:
    """Build a :class:`RemoteCheckpoint` from the headers of ``shards``.

    ``folder`` is the local snapshot folder (small files already there; shards
    would land there when downloaded), ``index`` the shard index's
    ``weight_map`` when the model is sharded.
    """
    for s in shards:
        if s.startswith("/") or ".." in Path(s).parts or not re.fullmatch(r"[^\x00]+\.safetensors", s):
            raise CheckpointError(f"{label}: shard name {s!r} is not a safetensors file inside the repository")

    def one(shard: str) -> tuple[str, Header, int]:
        header, size = read_remote_header(read_range, shard, folder / shard, f"{label}: {shard}")
        return shard, header, size

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(shards)))) as pool:
        results = list(pool.map(one, shards))
    per_shard = {shard: _tensors_of(header) for shard, header, _ in results}
    sizes = {shard: size for shard, _, size in results}
    tensors: dict[str, TensorInfo] = {}
    if index is not None:
        for name, shard in index.items():
            if shard not in per_shard:
                raise CheckpointError(f"{label}: index lists tensor {name!r} in shard {shard!r}, which was not read")
            if name not in per_shard[shard]:
                raise CheckpointError(f"{label}: index lists tensor {name!r} in shard {shard!r}, whose header lacks it")
            tensors[name] = per_shard[shard][name]
    else:
        for shard in shards:
            for name, info in per_shard[shard].items():
                if name in tensors:
                    raise CheckpointError(f"{label}: tensor {name!r} is in both {tensors[name].file.name} and {shard}")
                tensors[name] = info
    return RemoteCheckpoint(folder, tensors, config, label=label, repo_id=repo_id, revision=revision, shard_sizes=sizes)
