"""TIES and breadcrumbs on a tensor in one piece read its inputs once and equal the two-pass merge.

The reference is the whole-tensor ``ties`` (``MergeMethod.fn``); the kernel is driven
as the engine drives it (:func:`surgeon.merge.kernels.base.run_in_memory`: one piece,
the statistic passes then the merge) on stored bf16 or float32 inputs. Counting calls
of the selection's counting loop tells whether a statistic pass read the inputs.
"""
from __future__ import annotations

import pytest
import torch

from surgeon.merge.apply import build_merge
from surgeon.merge.kernels import ties_compiled
from surgeon.merge.kernels.base import run_in_memory
from surgeon.merge.kernels.one_pass import OnePassSelection
from surgeon.merge.kernels.ties import TiesKernel
from surgeon.merge.registry import get_method
from surgeon.merge.select import stream

pytestmark = pytest.mark.skipif(not ties_compiled.available(), reason="the one-pass merge is the compiled loop's")

CASES = [
    dict(mps=[{"density": 0.3}, {"density": 0.5}, {"density": 1.0}]),
    dict(mps=[{"density": 0.2, "weight": 1.0}, {"density": 0.7, "weight": 0.5}, {"density": 0.0, "weight": 2.0}]),
    dict(mps=[{"density": 0.4}] * 3, consensus="count", normalize=False),
    dict(mps=[{"density": 0.9999, "weight": -0.5}, {"density": 0.01}, {"density": 0.5}], mixing="sum"),
    dict(mps=[{"density": 0.3, "weight": 0.7}] * 3, **{"lambda": 1.5}),
]


def _family(shape, dtype, seed=0, weights=0.02, deltas=0.002):
    """bf16-representable values at an LLM's scales (weights ~0.02, fine-tune deltas a tenth
    of that: each |delta| value repeats, hundreds of entries tie at each threshold), stored
    as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = (weights * torch.randn(shape, generator=g)).bfloat16()
    models = [(base.float() + deltas * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _run(base, models, kw, counted, method="ties"):
    """The kernel's result (float32), the reference's and the kernel, with the counting
    loop's calls recorded."""
    kw = dict(kw)
    mps = kw.pop("mps")
    tm = build_merge(method, base.float(), [m.float() for m in models], mps, **kw)
    ref = get_method(method).fn(tm)
    kernel = get_method(method).block_kernel(tm)
    assert isinstance(kernel, OnePassSelection)
    counted.clear()
    out = run_in_memory(kernel, tm, base, models)
    return out, ref, kernel


@pytest.fixture
def counted(monkeypatch):
    """Calls of the selection's compiled counting loop (each reads every input once)."""
    calls: list[int] = []
    real = stream.count_deltas_compiled

    def record(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(stream, "count_deltas_compiled", record)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_one_piece_is_merged_in_one_pass_equal_to_the_reference(dtype, case, counted) -> None:
    base, models = _family((600, 1000), dtype, seed=case)
    out, ref, kernel = _run(base, models, CASES[case], counted)
    assert torch.equal(out, ref)
    assert kernel._one_pass and kernel.selector.misses == 0 and kernel.selector.done
    assert counted == []  # no statistic pass read the inputs


def test_the_listed_entries_are_every_entry_a_bracket_left_open(counted) -> None:
    """The merge lists exactly the entries inside some model's bracket, in flat order."""
    base, models = _family((300, 700), torch.bfloat16, seed=5)
    tm = build_merge("ties", base.float(), [m.float() for m in models], [{"density": 0.3}] * 3)
    kernel = get_method("ties").block_kernel(tm)
    flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
    from surgeon.merge.kernels.base import PieceInputs

    assert kernel.observe_raw(0, PieceInputs(0, flat_b, flat_m)) and kernel._one_pass
    lo, hi, room, tie = kernel._brackets()
    lo, hi, tie = lo[:, 0], hi[:, 0], tie[:, 0]
    seen = {}
    real_merge = ties_compiled.merge_raw

    def spy(*a, brackets=None, **kw):
        r = real_merge(*a, brackets=brackets, **kw)
        if brackets is not None:
            seen["pos"] = brackets.entries.listed()[0].copy()
            seen["below"] = brackets.below[:, 0].copy()
        return r

    ties_compiled.merge_raw, saved = spy, ties_compiled.merge_raw
    try:
        kernel.merge_raw(PieceInputs(0, flat_b, flat_m), torch.empty(base.numel(), dtype=torch.bfloat16))
    finally:
        ties_compiled.merge_raw = saved
    mags = [(m.float() - flat_b.float()).abs() for m in flat_m]
    inside = torch.zeros(base.numel(), dtype=torch.bool)
    for i, a in enumerate(mags):
        if not tie[i]:  # a tie bracket's entries are counted, not listed
            inside |= (a >= float(lo[i])) & (a < float(hi[i]))
        assert int(seen["below"][i]) == int((a < float(lo[i])).sum())
    assert seen["pos"].tolist() == torch.nonzero(inside).squeeze(1).tolist()
    assert 0 < len(seen["pos"]) <= room


def test_a_bracket_that_misses_counts_with_passes_and_gives_the_same_result(counted, monkeypatch) -> None:
    """A sampled bracket moved below the threshold (as a sample of other data would put it):
    the merge's counts do not settle the selection, the passes count it, the result is exact."""
    base, models = _family((600, 1000), torch.bfloat16, seed=7)
    real = stream.StreamSelector.bracket

    def low(self, series):
        b = real(self, series)
        return None if b is None else (b[0] // 2, b[1], b[2])  # half the pattern: far below

    monkeypatch.setattr(stream.StreamSelector, "bracket", low)
    out, ref, kernel = _run(base, models, CASES[0], counted)
    assert torch.equal(out, ref)
    assert kernel.selector.misses == 1 and not kernel._one_pass and counted  # counted with passes


def test_more_listed_entries_than_room_count_with_passes(counted, monkeypatch) -> None:
    base, models = _family((600, 1000), torch.float32, seed=8)
    real = TiesKernel._brackets

    def cramped(self):
        b = real(self)
        return None if b is None else (b[0], b[1], 10, b[3])

    monkeypatch.setattr(TiesKernel, "_brackets", cramped)
    out, ref, kernel = _run(base, models, CASES[4], counted)
    assert torch.equal(out, ref)
    assert kernel.selector.misses == 1 and counted


@pytest.mark.parametrize("bad", ["nan", "inf", "none"])
def test_non_finite_inputs_are_reported_and_merged_as_the_reference(bad, counted) -> None:
    from surgeon.merge.kernels.base import PieceInputs, merge_piece, observe_piece

    base, models = _family((600, 1000), torch.float32, seed=9)
    if bad != "none":
        models[1].view(-1)[17] = float(bad)
    tm = build_merge("ties", base.float(), [m.float() for m in models], [{"density": 0.3}] * 3)
    ref = get_method("ties").fn(tm)
    kernel = get_method("ties").block_kernel(tm)
    piece = PieceInputs(0, base.reshape(-1), [m.reshape(-1) for m in models])
    observe_piece(kernel, tm, 0, piece)
    kernel.end_pass(0)
    assert kernel._one_pass and not kernel.pass_needed(1)
    out = torch.empty(base.numel())
    assert merge_piece(kernel, tm, piece, out) == (bad == "none")
    assert counted == []
    assert torch.equal(out.isfinite(), ref.reshape(-1).isfinite())
    finite = ref.reshape(-1).isfinite()
    assert torch.equal(out[finite], ref.reshape(-1)[finite])


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_model_trimmed_away_drops_its_infinite_entries_in_one_pass(bad, counted) -> None:
    """A model of density 0 beside bracketed ones: its trim (zero where |delta| <= inf) drops
    infinite deltas as the reference does; a NaN delta makes its entry NaN (the compiled
    loop's rule, ties_compiled's docstring: the engine then stops on the non-finite output)."""
    base, models = _family((600, 1000), torch.float32, seed=11)
    at = [17, 5000, 77777]
    models[1].view(-1)[at] = float(bad)
    mps = [{"density": 0.3}, {"density": 0.0}, {"density": 0.6}]
    out, ref, kernel = _run(base, models, dict(mps=mps), counted)
    assert kernel._one_pass and counted == []
    if bad == "nan":
        assert bool(out.view(-1)[at].isnan().all())
        out.view(-1)[at] = ref.view(-1)[at]
    assert torch.equal(out, ref)


def test_a_tensor_cut_into_pieces_keeps_its_statistic_pass(counted) -> None:
    """Only a whole tensor in one piece is merged in one pass (a piece's output is written
    before the next is read)."""
    from surgeon.merge.kernels.base import PieceInputs

    base, models = _family((600, 1000), torch.bfloat16, seed=1)
    tm = build_merge("ties", base.float(), [m.float() for m in models], [{"density": 0.3}] * 3)
    kernel = get_method("ties").block_kernel(tm)
    half = base.numel() // 2
    piece = PieceInputs(0, base.reshape(-1)[:half], [m.reshape(-1)[:half] for m in models])
    assert kernel.observe_raw(0, piece) and not kernel._one_pass and counted


def test_brackets_listing_much_of_the_tensor_keep_the_statistic_pass(counted, monkeypatch) -> None:
    """Brackets that would list more than ONE_PASS_SHARE of the tensor (here a limit lowered
    below their share) leave the selection to a counting pass first."""
    from surgeon.merge.kernels import one_pass

    monkeypatch.setattr(one_pass, "ONE_PASS_SHARE", 0.001)
    g = torch.Generator().manual_seed(0)  # float32 values all apart: no tie brackets
    base = 0.02 * torch.randn((600, 1000), generator=g)
    models = [base + 0.002 * torch.randn((600, 1000), generator=g) for _ in range(3)]
    out, ref, kernel = _run(base, models, CASES[0], counted)
    assert torch.equal(out, ref)
    assert not kernel._one_pass and counted


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_a_fifth_of_the_entries_tied_at_a_cut_is_counted_not_listed(method, counted) -> None:
    """Deltas of a few bf16 steps: a fifth of the entries tie at one value, where a cut falls.
    Its bracket holds that value alone; the merge counts those entries (the listed share stays
    small) and settles in one pass, equal to the reference."""
    base, models = _family((600, 1000), torch.bfloat16, seed=0, weights=1.0, deltas=0.01)
    case = CASES[0] if method == "ties" else BREADCRUMBS_CASES[0]
    out, ref, kernel = _run(base, models, case, counted, method)
    ties = [s for s in kernel.selector.ks if kernel.selector._width.get(s) == 1]
    assert ties and max(kernel.selector._share[s] for s in ties) > (0.15 if method == "ties" else 0.02)
    assert kernel._one_pass and counted == [] and kernel.selector.misses == 0
    assert torch.equal(out, ref)


BREADCRUMBS_CASES = [
    dict(mps=[{"density": 0.3, "gamma": 0.01}] * 3),
    dict(mps=[{"density": 0.2, "gamma": 0.1, "weight": 0.5}, {"density": 0.9, "gamma": 0.05}, {"density": 1.0}]),
    dict(mps=[{"density": 0.4, "gamma": 0.3}, {"density": 0.5, "gamma": 0.2}, {"density": 0.3, "gamma": 0.0}],
         **{"lambda": 0.8}),
]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(BREADCRUMBS_CASES)))
def test_breadcrumbs_one_piece_is_merged_in_one_pass_equal_to_the_reference(method, dtype, case, counted) -> None:
    base, models = _family((600, 1000), dtype, seed=10 + case)
    out, ref, kernel = _run(base, models, BREADCRUMBS_CASES[case], counted, method)
    assert torch.equal(out, ref)
    assert kernel._one_pass and kernel.selector.misses == 0 and kernel.selector.done
    assert counted == []


def test_breadcrumbs_edge_ranges_equal_the_reference(counted) -> None:
    """A start cut at 0 (only the stop cut is selected), no entries kept, a stop cut so close to
    the top that the sample cannot bracket it (then the counting pass runs)."""
    base, models = _family((600, 1000), torch.bfloat16, seed=3)
    mps = [{"density": 0.5, "gamma": 0.6}, {"density": 0.0}, {"density": 0.999, "gamma": 0.0}]
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        out, ref, _ = _run(base, models, dict(mps=mps), counted, method)
        assert torch.equal(out, ref)


def test_a_missed_breadcrumbs_bracket_counts_with_passes(counted, monkeypatch) -> None:
    base, models = _family((600, 1000), torch.bfloat16, seed=12)
    real = stream.StreamSelector.bracket

    def high(self, series):
        b = real(self, series)
        return None if b is None else (b[0] + (1 << 23), b[1], b[2])  # twice the magnitude: far above

    monkeypatch.setattr(stream.StreamSelector, "bracket", high)
    out, ref, kernel = _run(base, models, BREADCRUMBS_CASES[0], counted, "breadcrumbs_ties")
    assert torch.equal(out, ref)
    assert kernel.selector.misses == 1 and not kernel._one_pass and counted


def _sparse_family(shape, dtype, seed, changed=0.9):
    """Fine-tunes that each leave a share of the entries alone (``1 - changed``): entries one
    model alone changed (RAM+ scales those by lambda_i) are ~3 % of them at 0.9, ~43 % at 0.4."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=g)).bfloat16()
    models = []
    for _ in range(3):
        keep = torch.rand(shape, generator=g) < changed
        models.append((base.float() + 0.002 * torch.randn(shape, generator=g) * keep).bfloat16())
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.fixture
def ram_counted(monkeypatch):
    """Calls of RAM+'s compiled counting pass (each reads every input once), and the lengths
    of the arrays each compiled mix got (``ram_counted.mixes``)."""
    from surgeon.merge.kernels import ram_compiled

    class Calls(list):
        mixes: list[int] = []

    calls = Calls()
    calls.mixes = []
    real_counts, real_mix = ram_compiled.ram_counts, ram_compiled.ram_mix
    monkeypatch.setattr(ram_compiled, "ram_counts", lambda *a, **kw: calls.append(1) or real_counts(*a, **kw))
    monkeypatch.setattr(ram_compiled, "ram_mix", lambda *a, **kw: calls.mixes.append(a[0].shape[0])
                        or real_mix(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
# alpha 1000: lambda follows the exact shared/unique counts (the default clamp hides them)
@pytest.mark.parametrize("params", [{}, {"r": 0.001, "alpha": 1000.0}, {"epsilon": 0.00005, "alpha": 1000.0}])
def test_ramplus_one_piece_is_merged_in_one_pass_equal_to_the_reference(dtype, params, ram_counted) -> None:
    from surgeon.merge.kernels.ram import RamKernel

    base, models = _sparse_family((600, 1000), dtype, seed=20)
    tm = build_merge("ramplus_tl", base.float(), [m.float() for m in models], [{}] * 3, **params)
    ref = get_method("ramplus_tl").fn(tm)
    kernel = get_method("ramplus_tl").block_kernel(tm)
    assert isinstance(kernel, RamKernel)
    out = run_in_memory(kernel, tm, base, models)
    assert torch.equal(out, ref)
    assert ram_counted == [] and kernel.lambdas is not None and any(v != 1.0 for v in kernel.lambdas)
    n = base.numel()
    assert len(ram_counted.mixes) == 2 and ram_counted.mixes[0] == n and 0 < ram_counted.mixes[1] < n // 16


def test_ramplus_with_more_lone_entries_than_room_mixes_again(ram_counted) -> None:
    base, models = _sparse_family((600, 1000), torch.bfloat16, seed=21, changed=0.4)  # ~43 % listed
    tm = build_merge("ramplus_tl", base.float(), [m.float() for m in models], [{}] * 3)
    ref = get_method("ramplus_tl").fn(tm)
    out = run_in_memory(get_method("ramplus_tl").block_kernel(tm), tm, base, models)
    assert torch.equal(out, ref)
    assert ram_counted.mixes == [base.numel(), base.numel()] and ram_counted == []


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_ramplus_non_finite_inputs_are_reported_as_the_reference(bad, ram_counted) -> None:
    from surgeon.merge.kernels.base import PieceInputs, merge_piece, observe_piece

    base, models = _sparse_family((600, 1000), torch.float32, seed=22)
    models[1].view(-1)[17] = float(bad)
    tm = build_merge("ramplus_tl", base.float(), [m.float() for m in models], [{}] * 3)
    ref = get_method("ramplus_tl").fn(tm).reshape(-1)
    kernel = get_method("ramplus_tl").block_kernel(tm)
    piece = PieceInputs(0, base.reshape(-1), [m.reshape(-1) for m in models])
    observe_piece(kernel, tm, 0, piece)
    kernel.end_pass(0)
    out = torch.empty(base.numel())
    assert merge_piece(kernel, tm, piece, out) is False and ram_counted == []
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert torch.equal(out[ref.isfinite()], ref[ref.isfinite()])
