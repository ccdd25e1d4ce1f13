"""linear and task_arithmetic against hand-computed values; per-tensor parameter rules."""
from __future__ import annotations

import pytest
import torch

from surgeon.errors import InvalidInputError
from surgeon.merge import TensorMerge, get_method
from surgeon.merge.params import interpolate_gradient, layer_index, resolve_params, resolve_value


def _tm(base, models, model_params, params, name="model.layers.0.mlp.up_proj.weight") -> TensorMerge:
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return TensorMerge(name, t(base) if base is not None else None, [t(m) for m in models], model_params, params)


def test_linear_weighted_average_hand_computed() -> None:
    m = get_method("linear")
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5]
    out = m.fn(_tm(None, [[1.0, 2.0], [5.0, 6.0]], [{"weight": 1.0}, {"weight": 3.0}], {"normalize": True}))
    assert torch.allclose(out, torch.tensor([4.0, 5.0]))
    out = m.fn(_tm(None, [[1.0, 2.0], [5.0, 6.0]], [{"weight": 1.0}, {"weight": 3.0}], {"normalize": False}))
    assert torch.allclose(out, torch.tensor([16.0, 20.0]))


def test_linear_zero_weight_sum_is_refused() -> None:
    with pytest.raises(ValueError, match="sum to zero"):
        get_method("linear").fn(_tm(None, [[1.0], [2.0]], [{"weight": 1.0}, {"weight": -1.0}], {"normalize": True}))


def test_task_arithmetic_hand_computed() -> None:
    m = get_method("task_arithmetic")
    # base [1,1]; deltas [1,0] and [0,2]; weights 0.5, 1; lambda 2 -> 1 + 2*(0.5*[1,0] + [0,2]) = [2, 5]
    out = m.fn(_tm([1.0, 1.0], [[2.0, 1.0], [1.0, 3.0]], [{"weight": 0.5}, {"weight": 1.0}],
                   {"lambda": 2.0, "normalize": False}))
    assert torch.allclose(out, torch.tensor([2.0, 5.0]))
    # normalize divides the summed deltas by the weight sum 1.5 -> 1 + 2*[0.5, 2]/1.5
    out = m.fn(_tm([1.0, 1.0], [[2.0, 1.0], [1.0, 3.0]], [{"weight": 0.5}, {"weight": 1.0}],
                   {"lambda": 2.0, "normalize": True}))
    assert torch.allclose(out, torch.tensor([1 + 2 * 0.5 / 1.5, 1 + 2 * 2 / 1.5]))


def test_task_arithmetic_of_base_with_itself_is_base() -> None:
    m = get_method("task_arithmetic")
    base = torch.randn(7, 3)
    out = m.fn(TensorMerge("w", base, [base.clone(), base.clone()], [{"weight": 0.7}, {"weight": 0.4}],
                           {"lambda": 1.3, "normalize": False}))
    assert torch.equal(out, base)


def test_layer_index_and_gradient() -> None:
    assert layer_index("model.layers.7.self_attn.q_proj.weight") == 7
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert interpolate_gradient([0.0, 1.0], 0.25) == 0.25
    assert interpolate_gradient([0.0, 1.0, 0.0], 0.75) == 0.5
    # 5 layers over [0, 1]: layer 2 is the midpoint
    assert resolve_value([0.0, 1.0], "model.layers.2.mlp.weight", 5) == 0.5
    # outside the stack every tensor takes the first value, as in mergekit
    assert resolve_value([0.2, 0.9], "model.embed_tokens.weight", 5) == 0.2
    assert resolve_value([0.2, 0.9], "lm_head.weight", 5) == 0.2
    assert resolve_value([0.2, 0.9], "model.norm.weight", 5) == 0.2
    # a one-layer model takes the last value, as in mergekit
    assert resolve_value([0.2, 0.9], "model.layers.0.mlp.weight", 1) == 0.9


def test_filter_rules_first_match_wins() -> None:
    rules = [{"filter": "self_attn", "value": 0.1}, {"glob": "*.mlp.*", "value": [0.0, 1.0]},
             {"regex": r"norm\.weight$", "value": 0.3}, {"value": 0.9}]
    assert resolve_value(rules, "model.layers.0.self_attn.q_proj.weight", 3) == 0.1
    assert resolve_value(rules, "model.layers.2.mlp.up_proj.weight", 3) == 1.0
    assert resolve_value(rules, "model.layers.1.input_layernorm.weight", 3) == 0.3
    assert resolve_value(rules, "lm_head.weight", 3) == 0.9  # the catch-all


def test_resolve_params_checks_ranges_and_defaults() -> None:
    m = get_method("task_arithmetic")
    p = resolve_params(m.global_params, {}, "w", None, "here")
    assert p == {"lambda": 1.0, "normalize": False}
    with pytest.raises(InvalidInputError, match="here: parameter 'normalize' must be true or false"):
        resolve_params(m.global_params, {"normalize": 1}, "w", None, "here")


def test_uniforms_depend_on_seed_name_and_salt() -> None:
    a = TensorMerge("x", torch.zeros(4), [torch.zeros(4)], [{}], {}, seed=1)
    b = TensorMerge("x", torch.zeros(4), [torch.zeros(4)], [{}], {}, seed=1)
    c = TensorMerge("y", torch.zeros(4), [torch.zeros(4)], [{}], {}, seed=1)
    d = TensorMerge("x", torch.zeros(4), [torch.zeros(4)], [{}], {}, seed=2)
    assert torch.equal(a.uniform("s"), b.uniform("s"))
    assert not torch.equal(a.uniform("s"), c.uniform("s")) and not torch.equal(a.uniform("s"), d.uniform("s"))
    assert not torch.equal(a.uniform("s"), a.uniform("t"))
