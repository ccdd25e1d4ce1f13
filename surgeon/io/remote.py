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

Streaming (``surgeon run --remote-stream``): a :class:`StreamingCheckpoint`
is a remote checkpoint that *can* read weights: every read the engine makes
(a whole tensor, or a piece of rows of one) fetches exactly those bytes with
HTTP range requests, through a :class:`RangeFetcher` that

* cuts a read of ``2 * FETCH_PART_BYTES`` or more into up to
  ``FETCH_CONNECTIONS`` parts fetched side by side (a server paces each
  connection);
* retries dropped connections, timeouts and 408/429/5xx answers with
  exponential backoff, resuming a cut body from the last byte received (the
  bytes already in hand are kept, not fetched again);
* keeps a bounded cache of recent ranges the caller will read again
  (:class:`RangeCache`; the run shares one of 512 MiB per streamed input),
  so the engine's second read of a piece — TIES' or DARE's selection reads a
  tensor once to count and once to merge — is served from memory when the
  tensor's input pieces fit the cache; a tensor larger than the cache is
  fetched once per pass (counted in ``fetched_bytes``);
* counts bytes fetched, requests, retries and cache hits, and drives a
  progress callback with the bytes fetched so far.

Nothing lands on disk: disk use is the output alone, memory the pieces in
flight plus the cache. A run killed half-way resumes from the writer's
journal (:mod:`surgeon.io.writer`): finished tensors are neither recomputed
nor fetched again.
"""
from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint, TensorInfo, _tensors_of, byte_buffer
from .header import MAX_HEADER_BYTES, Header, parse_header_bytes

# A reader of byte ranges: (filename, start, end_inclusive) -> (bytes, total file size)
RangeReader = Callable[[str, int, int], "tuple[bytes, int]"]
# A streaming range transport: (filename, start, end_inclusive, sink) sends the body's chunks
# to sink(bytes) in order; raises TransientFetchError (retry) or anything else (give up)
RangeStream = Callable[[str, int, int, Callable[[bytes], None]], None]


#: concurrent range requests one streamed input may have open (a read of at least twice
#: FETCH_PART_BYTES is cut into parts fetched side by side): a CDN paces each connection, so one
#: connection at a time leaves most of the link idle (docs/hub.md, "Streaming")
FETCH_CONNECTIONS = 4
#: the smallest part a read is cut into for concurrent fetching
FETCH_PART_BYTES = 2 << 20


class TransientFetchError(Exception):
    """A fetch that may succeed when tried again: a dropped connection, a timeout, 408/429/5xx."""


class RangeCache:
    """Recently fetched byte ranges, least recently used dropped first, at most ``budget`` bytes.

    Shared by the fetchers of a run (one budget for all inputs); keys are
    ``(owner, file, start, end)``. A range over a quarter of the budget is
    never kept. Thread-safe.
    """

    def __init__(self, budget: int = 512 << 20):
        self.budget = budget
        self.held = 0
        self._items: OrderedDict[tuple[int, str, int, int], bytes] = OrderedDict()
        self.lock = threading.Lock()

    def overlapping(self, owner: int, filename: str, start: int, end: int) -> list[tuple[int, bytes]]:
        """``(range start, bytes)`` of every kept range of that file that overlaps ``[start, end)``."""
        with self.lock:
            keys = [k for k in self._items if k[0] == owner and k[1] == filename and k[2] < end and k[3] > start]
            out = []
            for k in keys:
                self._items.move_to_end(k)
                out.append((k[2], self._items[k]))
            return out

    def put(self, owner: int, filename: str, start: int, data: bytes) -> None:
        if len(data) > self.budget // 4:
            return
        with self.lock:
            key = (owner, filename, start, start + len(data))
            if key in self._items:
                return
            self._items[key] = data
            self.held += len(data)
            while self.held > self.budget and self._items:
                _, old = self._items.popitem(last=False)
                self.held -= len(old)


class RangeFetcher:
    """Byte ranges of one repository's files, with retries, resume, a bounded cache and counters.

    ``transport`` is a :data:`RangeStream`. A range is asked for once; when
    the transport fails with :class:`TransientFetchError` (or an ``OSError``)
    after delivering part of the body, the next try asks only for the rest.
    ``retries`` tries after the first, waiting ``backoff * 2**i`` seconds
    (capped at ``max_backoff``) before try ``i + 1``. A read of at least
    ``2 * part_bytes`` is fetched in up to ``connections`` parts at once, each
    retried on its own. Thread-safe; ``on_progress`` is called from the
    fetching threads.
    """

    def __init__(self, transport: RangeStream, *, label: str = "", retries: int = 8, backoff: float = 0.25,
                 max_backoff: float = 8.0, cache: RangeCache | None = None, cache_bytes: int = 512 << 20,
                 on_progress: Callable[[int], None] | None = None, sleep: Callable[[float], None] = time.sleep,
                 connections: int = FETCH_CONNECTIONS, part_bytes: int = FETCH_PART_BYTES):
        self.transport = transport
        self.connections = max(1, connections)
        self.part_bytes = max(1, part_bytes)
        self._pool: ThreadPoolExecutor | None = None  # the extra connections' threads, started on first use
        self.label = label
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache = cache if cache is not None else RangeCache(cache_bytes)  # cache_bytes: for a cache of its own
        self.on_progress = on_progress
        self.sleep = sleep
        self.fetched_bytes = 0  # every body byte received, including parts of tries that failed
        self.requests = 0
        self.retried = 0
        self.cache_hits = 0
        self.cache_hit_bytes = 0
        self._lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        return {"fetched_bytes": self.fetched_bytes, "requests": self.requests, "retries": self.retried,
                "cache_hits": self.cache_hits, "cache_hit_bytes": self.cache_hit_bytes}

    def read_into(self, filename: str, start: int, view: memoryview, keep: bool = True) -> None:
        """Fill ``view`` with the bytes of ``filename`` from ``start`` on.

        Bytes some cached range already holds are copied from it (a piece read
        after its whole tensor, or the reverse, counts too); only the gaps are
        fetched, and then cached unless ``keep`` is False (the caller will not
        ask for them again: copying every fetched byte into the cache cost a
        1.1B merge more CPU time than fetching them).
        """
        n = len(view)
        if n == 0:
            return
        end = start + n
        covered: list[tuple[int, int]] = []
        for s0, data in self.cache.overlapping(id(self), filename, start, end):
            a, b = max(s0, start), min(s0 + len(data), end)
            view[a - start:b - start] = data[a - s0:b - s0]
            covered.append((a, b))
        gaps: list[tuple[int, int]] = []
        at = start
        for a, b in sorted(covered):
            if a > at:
                gaps.append((at, a))
            at = max(at, b)
        if at < end:
            gaps.append((at, end))
        hit = n - sum(b - a for a, b in gaps)
        if hit:
            with self._lock:
                self.cache_hits += 1
                self.cache_hit_bytes += hit
        self._fetch_parts(filename, start, view, [p for a, b in gaps for p in self._split(a, b)])
        for a, b in gaps if keep else ():
            if b - a <= self.cache.budget // 4:  # a range the cache can hold with others
                self.cache.put(id(self), filename, a, bytes(view[a - start:b - start]))

    def _split(self, a: int, b: int) -> list[tuple[int, int]]:
        """``[a, b)`` in at most ``connections`` parts of about ``part_bytes`` or more, cut at file
        offsets that are multiples of 4 KiB."""
        k = min(self.connections, (b - a) // self.part_bytes)
        if k <= 1:
            return [(a, b)]
        cuts = sorted({a, b, *((a + (b - a) * i // k) // 4096 * 4096 for i in range(1, k))})
        return [(x, y) for x, y in zip(cuts, cuts[1:]) if x >= a and y <= b]

    def _fetch_parts(self, filename: str, start: int, view: memoryview, parts: list[tuple[int, int]]) -> None:
        """Fetch each ``[a, b)`` of ``parts`` into ``view`` (which starts at ``start``), concurrently.

        The calling thread fetches the first part; the others go to the
        fetcher's pool (``connections - 1`` threads shared by every caller).
        Each part retries and resumes on its own; when one still fails, the
        others are waited for and its error is raised.
        """
        if not parts:
            return
        if len(parts) > 1 and self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.connections - 1,
                                                    thread_name_prefix="surgeon-fetch")
        futures = [self._pool.submit(self._fetch, filename, a, view[a - start:b - start])  # type: ignore[union-attr]
                   for a, b in parts[1:]]
        error: BaseException | None = None
        try:
            a, b = parts[0]
            self._fetch(filename, a, view[a - start:b - start])
        except BaseException as exc:  # the other parts still write into view: wait for them first
            error = exc
        for fut in futures:
            exc = fut.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    def _fetch(self, filename: str, start: int, view: memoryview) -> None:
        n = len(view)
        done = 0
        tries = 0
        while True:
            got = 0

            def sink(chunk: bytes) -> None:
                nonlocal got
                k = min(len(chunk), n - done - got)
                if k <= 0:
                    return
                view[done + got:done + got + k] = chunk[:k]
                got += k
                with self._lock:
                    self.fetched_bytes += k
                if self.on_progress is not None:
                    self.on_progress(k)

            with self._lock:
                self.requests += 1
            error: BaseException | None = None
            try:
                self.transport(filename, start + done, start + n - 1, sink)
            except (TransientFetchError, OSError) as exc:
                error = exc
            done += got
            if done >= n:
                return
            if error is None:
                error = TransientFetchError(f"the body ended after {got} of {n - done + got} bytes")
            if tries >= self.retries:
                raise CheckpointError(
                    f"{self.label}: {filename}: bytes {start + done}-{start + n - 1} still missing after "
                    f"{tries + 1} tries ({error})") from None
            wait = min(self.max_backoff, self.backoff * (2 ** tries))
            tries += 1
            with self._lock:
                self.retried += 1
            self.sleep(wait)


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


class StreamingCheckpoint(RemoteCheckpoint):
    """A hub checkpoint whose tensors are read over HTTP range requests, never stored on disk.

    Same read surface as :class:`surgeon.io.Checkpoint` (``get``, ``get_rows``,
    ...): each read fetches exactly the bytes asked for through ``fetcher``.
    """

    headers_only = False
    streaming = True
    get = Checkpoint.get  # reads, unlike a header-only checkpoint

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict[str, Any] | None, *,
                 label: str, repo_id: str, revision: str, shard_sizes: dict[str, int], fetcher: RangeFetcher):
        super().__init__(path, tensors, config, label=label, repo_id=repo_id, revision=revision,
                         shard_sizes=shard_sizes)
        self.fetcher = fetcher
        self._shard_of = {path / shard: shard for shard in shard_sizes}

    def _read_bytes(self, info: TensorInfo, offset: int, nbytes: int, pin: bool = False,
                    out: torch.Tensor | None = None, keep: bool = True) -> torch.Tensor:
        buf = byte_buffer(nbytes, pin, out)
        if nbytes:
            shard = self._shard_of.get(info.file)
            if shard is None:
                raise CheckpointError(f"{self.label}: tensor {info.name!r} is in {info.file}, not a shard of the repository")
            self.fetcher.read_into(shard, offset, memoryview(buf.numpy()), keep=keep)
        return buf

    def __repr__(self) -> str:
        return f"StreamingCheckpoint({self.label!r}, {len(self)} tensors, streamed)"


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
                max_workers: int = 8, fetcher: RangeFetcher | None = None) -> RemoteCheckpoint:
    """Build a :class:`RemoteCheckpoint` from the headers of ``shards``.

    ``folder`` is the local snapshot folder (small files already there; shards
    would land there when downloaded), ``index`` the shard index's
    ``weight_map`` when the model is sharded. With ``fetcher`` the result is a
    :class:`StreamingCheckpoint` that reads tensors through it.
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
    if fetcher is not None:
        return StreamingCheckpoint(folder, tensors, config, label=label, repo_id=repo_id, revision=revision,
                                   shard_sizes=sizes, fetcher=fetcher)
    return RemoteCheckpoint(folder, tensors, config, label=label, repo_id=repo_id, revision=revision, shard_sizes=sizes)
