"""DELLA, SCE and Arcee Fusion stream in pieces: no whole tensor is read where pieces suffice.

Their whole-tensor statistics (DELLA's L1 norms for ``rescale``, SCE's
variance selection and weights, Arcee Fusion's quartiles) come from
statistic passes over pieces; the merged checkpoint is the one the
whole-tensor reference writes. See surgeon/merge/kernels/della.py, sce.py and
arcee_fusion.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import surgeon
from conftest import models_section, splitmix64
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


def _observed_pieces(kernel, header: TensorMerge, base: torch.Tensor, models: list[torch.Tensor],
                     rows: int | None) -> list[kbase.PieceInputs]:
    """Cut a 2-D tensor's inputs into pieces of ``rows`` rows (None: one piece) and
    run the kernel's statistic passes over them as the engine does."""
    step = rows or base.shape[0]
    pieces = [kbase.PieceInputs(r * base.shape[1], base[r:r + step].reshape(-1),
                                [x[r:r + step].reshape(-1) for x in models]) for r in range(0, base.shape[0], step)]
    for p in range(kernel.stat_passes):
        if kernel.pass_needed(p) is False:
            continue
        for piece in pieces:
            kbase.observe_piece(kernel, header, p, piece)
        kernel.end_pass(p)
    return pieces


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
    pieces = _observed_pieces(kernel, header, base, models, rows)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(SAMPLE_SIZE // 1000 + 9, 1000), (300, 700)])
def test_arcee_fusion_statistic_pass_from_stored_values_equals_the_block_pass(
        monkeypatch, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """The compiled statistic pass (rows widened into reused float32 blocks, the
    sampled or all importances computed from the stored values) keeps the same
    per-row KL divergences, the same sample values and so the same threshold as
    torch's pass over float32 blocks, over pieces of odd row counts, sampled or not;
    the merged tensors are the reference's."""
    from surgeon.merge.kernels import arcee_fusion

    if arcee_fusion._kernels() is None:
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g).to(dtype)
    model = (base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype)
    m = get_method("arcee_fusion")
    tm = build_merge("arcee_fusion", base.float(), [model.float()], [{}], name="t", seed=5)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True, seed=5)
    monkeypatch.setattr(kbase, "BLOCK_ELEMS", 37 * shape[1])  # blocks of 37 rows inside pieces of 101
    kernels = {}
    for how in ("raw", "blocks"):
        kernel = m.block_kernel(header)
        assert isinstance(kernel, ArceeFusionKernel)
        if how == "blocks":
            monkeypatch.setattr(kernel, "observe_raw", lambda pass_no, piece: False)
        kernels[how] = kernel
        pieces = [kbase.PieceInputs(r * shape[1], base[r:r + 101].reshape(-1), [model[r:r + 101].reshape(-1)])
                  for r in range(0, shape[0], 101)]
        for piece in pieces:
            kbase.observe_piece(kernel, header, 0, piece)
        kl, parts = kernel.kl.clone(), torch.cat(kernel.parts)
        kernel.end_pass(0)
        kernels[how + "_all"] = (kl, parts, kernel.thr)
        out = torch.empty(base.numel(), dtype=torch.float32)
        for piece in pieces:
            kbase.merge_piece(kernel, header, piece, out[piece.start:piece.start + piece.numel])
        kernels[how + "_out"] = out.reshape(shape)
    kl_raw, parts_raw, thr_raw = kernels["raw_all"]
    kl_blk, parts_blk, thr_blk = kernels["blocks_all"]
    assert torch.equal(kl_raw, kl_blk) and torch.equal(parts_raw, parts_blk) and torch.equal(thr_raw, thr_blk)
    assert parts_raw.numel() == (SAMPLE_SIZE if base.numel() > SAMPLE_SIZE else base.numel())
    assert torch.equal(kernels["raw_out"], kernels["blocks_out"])
    assert torch.equal(kernels["raw_out"], m.fn(tm))


@pytest.mark.parametrize("n", [3 * SAMPLE_SIZE + 7, SAMPLE_SIZE + 1, 1 << 32, (1 << 32) + 5, (1 << 33) - 1, 3 << 33])
def test_arcee_fusion_sample_is_the_seeded_stratified_draw(n: int, monkeypatch) -> None:
    """The quartiles' sample: position ``j`` drawn from the ``j``-th of SAMPLE_SIZE
    consecutive ranges ``[floor(j n / k), floor((j + 1) n / k))`` as ``start + floor(u
    size)``, ``u`` the top 53 bits of word ``j`` of the (recipe seed, tensor name) stream
    over 2^53 (computed here by hand in Python integers): ascending without repeats,
    int64, from the compiled loop and torch alike."""
    from surgeon.merge.kernels import arcee_fusion
    from surgeon.merge.rng import stream_key, word_stream

    name = "model.layers.0.mlp.up_proj.weight"
    got = arcee_fusion.sample_positions(n, 5, name)
    words = word_stream(stream_key(5, name, "arcee_fusion"), 0, SAMPLE_SIZE).tolist()
    k = SAMPLE_SIZE
    by_hand = []
    for j, w in enumerate(words):
        lo, hi = j * n // k, (j + 1) * n // k
        by_hand.append(lo + min(int(float(w % (1 << 64) >> 11) * 2.0 ** -53 * (hi - lo)), hi - lo - 1))
    assert got.dtype == torch.int64 and got.tolist() == by_hand
    assert bool((got[1:] > got[:-1]).all())
    assert arcee_fusion.sample_positions(SAMPLE_SIZE, 5, "t") is None
    monkeypatch.setattr(arcee_fusion, "_kernels", lambda: None)
    assert torch.equal(arcee_fusion.sample_positions(n, 5, name), got)


def test_arcee_fusion_sample_positions_are_uniform_within_their_ranges() -> None:
    """n = 11.5 M: ranges of 11 and of 12 entries. In each kind, the draw's offset in its
    range takes every value as often as a uniform draw does (chi-square below its 0.9999
    quantile: 35.6 with 10 degrees of freedom, 37.4 with 11): no offset favoured, the
    ranges' last entries included."""
    from surgeon.merge.kernels.arcee_fusion import sample_positions

    n, k = 11 * SAMPLE_SIZE + 534_336, SAMPLE_SIZE
    pos = sample_positions(n, 9, "w")
    j = torch.arange(k)
    lo, hi = j * n // k, (j + 1) * n // k
    size, offset = hi - lo, pos - lo
    assert bool((offset >= 0).all()) and bool((offset < size).all())
    for width, limit in ((11, 35.6), (12, 37.4)):
        counts = torch.bincount(offset[size == width], minlength=width).double()
        assert counts.shape[0] == width and counts.sum() > 100_000
        expected = float(counts.sum()) / width
        assert float(((counts - expected) ** 2 / expected).sum()) < limit


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


def test_della_ranks_a_1d_tensor_larger_than_a_piece_as_one_row(tmp_path: Path) -> None:
    """MagPrune ranks a 1-D tensor as one row: the engine must not cut it into
    row pieces (each would be ranked on its own), however small the pieces."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    base = {"w1d": torch.randn(3000, generator=g), "w2d": torch.randn(40, 75, generator=g)}
    for name, sd in (("base", base), ("ft1", {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})):
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: della_linear\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - model: {tmp_path / 'ft1'}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.2}}\n")
    surgeon.run(recipe, output=str(tmp_path / "pieces"), quiet=True, piece_size="4096B")  # w1d: 12 KB
    surgeon.run(recipe, output=str(tmp_path / "whole"), quiet=True, piece_size="0")
    got, want = load_file(tmp_path / "pieces" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def _della_rows(kind: str, g: torch.Generator) -> torch.Tensor:
    """Task-vector rows that take the compiled loop down each of its paths."""
    if kind == "float32":  # distinct magnitudes: every comparison decided by the magnitudes
        return torch.randn(9, 64, generator=g)
    if kind == "bf16_ties":  # differences of bf16 values: many equal magnitudes, decided by index
        b = (torch.randn(9, 96, generator=g) * 0.02).bfloat16().float()
        return (b + torch.randn(9, 96, generator=g) * 0.002).bfloat16().float() - b
    if kind == "one_value":  # one magnitude, both signs: every comparison a tie
        return torch.where(torch.rand(4, 512, generator=g) < 0.5, -0.25, 0.25)
    if kind == "zeros_and_odd":  # zero rows and entries, 13-wide rows (not byte-aligned)
        x = torch.randn(7, 13, generator=g)
        x[2] = 0.0
        x[:, ::3] = 0.0
        return x
    if kind == "tie_groups":  # 9 magnitudes over 512 entries
        mags = (1 + torch.randint(9, (6, 512), generator=g)).float() * 0.01
        return torch.where(torch.rand(6, 512, generator=g) < 0.5, -mags, mags)
    if kind == "wide_range":  # magnitudes over ~70 binades, subnormal products included
        x = torch.randn(9, 64, generator=g)
        x[:, ::5] *= 1e-20
        x[:, 1::7] *= 1e-3
        return x
    if kind == "non_finite":
        x = torch.randn(5, 40, generator=g)
        x[1, 3], x[2, 7], x[3, 9] = float("inf"), float("-inf"), float("nan")
        return x
    if kind == "bound_edges":  # enough entries that some uniforms' top halves equal a bound's (~2 in 65,536)
        return torch.randn(96, 2048, generator=g)
    return torch.randn(6, 1, generator=g)  # rows of one entry: probability density


def _compiled_keep(base: torch.Tensor, model: torch.Tensor, draws, start: int,
                   density: float, eps: float, gathers: bool | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The compiled statistic loop's keep mask (shaped like ``base``) and L1 sums (``gathers``:
    the band decided by della_vector's 16-lane operations or by the scalar walk; None: the
    host's preference)."""
    from surgeon.merge.kernels import della_compiled
    from surgeon.merge.kernels.della import keep_bounds

    bits = np.zeros((1, (base.numel() + 7) // 8), dtype=np.uint8)
    sums = np.zeros((1, 2))
    della_compiled.keep_bits(base.reshape(-1).numpy(), (model.reshape(-1).numpy(),), base.shape[-1], [0],
                             [(draws.coarse, draws.fine, draws.partner)], start, [keep_bounds(density, eps)], bits, sums,
                             gathers)
    return torch.from_numpy(np.unpackbits(bits[0], count=base.numel()).astype(bool)).reshape(base.shape), sums[0]


@pytest.mark.parametrize("kind", ["float32", "bf16_ties", "one_value", "tie_groups", "zeros_and_odd", "wide_range",
                                  "non_finite", "width_one", "bound_edges"])
@pytest.mark.parametrize("start_row", [0, 3])
@pytest.mark.parametrize("gathers", [False, True], ids=["walk", "gathers"])
def test_della_compiled_keep_bits_equal_the_reference_mask(kind: str, start_row: int, gathers: bool) -> None:
    """The compiled statistic loop keeps exactly the entries MagPrune's reference
    keeps (the same uniforms, words and comparisons), wherever the piece starts
    (rows of 13 from row 3: mid-word in the four-entry hashes), and its L1 sums equal
    torch's to float64 rounding; with the band decided by the scalar walk or by 16-lane
    compress-stores and gathers (della_vector: vector instructions with AVX-512, LLVM's
    scalar expansion elsewhere: both run on every machine)."""
    from surgeon.merge.kernels import della_compiled
    from surgeon.merge.kernels.della import DellaDraws, magprune_keep

    if not della_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(7)
    d = _della_rows(kind, g)
    n = d.shape[1]
    density, eps = 0.4, 0.2
    base = torch.randn(d.shape, generator=g) if kind != "bf16_ties" else torch.zeros(d.shape)
    model = base + d
    d = model - base  # the task vector the loop computes
    draws = DellaDraws.of(5, "t", 0)
    start = start_row * n
    want = magprune_keep(d, density, eps, draws, start)
    if kind == "bound_edges":  # the loop's second look (an entry's low half) has entries to decide
        from surgeon.merge.kernels.della import keep_bounds

        tops = {b >> 16 for b in keep_bounds(density, eps)}
        coarse = draws.uniforms(start, d.numel()) >> 16
        assert sum(int((coarse == t).sum()) for t in tops) >= 3
    got, sums = _compiled_keep(base, model, draws, start, density, eps, gathers)
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < want.numel()
    if kind == "non_finite":
        assert np.isnan(sums).all()
        return
    assert sums[0] == pytest.approx(float(d.abs().sum(dtype=torch.float64)), rel=1e-12)
    assert sums[1] == pytest.approx(float((d * want).abs().sum(dtype=torch.float64)), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_della_compiled_sums_keep_the_references_non_finite_semantics(seed: int) -> None:
    """The kept sum is the reference's ``sum |d * keep|``: an infinite entry kept makes it
    inf, one dropped makes it NaN (inf * 0); rows whose entries are all finite sum the same
    as a masked add, which the loop uses there."""
    from surgeon.merge.kernels import della_compiled
    from surgeon.merge.kernels.della import DellaDraws, magprune_keep

    if not della_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(4, 64, generator=g)
    d[2, int(torch.randint(64, (1,), generator=g))] = float("inf")
    base = torch.zeros_like(d)
    draws = DellaDraws.of(seed, "t", 0)
    want = magprune_keep(d, 0.4, 0.2, draws, 0)
    got, sums = _compiled_keep(base, d.clone(), draws, 0, 0.4, 0.2)
    assert torch.equal(got, want)
    kept_inf = bool(want[d.isinf()].all())
    assert sums[0] == float("inf")
    assert (sums[1] == float("inf")) if kept_inf else np.isnan(sums[1])
    finite = d[[0, 1, 3]]
    got_f, sums_f = _compiled_keep(torch.zeros_like(finite), finite.clone(), draws, 0, 0.4, 0.2)
    assert sums_f[1] == pytest.approx(float((finite * got_f).abs().sum(dtype=torch.float64)), rel=1e-12)


def test_della_draws_are_the_documented_splitmix_streams() -> None:
    """By hand in Python integers: entry ``j``'s uniform is bits ``16 (j mod 4)..`` of
    SplitMix64's output for counter ``j // 4`` under the coarse key (its top half) and the
    top 16 bits of the fine key's output for ``j`` (its low half); the bounds are
    ``ceil(lo 2^32)`` of the float32 bounds; the ``k``-th band entry of a row takes the
    partner key's word for the flat index of the row's ``k``-th entry, and its partner is
    ``floor(word (n - 1) / 2^64)`` among the others. The reference's mask follows."""
    from surgeon.merge.kernels.della import DellaDraws, keep_bounds, magprune_keep

    draws = DellaDraws.of(3, "model.layers.0.mlp.up_proj.weight", 1)
    assert draws == DellaDraws.of(3, "model.layers.0.mlp.up_proj.weight", 1)
    assert len({draws.coarse, draws.fine, draws.partner}) == 3
    start, n_rows, n = 3 * 21, 4, 21  # rows starting mid-word of the coarse stream
    u = draws.uniforms(start, n_rows * n)
    for j in range(start, start + n_rows * n):
        top = (splitmix64(draws.coarse, j // 4) >> (16 * (j % 4))) & 0xFFFF
        low = splitmix64(draws.fine, j) >> 48
        assert int(u[j - start]) == (top << 16) | low
    density, eps = 0.45, 0.3
    lo, hi = keep_bounds(density, eps)
    assert lo == math.ceil(float(np.float32(0.15)) * 2 ** 32) and hi == math.ceil(float(np.float32(0.75)) * 2 ** 32)
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(n_rows, n, generator=g)
    keep = magprune_keep(rows, density, eps, draws, start)
    mags = rows.abs()
    banded = 0
    for r in range(n_rows):
        k = 0
        for c in range(n):
            v = int(u[r * n + c])
            if v < lo:
                assert keep[r, c]
            elif v >= hi:
                assert not keep[r, c]
            else:
                word = splitmix64(draws.partner, start + r * n + k)
                off = (word * (n - 1)) >> 64
                partner = off + (off >= c)
                assert bool(keep[r, c]) == bool(mags[r, c] > mags[r, partner])  # distinct magnitudes
                k += 1
                banded += 1
    assert 0.4 * n_rows * n < banded < 0.8 * n_rows * n


@pytest.mark.parametrize("bound", ["lo", "hi"])
def test_della_keep_decides_uniforms_whose_top_half_is_a_bound_s_by_their_low_half(bound: str) -> None:
    """A bound set exactly on a drawn uniform: a uniform equal to ``L`` is in the band
    (kept only by outranking its partner), one equal to ``H`` dropped; that uniform's top
    16 bits are the bound's, so the compiled loop decides it (and any other such entry)
    on its rare path, by all 32 bits, and agrees with the reference entry for entry."""
    from surgeon.merge.kernels import della_compiled
    from surgeon.merge.kernels.della import DellaDraws, keep_bounds, magprune_keep

    if not della_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(3)
    d = torch.randn(16, 64, generator=g)
    draws = DellaDraws.of(5, "t", 0)
    u = draws.uniforms(0, d.numel()).reshape(d.shape)
    eps = 0.05
    # a uniform that is a float32 value times 2^32 (low 8 bits zero) inside (0.1, 0.85): a bound lands on it
    r, c = next((r, c) for r in range(d.shape[0]) for c in range(d.shape[1])
                if int(u[r, c]) & 0xFF == 0 and 0.1 * 2 ** 32 < int(u[r, c]) < 0.85 * 2 ** 32)
    target = int(u[r, c])
    density = target / 2 ** 32 + (eps if bound == "lo" else -eps)
    lo, hi = keep_bounds(density, eps)
    assert (lo if bound == "lo" else hi) == target
    want = magprune_keep(d, density, eps, draws, 0)
    band = (u >= lo) & (u < hi)
    if bound == "lo":
        assert bool(band[r, c]) and not bool(want[r, c] & (u[r, c] < lo))
    else:
        assert not bool(want[r, c]) and not bool(band[r, c])
    same_top = ((u >> 16) == (lo >> 16)) | ((u >> 16) == (hi >> 16))
    assert bool(same_top[r, c])
    assert torch.equal(want & ~band, u < lo)
    got, _ = _compiled_keep(torch.zeros(d.shape), d, draws, 0, density, eps)
    assert torch.equal(got, want)


@pytest.mark.parametrize("compiled", [False, True])
def test_della_keep_frequency_by_rank_is_the_magprune_probability(compiled: bool) -> None:
    """Over 60,000 rows of the same eight magnitudes (three tied: ranked by index)
    with random signs, each position is kept with ``density - epsilon + 2 epsilon
    rank / 7`` (within 4.5 standard errors), reference and compiled loop alike; two
    positions' decisions are independent (their joint frequency is the product)."""
    from surgeon.merge.kernels import della_compiled
    from surgeon.merge.kernels.della import DellaDraws, magprune_keep

    if compiled and not della_compiled.available():
        pytest.skip("numba is off")
    rows, n, density, eps = 60_000, 8, 0.45, 0.3
    mags = torch.tensor([0.5, 4.0, 1.0, 1.0, 2.0, 3.0, 1.0, 0.125])  # neither end holds the largest or smallest
    rank = torch.tensor([1.0, 7.0, 2.0, 3.0, 5.0, 6.0, 4.0, 0.0])
    g = torch.Generator().manual_seed(11)
    d = mags * torch.where(torch.rand(rows, n, generator=g) < 0.5, -1.0, 1.0)
    draws = DellaDraws.of(1, "w", 0)
    if compiled:
        keep, _ = _compiled_keep(torch.zeros(d.shape), d, draws, 0, density, eps)
    else:
        keep = magprune_keep(d, density, eps, draws, 0)
    freq = keep.double().mean(0)
    p = density - eps + 2 * eps * rank.double() / (n - 1)
    assert ((freq - p).abs() / (p * (1 - p) / rows).sqrt()).max() < 4.5
    for a, b in ((2, 3), (0, 7), (1, 5)):  # neighbours, and two whose band slots often follow each other
        joint = (keep[:, a] & keep[:, b]).double().mean()
        assert abs(joint - p[a] * p[b]) < 4.5 * math.sqrt(p[a] * p[b] * (1 - p[a] * p[b]) / rows)


def test_della_ranks_a_3d_tensor_along_dim_1_whole_and_in_blocks(monkeypatch) -> None:
    """A stacked tensor [experts, n, k] is ranked along dim 1 (each of its k lines of n per
    expert): the reference keeps each line's largest magnitude more often than its smallest
    (as the rank probabilities say), and the block kernel (blocks of whole experts, inside
    pieces of two) writes the reference's values. (The reference used to fail on 3-D
    tensors: its positions were laid along the last dim.)"""
    from surgeon.merge.kernels.della import DellaDraws, magprune_keep, rows_view

    g = torch.Generator().manual_seed(6)
    shape = (6, 10, 7)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) for _ in range(2)]
    mps = [{"weight": 0.6, "density": 0.5, "epsilon": 0.4}, {"weight": 0.9, "density": 0.4, "epsilon": 0.3}]
    m = get_method("della")
    tm = build_merge("della", base, models, mps, name="experts", seed=2)
    want = m.fn(tm)
    big = torch.randn(2000, 10, 3, generator=g)
    keep = magprune_keep(rows_view(big, tuple(big.shape)), 0.5, 0.4, DellaDraws.of(1, "x", 0), 0)
    order = big.abs().argsort(dim=1)
    top = keep.gather(1, order[:, -1:]).double().mean()
    bottom = keep.gather(1, order[:, :1]).double().mean()
    assert float(top) == pytest.approx(0.9, abs=0.03) and float(bottom) == pytest.approx(0.1, abs=0.03)
    header = TensorMerge.header("experts", shape, tm.model_params, tm.params, True, seed=2)
    kernel = m.block_kernel(header)
    assert kernel is not None and kernel.stat_passes == 1
    monkeypatch.setattr(kbase, "BLOCK_ELEMS", 70)  # one expert a block
    slab = 70
    pieces = [kbase.PieceInputs(e * slab, base[e:e + 2].reshape(-1), [x[e:e + 2].reshape(-1) for x in models])
              for e in (0, 2, 4)]
    for piece in pieces:
        kbase.observe_piece(kernel, header, 0, piece)
    kernel.end_pass(0)
    out = torch.empty(base.numel())
    for piece in pieces:
        kbase.merge_piece(kernel, header, piece, out[piece.start:piece.start + piece.numel])
    assert torch.equal(out.reshape(shape), want)


def test_della_blocks_take_their_bits_from_the_compiled_pass_pieces(monkeypatch) -> None:
    """When the merge pass cannot take a piece whole (an output dtype the compiled
    loop does not write), its blocks read their keep bits out of the statistic
    pass's piece: the result is still the reference's."""
    from surgeon.merge.kernels import della_compiled

    if not della_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(4)
    shape = (12, 40)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(2)]
    mps = [{"weight": 0.6, "density": 0.3, "epsilon": 0.1}, {"weight": 0.9, "density": 0.6, "epsilon": 0.2}]
    m = get_method("della")
    tm = build_merge("della", base, models, mps, name="t", seed=1)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True, seed=1)
    kernel = m.block_kernel(header)
    assert kernel is not None and kernel.stat_passes == 1
    monkeypatch.setattr(kbase, "BLOCK_ELEMS", 80)  # blocks of 2 rows inside pieces of 6
    monkeypatch.setattr(kernel, "merge_raw", lambda piece, out: None)
    pieces = [kbase.PieceInputs(r * 40, base[r:r + 6].reshape(-1), [x[r:r + 6].reshape(-1) for x in models])
              for r in (0, 6)]
    for piece in pieces:
        kbase.observe_piece(kernel, header, 0, piece)
    kernel.end_pass(0)
    assert len(kernel._masks) == 2  # one entry per piece: the compiled loop took them whole
    out = torch.empty(base.numel())
    for piece in pieces:
        kbase.merge_piece(kernel, header, piece, out[piece.start:piece.start + piece.numel])
    assert not kernel._masks
    assert torch.equal(out.reshape(shape), m.fn(tm))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rows", [1, 5, None])
def test_breadcrumbs_band_splits_ties_at_both_cuts_in_flat_order(method: str, rows: int | None) -> None:
    """Task vectors of three magnitudes: both cuts fall inside a group of equal
    magnitudes, so each takes only the first tied entries in flat order, across
    pieces; the compiled merge pass equals the whole-tensor reference."""
    g = torch.Generator().manual_seed(5)
    shape = (12, 40)
    base = torch.randn(shape, generator=g).bfloat16().float()
    models = []
    for _ in range(3):
        a = torch.randint(1, 4, shape, generator=g).float() * 0.25
        models.append(base + a * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0))
    mps = [{"weight": w, "density": 0.5, "gamma": 0.3} for w in (0.6, 1.0, 0.8)]
    m = get_method(method)
    tm = build_merge(method, base, models, mps, name="t")
    ref = m.fn(tm)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True)
    kernel = m.block_kernel(header)
    assert kernel is not None
    pieces = _observed_pieces(kernel, header, base, models, rows)
    from surgeon.merge.kernels import ties_compiled

    one_pass = getattr(kernel, "_one_pass", False)  # one piece: the merge itself settles the cuts
    assert one_pass == (rows is None and ties_compiled.available())
    if not one_pass:
        quotas = {key: c.quota for key, c in kernel.cuts.items()}
    if ties_compiled.available():  # the compiled loop takes every piece: no float32 block is merged
        kernel.merge = None  # type: ignore[method-assign,assignment]
    out = torch.empty(base.numel())
    for piece in pieces:
        kbase.merge_piece(kernel, header, piece, out[piece.start:piece.start + piece.numel])
    if one_pass:
        quotas = {key: c.quota for key, c in kernel.cuts.items()}
    split = [key for key, q in quotas.items() if 0 < q and not kernel.cuts[key].all_tied]
    assert len(split) == len(kernel.cuts) == 6  # every cut splits a group of ties
    assert torch.equal(out.reshape(shape), ref)


def test_arcee_fusion_threshold_reads_the_sorted_values_quartiles() -> None:
    """The select (compiled, or numpy's partial sorts) reads the values a full sort puts at
    ``floor(q (n - 1))``: ties, NaN (last), negatives, both zeros and small sizes included."""
    from surgeon.merge.kernels.arcee_fusion import QUARTILES, outlier_threshold

    g = torch.Generator().manual_seed(0)
    cases = [torch.rand(1001, generator=g), torch.randint(0, 4, (999,), generator=g).float(), torch.tensor([2.5]),
             torch.tensor([3.0, 1.0]), torch.cat([torch.rand(100, generator=g), torch.full((7,), float("nan"))]),
             torch.tensor([1.0, float("nan"), 0.5]), torch.tensor([4.0, 1.0, 3.0, 2.0]),
             torch.cat([torch.full((60,), float("nan")), torch.rand(40, generator=g)]),
             # negatives, both zeros, infinities and a negative NaN (the radix select's keys)
             torch.cat([torch.randn(500, generator=g), torch.tensor([-0.0, 0.0, float("inf"), -float("inf")]),
                        -torch.full((3,), float("nan"))]),
             torch.randint(-3, 4, (2001,), generator=g).float()]
    for v in cases:
        s = v.sort().values
        q1, med, q3 = (s[int(q * (v.numel() - 1))] for q in QUARTILES)
        want = med + 1.5 * (q3 - q1)
        got = outlier_threshold(v)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert torch.equal(got, want) or (torch.isnan(got) and torch.isnan(want)), (v.numel(), got, want)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bf16 or float32 tensor's bit patterns, for comparing bytes (NaN and -0 included)."""
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _compiled_mix_is_the_torch_blocks(compiled_k: kbase.Kernel, torch_k: kbase.Kernel, header: TensorMerge,
                                      piece: kbase.PieceInputs, dtype: torch.dtype) -> torch.Tensor:
    """Merge ``piece`` through the compiled loop (``merge_raw``) and through the torch
    float32 blocks of a kernel in the same state; assert the same bytes; return their bits."""
    numel = piece.models[0].numel()
    got = torch.empty(numel, dtype=dtype)
    assert compiled_k.merge_raw(piece, got) is True
    want = torch.empty(numel, dtype=dtype)
    torch_k.merge_raw = lambda piece, out: None  # type: ignore[method-assign]  # float32 blocks
    kbase.merge_piece(torch_k, header, piece, want)
    assert torch.equal(_bits(got), _bits(want))
    return _bits(got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_stock_compiled_passes_equal_the_torch_blocks(dtype: torch.dtype) -> None:
    """The compiled statistic pass sums what the torch blocks sum (to float64
    rounding) and, for the same ratio, the compiled mix writes the torch block
    path's bytes."""
    from surgeon.merge.kernels import model_stock_compiled

    if not model_stock_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(8)
    shape = (33, 70)
    base = torch.randn(shape, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    m = get_method("model_stock")
    tm = build_merge("model_stock", base.float(), [x.float() for x in models], [{}, {}, {}], name="t")
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True)
    compiled_k, torch_k = m.block_kernel(header), m.block_kernel(header)
    piece = kbase.PieceInputs(0, base.reshape(-1), [x.reshape(-1) for x in models])
    assert compiled_k.observe_raw(0, piece)
    torch_k.observe(0, TensorMerge("t", base.reshape(-1).float(), [x.reshape(-1).float() for x in models],
                                   tm.model_params, tm.params))
    for a, b in zip(compiled_k.sq + list(compiled_k.dots.values()), torch_k.sq + list(torch_k.dots.values())):
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    torch_k.end_pass(0)
    compiled_k.ratio = torch_k.ratio
    _compiled_mix_is_the_torch_blocks(compiled_k, torch_k, header, piece, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [0.3, 1.0])
def test_slerp_compiled_passes_equal_the_torch_blocks(dtype: torch.dtype, t: float) -> None:
    """The compiled statistic pass sums what the torch blocks sum (to float64
    rounding), and for the same coefficients the compiled mix writes the torch
    block path's bytes (v0 * c0, then + c1 v1 in one rounding), tails included."""
    from surgeon.merge.kernels import gram_compiled

    if not gram_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(12)
    shape = (33, 70)  # 2310 entries: four whole chunks and a tail
    base = torch.randn(shape, generator=g).to(dtype)
    model = (base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype)  # cos ~0.999: the arc, not the line
    m = get_method("slerp")
    tm = build_merge("slerp", base.float(), [model.float()], [{}], name="t", t=t)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True)
    compiled_k, torch_k = m.block_kernel(header), m.block_kernel(header)
    piece = kbase.PieceInputs(0, base.reshape(-1), [model.reshape(-1)])
    assert compiled_k.observe_raw(0, piece)
    torch_k.observe(0, TensorMerge("t", base.reshape(-1).float(), [model.reshape(-1).float()],
                                   tm.model_params, tm.params))
    assert compiled_k.sums == pytest.approx(torch_k.sums, rel=1e-12)
    compiled_k.end_pass(0)
    torch_k.end_pass(0)
    assert compiled_k.coef == pytest.approx(torch_k.coef, rel=1e-12)
    assert abs(torch_k.coef[0] + torch_k.coef[1] - 1.0) > 1e-6 or t == 1.0  # the arc's coefficients
    compiled_k.coef = torch_k.coef
    got = _compiled_mix_is_the_torch_blocks(compiled_k, torch_k, header, piece, dtype)
    assert torch.equal(got, _bits(m.fn(tm).to(dtype).reshape(-1)))  # the whole-tensor slerp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_flat_compiled_passes_equal_the_torch_blocks(dtype: torch.dtype, with_base: bool) -> None:
    """One flat vector (mergekit's default): the compiled pass sums the torch blocks' sums
    to float64 rounding and, for the same coefficients, the compiled mix writes the torch
    block path's bytes (v0 c0, then + v1 c1 rounded apart, then + base) and the
    whole-tensor nuslerp's."""
    from surgeon.merge.kernels import gram_compiled

    if not gram_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(13)
    shape = (33, 70)
    base = torch.randn(shape, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(2)]
    m = get_method("nuslerp")
    mps = [{"weight": 0.7}, {"weight": 0.4}]
    tm = build_merge("nuslerp", base.float() if with_base else None, [x.float() for x in models], mps, name="t")
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, with_base)
    compiled_k, torch_k = m.block_kernel(header), m.block_kernel(header)
    assert compiled_k.kind == "flat"
    piece = kbase.PieceInputs(0, base.reshape(-1) if with_base else None, [x.reshape(-1) for x in models])
    assert compiled_k.observe_raw(0, piece)
    torch_k.observe(0, TensorMerge("t", base.reshape(-1).float() if with_base else None,
                                   [x.reshape(-1).float() for x in models], tm.model_params, tm.params))
    assert [float(x) for x in compiled_k.sums] == pytest.approx([float(x) for x in torch_k.sums], rel=1e-12)
    torch_k.end_pass(0)
    compiled_k.coef = torch_k.coef
    got = _compiled_mix_is_the_torch_blocks(compiled_k, torch_k, header, piece, dtype)
    assert torch.equal(got, _bits(m.fn(tm).to(dtype).reshape(-1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("method", "with_base"), [("multislerp", False), ("multislerp", True), ("karcher", False),
                                                   ("karcher", True)])
def test_gram_compiled_passes_equal_the_torch_blocks(dtype: torch.dtype, method: str, with_base: bool) -> None:
    """Multi-SLERP and the Karcher mean: the compiled pass sums the torch blocks' Gram
    matrix to float64 rounding and, for the same coefficients, the compiled mix writes the
    torch block path's bytes (x_0 c_0, then each + c_i x_i fused, then + base for
    multislerp; karcher's base is a template only); multislerp's are the whole-tensor
    method's too."""
    from surgeon.merge.kernels import gram_compiled

    if not gram_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(14)
    shape = (33, 70)
    base = torch.randn(shape, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    m = get_method(method)
    mps = [{"weight": w} for w in (1.0, 0.6, 0.3)] if method == "multislerp" else [{}, {}, {}]
    tm = build_merge(method, base.float() if with_base else None, [x.float() for x in models], mps, name="t")
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, with_base)
    compiled_k, torch_k = m.block_kernel(header), m.block_kernel(header)
    piece = kbase.PieceInputs(0, base.reshape(-1) if with_base else None, [x.reshape(-1) for x in models])
    assert compiled_k.observe_raw(0, piece)
    torch_k.observe(0, TensorMerge("t", base.reshape(-1).float() if with_base else None,
                                   [x.reshape(-1).float() for x in models], tm.model_params, tm.params))
    assert compiled_k.g.dtype == torch.float64
    assert compiled_k.g.reshape(-1).tolist() == pytest.approx(torch_k.g.reshape(-1).tolist(), rel=1e-12)
    torch_k.end_pass(0)
    compiled_k.coef = torch_k.coef
    assert len(set(torch_k.coef)) == 3  # three distinct coefficients: the order of the terms shows
    got = _compiled_mix_is_the_torch_blocks(compiled_k, torch_k, header, piece, dtype)
    if method == "multislerp":  # closed-form coefficients; karcher's iteration may end a float64 ulp apart
        assert torch.equal(got, _bits(m.fn(tm).to(dtype).reshape(-1)))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ram_compiled_equals_the_reference_at_the_epsilon_edge(method: str, dtype: torch.dtype) -> None:
    """Task vectors exactly at, just below and above epsilon (compared in float32,
    as torch compares with a Python float), shared and unique contributions:
    the compiled passes write the whole-tensor reference's bytes."""
    from surgeon.merge.kernels import ram_compiled

    if not ram_compiled.available():
        pytest.skip("numba is off")
    g = torch.Generator().manual_seed(6)
    shape = (10, 64)
    eps = 0.1  # float32(0.1) > 0.1: a delta of float32(0.1) contributes in float64, not in float32
    base = torch.zeros(shape).to(dtype)
    e32 = float(np.float32(eps))
    choices = torch.tensor([0.0, e32, -e32, np.nextafter(np.float32(e32), np.float32(1)), 0.5, -0.25, 0.05])
    models = [choices[torch.randint(0, len(choices), shape, generator=g)].to(dtype) for _ in range(3)]
    m = get_method(method)
    params = {"epsilon": eps} if method == "ram" else {"epsilon": eps, "r": 0.5, "alpha": 0.4}
    tm = build_merge(method, base.float(), [x.float() for x in models], [{}, {}, {}], name="t", **params)
    ref = m.fn(tm)
    header = TensorMerge.header("t", shape, tm.model_params, tm.params, True)
    kernel = m.block_kernel(header)
    kernel.merge = None  # type: ignore[method-assign,assignment]  # the compiled loop takes every piece
    kernel.observe = None  # type: ignore[method-assign,assignment]
    got = kbase.run_in_memory(kernel, header, base, models)
    assert torch.equal(got, ref)
    if method == "ramplus_tl":
        assert kernel.lambdas is not None and any(v != 1.0 for v in kernel.lambdas)
