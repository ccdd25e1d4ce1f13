"""Tensor-level comparison with mergekit's own merge-method implementations.

mergekit is called through its Python API (``mergekit.merge_methods.api``
``merge_tensors`` on the registered methods, or the functions they use) on
the same small float32 tensors; with float32 inputs mergekit computes in
float32 too, so the tolerance is float32 rounding. Random inputs have no
exact ties in magnitude, where the two may legitimately choose differently.
"""
from __future__ import annotations

import pytest
import torch

from surgeon.merge import merge_tensors as ours

mk_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit is not installed")

pytestmark = pytest.mark.mergekit

SHAPES = [(16, 24), (40,), (3, 5, 7)]
WEIGHTS = [1.0, 0.5, 0.8]
DENSITIES = [0.5, 0.3, 0.7]
ATOL = 1e-5


def inputs(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def theirs(method, base, models, **parameters):
    tensors = [base, *models] if base is not None else list(models)
    return mk_api.merge_tensors(tensors, method, parameters=parameters,
                                base_index=0 if base is not None else None, dtype=torch.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_linear(shape):
    _, models = inputs(shape)
    mk = theirs("linear", None, models, weight=WEIGHTS)
    us = ours("linear", None, models, [{"weight": w} for w in WEIGHTS])
    assert torch.allclose(us, mk, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic(shape):
    base, models = inputs(shape, seed=1)
    mk = theirs("task_arithmetic", base, models, weight=WEIGHTS, **{"lambda": 0.7})
    us = ours("task_arithmetic", base, models, [{"weight": w} for w in WEIGHTS], **{"lambda": 0.7})
    assert torch.allclose(us, mk, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_tensor_scope(shape, normalize):
    base, models = inputs(shape, seed=2)
    mk = theirs("ties", base, models, weight=WEIGHTS, density=DENSITIES, normalize=normalize, **{"lambda": 1.2})
    mps = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES)]
    us = ours("ties", base, models, mps, normalize=normalize, **{"lambda": 1.2})
    assert torch.allclose(us, mk, atol=ATOL)


def test_ties_rescale():
    base, models = inputs((12, 10), seed=3)
    mk = theirs("ties", base, models, weight=WEIGHTS, density=DENSITIES, rescale=True)
    us = ours("ties", base, models, [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES)], rescale=True)
    assert torch.allclose(us, mk, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("gamma", [0.01, 0.1, 0.4])
def test_breadcrumbs(shape, method, gamma):
    base, models = inputs(shape, seed=4)
    gammas = [gamma, gamma / 2, gamma]
    mk = theirs(method, base, models, weight=WEIGHTS, density=DENSITIES, gamma=gammas)
    mps = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(WEIGHTS, DENSITIES, gammas)]
    us = ours(method, base, models, mps)
    assert torch.allclose(us, mk, atol=ATOL)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_without_dropping(method):
    # density 1 draws nothing in either implementation: the deterministic tail must agree
    base, models = inputs((9, 11), seed=5)
    mk = theirs(method, base, models, weight=WEIGHTS, density=1.0)
    us = ours(method, base, models, [{"weight": w} for w in WEIGHTS])
    assert torch.allclose(us, mk, atol=ATOL)


def test_della_keeps_each_rank_as_often_as_mergekit():
    """MagPrune's keep frequency at each magnitude rank, over 40,000 rows of the same
    twelve distinct magnitudes (random signs and order per row): ours (no ranking,
    a random partner in the band) against mergekit's ``della_magprune`` (ranks, then
    ``torch.bernoulli``), within 5 standard errors of their difference."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    rows, n, density, eps = 40_000, 12, 0.5, 0.35
    g = torch.Generator().manual_seed(12)
    mags = torch.linspace(0.1, 1.2, n)
    order = torch.argsort(torch.rand(rows, n, generator=g), dim=1)
    tau = mags[order] * torch.where(torch.rand(rows, n, generator=g) < 0.5, -1.0, 1.0)
    torch.manual_seed(0)
    mk = sparsify.della_magprune(tau, density, eps) != 0
    us = ours("della_linear", torch.zeros(rows, n), [tau], [{"density": density, "epsilon": eps}],
              rescale=False, name="w") != 0
    rank = order  # the entry at column c has magnitude rank order[r, c]
    f_mk = torch.zeros(n).scatter_add_(0, rank.reshape(-1), mk.reshape(-1).float()) / rows
    f_us = torch.zeros(n).scatter_add_(0, rank.reshape(-1), us.reshape(-1).float()) / rows
    p = density - eps + 2 * eps * torch.arange(n) / (n - 1)
    se = (2 * p * (1 - p) / rows).sqrt()
    assert ((f_us - f_mk).abs() / se).max() < 5
    assert ((f_us - p).abs() / se).max() < 5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(shape, t):
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mk = theirs("slerp", a, [b], t=t)
    us = ours("slerp", a, [b], t=t)
    assert torch.allclose(us, mk, atol=ATOL)


def test_slerp_colinear_falls_back_to_lerp():
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    mk = theirs("slerp", a, [2.5 * a], t=0.4)
    us = ours("slerp", a, [2.5 * a], t=0.4)
    assert torch.allclose(us, mk, atol=ATOL)
    assert torch.allclose(us, 0.6 * a + 0.4 * 2.5 * a, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, filter_wise):
    base, models = inputs(shape, seed=8)
    mk = theirs("model_stock", base, models, filter_wise=filter_wise)
    us = ours("model_stock", base, models, filter_wise=filter_wise)
    assert torch.allclose(us, mk, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce(shape, select_topk):
    base, models = inputs(shape, seed=9)
    mk = theirs("sce", base, models, select_topk=select_topk)
    us = ours("sce", base, models, select_topk=select_topk)
    assert torch.allclose(us, mk, atol=ATOL)


def test_bf16_inputs_within_bf16_tolerance():
    """mergekit computes TIES in the checkpoint dtype (bf16); we compute in float32."""
    base, models = inputs((32, 32), seed=10)
    base16, models16 = base.bfloat16(), [m.bfloat16() for m in models]
    mk = mk_api.merge_tensors([base16, *models16], "ties", base_index=0,
                              parameters={"weight": WEIGHTS, "density": DENSITIES})
    us = ours("ties", base16.float(), [m.float() for m in models16],
              [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES)])
    # bf16 has 8 bits of mantissa: compare at its resolution, allowing a few
    # entries whose bf16 trim differs (equal bf16 magnitudes, chosen differently)
    close = torch.isclose(us.bfloat16().float(), mk.float(), rtol=2 ** -7, atol=2 ** -7)
    assert close.float().mean() > 0.97
