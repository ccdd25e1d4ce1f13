"""WIDEN: hand-computed 2-D and 1-D cases, embedding orientation, guards, non-idempotence."""
from __future__ import annotations

import math

import pytest
import torch

from surgeon.merge import merge_tensors


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Base columns b0=[1,0], b1=[0,1], b2=[3,4], b3=[2,0] (exact norms 1, 1, 5, 2).
BASE = torch.tensor([[1.0, 0.0, 3.0, 2.0],
                     [0.0, 1.0, 4.0, 0.0]])
# model 1: c0 = [2,0] (|dm| 1, dir 0), c1 = [1,0] (0, 1-cos = 1), c2, c3 unchanged
M1 = torch.tensor([[2.0, 1.0, 3.0, 2.0],
                   [0.0, 0.0, 4.0, 0.0]])
# model 2: c0 unchanged, c1 = [0,3] (|dm| 2, 0), c2 = -b2 (0, 2), c3 = [0,3] (1, 1)
M2 = torch.tensor([[1.0, 0.0, -3.0, 0.0],
                   [0.0, 3.0, -4.0, 3.0]])


def expected_2d() -> torch.Tensor:
    # magnitude changes M1=[1,0,0,0], M2=[0,2,0,1]; direction changes D1=[0,1,0,0], D2=[0,0,2,1]
    # stable ascending rank / 4:
    #   sigM1=[.75,0,.25,.5]  sigM2=[0,.75,.25,.5]  sigD1=[0,.75,.25,.5]  sigD2=[0,.25,.75,.5]
    # each model's mean significance is .375; ranks .5 and .75 are calibrated to 1.
    # magnitude scores: m1=[1, s(-.75), .5, 1]  m2=[s(-.75), 1, .5, 1]
    # direction scores: m1=[.5, 1, s(-.5), 1]   m2=[.5, s(-.5), 1, 1]
    w1 = [(1 + 0.5) / 2, (sig(-0.75) + 1) / 2, (0.5 + sig(-0.5)) / 2, 1.0]
    w2 = [(sig(-0.75) + 0.5) / 2, (1 + sig(-0.5)) / 2, (0.5 + 1) / 2, 1.0]
    d1, d2 = M1 - BASE, M2 - BASE
    out = BASE.clone().double()
    for j in range(4):
        out[:, j] += w1[j] * d1[:, j].double() + w2[j] * d2[:, j].double()
    return out.float()


def test_hand_computed_matrix():
    want = expected_2d()
    # spelled out: row0 = [1.75, 0.66041, -1.5, 0], row1 = [0, 1.71713, -2, 3]
    assert want[:, 0].tolist() == pytest.approx([1.75, 0.0])
    assert want[:, 1].tolist() == pytest.approx([0.6604107, 1.7171300], abs=1e-6)
    assert want[:, 2].tolist() == pytest.approx([-1.5, -2.0])
    assert want[:, 3].tolist() == pytest.approx([0.0, 3.0])
    out = merge_tensors("widen", BASE, [M1, M2])
    assert torch.allclose(out, want, atol=1e-6)


def test_embedding_is_transposed_first():
    # an input embedding is (vocab, hidden): WIDEN works on its transpose, (hidden, vocab)
    out = merge_tensors("widen", BASE.t(), [M1.t(), M2.t()], name="model.embed_tokens.weight", role="embedding")
    assert torch.allclose(out, expected_2d().t(), atol=1e-6)
    # lm_head is not transposed: the same numbers as (vocab, hidden) give a different merge
    head = merge_tensors("widen", BASE.t(), [M1.t(), M2.t()], name="lm_head.weight", role="lm_head")
    assert not torch.allclose(head, expected_2d().t(), atol=1e-3)


def test_hand_computed_vector():
    # tau1=[2,1,0,0] (mean 0.75), tau2=[1,1,0,4] (mean 1.5); significance = |delta|
    # idx0: softmax(2,1) -> tau1 calibrated to 1, tau2 s(-1) -> 2 + s(-1)
    # idx1: softmax(1,1) = .5,.5; tau1 1 > .75 calibrated -> 1*1 + .5*1 = 1.5
    # idx2: 0;  idx3: tau2 4 > 1.5 calibrated -> 4
    out = merge_tensors("widen", [0, 0, 0, 0], [[2, 1, 0, 0], [1, 1, 0, 4]], name="model.norm.weight")
    assert out.tolist() == pytest.approx([2 + sig(-1), 1.5, 0.0, 4.0], abs=1e-6)


def test_calibration_parameters():
    # ratio 10: nothing is above 10x the mean, so plain softmax scores: idx0 = 2 s(1) + s(-1)
    out = merge_tensors("widen", [0, 0, 0, 0], [[2, 1, 0, 0], [1, 1, 0, 4]], above_average_value_ratio=10.0)
    assert out[0].item() == pytest.approx(2 * sig(1) + sig(-1), abs=1e-6)
    out = merge_tensors("widen", [0, 0, 0, 0], [[2, 1, 0, 0], [1, 1, 0, 4]], score_calibration_value=0.25)
    assert out[3].item() == pytest.approx(1.0, abs=1e-6)  # 4 * 0.25


def test_not_idempotent_with_default_calibration():
    # two identical models: softmax gives .5 each; above-average entries get 1 each -> 2 * delta
    out = merge_tensors("widen", [0, 0], [[1, 3], [1, 3]])
    assert out.tolist() == pytest.approx([1.0, 6.0])  # not [1, 3]
    g = torch.Generator().manual_seed(0)
    base, m = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    out = merge_tensors("widen", base, [m, m])
    factor = (out - base) / (m - base)
    assert not torch.allclose(out, m)
    for f in factor.reshape(-1).tolist():  # 1, 1.5 or 2 per column
        assert min(abs(f - 1), abs(f - 1.5), abs(f - 2)) < 1e-4
    # calibration 0.5 restores idempotence for two identical models
    assert torch.allclose(merge_tensors("widen", base, [m, m], score_calibration_value=0.5), m, atol=1e-6)


def test_one_model_returns_it():
    g = torch.Generator().manual_seed(1)
    base, m = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.allclose(merge_tensors("widen", base, [m]), m, atol=1e-6)
    assert torch.allclose(merge_tensors("widen", base[0], [m[0]]), m[0], atol=1e-6)


def test_all_zero_columns_are_guarded():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, generator=g)
    models = [torch.randn(4, 6, generator=g) for _ in range(2)]
    base[:, 1] = 0
    models[0][:, 1] = 0
    models[1][:, 1] = 0  # zero everywhere: no change
    models[1][:, 4] = 0  # zero in one model only
    base[:, 5] = 0  # zero in the base only
    out = merge_tensors("widen", base, models)
    assert torch.isfinite(out).all()
    assert (out[:, 1] == 0).all()
    emb = merge_tensors("widen", base.t(), [m.t() for m in models], role="embedding")
    assert torch.isfinite(emb).all()


def test_needs_a_base():
    from surgeon.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="needs a base"):
        merge_tensors("widen", None, [[1.0, 2.0]], name="x")


def _reference_style(base, models, ratio=1.0, calib=1.0):
    """The reference algorithm transcribed literally (directions by division, cosine_similarity)."""
    def scores(s):
        sc = torch.softmax(s, dim=0)
        sc[s > s.mean(dim=1, keepdim=True) * ratio] = calib
        return sc

    def rank(diff):
        order = torch.argsort(diff, dim=1, descending=False, stable=True)
        within = (torch.arange(diff.shape[1]) / diff.shape[1]).repeat(diff.shape[0]).reshape(diff.shape)
        return torch.scatter(torch.zeros(within.shape), 1, order, within)

    mb = torch.norm(base, p=2, dim=0)
    db = base / mb
    mags, dirs = [], []
    for m in models:
        mm = torch.norm(m, p=2, dim=0)
        mags.append((mm - mb).abs())
        dirs.append(1.0 - torch.cosine_similarity(m / mm, db, dim=0))
    w = 0.5 * (scores(rank(torch.stack(mags))) + scores(rank(torch.stack(dirs))))
    deltas = torch.stack([m - base for m in models])
    return base + (deltas * w.unsqueeze(1)).sum(0)


@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_matches_reference_algorithm_on_random_weights(n_models):
    g = torch.Generator().manual_seed(10 + n_models)
    base = torch.randn(16, 40, generator=g)
    models = [base + 0.1 * torch.randn(16, 40, generator=g) for _ in range(n_models)]
    ours = merge_tensors("widen", base, models)
    ref = _reference_style(base, models)
    # rounding in the cosine may swap the order of two nearly equal direction changes;
    # allow a couple of columns to differ, and require the rest to match tightly
    close = torch.isclose(ours, ref, atol=1e-5).all(dim=0)
    assert int((~close).sum()) <= 2
