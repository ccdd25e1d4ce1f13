"""TIES: hand-computed cases, tie and zero-sign rules, whole-model trim scope."""
from __future__ import annotations

import pytest
import torch

from surgeon.errors import InvalidInputError, StepError
from surgeon.merge import get_method
from surgeon.merge import build_merge, merge_tensors
from surgeon.merge.methods.ties import prepare_ties

Z4 = [0.0, 0.0, 0.0, 0.0]


def test_tensor_scope_hand_computed_with_tie_at_threshold():
    # density 0.5 of 4 entries: k = 2 per task vector.
    # tau1 keeps 3 and 2; tau2 keeps -2 and the FIRST of its two 1s (index 1).
    # elected signs: sums [1, 1, 2, 0] -> [+, +, +, + (zero counts positive)].
    # index 0: only tau1 agrees (3); index 1: tau2 (1); index 2: tau1 (2); index 3: nobody.
    out = merge_tensors("ties", Z4, [[3, -1, 2, -0.5], [-2, 1, 1, 0.25]], [{"density": 0.5}] * 2)
    assert out.tolist() == [3.0, 1.0, 2.0, 0.0]
    out = merge_tensors("ties", [1, 1, 1, 1], [[4, 0, 3, 0.5], [-1, 2, 2, 1.25]], [{"density": 0.5}] * 2, **{"lambda": 0.5})
    assert out.tolist() == [2.5, 1.5, 2.0, 1.0]


def test_zero_elected_sign_positive_vs_majority():
    a, b = [1, -2, -3], [-1, -1, -1]
    # sums [0, -3, -4]: index 0 is a zero sum.
    pos = merge_tensors("ties", [0, 0, 0], [a, b])
    assert pos.tolist() == [1.0, -1.5, -2.0]  # mergekit: zero -> +, only +1 agrees
    maj = merge_tensors("ties", [0, 0, 0], [a, b], zero_sign="majority")
    assert maj.tolist() == [-1.0, -1.5, -2.0]  # reference: sum of elected signs is -2 -> -


def test_weights_normalize_and_mixing():
    # weighted deltas [2, -2] and [1, 3]; sums [3, 1] -> [+, +]
    # index 0: (2 + 1) / (2 + 1) = 1; index 1: only model 2 agrees: 3 / 1 = 3
    mp = [{"weight": 2.0}, {"weight": 1.0}]
    assert merge_tensors("ties", [0, 0], [[1, -1], [1, 3]], mp).tolist() == [1.0, 3.0]
    assert merge_tensors("ties", [0, 0], [[1, -1], [1, 3]], mp, mixing="sum").tolist() == [3.0, 3.0]
    assert merge_tensors("ties", [0, 0], [[1, -1], [1, 3]], mp, normalize=False).tolist() == [3.0, 3.0]


def test_count_consensus():
    models = [[5.0], [-1.0], [-1.0]]
    assert merge_tensors("ties", [0.0], models).tolist() == [5.0]  # mass: 3 > 0
    assert merge_tensors("ties", [0.0], models, consensus="count").tolist() == [-1.0]  # 2 negatives vs 1


def test_density_edges():
    tau = [[0.5, -0.1, 0.2]]
    # density 0.1 of 3 entries -> int(0.3) = 0 -> at least one entry is kept (mergekit)
    assert merge_tensors("ties", [0, 0, 0], tau, [{"density": 0.1}]).tolist() == [0.5, 0.0, 0.0]
    assert merge_tensors("ties", [0, 0, 0], tau, [{"density": 0.0}]).tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(merge_tensors("ties", [0, 0, 0], tau, [{"density": 1.0}]), torch.tensor(tau[0]))


def test_one_model_density_one_equals_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base, m = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    ta = merge_tensors("task_arithmetic", base, [m], [{"weight": 0.7}], **{"lambda": 1.3})
    out = merge_tensors("ties", base, [m], [{"weight": 0.7}], mixing="sum", **{"lambda": 1.3})
    assert torch.allclose(out, ta, atol=1e-6)
    # unit weight: the disjoint mean of one model is the model's task vector
    assert torch.allclose(merge_tensors("ties", base, [m]), merge_tensors("task_arithmetic", base, [m]), atol=1e-6)


def test_identical_models_return_the_model():
    g = torch.Generator().manual_seed(1)
    base, m = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.allclose(merge_tensors("ties", base, [m, m, m]), m, atol=1e-6)


def test_rescale_keeps_l1_norm():
    base = torch.zeros(6)
    tau = torch.tensor([3.0, -1.0, 2.0, -0.5, 0.25, 1.0])
    out = merge_tensors("ties", base, [tau], [{"density": 0.5}], rescale=True)
    assert torch.isclose(out.abs().sum(), tau.abs().sum())
    assert (out != 0).sum() == 3


def test_errors_name_the_tensor():
    with pytest.raises(InvalidInputError, match="tensor 'w'"):
        merge_tensors("ties", [0, 0], [[1, 2, 3]], name="w")
    with pytest.raises(InvalidInputError, match="density"):
        build_merge("ties", [0.0], [[1.0]], [{"density": 1.5}])
    with pytest.raises(InvalidInputError, match="trim_scope"):
        build_merge("ties", [0.0], [[1.0]], trim_scope="layer")
    with pytest.raises(StepError, match="pre-pass"):
        merge_tensors("ties", [0.0], [[1.0]], trim_scope="model")


# ---------------------------------------------------------------------------
# trim_scope: model — one threshold per task vector over the whole model.

def _model(names_shapes, n_models, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in names_shapes:
        base = torch.randn(shape, generator=g)
        models = []
        for _ in range(n_models):
            delta = torch.randn(shape, generator=g)
            if ties:
                delta = torch.round(delta * 4) / 4  # many equal magnitudes
            models.append(base + delta)
        out.append((name, base, models))
    return out


def _stream(model, model_params, **params):
    return [build_merge("ties", b, ms, model_params, name=n, trim_scope="model", **params) for n, b, ms in model]


@pytest.mark.parametrize("ties_in_data", [False, True])
def test_model_scope_threshold_equals_kthvalue_on_concatenation(ties_in_data):
    model = _model([("a.weight", (7, 5)), ("a.bias", (7,)), ("b.weight", (3, 4, 2)), ("c", (1,))], 3,
                   seed=3, ties=ties_in_data)
    densities = [0.2, 0.5, 0.93]
    mps = [{"density": d} for d in densities]
    stream = _stream(model, mps)
    state = prepare_ties(stream, stream[0].params)
    for i, K in enumerate(densities):
        flat = torch.cat([(ms[i] - b).abs().reshape(-1) for _, b, ms in model])
        d = flat.numel()
        k = d - int(d * K)
        assert state["thresholds"][i] == float(torch.kthvalue(flat, k).values)
    assert state["total"] == sum(b.numel() for _, b, _ in model)


def test_model_scope_hand_computed():
    # one model, two tensors: |tau| = {0.1, 0.5, 0.3} and {0.2, 0.4}; d = 5, density 0.4:
    # k = 5 - int(2.0) = 3 -> threshold = 3rd smallest = 0.3; keep |tau| >= 0.3
    # (the reference keeps int(d*K) + 1 = 3 entries when there are no ties).
    model = [("a", torch.zeros(3), [torch.tensor([0.1, 0.5, -0.3])]),
             ("b", torch.zeros(2), [torch.tensor([0.2, -0.4])])]
    stream = _stream(model, [{"density": 0.4}])
    state = prepare_ties(stream, stream[0].params)
    assert state["thresholds"] == [pytest.approx(0.3)]
    fn = get_method("ties").fn
    outs = []
    for t in stream:
        t.state = state
        outs.append(fn(t).tolist())
    assert outs == [pytest.approx([0.0, 0.5, -0.3]), pytest.approx([0.0, -0.4])]
    # tensor scope keeps max(1, int(density * numel)) per tensor instead
    assert merge_tensors("ties", torch.zeros(3), [[0.1, 0.5, -0.3]], [{"density": 0.4}]).tolist() == \
        pytest.approx([0.0, 0.5, 0.0])


def test_model_scope_keeps_every_tie_at_threshold():
    model = [("a", torch.zeros(4), [torch.tensor([1.0, -1.0, 1.0, 0.5])])]
    stream = _stream(model, [{"density": 0.25}])  # d = 4, k = 4 - 1 = 3 -> threshold 1.0
    state = prepare_ties(stream, stream[0].params)
    t = stream[0]
    t.state = state
    assert get_method("ties").fn(t).tolist() == [1.0, -1.0, 1.0, 0.0]


def test_model_scope_zero_sum_takes_global_majority():
    # tensor a: +1 and -1 cancel; tensor b: both negative -> global sum of elected signs -2 -> '-'
    model = [("a", torch.zeros(1), [torch.tensor([1.0]), torch.tensor([-1.0])]),
             ("b", torch.zeros(2), [torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -1.0])])]
    stream = _stream(model, [{"density": 1.0}, {"density": 1.0}])
    state = prepare_ties(stream, stream[0].params)
    assert state["zero_sign"] == -1.0
    t = stream[0]
    t.state = state
    assert get_method("ties").fn(t).tolist() == [-1.0]
    # tensor scope (mergekit): the zero sum counts as positive
    assert merge_tensors("ties", torch.zeros(1), [[1.0], [-1.0]]).tolist() == [1.0]


def test_model_scope_equals_reference_formula_on_flat_vector():
    """Our per-tensor streaming result equals the reference's algorithm on the concatenated model."""
    model = _model([("x", (6, 4)), ("y", (9,)), ("z", (2, 3))], 3, seed=5)
    K = 0.3
    stream = _stream(model, [{"density": K}] * 3)
    state = prepare_ties(stream, stream[0].params)
    ours = []
    for t in stream:
        t.state = state
        ours.append(get_method("ties").fn(t).reshape(-1))
    ours = torch.cat(ours)
    # the reference (prateeky2806/ties-merging) written out on the flat vectors
    base = torch.cat([b.reshape(-1) for _, b, _ in model])
    tv = torch.stack([torch.cat([(ms[i] - b).reshape(-1) for _, b, ms in model]) for i in range(3)])
    d = tv.shape[1]
    kth = tv.abs().kthvalue(d - int(d * K), dim=1, keepdim=True).values
    tv = tv * (tv.abs() >= kth)
    sign = torch.sign(tv.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, tv > 0, tv < 0)
    sel = tv * keep
    merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    assert torch.allclose(ours, base + merged, atol=1e-6)


def test_model_scope_needs_one_density_per_model():
    model = _model([("a", (3,)), ("b", (3,))], 1)
    stream = [build_merge("ties", b, ms, [{"density": d}], name=n, trim_scope="model")
              for (n, b, ms), d in zip(model, [0.5, 0.6])]
    with pytest.raises(InvalidInputError, match="one density per model"):
        prepare_ties(stream, stream[0].params)


def test_prepare_is_a_no_op_for_tensor_scope():
    class Boom:
        def __iter__(self):
            raise AssertionError("tensor scope must not stream the model")

    assert prepare_ties(Boom(), {"trim_scope": "tensor"}) is None
