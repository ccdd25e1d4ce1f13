"""Pieces read as views of the page cache (surgeon.io.mapped, Checkpoint.map_rows)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgeon.io import Checkpoint

#: pieces are mapped on Linux only (surgeon.io.mapped); elsewhere every piece is read
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mapped reads are Linux-only")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _rss_file() -> int:
    """Resident bytes of mapped files (RssFile)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(4096, 2048, generator=g).to(torch.bfloat16),   # 16 MiB
               "small": torch.randn(7, 3, generator=g), "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_mapped_rows_are_the_rows_get_rows_reads(ckpt) -> None:
    folder, tensors = ckpt
    ck = Checkpoint.open(folder)
    for name, (a, b) in [("big", (0, 4096)), ("big", (17, 1000)), ("small", (2, 5)), ("small", (0, 0))]:
        mapped = ck.map_rows(name, a, b)
        if a == b:
            assert mapped is None  # nothing to map: the caller reads (nothing)
            continue
        t, release = mapped
        assert t.dtype == tensors[name].dtype and torch.equal(t, ck.get_rows(name, a, b))
        assert torch.equal(t, tensors[name][a:b])
        release()
        assert torch.equal(t, tensors[name][a:b])  # still readable: the pages fault back in
    with pytest.raises(Exception, match="out of range"):
        ck.map_rows("big", 4000, 4097)


def test_row_bytes_are_the_rows_get_rows_reads(ckpt) -> None:
    """read_row_bytes: the stored bytes of the rows (one pread), for plain files only."""
    folder, tensors = ckpt
    ck = Checkpoint.open(folder)
    for name, (a, b) in [("big", (0, 4096)), ("big", (17, 19)), ("small", (2, 5)), ("small", (0, 0))]:
        got = ck.read_row_bytes(name, a, b)
        want = ck.get_rows(name, a, b)
        assert got == want.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert torch.equal(torch.frombuffer(bytearray(got), dtype=want.dtype).reshape(want.shape)
                           if got else want, tensors[name][a:b])
    with pytest.raises(Exception, match="out of range"):
        ck.read_row_bytes("big", 4000, 4097)

    class Adapted(Checkpoint):  # a reader with its own rows: no raw bytes
        def get_rows(self, name, start, stop, pin=False, out=None):
            return super().get_rows(name, start, stop) * 2

    assert Adapted(ck.path, {n: ck.info(n) for n in ck.names}, None).read_row_bytes("big", 0, 2) is None


def test_a_view_outlives_its_checkpoint(ckpt) -> None:
    """Closing the checkpoint drops its reference to the mapping, never the mapping under a live view."""
    folder, tensors = ckpt
    ck = Checkpoint.open(folder)
    t, _ = ck.map_rows("big", 100, 200)
    ck.close()
    del ck
    assert torch.equal(t, tensors["big"][100:200])


def test_readers_that_are_not_plain_files_are_not_mapped(ckpt) -> None:
    from surgeon.engine.slices import SliceView

    folder, tensors = ckpt
    ck = Checkpoint.open(folder)

    class Adapted(Checkpoint):  # a reader with its own rows (as LoRA-adapted inputs have)
        def get_rows(self, name, start, stop, pin=False, out=None):
            return super().get_rows(name, start, stop) * 2

    adapted = Adapted(ck.path, {n: ck.info(n) for n in ck.names}, None)
    assert adapted.map_rows("big", 0, 2) is None
    view = SliceView(ck, {"renamed": "big"}, "slice", None)  # renamed views delegate to their source
    t, release = view.map_rows("renamed", 3, 9)
    assert torch.equal(t, tensors["big"][3:9])
    release()
    assert view.read_row_bytes("renamed", 3, 9) == ck.read_row_bytes("big", 3, 9)


def test_released_pages_leave_the_resident_set(ckpt) -> None:
    """The view's pages are resident once read through it and
    leave the process's resident set when released: a merge's RSS holds only the
    pieces in flight, as with read buffers."""
    folder, _ = ckpt
    ck = Checkpoint.open(folder)
    before = _rss()
    t, release = ck.map_rows("big", 0, 4096)
    assert float(t[::64].float().sum()) == float(t[::64].float().sum())  # read through the view
    held = _rss() - before
    release()
    after = _rss() - before
    assert held > 12 * 2**20, held   # most of the 16 MiB
    assert after < 4 * 2**20, after


def test_a_part_read_hands_back_the_folios_it_touched(ckpt) -> None:
    """A view maps only what is read (however large the page cache's folios make
    that); releasing the part read drops every page the read mapped, whole 2 MiB blocks round it
    included, and the view's values stay readable."""
    folder, tensors = ckpt
    ck = Checkpoint.open(folder)
    flat = tensors["big"].reshape(-1)
    assert torch.equal(flat[:8], flat[:8])  # torch's first-use allocations, before measuring
    before = _rss_file()
    t, release = ck.map_rows("big", 0, 4096)
    t = t.reshape(-1)
    assert _rss_file() - before < 2**20  # nothing mapped yet (the 16 MiB were not filled in)
    parts = [(r * 4096, r * 4096 + 4096) for r in range(0, 4096, 512)]  # 8 reads of one row, 2 MiB apart
    for a, b in parts:
        assert torch.equal(t[a // 2:b // 2], flat[a // 2:b // 2])
    read = _rss_file() - before
    for a, b in parts:
        release(a, b)
    left = _rss_file() - before
    assert read >= 8 * 4096 and left <= 64 * 1024, (read, left)
    assert torch.equal(t, tensors["big"].reshape(-1))  # faulted back in


def test_a_merge_reads_its_pieces_through_mappings(tmp_path, tiny_family, monkeypatch) -> None:
    """The CPU piece engine views the inputs' pages (no pread copies into read buffers) and
    hands every mapped piece back; the output is the one read buffers give."""
    import surgeon
    from conftest import models_section
    from test_merge_blocks import RECIPE

    calls = {"mapped": 0, "released": 0, "read": 0}
    map_rows, get_rows = Checkpoint.map_rows, Checkpoint.get_rows

    def counted_map(self, *a, **k):
        got = map_rows(self, *a, **k)
        if got is None:
            return None
        calls["mapped"] += 1
        t, release = got

        def counted_release():
            calls["released"] += 1
            release()
        return t, counted_release

    def counted_read(self, *a, **k):
        calls["read"] += 1
        return get_rows(self, *a, **k)

    recipe = tmp_path / "r.yaml"
    mp = lambda w, d: f", weight: {w}, density: {d}"  # noqa: E731
    recipe.write_text(RECIPE.format(method="ties", params="", d1=mp(0.5, 0.3), d2=mp(0.3, 0.6), d3=mp(0.3, 0.5),
                                    models_section=models_section(tiny_family)))
    monkeypatch.setattr(Checkpoint, "map_rows", counted_map)
    monkeypatch.setattr(Checkpoint, "get_rows", counted_read)
    surgeon.run(recipe, output=str(tmp_path / "mapped"), quiet=True, piece_size="4KB")
    assert calls["mapped"] > 0 and calls["released"] == calls["mapped"]
    piece_reads = calls["read"]

    monkeypatch.setattr(Checkpoint, "map_rows", lambda self, *a, **k: None)  # every piece read into buffers
    surgeon.run(recipe, output=str(tmp_path / "read"), quiet=True, piece_size="4KB")
    assert calls["read"] - piece_reads >= calls["mapped"]
    assert [f.read_bytes() for f in sorted((tmp_path / "mapped").glob("*.safetensors"))] == \
        [f.read_bytes() for f in sorted((tmp_path / "read").glob("*.safetensors"))]
