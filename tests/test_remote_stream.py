"""Merges that stream hub models' tensors over HTTP range requests (surgeon run --remote-stream).

Against the local fake hub (tests/hub_server.py), never the network: the streamed
merge equals the download-then-merge one byte for byte, stores no weights, fetches
each input byte once, survives dropped connections, 503s and slow answers, and a
run killed half-way fetches only the tensors it had not finished.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub, build_tiny_model, point_hf_at  # noqa: E402

from surgeon import api  # noqa: E402
from surgeon.errors import CheckpointError  # noqa: E402
from surgeon.io import Checkpoint  # noqa: E402
from surgeon.io import hub as hubio  # noqa: E402
from surgeon.io.remote import RangeFetcher, StreamingCheckpoint, TransientFetchError  # noqa: E402

TOKEN = "hf_TestTokenAbcdefghijklmnop0123"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- the fetcher alone ------------------------------------------------------------------------------------------------
class _Transport:
    """Serves ``data`` for any file; ``plan`` lists, per call, how many body bytes to send before failing
    (None: all of them) and which exception to raise."""

    def __init__(self, data: bytes, plan: list[tuple[int | None, type[Exception]]] | None = None):
        self.data, self.plan, self.calls = data, list(plan or []), []

    def __call__(self, filename: str, start: int, end: int, sink) -> None:
        self.calls.append((start, end))
        body = self.data[start:end + 1]
        cut, exc = self.plan.pop(0) if self.plan else (None, TransientFetchError)
        for i in range(0, len(body) if cut is None else cut, 7):  # small chunks
            sink(body[i:min(i + 7, len(body) if cut is None else cut)])
        if cut is not None:
            raise exc("injected")


def test_fetcher_resumes_a_cut_body_from_the_last_byte_with_backoff() -> None:
    data = bytes(range(256)) * 4
    t = _Transport(data, [(100, TransientFetchError), (0, OSError), (50, TransientFetchError)])
    waits: list[float] = []
    f = RangeFetcher(t, backoff=0.5, max_backoff=1.5, sleep=waits.append, cache_bytes=0)
    buf = bytearray(600)
    f.read_into("m.safetensors", 10, memoryview(buf))
    assert bytes(buf) == data[10:610]
    # each retry asks only for what is still missing
    assert t.calls == [(10, 609), (110, 609), (110, 609), (160, 609)]
    assert waits == [0.5, 1.0, 1.5]  # doubling, capped
    assert f.fetched_bytes == 600 and f.requests == 4 and f.retried == 3


def test_fetcher_gives_up_naming_the_file_and_range() -> None:
    t = _Transport(b"x" * 100, [(10, TransientFetchError)] * 10)
    f = RangeFetcher(t, retries=2, backoff=0.0, sleep=lambda s: None, label="org/m")
    with pytest.raises(CheckpointError, match=r"org/m: m\.safetensors: bytes 30-99 still missing after 3 tries"):
        f.read_into("m.safetensors", 0, memoryview(bytearray(100)))


def test_fetcher_does_not_retry_a_permanent_error() -> None:
    t = _Transport(b"x" * 100, [(0, CheckpointError)])
    f = RangeFetcher(t, backoff=0.0, sleep=lambda s: None)
    with pytest.raises(CheckpointError, match="injected"):
        f.read_into("m.safetensors", 0, memoryview(bytearray(10)))
    assert len(t.calls) == 1


def test_fetcher_cache_serves_a_second_read_and_stays_bounded() -> None:
    data = bytes(range(256)) * 64
    t = _Transport(data)
    f = RangeFetcher(t, cache_bytes=4096)
    a, b = bytearray(1000), bytearray(1000)
    f.read_into("f", 0, memoryview(a))
    f.read_into("f", 0, memoryview(b))
    assert a == b == bytearray(data[:1000]) and len(t.calls) == 1 and f.cache_hits == 1
    for i in range(1, 10):  # 9 more ranges of 1000 bytes: the cache keeps at most 4096
        f.read_into("f", i * 1000, memoryview(bytearray(1000)))
    assert f.cache.held <= 4096
    f.read_into("f", 0, memoryview(bytearray(1000)))  # evicted long ago: fetched again
    assert len(t.calls) == 11
    big = bytearray(3000)  # over a quarter of the cache: fetched, never cached
    f.read_into("f", 12000, memoryview(big))
    f.read_into("f", 12000, memoryview(big))
    assert len(t.calls) == 13 and bytes(big) == data[12000:15000]


# -- streamed merges from the fake hub --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stream-sources")
    with FakeHub(token=TOKEN) as h:
        h.shas = {}
        h.shas["base"] = h.add_folder("org/base", build_tiny_model(root / "base", 0, hidden=64, vocab=512))
        h.shas["math"] = h.add_folder("org/math", build_tiny_model(root / "math", 1, hidden=64, vocab=512, shards=2))
        h.shas["code"] = h.add_folder("org/code", build_tiny_model(root / "code", 2, hidden=64, vocab=512))
        yield h


@pytest.fixture
def hf(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home", token=TOKEN)
    hub.reset_counters()
    hub.drop_weight_gets = hub.fail_weight_gets = 0
    hub.weight_delay_s = 0.0
    return env


def _recipe(tmp: Path, piece: str | None = None) -> Path:
    models = {"base": "org/base", "math": "org/math", "code": "org/code"}
    recipe = {
        "name": "stream-ties", "seed": 3, "models": models,
        "steps": [{"id": "merged", "merge": {"method": "ties", "base": "base", "dtype": "bfloat16",
                                             "models": [{"model": m, "weight": 0.7, "density": 0.4}
                                                        for m in ("math", "code")]}}],
        "output": {"path": "./out", "max_shard_size": "100KB"},
    }
    p = tmp / "stream.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as ck:
        return {n: ck.get(n) for n in ck.names}


def _input_weight_bytes(hub: FakeHub) -> int:
    total = 0
    for repo in ("org/base", "org/math", "org/code"):
        for name, data in hub.files(repo).items():
            if name.endswith(".safetensors"):
                total += len(data) - 8 - int.from_bytes(data[:8], "little")
    return total


def _cached_weights(env: dict[str, str]) -> list[Path]:
    return [p for p in Path(env["HF_HUB_CACHE"]).rglob("*.safetensors")]


@pytest.fixture(scope="module")
def reference(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The download-then-merge output."""
    tmp = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    try:
        point_hf_at(mp, hub.url, tmp / "hf-home", token=TOKEN)
        api.run(str(_recipe(tmp)), output=str(tmp / "out"), quiet=True, remote_stream=False)
        assert _cached_weights({"HF_HUB_CACHE": str(tmp / "hf-home" / "hub")})  # it did download
        return _weights(tmp / "out")
    finally:
        mp.undo()


@pytest.mark.parametrize("piece", [None, "16KB"])
def test_streamed_ties_equals_download_then_merge(hub: FakeHub, hf: dict[str, str], tmp_path: Path,
                                                  reference: dict[str, torch.Tensor], piece: str | None) -> None:
    # piece 16KB: multi-piece tensors, read once per TIES pass; the fetcher's cache serves the second pass
    out = tmp_path / "out"
    rep = api.run(str(_recipe(tmp_path)), output=str(out), quiet=True, remote_stream=True, piece_size=piece)
    got = _weights(out)
    assert got.keys() == reference.keys()
    for n in got:
        assert torch.equal(got[n], reference[n]), n
    assert _cached_weights(hf) == []  # nothing but the output on disk
    total = _input_weight_bytes(hub)
    assert hub.weight_bytes_served() == total  # each input byte fetched once
    assert sum(r["fetched_bytes"] for r in rep["remote"].values()) == total
    assert sum(r["input_bytes"] for r in rep["remote"].values()) == total
    assert all(r["fetched_over_input"] == 1.0 for r in rep["remote"].values())
    if piece:
        assert sum(r["cache_hits"] for r in rep["remote"].values()) > 0


def test_streamed_merge_survives_drops_503s_and_slow_answers(hub: FakeHub, hf: dict[str, str], tmp_path: Path,
                                                             reference: dict[str, torch.Tensor]) -> None:
    hub.drop_weight_gets, hub.fail_weight_gets, hub.weight_delay_s = 4, 3, 0.02
    rep = api.run(str(_recipe(tmp_path)), output=str(tmp_path / "out"), quiet=True, remote_stream=True)
    assert hub.faults_injected >= 7
    got = _weights(tmp_path / "out")
    for n in got:
        assert torch.equal(got[n], reference[n]), n
    assert sum(r["retries"] for r in rep["remote"].values()) == 7
    # a dropped body keeps what arrived: the retries fetch only the rest
    assert sum(r["fetched_bytes"] for r in rep["remote"].values()) == _input_weight_bytes(hub)


def test_streamed_merge_keeps_several_reads_in_flight(hub: FakeHub, hf: dict[str, str], tmp_path: Path,
                                                     reference: dict[str, torch.Tensor]) -> None:
    """Every weight answer waits 50 ms: a merge reading one or two tensors at a time would leave the
    link idle (steps.STREAMED_READ_AHEAD)."""
    hub.weight_delay_s = 0.05
    api.run(str(_recipe(tmp_path)), output=str(tmp_path / "out"), quiet=True, remote_stream=True)
    got = _weights(tmp_path / "out")
    for n in got:
        assert torch.equal(got[n], reference[n]), n
    assert hub.max_in_flight >= 6, hub.max_in_flight


def test_streamed_merge_shows_every_fetched_byte_on_one_bar(hub: FakeHub, hf: dict[str, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetch bar adds up the bytes of every fetching thread of every input (parts side by side)."""
    import tqdm.auto

    bars: dict[str, list[int]] = {}
    real = tqdm.auto.tqdm

    class Recording(real):  # type: ignore[misc,valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            bars.setdefault(str(getattr(self, "desc", "")), []).append(int(n or 0))
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    rep = api.run(str(_recipe(tmp_path)), output=str(tmp_path / "out"), progress=True, remote_stream=True)
    fetched = sum(r["fetched_bytes"] for r in rep["remote"].values())
    assert fetched == _input_weight_bytes(hub)
    assert sum(bars["fetched from the hub"]) == fetched


def test_resolve_streams_only_when_asked_or_out_of_room(hub: FakeHub, hf: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert not isinstance(hubio.resolve("org/code", stream=False).checkpoint, StreamingCheckpoint)
    hub.reset_counters()
    r = hubio.resolve("org/math", stream=None)  # room enough: downloads
    assert not isinstance(r.checkpoint, StreamingCheckpoint) and hub.files_downloaded("org/math")
    monkeypatch.setattr(hubio.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    r = hubio.resolve("org/base", stream=None)  # no room: streams
    assert isinstance(r.checkpoint, StreamingCheckpoint)
    t = r.checkpoint.get("model.embed_tokens.weight")
    assert t.shape == (512, 64)
    # a cached model is read from the cache even when streaming is asked for
    assert not isinstance(hubio.resolve("org/math", stream=True).checkpoint, StreamingCheckpoint)


@pytest.mark.slow  # a CLI subprocess killed half-way: ~15 s on a quiet machine, ~50 s on a loaded one
def test_killed_streamed_run_resumes_without_refetching_finished_tensors(hub: FakeHub, hf: dict[str, str],
                                                                         tmp_path: Path,
                                                                         reference: dict[str, torch.Tensor]) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    journal = tmp_path / ".out.surgeon-partial" / ".surgeon-written"
    hub.weight_delay_s = 0.05  # slow enough to kill half-way
    env = {**os.environ, **hf, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "surgeon", "run", str(recipe), "-o", str(out), "--remote-stream",
                             "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    # one JSON string per finished tensor, as the writer journals them; a cut last line does not count
    done = {json.loads(line) for line in journal.read_text().split("\n")[:-1] if line}
    assert done and not out.exists()

    # the killed run's last requests are still being answered (each waits weight_delay_s): their bytes must not
    # count as the rerun's (this was the "one finished tensor refetched in ~1 run of 3": the rerun never asked)
    hub.wait_idle()
    hub.weight_delay_s = 0.0
    hub.reset_counters()
    api.run(str(recipe), output=str(out), quiet=True, remote_stream=True)
    got = _weights(out)
    for n in got:
        assert torch.equal(got[n], reference[n]), n
    # the rerun fetched exactly the input bytes of the tensors the killed run had not finished, and no byte of a
    # finished one
    served = [s for s in hub.served if s.method == "GET" and s.weight_bytes]
    expected = 0
    for repo in ("org/base", "org/math", "org/code"):
        ck = hubio.resolve(repo, headers_only=True).checkpoint
        expected += sum(ck.info(n).nbytes for n in ck.names if n not in done)
        for n in done & set(ck.names):
            info = ck.info(n)
            hit = [s for s in served if s.repo == repo and s.path == info.file.name
                   and s.start < info.offset + info.nbytes and s.end > info.offset]
            assert not hit, f"{repo}: finished tensor {n!r} fetched again: {hit}"
    assert hub.weight_bytes_served() == expected, (hub.weight_bytes_served(), expected)


def test_fetcher_cache_serves_parts_and_unions_of_cached_ranges() -> None:
    data = bytes(range(256)) * 64
    t = _Transport(data)
    f = RangeFetcher(t, cache_bytes=1 << 20)
    whole = bytearray(4000)
    f.read_into("f", 100, memoryview(whole))  # a whole tensor ...
    piece = bytearray(1000)
    f.read_into("f", 1100, memoryview(piece))  # ... then one of its pieces: no fetch
    assert piece == bytearray(data[1100:2100]) and len(t.calls) == 1
    span = bytearray(5000)
    f.read_into("f", 0, memoryview(span))  # overlaps the cached range: only 0-99 and 4100-4999 are fetched
    assert span == bytearray(data[:5000])
    assert sorted(t.calls[1:]) == [(0, 99), (4100, 4999)]  # the two gaps side by side: in either order
    assert f.fetched_bytes == 4000 + 100 + 900


def test_fetcher_keeps_nothing_it_is_told_will_not_be_read_again() -> None:
    data = bytes(range(256)) * 64
    t = _Transport(data)
    f = RangeFetcher(t, cache_bytes=1 << 20)
    once = bytearray(1000)
    f.read_into("f", 0, memoryview(once), keep=False)
    assert once == bytearray(data[:1000]) and f.cache.held == 0
    f.read_into("f", 0, memoryview(once))  # asked again after all: fetched again, kept this time
    f.read_into("f", 0, memoryview(once), keep=False)  # ... and served from the cache
    assert len(t.calls) == 2 and f.cache.held == 1000 and f.cache_hits == 1


class _GatedTransport(_Transport):
    """A transport whose calls all wait until ``width`` of them are in flight (or ``timeout`` passes)."""

    def __init__(self, data: bytes, width: int, plan: list[tuple[int | None, type[Exception]]] | None = None):
        super().__init__(data, plan)
        self.gate = threading.Barrier(width, timeout=10)
        self.entered = 0
        self.lock = threading.Lock()

    def __call__(self, filename: str, start: int, end: int, sink) -> None:
        with self.lock:
            self.entered += 1
            gated = self.entered <= self.gate.parties  # the first `width` calls meet; later ones pass through
        if gated:
            self.gate.wait()  # BrokenBarrierError (a failed test, not a hang) unless they run side by side
        super().__call__(filename, start, end, sink)


def test_fetcher_cuts_a_large_read_into_parts_fetched_side_by_side() -> None:
    data = bytes(range(256)) * 400  # 102,400 bytes
    t = _GatedTransport(data, width=4)
    f = RangeFetcher(t, cache_bytes=0, connections=4, part_bytes=8192)
    buf = bytearray(90_000)
    f.read_into("f", 1000, memoryview(buf))
    assert bytes(buf) == data[1000:91_000]
    parts = sorted(t.calls)
    assert len(parts) == 4 and parts[0][0] == 1000 and parts[-1][1] == 90_999
    assert all(b + 1 == c for (_, b), (c, _) in zip(parts, parts[1:]))  # no gap, no overlap
    assert all(c % 4096 == 0 for c, _ in parts[1:])  # cut on 4 KiB boundaries
    assert f.fetched_bytes == 90_000 and f.requests == 4
    small = bytearray(16_000)  # under two parts' worth: one request
    f.read_into("f", 0, memoryview(small))
    assert bytes(small) == data[:16_000] and len(t.calls) == 5


def test_fetcher_retries_only_the_part_that_was_cut() -> None:
    data = bytes(range(256)) * 400
    # the first call of the four is cut after 100 bytes; whichever part it was, only its rest is fetched again
    t = _Transport(data, [(100, TransientFetchError)])
    f = RangeFetcher(t, cache_bytes=0, connections=4, part_bytes=8192, backoff=0.0, sleep=lambda s: None)
    buf = bytearray(90_000)
    f.read_into("f", 1000, memoryview(buf))
    assert bytes(buf) == data[1000:91_000]
    assert f.requests == 5 and f.retried == 1 and f.fetched_bytes == 90_000
    first = t.calls[0]
    assert (first[0] + 100, first[1]) in t.calls[1:]


def test_fetcher_raises_a_part_that_keeps_failing_after_the_others_finish() -> None:
    data = bytes(range(256)) * 400
    finished: list[tuple[int, int]] = []

    def transport(filename: str, start: int, end: int, sink) -> None:
        if start < 20480:  # the first part (1000-20479): never more than 10 bytes a try
            sink(data[start:start + 10])
            raise TransientFetchError("injected")
        time.sleep(0.05)  # the other parts are still writing when the first one gives up
        sink(data[start:end + 1])
        finished.append((start, end))

    f = RangeFetcher(transport, cache_bytes=0, connections=4, part_bytes=8192, retries=2, backoff=0.0,
                     sleep=lambda s: None, label="org/m")
    with pytest.raises(CheckpointError, match=r"org/m: f: bytes 1030-20479 still missing after 3 tries"):
        f.read_into("f", 1000, memoryview(bytearray(90_000)))
    assert len(finished) == 3  # read_into returned only after the other parts had finished writing
