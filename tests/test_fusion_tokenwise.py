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
    assert kl_loss(s, p, target_ids=ids).item() == pytest.approx(kl_loss(s, dense).item(), rel=1e-6)


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
