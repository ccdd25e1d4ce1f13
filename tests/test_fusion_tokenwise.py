"""Token-wise distillation terms: KL on aligned distributions, ULD."""
from __future__ import annotations

import pytest
import torch

from surgeon.fusion import TopK
from surgeon.fusion.tokenwise import kl_loss, sparse_to_dense, uld_loss


def test_kl_matches_torch_and_is_zero_on_itself():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 20, generator=g, dtype=torch.float64)
    t = torch.randn(7, 20, generator=g, dtype=torch.float64)
    q = torch.softmax(t, -1)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, -1), q, reduction="batchmean")
    assert kl_loss(s, q).item() == pytest.approx(ref.item(), rel=1e-6)
    assert kl_loss(t, q).item() == pytest.approx(0.0, abs=1e-6)
    soft = kl_loss(s, q, mode="soft_ce").item()
    ent = -(q * q.log()).sum(-1).mean().item()
    assert soft == pytest.approx(ref.item() + ent, rel=1e-6)


def test_sparse_target_with_duplicates_and_unmapped_ids():
    ids = torch.tensor([[3, 3, 1, -1]])
    p = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    dense = sparse_to_dense(ids, p, 5)
    torch.testing.assert_close(dense, torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]))
    s = torch.randn(1, 5)
    # FuseLLM's target: the kept mass renormalised, against the student's full distribution
    assert kl_loss(s, p, target_ids=ids, sparse="fusellm").item() == pytest.approx(kl_loss(s, dense).item(), rel=1e-6)


def test_kl_mask():
    s = torch.randn(4, 6)
    q = torch.softmax(torch.randn(4, 6), -1)
    m = torch.tensor([1, 0, 1, 0])
    full = kl_loss(s, q, reduction="none")
    assert kl_loss(s, q, mask=m).item() == pytest.approx(full[[0, 2]].mean().item(), rel=1e-6)


def test_uld_is_sorted_l1_and_vocabulary_free():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64)
    t = torch.randn(5, 9, generator=g, dtype=torch.float64)
    ps = torch.sort(torch.softmax(s, -1), descending=True).values
    pt = torch.nn.functional.pad(torch.sort(torch.softmax(t, -1), descending=True).values, (0, 3))
    assert uld_loss(s, t).item() == pytest.approx((ps - pt).abs().sum(-1).mean().item(), rel=1e-6)
    # any relabelling of the teacher's vocabulary gives the same value
    assert uld_loss(s, t[:, torch.randperm(9, generator=g)]).item() == pytest.approx(uld_loss(s, t).item(), rel=1e-6)
    assert uld_loss(t, t[:, torch.randperm(9, generator=g)]).item() == pytest.approx(0.0, abs=1e-7)
    # top-k variant and a cached teacher
    cached = TopK.from_logits(t, 4)
    assert uld_loss(s, cached).item() == pytest.approx(uld_loss(s, t, top_k=4).item(), rel=1e-5)


def test_gradients_flow():
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8)
    (kl_loss(s, torch.softmax(t, -1)) + uld_loss(s, t, top_k=5)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def test_sparse_kl_rest_bucket_is_the_coarsened_kl():
    # k kept (mapped) ids + one bucket for everything else, for both sides
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    t = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    tk = TopK.from_logits(t, 5)
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    sel = torch.zeros_like(ps, dtype=torch.bool).scatter(-1, tk.ids, True)

    def coarse(p):
        return torch.cat([torch.where(sel, p, torch.zeros_like(p)), (p * ~sel).sum(-1, keepdim=True)], -1)

    cs, ct = coarse(ps), coarse(pt)
    keep = ct > 0
    ref = torch.where(keep, ct * (ct.clamp_min(1e-300).log() - cs.clamp_min(1e-300).log()), torch.zeros_like(ct)).sum(-1)
    got = kl_loss(s, tk, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    assert (got <= _kl(pt, ps) + 1e-9).all()       # data processing: a lower bound of the full KL
    # the same with probabilities and ids, and "topk": both renormalised over the kept ids
    probs = (tk.logits - tk.lse.unsqueeze(-1)).exp()
    torch.testing.assert_close(kl_loss(s, probs, target_ids=tk.ids, reduction="none"), got, rtol=1e-6, atol=1e-9)
    qs = torch.gather(ps, -1, tk.ids)
    qt = torch.gather(pt, -1, tk.ids)
    ref_topk = _kl(qt / qt.sum(-1, keepdim=True), qs / qs.sum(-1, keepdim=True))
    torch.testing.assert_close(kl_loss(s, tk, sparse="topk", reduction="none"), ref_topk, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_identical_models_give_zero_at_every_temperature(temperature):
    # issue 17: KL tempered only the student (identical models at T=2 gave 1.54); the cached
    # teacher's top-k was renormalised over k at T != 1 while the student's was not (ULD 0.877)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 4000, generator=gen, dtype=torch.float64) * 3
    p = torch.softmax(x, -1)
    caches = [TopK.from_logits(x, 16), TopK.from_logits(x, 16, temperature=temperature)]
    assert kl_loss(x, p, temperature=temperature).item() == pytest.approx(0.0, abs=1e-9)
    assert uld_loss(x, x, top_k=16, temperature=temperature).item() == pytest.approx(0.0, abs=1e-12)
    for tk in caches:
        assert uld_loss(x, tk, temperature=temperature).item() == pytest.approx(0.0, abs=1e-12)
        for sparse in ("rest", "topk"):
            val = kl_loss(x, tk, temperature=temperature, sparse=sparse).item()
            assert val == pytest.approx(0.0, abs=1e-9), (sparse, tk.lse_temperature, val)
    probs = (caches[0].logits - caches[0].lse.unsqueeze(-1)).exp()
    assert kl_loss(x, probs, target_ids=caches[0].ids, temperature=temperature).item() == pytest.approx(0.0, abs=1e-9)


def test_temperature_tempers_both_sides():
    # KL at T between softmax(t/T) and softmax(s/T), times T^2 (dense and cached at T)
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 2
    T = 2.5
    ref = 4 * 0 + T**2 * _kl(torch.softmax(t / T, -1), torch.softmax(s / T, -1)).mean()
    assert kl_loss(s, torch.softmax(t, -1), temperature=T).item() == pytest.approx(ref.item(), rel=1e-9)
    full = TopK.from_logits(t, 50, temperature=T)  # every id kept: the rest bucket is empty
    assert kl_loss(s, full, temperature=T).item() == pytest.approx(ref.item(), rel=1e-9)
    # ULD with a cache at T equals ULD with full logits at T
    tk = TopK.from_logits(t, 8, temperature=T)
    assert uld_loss(s, tk, temperature=T).item() == pytest.approx(uld_loss(s, t, top_k=8, temperature=T).item(),
                                                                   rel=1e-9)


def test_sparse_kl_unmapped_ids_and_gradients():
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(3, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    tk = TopK.from_logits(t, 4)
    ids = tk.ids.clone()
    ids[0] = -1                    # a row whose ids map to nothing: its mass is in the rest bucket
    ids[1, 1] = ids[1, 0]          # two teacher ids onto one student id: they add up
    mapped = TopK(tk.logits, ids, tk.lse, 10)
    for sparse in ("rest", "topk", "fusellm"):
        val = kl_loss(s, mapped, sparse=sparse)
        assert torch.isfinite(val)
        (g,) = torch.autograd.grad(val, s)
        assert torch.isfinite(g).all()
    assert torch.autograd.gradcheck(lambda a: kl_loss(a, mapped, temperature=1.7, sparse="topk"), (s,))
    assert torch.autograd.gradcheck(lambda a: kl_loss(a, mapped), (s,))
