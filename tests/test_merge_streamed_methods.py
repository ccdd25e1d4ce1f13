"""DELLA, SCE and Arcee Fusion stream in pieces: no whole tensor is read where pieces suffice.

Their whole-tensor statistics (DELLA's L1 norms for ``rescale``, SCE's
variance selection and weights, Arcee Fusion's quartiles) come from
statistic passes over pieces; the merged checkpoint is the one the
whole-tensor reference writes. See surgeon/merge/kernels/della.py, sce.py and
arcee_fusion.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import surgeon
from conftest import models_section
from surgeon.merge import build_merge
from surgeon.merge.kernels import base as kbase
from surgeon.merge.kernels.arcee_fusion import SAMPLE_SIZE, ArceeFusionKernel
from surgeon.merge.registry import TensorMerge, get_method

RECIPE = """\
name: streamed
seed: 11
{models_section}steps:
  - id: merged
    merge:
      method: {method}
      base: base
{params}      models:
{models}output:
  path: ./out
"""
MODELS = {
    "della": "        - {model: ft1, weight: 0.5, density: 0.3, epsilon: 0.1}\n"
             "        - {model: ft2, weight: 0.4, density: 0.5, epsilon: 0.2}\n"
             "        - {model: ft3, weight: 0.6, density: 0.4, epsilon: 0.1}\n",
    "sce": "        - {model: ft1}\n        - {model: ft2}\n        - {model: ft3}\n",
    "arcee_fusion": "        - {model: ft1}\n",
}
CASES = [
    ("della", "della", ""),
    ("della_linear", "della", ""),
    ("sce", "sce", "      parameters: {select_topk: 0.3}\n"),
    ("arcee_fusion", "arcee_fusion", ""),
]
PIECE = 4096  # bytes per input per piece


@pytest.mark.parametrize("method,models,params", CASES, ids=[c[0] for c in CASES])
def test_streamed_in_pieces_and_equal_to_whole_tensors(tmp_path: Path, tiny_family: dict[str, Path], method: str,
                                                       models: str, params: str, monkeypatch) -> None:
    """Every tensor larger than a piece goes through the kernel piece by piece
    (no whole-tensor merge, no piece larger than a piece's bytes, whether the
    kernel takes it whole in its stored dtype or in float32 blocks), and the
    checkpoint equals the whole-tensor run's byte for byte."""
    from surgeon.engine import merge_step, piecewise

    whole_tasks: list[str] = []
    blocks: list[tuple[str, int]] = []
    iter_merges, merge_piece = merge_step.iter_merges, piecewise.merge_piece

    def record_whole(plan, inputs, rt, tasks, state=None):
        whole_tasks.extend(t.name for t in tasks)
        return iter_merges(plan, inputs, rt, tasks, state)

    def record_piece(kernel, meta, piece, out):
        blocks.append((meta.name, piece.numel))
        return merge_piece(kernel, meta, piece, out)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(method=method, params=params, models=MODELS[models],
                                    models_section=models_section(tiny_family)))
    with monkeypatch.context() as mp:
        mp.setattr(merge_step, "iter_merges", record_whole)
        mp.setattr(piecewise, "merge_piece", record_piece)
        surgeon.run(recipe, output=str(tmp_path / "pieces"), quiet=True, piece_size=f"{PIECE}B")
    from surgeon.io import Checkpoint

    ck = Checkpoint.open(tiny_family["base"])
    large = {n for n in ck.names if ck.info(n).dtype.is_floating_point
             and ck.info(n).nbytes > PIECE and len(ck.info(n).shape) >= 2}
    assert large, "the family has no tensor larger than a piece: the test proves nothing"
    assert not large & set(whole_tasks), f"merged whole: {sorted(large & set(whole_tasks))}"
    seen = {n for n, _ in blocks}
    assert large <= seen
    itemsize = max(ck.info(n).dtype.itemsize for n in large)
    biggest = max((size for n, size in blocks if n in large), default=0)
    assert 0 < biggest * itemsize <= PIECE

    surgeon.run(recipe, output=str(tmp_path / "whole"), quiet=True, piece_size="0")
    got = [f.read_bytes() for f in sorted((tmp_path / "pieces").glob("*.safetensors"))]
    want = [f.read_bytes() for f in sorted((tmp_path / "whole").glob("*.safetensors"))]
    assert got and got == want


def _naive_sce(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> torch.Tensor:
    """mergekit's SCE written out with a stable sort: keep the k largest variances
    (ties: lowest flat index), weights = mean squared selected task vector, erase."""
    deltas = torch.stack([m - base for m in models])
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * topk)
    order = torch.argsort(-var.reshape(-1), stable=True)[:k]
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    mask[order] = True
    deltas = deltas * mask.reshape(var.shape)
    w = deltas.double().square().mean(dim=tuple(range(1, deltas.dim())))
    w = w / w.sum()
    sign = torch.sign(deltas.sum(0))
    sign[sign == 0] = 1
    agree = (torch.sign(deltas) == sign).to(torch.float64)
    wv = w.reshape(-1, *([1] * var.dim()))
    merged = (deltas.double() * agree * wv).sum(0) / (agree * wv).sum(0).clamp(min=1e-6)
    return (merged + base.double()).float()


@pytest.mark.parametrize("rows,block", [(None, None), (1, 24), (5, 80)])
def test_sce_kernel_splits_ties_at_the_threshold_in_flat_order(rows: int | None, block: int | None,
                                                               monkeypatch) -> None:
    """Many entries share the boundary variance: the kernel keeps the first ones
    in flat order across pieces and blocks, as the whole-tensor selection does."""
    g = torch.Generator().manual_seed(3)
    shape = (12, 40)
    base = torch.randn(shape, generator=g)
    a = torch.randint(1, 4, shape, generator=g).float() * 0.25  # 3 magnitudes: 3 variance values
    models = [base + a, base - a, base.clone()]
    m = get_method("sce")
    tm = build_merge("sce", base, models, [{}, {}, {}], name="t", select_topk=0.5)
    ref = m.fn(tm)
    torch.testing.assert_close(ref, _naive_sce(base, models, 0.5), rtol=1e-6, atol=1e-6)
    if block is not None:
        monkeypatch.setattr(kbase, "BLOCK_ELEMS", block)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True)
    kernel = m.block_kernel(header)
    assert kernel is not None
    step = rows or shape[0]
    pieces = [kbase.PieceInputs(r * shape[1], base[r:r + step].reshape(-1), [x[r:r + step].reshape(-1) for x in models])
              for r in range(0, shape[0], step)]
    for p in range(kernel.stat_passes):
        for piece in pieces:
            kbase.observe_piece(kernel, header, p, piece)
        kernel.end_pass(p)
    assert 0 < kernel._quota0 < 480  # the boundary falls inside a group of tied variances
    out = torch.empty(base.numel())
    for piece in pieces:
        kbase.merge_piece(kernel, header, piece, out[piece.start:piece.start + piece.numel])
    assert torch.equal(out.reshape(shape), ref)


def test_arcee_fusion_kernel_draws_its_sample_only_while_it_runs() -> None:
    """The engine makes every tensor's kernel before merging any: a kernel must
    not hold its 1,000,000 sample positions (8 MB) from then on."""
    shape = (SAMPLE_SIZE // 1000 + 5, 1000)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    model = base + 0.05 * torch.randn(shape, generator=g)
    m = get_method("arcee_fusion")
    tm = build_merge("arcee_fusion", base, [model], [{}], name="t", seed=5)
    kernel = m.block_kernel(TensorMerge.header("t", shape, tm.model_params, tm.params, True, seed=5))
    assert isinstance(kernel, ArceeFusionKernel) and kernel.pos is None
    got = kbase.run_in_memory(kernel, TensorMerge.header("t", shape, tm.model_params, tm.params, True, seed=5),
                              base, [model])
    assert kernel.pos is None and not kernel.parts
    assert torch.equal(got, m.fn(tm))


def test_della_kernel_rescale_keeps_each_task_vectors_l1_norm(monkeypatch) -> None:
    """MagPrune with ``rescale`` scales the pruned task vector back to the L1 norm
    of the unpruned one over the whole tensor, though the kernel sees it in pieces."""
    g = torch.Generator().manual_seed(9)
    shape = (30, 50)
    base = torch.randn(shape, generator=g)
    model = base + 0.1 * torch.randn(shape, generator=g)
    mps = [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}]
    m = get_method("della_linear")
    tm = build_merge("della_linear", base, [model], mps, name="t", seed=2)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True, seed=2)
    monkeypatch.setattr(kbase, "BLOCK_ELEMS", 100)  # blocks of 2 rows
    kernel = m.block_kernel(header)
    assert kernel is not None and kernel.stat_passes == 1
    got = kbase.run_in_memory(kernel, header, base, [model])
    kept = got - base
    assert 0.25 < float((kept != 0).float().mean()) < 0.35  # keep probabilities average the density, 0.3
    torch.testing.assert_close(kept.abs().sum(dtype=torch.float64), (model - base).abs().sum(dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert torch.equal(got, m.fn(tm))
