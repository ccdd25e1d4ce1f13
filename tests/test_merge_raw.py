"""Compiled kernels reading and writing stored dtypes (surgeon.merge.kernels._raw).

The references are torch's own conversions (bf16 -> float32 is exact;
float32 -> bf16 rounds to nearest even, NaN to 0xFFFF) and the methods'
whole-tensor ``fn`` on float32 copies of the same inputs: the piece merged
from bf16 straight into a bf16 output must be those bytes exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from surgeon.merge.kernels import _jit, _raw
from surgeon.merge import build_merge
from surgeon.merge.kernels.base import BLOCK_ELEMS, PieceInputs, merge_piece, observe_piece
from surgeon.merge.registry import get_method

CHUNK = _raw.CHUNK
needs_numba = pytest.mark.skipif(_jit.numba_module() is None, reason="numba switched off")


@pytest.fixture(scope="module")
def roundtrip():
    """A compiled ``store(load(src))`` from float32 into a bf16 array, and the reverse."""
    _raw.register()
    jit = _jit.jit_options()

    @jit
    def narrow(src, dst):  # pragma: no cover - compiled
        tmp = np.empty(CHUNK, np.float32)
        for s in range(0, src.shape[0], CHUNK):
            e = min(src.shape[0], s + CHUNK)
            _raw.load(src[s:e], tmp)
            _raw.store(tmp, dst[s:e])

    return narrow


def _edge_floats() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    vals = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3.4e38, -3.4e38,
            1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9]  # exact ties of the rounding
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (100_000,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat([torch.tensor(vals), torch.randn(50_000, generator=g), bits.view(torch.float32)])


@needs_numba
def test_store_rounds_float32_to_bf16_as_torch_does(roundtrip) -> None:
    x = _edge_floats()
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    roundtrip(x.numpy(), _raw.raw_view(out))
    ref = x.to(torch.bfloat16)
    nan = x.isnan()
    assert nan.sum() > 100 and out[nan].isnan().all()
    assert torch.equal(out[~nan].view(torch.int16), ref[~nan].view(torch.int16))
    assert (out[nan].view(torch.int16) == -1).all()  # 0xFFFF, as torch's vectorised cast


@needs_numba
def test_load_widens_bf16_exactly(roundtrip) -> None:
    x = _edge_floats().to(torch.bfloat16)
    out = torch.empty(x.numel(), dtype=torch.float32)
    roundtrip(_raw.raw_view(x), out.numpy())
    assert torch.equal(out.view(torch.int32), x.float().view(torch.int32))


def test_raw_views_only_for_cpu_contiguous_bf16_and_float32() -> None:
    assert _raw.raw_view(torch.zeros(4, dtype=torch.float16)) is None
    assert _raw.raw_view(torch.zeros(4, 4)[:, 1]) is None
    assert _raw.raw_view(torch.zeros(4, dtype=torch.bfloat16)).dtype.name == "uint16"
    assert _raw.raw_inputs(torch.zeros(4), [torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)]) is None
    b, ms = _raw.raw_inputs(torch.zeros(4, dtype=torch.bfloat16), [torch.zeros(4)] * 2)
    assert b.dtype.name == "uint16" and all(m.dtype.name == "float32" for m in ms)


def _run_piece(kernel, meta, piece: PieceInputs, out: torch.Tensor) -> bool:
    """The engine's order for one whole piece: the statistic passes the kernel
    needs, then the merge into ``out``; returns the finiteness."""
    for p in range(kernel.stat_passes):
        if kernel.pass_needed(p):
            observe_piece(kernel, meta, p, piece)
            kernel.end_pass(p)
    return merge_piece(kernel, meta, piece, out)


CASES = [
    ("ties", [{"density": 0.3}, {"density": 0.55, "weight": 0.5}, {"density": 1.0}], {}),
    ("ties", [{"density": 0.4}] * 3, {"consensus": "count", "lambda": 1.3}),
    ("dare_ties", [{"density": 0.3}, {"density": 0.5}, {"density": 1.0}], {}),
    ("dare_linear", [{"density": 0.2, "weight": 0.7}, {"density": 0.0}, {"density": 0.9}], {"normalize": True}),
    ("linear", [{"weight": 0.3}, {"weight": 0.55}, {"weight": 0.15}], {}),
    ("linear", [{"weight": 1.0}, {"weight": -0.4}], {"normalize": False}),
    ("task_arithmetic", [{"weight": 0.3}, {"weight": 0.7}, {"weight": 1.0}], {"lambda": 0.9}),
    ("task_arithmetic", [{"weight": 0.5}, {"weight": 0.25}], {"normalize": True}),
    ("nearswap", [{}], {"t": 0.005}),
    ("nearswap", [{}], {"t": 0.0}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_piece_merged_from_bf16_into_bf16_equals_fn_then_cast(case: int, base_dtype: torch.dtype) -> None:
    method_name, mps, kw = CASES[case]
    n = 2 * BLOCK_ELEMS + 1001
    g = torch.Generator().manual_seed(case)
    base = torch.randn(n, generator=g).to(base_dtype)
    models = [(base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16() for _ in mps]
    method = get_method(method_name)

    def tm():
        return build_merge(method_name, base.float(), [m.float() for m in models], mps, name="w", seed=5, **kw)

    ref = method.fn(tm()).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    assert _run_piece(method.block_kernel(tm()), tm(), PieceInputs(0, base, models), out)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("method_name", ["ties", "dare_ties"])
def test_raw_merge_reports_non_finite_results(method_name: str) -> None:
    n = BLOCK_ELEMS + 7
    base = torch.zeros(n, dtype=torch.bfloat16)
    models = [torch.full((n,), 0.5, dtype=torch.bfloat16) for _ in range(2)]
    models[1][n - 3] = float("inf")
    mps = [{"density": 0.5}, {"density": 0.5}]
    tm = build_merge(method_name, base.float(), [m.float() for m in models], mps, name="w")
    kernel = get_method(method_name).block_kernel(tm)
    out = torch.empty(n, dtype=torch.bfloat16)
    assert not _run_piece(kernel, tm, PieceInputs(0, base, models), out)


def test_mixed_model_dtypes_take_the_float32_blocks() -> None:
    """Models of different stored dtypes cannot share one compiled signature:
    the kernel falls back to float32 blocks and still gives ``fn``'s result."""
    n = BLOCK_ELEMS + 99
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g)
    models = [(base + 0.01 * torch.randn(n, generator=g)).to(dt) for dt in (torch.bfloat16, torch.float16)]
    mps = [{"density": 0.3}, {"density": 0.6}]
    method = get_method("ties")

    def tm():
        return build_merge("ties", base, [m.float() for m in models], mps, name="w")

    out = torch.empty(n, dtype=torch.float32)
    assert _run_piece(method.block_kernel(tm()), tm(), PieceInputs(0, base, models), out)
    assert torch.equal(out, method.fn(tm()))


def test_widen_piece_from_bf16_into_bf16_equals_whole_matrix_then_cast() -> None:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 1000, generator=g).bfloat16()
    models = [(base.float() + 0.02 * torch.randn(300, 1000, generator=g)).bfloat16() for _ in range(3)]
    method = get_method("widen")

    def tm():
        return build_merge("widen", base.float(), [m.float() for m in models], [{}] * 3, name="w")

    ref = method.fn(tm()).to(torch.bfloat16)
    meta = tm()
    out = torch.empty(base.numel(), dtype=torch.bfloat16)
    assert _run_piece(method.block_kernel(meta), meta, PieceInputs(0, base.reshape(-1), [m.reshape(-1) for m in models]),
                      out)
    assert torch.equal(out.view(torch.int16), ref.reshape(-1).view(torch.int16))


def test_weights_summing_to_zero_still_get_the_clear_error() -> None:
    tm = build_merge("linear", None, [torch.ones(4), torch.ones(4)], [{"weight": 1.0}, {"weight": -1.0}], name="w")
    assert get_method("linear").block_kernel(tm).__class__.__name__ == "Elementwise"


@needs_numba
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_arcee_fusion_pieces_from_bf16_into_bf16_equal_fn_then_cast(base_dtype: torch.dtype) -> None:
    """Arcee Fusion's compiled merge pass, over row pieces of a sampled tensor (> 1,000,000
    entries), writes the bytes of the whole-tensor definition cast to bf16."""
    shape = (1100, 1000)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g).to(base_dtype)
    model = (base.float() + 0.02 * torch.randn(shape, generator=g)).bfloat16()
    method = get_method("arcee_fusion")

    def tm():
        return build_merge("arcee_fusion", base.float(), [model.float()], [{}], name="w", seed=5)

    ref = method.fn(tm()).to(torch.bfloat16).reshape(-1)
    kernel, meta = method.block_kernel(tm()), tm()
    cuts = [0, 400 * 1000, 800 * 1000, base.numel()]
    pieces = [PieceInputs(a, base.reshape(-1)[a:b], [model.reshape(-1)[a:b]]) for a, b in zip(cuts, cuts[1:])]
    for piece in pieces:
        observe_piece(kernel, meta, 0, piece)
    kernel.end_pass(0)
    out = torch.empty(base.numel(), dtype=torch.bfloat16)
    for piece in pieces:
        assert kernel.merge_raw(piece, out[piece.start:piece.start + piece.numel]) is True  # compiled
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    assert 0 < int((ref != base.reshape(-1).bfloat16()).sum()) < ref.numel()  # some entries fused, not all
