"""The order in which the piece engine reads (surgeon.engine.piecewise._Schedule).

Cut tensors (several row pieces) run on lanes beside the one-piece tensors;
each cut tensor's reads stay in piece and pass order on one lane, and a later
statistic pass is only decided once the lane has processed the pass before it.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import surgeon
from surgeon.engine.piecewise import _SETTLE, _Job, _Schedule
from surgeon.merge.kernels.base import Kernel


class _Passes(Kernel):
    """A kernel whose later statistic passes are ``needed``; it refuses to be
    asked about a pass before the one before it has closed (or was skipped)."""

    def __init__(self, stat_passes: int, needed: set[int]):
        self.stat_passes, self.needed, self.closed = stat_passes, needed, 0

    def pass_needed(self, pass_no: int) -> bool | None:
        assert pass_no <= self.closed, f"asked about pass {pass_no} while pass {self.closed} is open"
        if pass_no not in self.needed:
            self.closed = pass_no + 1
            return False
        return True


def _job(name: str, pieces: int, kernel: Kernel | None = None) -> _Job:
    task = SimpleNamespace(name=name, spec=SimpleNamespace(dtype=torch.bfloat16))
    return _Job(task, kernel or Kernel(), None, [(r, r + 1) for r in range(pieces)], 8, False, 2, 2)  # type: ignore[arg-type]


def _key(read) -> tuple[str, int, tuple[int, ...]]:
    return read.job.task.name, read.piece, read.passes


def test_cut_jobs_go_on_their_own_lanes_beside_the_one_piece_jobs() -> None:
    a, b = _job("a", 3), _job("b", 2)
    whole = [_job(f"w{i}", 1) for i in range(4)]
    reads = list(_Schedule([a, b, *whole], lanes=2))
    assert _SETTLE not in reads
    assert sorted(_key(r) for r in reads) == sorted(
        [("a", i, (0,)) for i in range(3)] + [("b", i, (0,)) for i in range(2)] + [(f"w{i}", 0, (0,)) for i in range(4)])
    assert {r.lane for r in reads if r.job is a} == {0} and {r.lane for r in reads if r.job is b} == {1}
    assert all(r.lane is None for r in reads if r.job in whole)
    assert [r.piece for r in reads if r.job is a] == [0, 1, 2]  # in order on the lane
    # round-robin: the first three reads come from the three streams, not all of "a" first
    assert {r.job.task.name[0] for r in reads[:3]} == {"a", "b", "w"}


def test_a_lane_takes_the_next_cut_job_when_one_is_read() -> None:
    jobs = [_job("a", 2), _job("b", 2), _job("c", 2)]
    reads = list(_Schedule(jobs, lanes=2))
    lanes = {r.job.task.name: r.lane for r in reads}
    assert lanes["a"] != lanes["b"] and lanes["c"] in (0, 1)
    assert [r.piece for r in reads if r.job.task.name == "c"] == [0, 1]


def test_a_later_pass_waits_for_the_lane_while_the_others_go_on() -> None:
    kernel = _Passes(stat_passes=2, needed={1})
    a = _job("a", 3, kernel)
    whole = [_job(f"w{i}", 1) for i in range(3)]
    schedule = _Schedule([a, *whole], lanes=1)
    it = iter(schedule)
    out = []
    while True:
        read = next(it)
        if read is _SETTLE:
            break
        out.append(read)
    # everything that did not depend on pass 0's end came out first: pass 0 of "a" and every one-piece job
    assert sorted(_key(r) for r in out) == sorted([("a", i, (0,)) for i in range(3)] + [(f"w{i}", 0, (0,))
                                                                                       for i in range(3)])
    for r in out:  # the lane processes pass 0; its last piece closes it
        if r.job is a:
            kernel.closed += r.piece == 2
            schedule.processed(r)
    rest = list(it)
    assert [_key(r) for r in rest] == [("a", i, (p,)) for p in (1, 2) for i in range(3)]


def test_a_pass_the_kernel_does_not_need_is_not_read() -> None:
    kernel = _Passes(stat_passes=3, needed=set())
    a = _job("a", 2, kernel)
    schedule = _Schedule([a], lanes=2)
    reads = []
    for read in schedule:
        if read is _SETTLE:
            continue
        reads.append(_key(read))
        if read.piece == 1:
            kernel.closed += 1
        schedule.processed(read)
    assert reads == [("a", 0, (0,)), ("a", 1, (0,)), ("a", 0, (3,)), ("a", 1, (3,))]


def test_cut_tensors_are_merged_on_lanes_and_match_the_whole_tensor_merge(tmp_path, tiny_family, monkeypatch) -> None:
    """End to end: TIES with small pieces on two compute threads; every cut
    tensor's pieces are merged on one lane thread, in order, and the output is
    byte-identical to the merge of whole tensors."""
    from surgeon.engine import piecewise
    from conftest import models_section
    from test_merge_blocks import RECIPE

    seen: list[tuple[str, str, int]] = []
    merge_piece = piecewise.merge_piece

    def record(kernel, meta, piece, out):
        import threading

        seen.append((meta.name, threading.current_thread().name, piece.start))
        return merge_piece(kernel, meta, piece, out)

    monkeypatch.setattr(piecewise, "merge_piece", record)
    monkeypatch.setenv("SURGEON_COMPUTE_WORKERS", "2")
    recipe = tmp_path / "r.yaml"
    mp = lambda w, d: f", weight: {w}, density: {d}"  # noqa: E731
    recipe.write_text(RECIPE.format(method="ties", params="", d1=mp(0.5, 0.3), d2=mp(0.3, 0.6), d3=mp(0.3, 0.5),
                                    models_section=models_section(tiny_family)))
    surgeon.run(recipe, output=str(tmp_path / "pieces"), quiet=True, piece_size="4KB")
    cut = {name for name, _, start in seen if start > 0}
    assert cut
    for name in cut:
        mine = [(thread, start) for n, thread, start in seen if n == name]
        assert len({t for t, _ in mine}) == 1 and mine[0][0].startswith("surgeon-lane")
        assert [s for _, s in mine] == sorted(s for _, s in mine)
    monkeypatch.setattr(piecewise, "merge_piece", merge_piece)
    surgeon.run(recipe, output=str(tmp_path / "whole"), quiet=True, piece_size="0")
    assert [f.read_bytes() for f in sorted((tmp_path / "pieces").glob("*.safetensors"))] == \
        [f.read_bytes() for f in sorted((tmp_path / "whole").glob("*.safetensors"))]


@pytest.mark.parametrize("lanes", [1, 3])
def test_every_read_comes_out_once_whatever_the_lanes(lanes) -> None:
    jobs = [_job("a", 4), _job("w0", 1), _job("b", 1), _job("c", 3), _job("w1", 1)]
    reads = [r for r in _Schedule(jobs, lanes=lanes) if r is not _SETTLE]
    assert sorted(_key(r) for r in reads) == sorted((j.task.name, i, (0,)) for j in jobs for i in range(len(j.pieces)))
