"""Batched OMP agrees with scikit-learn's orthogonal_mp and behaves at the edges."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from surgeon.errors import InvalidInputError
from surgeon.transplant.omp import batch_omp, omp_exact, omp_screened, reconstruct, screen_candidates


def _dense(idx: torch.Tensor, coef: torch.Tensor, n: int) -> np.ndarray:
    out = np.zeros((idx.shape[0], n))
    for b in range(idx.shape[0]):
        for i, c in zip(idx[b].tolist(), coef[b].tolist()):
            out[b, i] += c
    return out


def _sklearn(A: torch.Tensor, Y: torch.Tensor, k: int) -> np.ndarray:
    coef = orthogonal_mp(A.double().numpy().T, Y.double().numpy().T, n_nonzero_coefs=k, precompute=False)
    return np.asarray(coef).reshape(A.shape[0], -1).T  # B x N


@pytest.mark.parametrize("seed,n,d,k", [(0, 300, 64, 12), (1, 80, 40, 20), (2, 500, 32, 8), (3, 50, 64, 50)])
def test_exact_matches_sklearn(seed, n, d, k):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.5)  # atoms of varied norms
    Y = torch.randn(16, d, generator=g)
    idx, coef = omp_exact(Y, A, k)
    ref = _sklearn(A, Y, k)
    for b in range(Y.shape[0]):
        assert set(idx[b].tolist()) == set(np.flatnonzero(ref[b]).tolist())
    np.testing.assert_allclose(_dense(idx, coef, n), ref, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("gram", [True, False])
def test_screened_with_all_candidates_is_exact(gram):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(120, 48, generator=g)
    Y = torch.randn(10, 48, generator=g)
    k = 10
    cand = torch.stack([torch.randperm(120, generator=g) for _ in range(10)])  # any order of all atoms
    idx, coef = omp_screened(Y, A, k, cand, gram=gram)
    ref = _sklearn(A, Y, k)
    np.testing.assert_allclose(_dense(idx, coef, 120), ref, atol=2e-4, rtol=1e-3)
    i2, c2 = omp_exact(Y, A, k)
    assert torch.equal(idx, i2)


@pytest.mark.parametrize("gram", [True, False])
def test_refreshed_screening_with_all_candidates_is_exact(gram):
    g = torch.Generator().manual_seed(6)
    A = torch.randn(90, 32, generator=g)
    Y = torch.randn(9, 32, generator=g)
    cand = torch.arange(90).expand(9, -1)
    idx, coef = omp_screened(Y, A, 12, cand, refresh=3, gram=gram)
    np.testing.assert_allclose(_dense(idx, coef, 90), _sklearn(A, Y, 12), atol=2e-4, rtol=1e-3)


def test_refreshed_screening_fits_nearly_as_well_as_exact():
    # structured targets: sparse combinations of atoms plus noise
    g = torch.Generator().manual_seed(8)
    A = torch.randn(3000, 48, generator=g) * torch.rand(3000, 1, generator=g).add(0.3)
    mix = torch.zeros(64, 3000)
    for b in range(64):
        mix[b, torch.randperm(3000, generator=g)[:6]] = torch.randn(6, generator=g)
    Y = mix @ A + 0.05 * torch.randn(64, 48, generator=g)
    k = 12

    def fit(i, c):
        return float(torch.nn.functional.cosine_similarity(reconstruct(i, c, A), Y, dim=1).mean())

    exact = fit(*omp_exact(Y, A, k))
    static = fit(*batch_omp(Y, A, k, screen=40, refresh=0, progress=False))
    refreshed = fit(*batch_omp(Y, A, k, screen=40, refresh=3, progress=False))
    assert refreshed >= exact - 0.01
    assert refreshed >= static


def test_screened_matches_sklearn_on_the_candidate_subset():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(400, 32, generator=g)
    Y = A[:8] @ torch.randn(32, 32, generator=g) * 0.1 + torch.randn(8, 32, generator=g)
    cand = screen_candidates(Y, A, 60)
    idx, coef = omp_screened(Y, A, 6, cand)
    for b in range(8):
        sub = A[cand[b]]
        ref = _sklearn(sub, Y[b:b + 1], 6)[0]
        got = np.zeros(400)
        got[idx[b].numpy()] = coef[b].numpy()
        want = np.zeros(400)
        want[cand[b].numpy()] = ref
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def test_screen_candidates_are_nearest_by_abs_cosine():
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-10.0, 0.1], [0.7, 0.7]])
    Y = torch.tensor([[1.0, 0.0]])
    cand = screen_candidates(Y, A, 2)
    assert set(cand[0].tolist()) == {0, 2}  # |cos| ranks the opposite atom high too


def test_batching_and_progress_do_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(200, 24, generator=g)
    Y = torch.randn(37, 24, generator=g)
    i1, c1 = batch_omp(Y, A, 8, batch_size=5, progress=True)
    i2, c2 = batch_omp(Y, A, 8, batch_size=64, progress=False)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-4)
    i3, c3 = batch_omp(Y, A, 8, screen=200, batch_size=7, progress=False)  # screen >= N: exact
    assert torch.equal(i1, i3)


def test_exact_reconstruction_when_target_is_in_span():
    g = torch.Generator().manual_seed(11)
    A = torch.randn(50, 30, generator=g)
    true = torch.zeros(4, 50)
    true[0, [3, 7]] = torch.tensor([1.0, -2.0])
    true[1, [0, 1, 2]] = torch.tensor([0.5, 0.5, 0.5])
    true[2, 10] = 3.0
    true[3, [20, 40, 45]] = torch.tensor([1.0, 1.0, -1.0])
    Y = true @ A
    idx, coef = batch_omp(Y, A, 5, progress=False)
    torch.testing.assert_close(reconstruct(idx, coef, A), Y, atol=1e-4, rtol=1e-4)


def test_dependent_and_zero_atoms_give_finite_results():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 16, generator=g)
    A = torch.cat([base, base, 2 * base, torch.zeros(3, 16)])  # duplicates, multiples, zero rows
    Y = torch.randn(5, 16, generator=g)
    for screened in (False, True):
        if screened:
            idx, coef = omp_screened(Y, A, 10, torch.arange(len(A)).expand(5, -1))
        else:
            idx, coef = omp_exact(Y, A, 10)
        assert torch.isfinite(coef).all()
        # the fit is the projection onto span(base): 6 useful atoms, the rest get 0
        approx = reconstruct(idx, coef, A)
        proj = Y @ torch.linalg.pinv(base) @ base
        torch.testing.assert_close(approx, proj, atol=1e-3, rtol=1e-3)
        assert (coef != 0).sum(1).max() <= 6


def test_bad_arguments():
    A = torch.randn(10, 4)
    with pytest.raises(InvalidInputError, match="k=11"):
        omp_exact(torch.randn(2, 4), A, 11)
    with pytest.raises(InvalidInputError, match="width"):
        omp_exact(torch.randn(2, 5), A, 2)
    with pytest.raises(InvalidInputError, match="screen"):
        batch_omp(torch.randn(2, 4), A, 5, screen=3)


def test_empty_targets():
    idx, coef = batch_omp(torch.zeros(0, 4), torch.randn(10, 4), 3, progress=False)
    assert idx.shape == (0, 3) and coef.shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3000, 64, generator=g)
    Y = torch.randn(100, 64, generator=g)
    for screen in (None, 256):
        i1, c1 = batch_omp(Y, A, 16, screen=screen, progress=False)
        i2, c2 = batch_omp(Y, A, 16, screen=screen, device="cuda", progress=False)
        agree = (i1 == i2).all(1).float().mean()
        assert agree > 0.95
        torch.testing.assert_close(reconstruct(i1, c1, A), reconstruct(i2, c2, A), atol=1e-3, rtol=1e-3)


# -- the default (automatic screening) -------------------------------------------------------------------------------
def test_flop_floor_counts_the_products():
    from surgeon.transplant.omp import omp_flops

    # exact: k vocabulary-wide products of 2 * targets * atoms * width each
    f = omp_flops(3004, 46148, 576, 64)
    assert f["products"] == 64 and f["total"] == 64 * 2.0 * 3004 * 46148 * 576
    # screened, refresh 8, k 64: candidate sets at t = 0, 8, ..., 56 (1 screen + 7 re-rankings)
    s = omp_flops(3004, 46148, 576, 64, screen=128, refresh=8)
    assert s["products"] == 8 and s["vocab_products"] == 8 * 2.0 * 3004 * 46148 * 576
    sets = range(0, 64, 8)
    assert s["candidate_products"] == sum(2.0 * 3004 * (128 * 128 * 576 + t * 128 * 576) for t in sets)
    assert omp_flops(10, 100, 8, 4, screen=50, refresh=0)["products"] == 1  # static: the screen only
    assert omp_flops(10, 100, 8, 4, screen=100)["products"] == 4  # screen >= atoms: exact


def test_auto_screen_is_exact_when_cheap_and_screened_when_not():
    from surgeon.transplant.omp import DEFAULT_SCREEN, choose_screen

    assert choose_screen(1757, 2339, 96, 8) is None  # a zoo pair: seconds exact
    assert choose_screen(3004, 46148, 576, 64) is None  # Gemma-3 -> SmolLM2: ~10 TFLOP exact, minutes
    assert choose_screen(9915, 39237, 576, 64) is None  # Qwen2.5 -> SmolLM2: ~29 TFLOP
    assert choose_screen(50_000, 80_000, 4096, 64) == DEFAULT_SCREEN  # ~2 PFLOP exact: hours
    assert choose_screen(50_000, 80_000, 4096, 200) == 200  # never fewer candidates than k
    assert choose_screen(3004, 46148, 576, 64, None) is None
    assert choose_screen(3004, 46148, 576, 64, 256) == 256
    assert choose_screen(3004, 46148, 576, 64, 50_000) is None  # covers the dictionary: exact
    for bad in (0, -3, "fast", 2.5, True):
        with pytest.raises(InvalidInputError, match="screen"):
            choose_screen(10, 100, 8, 4, bad)


def test_default_screened_pursuit_fits_as_well_as_sklearn():
    # embedding-like dictionary: many atoms of varied norms in few dimensions, targets that are
    # sparse combinations of atoms plus noise; the default screening (128 candidates, re-ranked
    # every 8 picks) against scikit-learn's exact orthogonal_mp, measured by the fit of the targets
    from surgeon.transplant.omp import DEFAULT_REFRESH, DEFAULT_SCREEN

    g = torch.Generator().manual_seed(21)
    A = torch.randn(6000, 64, generator=g) * torch.rand(6000, 1, generator=g).add(0.3)
    mix = torch.zeros(48, 6000)
    for b in range(48):
        mix[b, torch.randperm(6000, generator=g)[:10]] = torch.randn(10, generator=g)
    Y = mix @ A + 0.1 * torch.randn(48, 64, generator=g)
    k = 24
    ref = torch.from_numpy(_sklearn(A, Y, k)).float()  # B x N dense coefficients

    def fit(approx):
        return float(torch.nn.functional.cosine_similarity(approx, Y, dim=1).mean())

    exact_fit = fit(ref @ A)
    idx, coef = batch_omp(Y, A, k, screen=DEFAULT_SCREEN, refresh=DEFAULT_REFRESH, progress=False)
    screened_fit = fit(reconstruct(idx, coef, A))
    assert screened_fit >= exact_fit - 0.002, (screened_fit, exact_fit)  # static screening: -0.01
    # and the coefficients are the least-squares fit on the atoms it picked (OMP's refit)
    for b in range(0, 48, 7):
        sub = A[idx[b]].double()
        ls = torch.linalg.lstsq(sub.T, Y[b].double().unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(coef[b].double(), ls, atol=1e-3, rtol=1e-3)


def test_cli_screen_flag():
    from surgeon.cli import _screen_arg, build_parser

    assert _screen_arg("auto") == "auto" and _screen_arg("None") is None and _screen_arg("256") == 256
    import argparse

    for bad in ("0", "-1", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            _screen_arg(bad)
    p = build_parser()
    a = p.parse_args(["transplant", "b", "d", "o"])
    assert a.screen == "auto" and not a.exact
    assert p.parse_args(["transplant", "b", "d", "o", "--exact"]).exact
    with pytest.raises(SystemExit) as e:
        p.parse_args(["transplant", "b", "d", "o", "--exact", "--screen", "64"])
    assert e.value.code == 2
