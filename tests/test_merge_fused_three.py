"""The compiled merges' fused loops for three models equal the reference functions.

Three models electing signs (TIES' trim, DARE's drop) take one fused loop per chunk in
:mod:`surgeon.merge.kernels.ties_compiled` instead of a loop per operation; every
setting it folds into selects (consensus by sum or count, normalize with positive or
mixed-sign weights, lambda, a model kept whole or trimmed away) is checked here against
the whole-tensor reference, with NaN and infinite inputs, bit for bit. SCE's
erase-and-mix (:mod:`surgeon.merge.kernels.sce_compiled`) likewise, with entries whose
sign hangs on the order of the additions and variances tied at the threshold.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from surgeon.merge.apply import apply_method, build_merge
from surgeon.merge.kernels import ties_compiled
from surgeon.merge.kernels.base import BLOCK_ELEMS
from surgeon.merge.registry import get_method

pytestmark = pytest.mark.skipif(not ties_compiled.available(), reason="the fused loop is compiled")


def _family(n: int, seed: int, bad: bool, nan: bool = True):
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(n, generator=g)).bfloat16().float()
    models = [(base + 0.002 * torch.randn(n, generator=g)).bfloat16().float() for _ in range(3)]
    if bad:
        models[0][7] = float("nan") if nan else 0.5
        models[1][1000] = float("inf")
        models[2][1001] = float("-inf")
    return base, models


def _same(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Bit-identical, NaN where the reference has NaN (which NaN may differ)."""
    nan = torch.isnan(ref)
    return bool(torch.equal(torch.isnan(got), nan)) and torch.equal(got[~nan], ref[~nan])


WEIGHTS = [[1.0, 1.0, 1.0], [0.7, 0.0, 2.0], [1.0, -0.5, 0.3]]


@pytest.mark.parametrize("consensus,normalize,weights,lam", list(itertools.product(
    ["sum", "count"], [True, False], range(len(WEIGHTS)), [1.0, 1.5])))
def test_ties_three_models(consensus, normalize, weights, lam) -> None:
    # infinite inputs, no NaN: a NaN |delta| ranks differently in the reference's kthvalue than in
    # the streamed selection (pre-existing; a NaN output stops the engine anyway)
    base, models = _family(2 * BLOCK_ELEMS + 333, seed=weights, bad=lam == 1.5, nan=False)
    mps = [{"weight": w, "density": d} for w, d in zip(WEIGHTS[weights], [0.3, 1.0, 0.6])]
    kw = dict(consensus=consensus, normalize=normalize, **{"lambda": lam})
    m = get_method("ties")
    ref = m.fn(build_merge("ties", base, models, mps, **kw))
    assert _same(apply_method(m, build_merge("ties", base, models, mps, **kw)), ref)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale,normalize,weights,lam", list(itertools.product(
    [True, False], [True, False], range(len(WEIGHTS)), [1.0, 0.8])))
def test_dare_three_models(method, rescale, normalize, weights, lam) -> None:
    base, models = _family(2 * BLOCK_ELEMS + 333, seed=10 + weights, bad=lam == 0.8)
    mps = [{"weight": w, "density": d} for w, d in zip(WEIGHTS[weights], [0.3, 1.0, 0.55])]
    kw = dict(rescale=rescale, normalize=normalize, **{"lambda": lam})
    name = "model.layers.3.mlp.up_proj.weight"
    m = get_method(method)
    ref = m.fn(build_merge(method, base, models, mps, name=name, seed=5, **kw))
    assert _same(apply_method(m, build_merge(method, base, models, mps, name=name, seed=5, **kw)), ref)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("bad", [False, True])
def test_sce_three_models(topk, bad) -> None:
    # the weights are sums of squares: with a NaN or infinite input every entry is NaN or infinite
    base, models = _family(2 * BLOCK_ELEMS + 333, seed=20, bad=bad)
    # sum of signs hanging on the order of the additions: ((1 - 2^-24) + -1) < 0, 1 + (-2^-24 + -1) == 0
    for j in (5, 77, BLOCK_ELEMS + 5):
        base[j] = 0.0
        models[0][j], models[1][j], models[2][j] = 1.0, -(2.0 ** -24), -1.0
    kw = {"select_topk": topk}
    m = get_method("sce")
    ref = m.fn(build_merge("sce", base, models, **kw))
    assert bad or bool(ref[5] < 0)  # the elected sign is the one the ordered sum gives
    assert _same(apply_method(m, build_merge("sce", base, models, **kw)), ref)


@pytest.mark.parametrize("models_n", [2, 3, 4])
def test_sce_variance_patterns_equal_torch(models_n) -> None:
    """The compiled variance (one fused loop for three models, per-operation loops
    otherwise) has torch's bits on every entry: a window over every pattern records
    them all, in flat order. Task vectors of mixed magnitudes make the order of the
    additions show in the last bits."""
    import numpy as np

    from surgeon.merge.kernels import sce_compiled
    from surgeon.merge.kernels.sce import variance

    g = torch.Generator().manual_seed(31)
    n = 3 * 512 + 77
    base = torch.randn(n, generator=g)
    models = [base + torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 4, (n,), generator=g).float())
              for _ in range(models_n)]
    want = variance([m - base for m in models]).numpy().view(np.uint32)
    counts = np.zeros(3, np.int64)
    rec_bits = np.zeros(n + 1, np.uint32)
    rec_sq = np.zeros((models_n, n + 1), np.float32)
    sce_compiled.window_pass(base.numpy(), tuple(m.numpy() for m in models), 0, 0xFFFFFFFF, counts,
                             np.zeros(models_n), rec_bits, rec_sq)
    assert counts[2] == n
    assert np.array_equal(rec_bits[:n], want)
    assert np.array_equal(rec_sq[:, :n], np.stack([((m - base) ** 2).numpy() for m in models]))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale,normalize,weights,lam", list(itertools.product(
    [True, False], [True, False], range(len(WEIGHTS)), [1.0, 0.8])))
def test_della_three_models(method, rescale, normalize, weights, lam) -> None:
    """DELLA's keep bits (and a model kept whole) through the fused loop, with the
    consensus (della) and without (della_linear), bit for bit."""
    base, models = _family(491 * 1069, seed=40 + weights, bad=lam == 0.8)  # 2 blocks and a bit
    base, models = base.reshape(491, 1069), [m.reshape(491, 1069) for m in models]  # MagPrune ranks rows
    mps = [{"weight": w, "density": d, "epsilon": e}
           for w, d, e in zip(WEIGHTS[weights], [0.3, 1.0, 0.55], [0.1, 0.0, 0.2])]
    kw = dict(rescale=rescale, normalize=normalize, **{"lambda": lam})
    name = "model.layers.3.mlp.up_proj.weight"
    m = get_method(method)
    ref = m.fn(build_merge(method, base, models, mps, name=name, seed=5, **kw))
    assert _same(apply_method(m, build_merge(method, base, models, mps, name=name, seed=5, **kw)), ref)
