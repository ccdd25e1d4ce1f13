"""Hand-computed cases and invariants for DARE, breadcrumbs, DELLA, SLERP, Model Stock, SCE,
and the registry declarations of every method."""
from __future__ import annotations

import math

import pytest
import torch

from surgeon.errors import InvalidInputError
from surgeon.merge import all_methods, get_method
from surgeon.merge import build_merge, merge_tensors


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# registry declarations

EXPECTED = {
    # name: (needs_base, min_models, max_models, randomized, mergekit_name)
    "ties": (True, 1, None, False, "ties"),
    "widen": (True, 1, None, False, None),
    "dare_linear": (True, 1, None, True, "dare_linear"),
    "dare_ties": (True, 1, None, True, "dare_ties"),
    "breadcrumbs": (True, 1, None, False, "breadcrumbs"),
    "breadcrumbs_ties": (True, 1, None, False, "breadcrumbs_ties"),
    "della": (True, 1, None, True, "della"),
    "della_linear": (True, 1, None, True, "della_linear"),
    "slerp": (True, 1, 1, False, "slerp"),
    "model_stock": (True, 2, None, False, "model_stock"),
    "sce": (True, 1, None, False, "sce"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_declarations(name):
    m = get_method(name)
    assert (m.needs_base, m.min_models, m.max_models, m.randomized, m.mergekit_name) == EXPECTED[name]
    assert "arXiv" in m.paper or name == "slerp"
    assert m.summary and m.fn.__doc__
    assert m.fn.__module__.startswith("surgeon.merge.")
    for p in m.params:
        if p.kind is float and p.name in ("density", "gamma", "epsilon", "t", "select_topk"):
            assert p.min == 0.0 and p.max is not None


def test_helper_modules_are_not_methods():
    assert not any(m.fn.__module__.split(".")[-1].startswith("_") for m in all_methods().values())


def test_mergekit_defaults():
    d = {n: {p.name: p.default for p in get_method(n).params} for n in EXPECTED}
    assert d["ties"]["density"] == 1.0 and d["ties"]["normalize"] is True and d["ties"]["weight"] == 1.0
    assert d["dare_ties"]["normalize"] is False and d["dare_ties"]["rescale"] is True
    assert d["breadcrumbs"]["gamma"] == 0.01 and d["breadcrumbs"]["normalize"] is False
    assert d["della"]["epsilon"] == 0.15 and d["della"]["normalize"] is True and d["della_linear"]["normalize"] is False
    assert d["sce"]["select_topk"] == 1.0
    assert d["widen"]["above_average_value_ratio"] == 1.0 and d["widen"]["score_calibration_value"] == 1.0


# ---------------------------------------------------------------------------
# DARE

def test_dare_density_one_equals_task_arithmetic():
    base, a, b = rnd(5, 6, seed=1), rnd(5, 6, seed=2), rnd(5, 6, seed=3)
    mp = [{"weight": 0.6}, {"weight": 1.2}]
    ta = merge_tensors("task_arithmetic", base, [a, b], mp, **{"lambda": 0.8})
    out = merge_tensors("dare_linear", base, [a, b], mp, **{"lambda": 0.8})
    assert torch.allclose(out, ta, atol=1e-6)


def test_dare_drops_and_rescales_by_inverse_density():
    base = torch.zeros(4000)
    tau = torch.full((4000,), 0.5)
    out = merge_tensors("dare_linear", base, [tau], [{"density": 0.25}], name="x")
    kept = out != 0
    assert torch.all(out[kept] == 2.0)  # 0.5 / 0.25
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    no_rescale = merge_tensors("dare_linear", base, [tau], [{"density": 0.25}], name="x", rescale=False)
    assert torch.equal(no_rescale != 0, kept)  # same draw, survivors kept as they were
    assert torch.all(no_rescale[kept] == 0.5)
    assert merge_tensors("dare_linear", base, [tau], [{"density": 0.0}]).abs().sum() == 0


def test_dare_ties_hand_check():
    # density 1: no drop; then TIES sign election with a zero sum counting as positive, no normalize
    out = merge_tensors("dare_ties", [0, 0, 0], [[1, -2, 3], [-1, -1, 1]])
    assert out.tolist() == [1.0, -3.0, 4.0]


@pytest.mark.parametrize("method,params", [("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                                           ("della", {"density": 0.5, "epsilon": 0.2}),
                                           ("della_linear", {"density": 0.5, "epsilon": 0.2})])
def test_seeded_randomness(method, params):
    base = rnd(32, 32, seed=4)
    models = [rnd(32, 32, seed=5), rnd(32, 32, seed=6)]
    mp = [dict(params), dict(params)]
    a = merge_tensors(method, base, models, mp, name="model.layers.0.w", seed=7)
    b = merge_tensors(method, base, models, mp, name="model.layers.0.w", seed=7)
    c = merge_tensors(method, base, models, mp, name="model.layers.1.w", seed=7)
    d = merge_tensors(method, base, models, mp, name="model.layers.0.w", seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_dare_models_get_different_masks():
    base = torch.zeros(1000)
    out = build_merge("dare_linear", base, [torch.ones(1000), torch.ones(1000)], [{"density": 0.5}] * 2)
    from surgeon.merge.methods.dare import _dropped_deltas

    d1, d2 = _dropped_deltas(out)
    assert not torch.equal(d1 != 0, d2 != 0)


# ---------------------------------------------------------------------------
# breadcrumbs

TAU10 = [0.1, -0.9, 0.5, 0.3, -0.2, 0.7, 0.05, -0.6, 0.4, 0.8]


def test_breadcrumbs_hand_computed():
    # n=10, density .5, gamma .2: keep 5, drop the top 2 (0.9, 0.8) and the bottom 3 (0.05, 0.1, 0.2)
    out = merge_tensors("breadcrumbs", [0.0] * 10, [TAU10], [{"density": 0.5, "gamma": 0.2}])
    assert out.tolist() == pytest.approx([0, 0, 0.5, 0.3, 0, 0.7, 0, -0.6, 0.4, 0])
    # density .9, gamma .2: 9 + 2 > 10, so only the top 1 is dropped (mergekit's rule)
    out = merge_tensors("breadcrumbs", [0.0] * 10, [TAU10], [{"density": 0.9, "gamma": 0.2}])
    assert out.tolist() == pytest.approx([0.1, 0, 0.5, 0.3, -0.2, 0.7, 0.05, -0.6, 0.4, 0.8])
    # density 1 keeps everything whatever gamma
    out = merge_tensors("breadcrumbs", [0.0] * 10, [TAU10], [{"density": 1.0, "gamma": 0.5}])
    assert out.tolist() == pytest.approx(TAU10)


def test_breadcrumbs_ties_hand_computed():
    # density .5 gamma .25 on 4 entries: target 2, drop top 1, bottom 1 -> ranks 1..2
    # tau1 = [4, 1, -2, 3] keeps -2 and 3; tau2 = [1, -3, 2, 0.5] keeps 1 and 2
    # sums [1, 0, 0, 3] -> all '+': idx0 tau2 1; idx2 tau2 2 (tau1 -2 disagrees); idx3 tau1 3
    mp = [{"density": 0.5, "gamma": 0.25}] * 2
    out = merge_tensors("breadcrumbs_ties", [0, 0, 0, 0], [[4, 1, -2, 3], [1, -3, 2, 0.5]], mp)
    assert out.tolist() == [1.0, 0.0, 2.0, 3.0]
    out = merge_tensors("breadcrumbs", [0, 0, 0, 0], [[4, 1, -2, 3], [1, -3, 2, 0.5]], mp)
    assert out.tolist() == [1.0, 0.0, 0.0, 3.0]


# ---------------------------------------------------------------------------
# DELLA

def test_della_keep_probability_follows_magnitude_rank():
    # rows of 2 entries: the smaller is kept with p = density - eps, the larger with density + eps
    rows = 20000
    tau = torch.stack([torch.full((rows,), 0.1), torch.full((rows,), 1.0)], dim=1)
    out = merge_tensors("della_linear", torch.zeros(rows, 2), [tau], [{"density": 0.5, "epsilon": 0.4}],
                        rescale=False, name="w")
    freq = (out != 0).float().mean(dim=0)
    assert abs(freq[0].item() - 0.1) < 0.015 and abs(freq[1].item() - 0.9) < 0.015
    assert set(out[:, 1].unique().tolist()) <= {0.0, 1.0}


def test_della_rescale_restores_l1_norm_and_validates_epsilon():
    tau = rnd(16, 16, seed=9)
    out = merge_tensors("della_linear", torch.zeros(16, 16), [tau], [{"density": 0.4, "epsilon": 0.1}])
    assert torch.isclose(out.abs().sum(), tau.abs().sum(), rtol=1e-5)
    with pytest.raises(InvalidInputError, match="epsilon"):
        merge_tensors("della", torch.zeros(4), [torch.ones(4)], [{"density": 0.9, "epsilon": 0.15}], name="w")
    # density 1 ignores epsilon: plain TIES-style mean of the (unpruned) task vectors
    out = merge_tensors("della", [0, 0], [[1, -2], [3, 2]])
    assert out.tolist() == [2.0, 2.0]


# ---------------------------------------------------------------------------
# SLERP

def test_slerp_hand_computed():
    s = math.sin(math.pi / 4)  # theta = pi/2, t = .5: both coefficients sin(pi/4) / sin(pi/2)
    assert merge_tensors("slerp", [1, 0], [[0, 1]], t=0.5).tolist() == pytest.approx([s, s])
    assert merge_tensors("slerp", [1, 0], [[0, 2]], t=0.5).tolist() == pytest.approx([s, 2 * s])
    # t = 1/3 of a right angle: cos(pi/6), sin(pi/6)
    assert merge_tensors("slerp", [1, 0], [[0, 1]], t=1 / 3).tolist() == pytest.approx([math.sqrt(3) / 2, 0.5])
    # colinear: linear interpolation of the un-normalised vectors
    assert merge_tensors("slerp", [1, 2], [[2, 4]], t=0.25).tolist() == pytest.approx([1.25, 2.5])
    # the base is the t = 0 end
    assert merge_tensors("slerp", [1, 0], [[0, 1]], t=0.0).tolist() == pytest.approx([1, 0])
    assert merge_tensors("slerp", [1, 0], [[0, 1]], t=1.0).tolist() == pytest.approx([0, 1], abs=1e-7)


def test_slerp_self_merge_and_zero_vector():
    m = rnd(4, 5, seed=11)
    assert torch.allclose(merge_tensors("slerp", m, [m], t=0.7), m, atol=1e-6)
    # a zero base: its norm counts as 1, dot 0 -> spherical weights, finite
    out = merge_tensors("slerp", [0, 0], [[3, 4]], t=0.5)
    assert out.tolist() == pytest.approx([3 * math.sin(math.pi / 4), 4 * math.sin(math.pi / 4)])


def test_slerp_needs_exactly_two_models():
    with pytest.raises(InvalidInputError, match="model.layers.3.w.*exactly 2"):
        merge_tensors("slerp", [1, 0], [[0, 1], [1, 1]], t=0.5, name="model.layers.3.w")
    with pytest.raises(InvalidInputError, match="exactly 2"):
        merge_tensors("slerp", None, [[0, 1], [1, 1]], t=0.5)
    with pytest.raises(InvalidInputError, match="'t' is required"):
        build_merge("slerp", [1, 0], [[0, 1]])
    with pytest.raises(InvalidInputError, match="<= 1"):
        build_merge("slerp", [1, 0], [[0, 1]], t=1.5)


# ---------------------------------------------------------------------------
# Model Stock

def test_model_stock_hand_computed():
    # orthogonal offsets: cos 0 -> t 0 -> the base
    assert merge_tensors("model_stock", [0, 0], [[1, 0], [0, 1]]).tolist() == [0.0, 0.0]
    # offsets [1,0] and [1,1]: cos = 1/sqrt2, t = 2c / (1 + c) = 0.828427; average [1, .5]
    c = 1 / math.sqrt(2)
    tt = 2 * c / (1 + c)
    assert merge_tensors("model_stock", [0, 0], [[1, 0], [1, 1]]).tolist() == pytest.approx([tt, tt / 2])
    # identical models: cos 1, t 1 -> the model; opposite: 1 + (N-1) cos = 0 -> the base
    assert merge_tensors("model_stock", [1, 1], [[2, 3], [2, 3]]).tolist() == pytest.approx([2, 3])
    assert merge_tensors("model_stock", [1, 1], [[2, 1], [0, 1]]).tolist() == [1.0, 1.0]


def test_model_stock_filter_wise():
    base = [[0.0, 0.0], [0.0, 0.0]]
    a = [[1.0, 0.0], [1.0, 0.0]]
    b = [[0.0, 1.0], [1.0, 0.0]]  # row 0 orthogonal (t 0), row 1 identical (t 1)
    out = merge_tensors("model_stock", base, [a, b], filter_wise=True)
    assert out.tolist() == [[0.0, 0.0], [1.0, 0.0]]
    with pytest.raises(InvalidInputError, match="at least 2"):
        merge_tensors("model_stock", [0.0], [[1.0]], name="w")


# ---------------------------------------------------------------------------
# SCE

def test_sce_hand_computed():
    # weights: mean squares 1.5 and 3.5 -> .3, .7; elected signs [+, 0->+, 0->+, +... ]:
    # idx0 both agree: (.3*1 + .7*3) / 1 = 2.4; idx1 only tau1: 2; idx2 none: 0; idx3 only tau2: 1
    out = merge_tensors("sce", [0, 0, 0, 0], [[1, 2, 0, -1], [3, -2, 0, 1]])
    assert out.tolist() == pytest.approx([2.4, 2.0, 0.0, 1.0])
    # select_topk .5: variances [1, 4, 0, 1], 3 non-zero -> k = 1 -> only idx1 survives;
    # weights .5/.5, zero sum there -> '+': tau1's 2
    out = merge_tensors("sce", [0, 0, 0, 0], [[1, 2, 0, -1], [3, -2, 0, 1]], select_topk=0.5)
    assert out.tolist() == pytest.approx([0.0, 2.0, 0.0, 0.0])
    # select_topk .67: k = 2 -> idx1 and, of the tied variances at idx0 and idx3, idx0
    # weights: tau1 [1,2,0,0] -> 1.25, tau2 [3,-2,0,0] -> 3.25; idx0: (1.25*1 + 3.25*3)/4.5
    out = merge_tensors("sce", [0, 0, 0, 0], [[1, 2, 0, -1], [3, -2, 0, 1]], select_topk=0.67)
    assert out.tolist() == pytest.approx([(1.25 + 9.75) / 4.5, 2.0, 0.0, 0.0])


def test_sce_identical_models_and_single_model():
    base, m = rnd(6, 3, seed=12), rnd(6, 3, seed=13)
    assert torch.allclose(merge_tensors("sce", base, [m, m]), m, atol=1e-6)
    # one model, select_topk < 1: every variance is 0, nothing is selected -> the base (as mergekit)
    assert torch.allclose(merge_tensors("sce", base, [m], select_topk=0.5), base)
    assert torch.allclose(merge_tensors("sce", base, [m]), m, atol=1e-6)


# ---------------------------------------------------------------------------
# self-merges and shape validation

@pytest.mark.parametrize("method,params", [
    ("linear", {}), ("ties", {}), ("della", {}), ("sce", {}), ("model_stock", {}),
    # methods whose mergekit default is to add task vectors promise it only when normalised
    ("dare_linear", {"normalize": True}), ("breadcrumbs", {"normalize": True}),
    ("task_arithmetic", {"normalize": True}),
])
def test_self_merge_returns_the_model(method, params):
    base, m = rnd(7, 3, seed=14), rnd(7, 3, seed=15)
    out = merge_tensors(method, base, [m, m], **params)
    assert torch.allclose(out, m, atol=1e-6)
    if not params:
        assert torch.allclose(merge_tensors(method, base, [m, m, m]), m, atol=1e-6)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_shape_mismatch_names_the_tensor(method):
    params = {"t": 0.5} if method == "slerp" else {}
    models = [torch.zeros(3, 2)] if method == "slerp" else [torch.zeros(3, 2), torch.zeros(2, 3)]
    with pytest.raises(InvalidInputError, match="model.layers.9.x"):
        merge_tensors(method, torch.zeros(2, 3), models, name="model.layers.9.x", **params)
