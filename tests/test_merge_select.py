"""The sort-free selection helpers agree with a stable sort, ties included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from surgeon.merge.select.exact import kth_smallest, largest_mask, rank_range_mask, smallest_mask, stream_kth_smallest


def _stable_positions(v: torch.Tensor, descending: bool = False) -> torch.Tensor:
    flat = v.reshape(-1)
    key = -flat if descending else flat
    return torch.argsort(key, stable=True)


def test_masks_match_stable_sort_with_many_ties():
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 5, (7, 9), generator=g).float()  # lots of ties
    n = v.numel()
    asc = _stable_positions(v)
    desc = _stable_positions(v, descending=True)
    for k in [0, 1, 5, 17, 31, n - 1, n, n + 3]:
        want = torch.zeros(n, dtype=torch.bool)
        want[asc[:k]] = True
        assert torch.equal(smallest_mask(v, k).reshape(-1), want), k
        want = torch.zeros(n, dtype=torch.bool)
        want[desc[:k]] = True
        got = largest_mask(v, k)
        assert got.shape == v.shape
        assert torch.equal(got.reshape(-1), want), k
    for start, stop in [(0, 0), (0, 10), (3, 11), (20, 63), (62, 63), (10, 5)]:
        want = torch.zeros(n, dtype=torch.bool)
        want[asc[start:stop]] = True
        assert torch.equal(rank_range_mask(v, start, stop).reshape(-1), want), (start, stop)


def test_tie_goes_to_lowest_index():
    v = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0])
    assert largest_mask(v, 2).tolist() == [False, True, False, True, False]
    assert smallest_mask(torch.tensor([2.0, 1.0, 2.0, 2.0]), 2).tolist() == [True, True, False, False]


def test_stream_kth_smallest_is_exact():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(s, generator=g).abs() for s in [(5, 7), (13,), (3, 3, 3), (1,)]]
    chunks[1][:4] = 0.0
    chunks[2][0, 0, :] = chunks[0][0, 0]  # duplicates
    other = [torch.rand(c.shape, generator=g) * 1e-3 for c in chunks]
    flat = torch.cat([c.reshape(-1) for c in chunks])
    flat2 = torch.cat([c.reshape(-1) for c in other])
    d = flat.numel()
    for k in [1, 2, 4, 5, 30, d // 2, d - 1, d]:
        got = stream_kth_smallest(lambda: zip(chunks, other), [k, d + 1 - k])
        assert got[0] == float(torch.kthvalue(flat, k).values)
        assert got[1] == float(torch.kthvalue(flat2, d + 1 - k).values)
    # a callable of the lengths, and a skipped series
    got = stream_kth_smallest(lambda: zip(chunks, other), lambda lengths: [None, lengths[1]])
    assert got == [None, float(flat2.max())]


def test_kth_smallest_both_ways():
    g = torch.Generator().manual_seed(3)
    v = torch.randint(-4, 5, (101,), generator=g).float()
    for k in [1, 2, 50, 51, 52, 100, 101]:
        want = float(torch.sort(v).values[k - 1])
        assert float(kth_smallest(v, k, "kthvalue")) == want
        assert float(kth_smallest(v, k, "topk")) == want


def _selector_case(seed: int, n: int, quantized: bool = False):
    """Deltas with a run of zeros; ``quantized``: bf16 values, so the deltas
    take a few discrete values with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    model = base + 0.01 * torch.randn(n, generator=g)
    if quantized:
        base, model = base.bfloat16(), model.bfloat16()
    model[: n // 10] = base[: n // 10]
    return base, model, (model.float() - base.float()).abs()


def _check(sel, mag: torch.Tensor, ks: dict) -> None:
    for s, k in ks.items():
        r = sel.result[s]
        assert r.value == float(torch.kthvalue(mag, k).values), (s, k)
        assert r.below == int((mag < r.value).sum()) and r.equal == int((mag == r.value).sum())


def _run(sel, base, models, sample_from=None, row=1000, piece=None):
    from surgeon.merge.kernels.base import block_ranges

    sel.sample(*(sample_from or (base, models)), row)
    passes = 0
    for p in range(sel.passes):
        if not sel.pass_needed(p):
            continue
        passes += 1
        for a, b in block_ranges(0, base.numel(), piece):
            sel.observe(p, base[a:b], [m[a:b] for m in models])
        sel.end_pass(p)
    assert sel.done
    return passes


def test_stream_selector_settles_in_one_pass_when_the_sample_brackets_the_kth() -> None:
    from surgeon.merge.select.stream import SAMPLE, StreamSelector

    n = 3 * SAMPLE + 17
    base, model, mag = _selector_case(0, n)
    ks = {"a": 1, "b": n // 10, "c": n // 10 + 1, "d": n // 2, "e": int(0.7 * n), "f": n - 500}
    sel = StreamSelector(ks, n, {s: 0 for s in ks})
    passes = _run(sel, base, [model], piece=100_000)
    _check(sel, mag, ks)
    assert passes == 1 and sel.misses == 0
    # discrete deltas: a bracket between two far-apart values is too wide to
    # histogram, so some selections take the top-bits and bucket passes
    base, model, mag = _selector_case(0, n, quantized=True)
    sel = StreamSelector(ks, n, {s: 0 for s in ks})
    assert _run(sel, base, [model], piece=100_000) <= 2
    _check(sel, mag, ks)
    # a tensor no larger than the sample is selected exactly from the sample
    small = 1000
    sel = StreamSelector({0: 700}, small)
    assert _run(sel, base[:small], [model[:small]]) == 1
    _check(sel, mag[:small], {0: 700})


def test_stream_selector_falls_back_when_the_sample_misleads() -> None:
    """A sample of other data (3x larger deltas) misses: the top-bits and
    bucket passes still find the exact values (three passes)."""
    from surgeon.merge.select.stream import SAMPLE, StreamSelector

    n = 2 * SAMPLE + 5
    base, model, mag = _selector_case(1, n)
    decoy = (base.float() + 3 * (model.float() - base.float())).bfloat16()
    ks = {0: int(0.7 * n)}
    sel = StreamSelector(ks, n)
    passes = _run(sel, base, [model], sample_from=(base, [decoy]))
    _check(sel, mag, ks)
    assert passes == 3 and sel.misses == 1


def test_stream_selector_without_a_usable_sample_counts_top_bits() -> None:
    from surgeon.merge.select.stream import StreamSelector

    n = 5000
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(n)
    model = torch.exp(20 * torch.randn(n, generator=g))  # magnitudes over ~17 octaves: no narrow bracket
    ks = {0: 2500, 1: 4000}
    sel = StreamSelector(ks, n, {0: 0, 1: 0})
    sel.sampled = True  # no sample at all
    assert _run(sel, base, [model]) == 2
    _check(sel, model, ks)
    sel = StreamSelector({0: 4999}, n)
    _run(sel, base, [model], sample_from=(base[:100], [model[:100]]))  # a 100-entry sample is too wide
    _check(sel, model, {0: 4999})


def test_stream_selector_torch_ops_equal_compiled(monkeypatch) -> None:
    from surgeon.merge.select import counting as _hist
    from surgeon.merge.select import stream as _streamselect
    from surgeon.merge.select.stream import SAMPLE, StreamSelector

    n = SAMPLE + 3
    base, model, mag = _selector_case(3, n)
    ks = {0: n // 3}
    monkeypatch.setattr(_streamselect, "compiled_counts_available", lambda: False)
    sel = StreamSelector(ks, n)
    assert _run(sel, base, [model], piece=50_000) == 1
    _check(sel, mag, ks)
    assert __import__("surgeon.merge.kernels._jit", fromlist=["x"]).numba_module() is None or _hist.compiled_counts_available()


def test_stream_selector_treats_an_overflowing_bracket_as_a_miss(monkeypatch) -> None:
    """More entries inside a wide bracket than the sample promised: the
    kept patterns overflow, and the fallback passes still give exact values
    (compiled loop and torch ops alike)."""
    from surgeon.merge.select import stream as _streamselect
    from surgeon.merge.select.counting import COLLECT
    from surgeon.merge.select.stream import SAMPLE, StreamSelector

    n = 2 * SAMPLE + 9
    base, model, mag = _selector_case(4, n)
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(_streamselect, "compiled_counts_available", lambda: False)
        sel = StreamSelector({0: n // 2}, n)
        sel.sample(base, [model], 1000)
        assert sel._kind[0] == COLLECT
        sel._cap[0] = 10
        assert _run(sel, base, [model]) == 3 and sel.misses == 1
        _check(sel, mag, {0: n // 2})


@pytest.mark.parametrize("compiled", [True, False])
def test_order_statistics_equal_a_full_sort_and_leave_the_input_alone(compiled: bool, monkeypatch) -> None:
    """The radix select (compiled) or one partition at all the ranks: the values at the ranks
    are those of np.sort, for one to four ranks, repeated values, the whole uint32 range, the
    |delta| patterns of bf16 fine-tunes (few distinct values, most in a few bins), a strided
    input, and the ends included."""
    from surgeon.merge.select import stream
    from surgeon.merge.select.stream import order_statistics

    if not compiled:
        monkeypatch.setattr(stream, "compiled_counts_available", lambda: False)
    rng = np.random.default_rng(0)
    for n in (1, 2, 10, 1000, 65536):
        for trial in range(20):
            kind = trial % 4
            if kind == 0:
                u = rng.integers(0, 50, n).astype(np.uint32)
            elif kind == 1:
                u = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
            elif kind == 2:  # |b16(m) - b16(b)| as float32 patterns
                b = torch.randn(n).to(torch.bfloat16)
                m = (b.float() + 0.01 * torch.randn(n)).to(torch.bfloat16)
                u = (m.float() - b.float()).abs().numpy().view(np.uint32)
            else:
                u = rng.integers(0, 2**31, 2 * n).astype(np.uint32)[::2]  # not contiguous
            ranks = sorted(set(rng.integers(0, n, rng.integers(1, 5)).tolist()) | ({0, n - 1} if trial % 5 == 0 else set()))
            copy = u.copy()
            got = order_statistics(u, ranks)
            srt = np.sort(u)
            assert got == {r: int(srt[r]) for r in ranks}, (n, ranks, kind)
            assert np.array_equal(u, copy)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("width", [1, 50, 4097, 1 << 20, (1 << 20) + 1, 1 << 31])
def test_rank_in_window_equals_a_full_sort(width: int, compiled: bool, monkeypatch) -> None:
    """The k-th smallest pattern of a window with the entries below and equal to it, by a
    histogram (width up to 2^20; compiled, or numpy's bincount without numba) or a sort: as
    np.sort counts them, for few distinct values repeated (the case that made np.partition
    slow), all distinct, and every rank's ends."""
    from surgeon.merge.select import stream
    from surgeon.merge.select.stream import HISTOGRAM_WIDTH, rank_in_window

    if not compiled:
        monkeypatch.setattr(stream, "compiled_counts_available", lambda: False)

    assert HISTOGRAM_WIDTH == 1 << 20  # the parametrisation covers both paths
    rng = np.random.default_rng(width)
    lo = 1_000_000
    for n, distinct in ((1, 1), (7, 3), (5000, 40), (20000, 20000)):
        values = rng.choice(rng.integers(0, width, min(distinct, width), dtype=np.int64), n) + lo
        u = values.astype(np.uint32)
        srt = np.sort(u)
        for rank in sorted({1, n, *rng.integers(1, n + 1, 5).tolist()}):
            v = int(srt[rank - 1])
            expected = (v, int((u < v).sum()), int((u == v).sum()))
            assert rank_in_window(u, rank, lo, width) == expected, (n, distinct, rank)
            if width == 1:  # a stand-in of the right length (a one-pass merge's tie bracket) will do
                assert rank_in_window(np.broadcast_to(np.uint32(lo), (n,)), rank, lo, 1) == expected
