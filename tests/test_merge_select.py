"""The sort-free selection helpers agree with a stable sort, ties included."""
from __future__ import annotations

import torch

from surgeon.merge._select import kth_smallest, largest_mask, rank_range_mask, smallest_mask, stable_ranks, stream_kth_smallest


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


def test_stable_ranks():
    v = torch.tensor([[3.0, 1.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert stable_ranks(v, dim=1).tolist() == [[2, 1, 3, 0], [0, 1, 2, 3]]


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
