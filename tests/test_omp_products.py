"""The pursuit's dictionary-wide products, block by block on CPU, against plain products."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from surgeon.transplant import omp, products, search_compiled
from surgeon.transplant.products import SEARCHES, DictionaryProducts, blas_threads


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


@pytest.fixture(params=[s for s in SEARCHES if s != "auto"])
def search(request):
    if request.param == "bfloat16" and not search_compiled.available():
        pytest.skip("no numba: no certified bfloat16 search")
    return request.param


@pytest.mark.parametrize("seed,k", [(3, 10), (4, 24)])
def test_blocked_pursuit_matches_sklearn_and_the_held_one(small_blocks, seed, k, search):
    y, A = _pair(seed)
    idx, coef = omp.omp_exact(y, A, k, products=DictionaryProducts(A, search=search))  # CPU: the blocked pursuit
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


def test_a_residual_orthogonal_to_the_dictionary_never_picks_an_atom_twice(small_blocks, search):
    # 300 atoms in a 5-dimensional subspace of 24: after 5 picks every correlation is rounding,
    # and the picked atoms' rounding may be the largest; they are searched again at exactly 0
    g = torch.Generator().manual_seed(9)
    basis = torch.randn(5, 24, generator=g)
    A = torch.randn(300, 5, generator=g) @ basis
    y = torch.randn(7, 5, generator=g) @ basis  # in the span: the residual after 5 picks is rounding
    idx, coef = omp.omp_exact(y, A, 9, products=DictionaryProducts(A, search=search))
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


def _certified():
    if not search_compiled.available():
        pytest.skip("no numba: no certified bfloat16 search")


def test_certified_pick_is_the_float64_one_where_bfloat16_inverts_the_order():
    # x = (1, 1, 1, 1, 0, ...): <a_big, x> = 1.004 > <a_small, x> = 1.003, but in bfloat16 (8
    # significant bits, 2**-9 apart near 0.25) a_big's entries 0.252 round down to 0.2519531 and
    # a_small's 0.251 up to the same, and the sums 1.0039 and 1.0059 round to 1.0 and 1.0078:
    # the rounded products put a_small first. Among 200 atoms of small products, wherever the
    # two sit, the pick is a_big
    _certified()
    g = torch.Generator().manual_seed(11)
    x = torch.zeros(1, 8)
    x[0, :4] = 1.0
    for big, small in [(5, 150), (150, 5), (0, 199), (199, 0)]:
        A = torch.randn(200, 8, generator=g) * 0.01
        A[big] = A[small] = 0.0
        A[big, :4] = torch.tensor([0.252, 0.25, 0.252, 0.25])
        A[small, :4] = torch.tensor([0.251, 0.25, 0.251, 0.251])
        rounded = (x.bfloat16() @ A.bfloat16().T).float().abs().argmax(1)
        assert rounded.tolist() == [small]  # the inversion the bound must see through
        assert DictionaryProducts(A, search="bfloat16").argmax_abs(x).tolist() == [big]
        assert DictionaryProducts(A, search="float32").argmax_abs(x).tolist() == [big]


def test_certified_pick_skips_taken_atoms_and_a_zero_residual_takes_the_lowest_free():
    _certified()
    x, A = _pair(12, n=300, d=24, b=6)
    dp = DictionaryProducts(A, search="bfloat16")
    assert dp.search == "bfloat16"
    full = (x.double() @ A.double().T).abs()
    order = full.argsort(1, descending=True)
    taken = order[:, :3]  # the three best are taken: the fourth is the pick
    assert torch.equal(dp.argmax_abs(x, taken), order[:, 3])
    assert torch.equal(dp.argmax_abs(x), order[:, 0])
    zero = torch.zeros(2, 24)
    assert dp.argmax_abs(zero, torch.tensor([[0, 1], [2, 7]])).tolist() == [2, 0]


def test_float32_search_where_asked_or_without_numba(monkeypatch):
    x, A = _pair(13)
    assert DictionaryProducts(A, search="float32").search == "float32"
    monkeypatch.setenv("SURGEON_NO_NUMBA", "1")
    products.bf16_search_available.cache_clear()
    try:
        assert DictionaryProducts(A).search == "float32"  # auto: nothing compiled, nothing certified
    finally:
        products.bf16_search_available.cache_clear()
    with pytest.raises(ValueError, match="search must be one of"):
        DictionaryProducts(A, search="fp8")


def test_certified_pursuit_on_many_near_equal_atoms_matches_float64():
    # atoms in clusters of near-copies (relative differences ~1e-3, below bfloat16's resolution):
    # every pick of the pursuit is a float64 argmax among near-ties
    _certified()
    g = torch.Generator().manual_seed(14)
    centres = torch.randn(40, 32, generator=g)
    A = (centres.repeat_interleave(8, 0) * (1 + 1e-3 * torch.randn(320, 1, generator=g))
         + 1e-3 * torch.randn(320, 32, generator=g))
    y = torch.randn(9, 32, generator=g)
    k = 12
    i_b, c_b = omp.omp_exact(y, A, k, products=DictionaryProducts(A, search="bfloat16"))
    ref = np.asarray(orthogonal_mp(A.double().numpy().T, y.double().numpy().T, n_nonzero_coefs=k,
                                   precompute=False)).T
    for b in range(y.shape[0]):
        assert set(i_b[b].tolist()) == set(np.flatnonzero(ref[b]).tolist())
