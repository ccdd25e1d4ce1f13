"""nearswap (mergekit 0.1.5 semantics): hand-computed values, properties, and mergekit itself in float32."""
from __future__ import annotations

import pytest
import torch

from surgeon.errors import InvalidInputError
from surgeon.merge import get_method, merge_tensors


def test_hand_computed() -> None:
    # |a - b| = 0.05, 0.2, 1.0, 0 ; t = 0.1 -> w = 1 (clamped from 2), 0.5, 0.1, 1 (|a - b| clamped to 1e-6)
    a = torch.tensor([1.0, 1.0, 1.0, 2.0])
    b = torch.tensor([1.05, 1.2, 2.0, 2.0])
    out = merge_tensors("nearswap", a, [b], t=0.1)
    expected = torch.tensor([1.05, 0.5 * 1.2 + 0.5 * 1.0, 0.1 * 2.0 + 0.9 * 1.0, 2.0])
    torch.testing.assert_close(out, expected)


def test_properties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 30, generator=g)
    b = a + 0.1 * torch.randn(50, 30, generator=g)
    assert torch.equal(merge_tensors("nearswap", a, [b], t=0.0), a)          # t = 0: the base
    assert torch.allclose(merge_tensors("nearswap", a, [b], t=1e3), b)       # t >= every distance: the other model
    out = merge_tensors("nearswap", a, [b], t=0.05)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())            # always between the two
    assert torch.equal(merge_tensors("nearswap", a, [a.clone()], t=0.05), a)  # self-merge


def test_declaration_and_bad_inputs() -> None:
    m = get_method("nearswap")
    assert m.needs_base and m.max_models == 1 and m.elementwise and m.param("t").required
    a = torch.zeros(3)
    with pytest.raises(InvalidInputError, match="'t' is required"):
        merge_tensors("nearswap", a, [a])
    with pytest.raises(InvalidInputError, match="at most 1"):
        merge_tensors("nearswap", a, [a, a], t=0.1)


@pytest.mark.mergekit
@pytest.mark.parametrize("shape,t", [((16, 24), 0.05), ((40,), 0.001), ((3, 5, 7), 0.3)])
def test_equals_mergekit_float32(shape, t) -> None:
    mk_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit is not installed")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(shape, generator=g)
    b = a + 0.1 * torch.randn(shape, generator=g)
    theirs = mk_api.merge_tensors([a, b], "nearswap", parameters={"t": t}, base_index=0, dtype=torch.float32)
    ours = merge_tensors("nearswap", a, [b], t=t)
    assert torch.equal(ours, theirs)  # the same float32 operations in the same order
