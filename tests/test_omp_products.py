"""The pursuit's dictionary-wide products, block by block on CPU, against plain products."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from surgeon.transplant import omp, products
from surgeon.transplant.products import DictionaryProducts, blas_threads


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(products, "BLOCK", 64)  # 300 atoms: four whole blocks and a part


def _pair(seed: int, n: int = 300, d: int = 24, b: int = 11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.2)


def test_block_argmax_and_top_are_those_of_the_whole_product(small_blocks):
    x, A = _pair(0)
    full = (x.double() @ A.double().T).abs()
    dp = DictionaryProducts(A)
    assert len(dp.blocks) == 5
    assert torch.equal(dp.argmax_abs(x), full.argmax(1))
    got = dp.top_abs(x, 20)
    for b in range(x.shape[0]):
        assert set(got[b].tolist()) == set(full[b].topk(20).indices.tolist())
    assert dp.top_abs(x, 1000).shape == (x.shape[0], 300)  # more than the atoms: all of them


def test_block_products_scaled_are_cosines(small_blocks):
    x, A = _pair(1)
    A[7] = 0.0  # a zero atom: cosine 0, not NaN
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(A.double(), dim=1).T
    got = omp.screen_candidates(x, A, 15)
    for b in range(x.shape[0]):
        assert set(got[b].tolist()) == set(cos[b].abs().topk(15).indices.tolist())
        assert 7 not in got[b].tolist()


def test_argmax_ties_go_to_the_lower_atom_across_blocks(small_blocks):
    A = torch.zeros(300, 4)
    A[10, 0] = A[200, 0] = -2.0  # equal |products| in the first and the fourth block
    A[150, 0] = 1.0
    assert DictionaryProducts(A).argmax_abs(torch.tensor([[1.0, 0, 0, 0]])).tolist() == [10]


@pytest.mark.parametrize("seed,k", [(3, 10), (4, 24)])
def test_blocked_pursuit_matches_sklearn_and_the_held_one(small_blocks, seed, k):
    y, A = _pair(seed)
    idx, coef = omp.omp_exact(y, A, k)  # CPU: the blocked pursuit
    ref = np.asarray(orthogonal_mp(A.double().numpy().T, y.double().numpy().T, n_nonzero_coefs=k,
                                   precompute=False)).T
    dense = np.zeros_like(ref)
    for b in range(y.shape[0]):
        dense[b, idx[b].numpy()] = coef[b].numpy()
        assert set(idx[b].tolist()) == set(np.flatnonzero(ref[b]).tolist())
    np.testing.assert_allclose(dense, ref, atol=2e-4, rtol=1e-3)
    res_b, res_h = torch.empty(y.shape[0], k), torch.empty(y.shape[0], k)
    omp.omp_exact(y, A, k, residuals=res_b)
    i_h, c_h = omp._omp_exact_held(y, A, k, res_h)
    assert torch.equal(idx, i_h)
    torch.testing.assert_close(coef, c_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res_b, res_h, atol=1e-3, rtol=1e-4)  # sqrt of cancellation once the fit is whole


def test_a_residual_orthogonal_to_the_dictionary_never_picks_an_atom_twice(small_blocks):
    # 300 atoms in a 5-dimensional subspace of 24: after 5 picks every correlation is rounding,
    # and the picked atoms' rounding may be the largest; they are searched again at exactly 0
    g = torch.Generator().manual_seed(9)
    basis = torch.randn(5, 24, generator=g)
    A = torch.randn(300, 5, generator=g) @ basis
    y = torch.randn(7, 5, generator=g) @ basis  # in the span: the residual after 5 picks is rounding
    idx, coef = omp.omp_exact(y, A, 9)
    for b in range(7):
        assert len(set(idx[b].tolist())) == 9  # as the held correlations pick: never one twice
        assert int((coef[b] != 0).sum()) <= 5
    assert torch.isfinite(coef).all()
    torch.testing.assert_close(omp.reconstruct(idx, coef, A), y, atol=1e-3, rtol=1e-3)


def test_blas_threads_limits_numpys_blas():
    from threadpoolctl import threadpool_info

    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
    if not blas:
        pytest.skip("threadpoolctl sees no BLAS in this numpy")
    with blas_threads(1):
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == [p["num_threads"] for p in blas]


def test_scaled_products_share_the_atoms(small_blocks):
    x, A = _pair(5)
    plain = DictionaryProducts(A)
    cos = omp.cosine_products(A, plain)
    assert cos.at is plain.at and plain.scale is None
    assert torch.equal(cos.top_abs(x, 9).sort(1).values, omp.cosine_products(A).top_abs(x, 9).sort(1).values)
