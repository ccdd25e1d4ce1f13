"""Block-wise merging and row-piece streaming give exactly the whole-tensor results.

The whole-tensor implementations (``MergeMethod.fn``: ``largest_mask`` selection,
boolean masks) are the reference; the block kernels (histogram selection,
float-only consensus, per-segment random numbers) must agree bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import surgeon
from conftest import models_section, splitmix64
from surgeon.io import Checkpoint
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.merge import build_merge
from surgeon.merge.apply import apply_method
from surgeon.merge.kernels.base import BLOCK_ELEMS, block_ranges
from surgeon.merge.registry import TensorMerge, get_method


def _family(shape, quantized: bool, seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(n)]
    if quantized:  # bf16 values: many exactly equal magnitudes, ties at every threshold
        base = base.bfloat16().float()
        models = [m.bfloat16().float() for m in models]
    return base, models


TIES_CASES = [
    dict(mps=[{"density": 0.3}, {"density": 0.5}, {"density": 1.0}]),
    dict(mps=[{"density": 0.2, "weight": 1.0}, {"density": 0.7, "weight": 0.5}, {"density": 0.0, "weight": 2.0}]),
    dict(mps=[{"density": 0.4}] * 3, consensus="count", normalize=False),
    dict(mps=[{"density": 0.9999, "weight": -0.5}, {"density": 0.01}, {"density": 0.5}], mixing="sum"),
    dict(mps=[{"density": 0.3, "weight": 0.7}] * 3, **{"lambda": 1.5}),
]


@pytest.mark.parametrize("shape", [(7,), (3, 5), (600, 1000), (2 * BLOCK_ELEMS + 3,)])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("case", range(len(TIES_CASES)))
def test_ties_kernel_equals_whole_tensor_reference(shape, quantized, case) -> None:
    base, models = _family(shape, quantized, seed=case)
    kw = dict(TIES_CASES[case])
    mps = kw.pop("mps")
    method = get_method("ties")
    ref = method.fn(build_merge("ties", base, models, mps, **kw))
    kernel = method.block_kernel(_meta(build_merge("ties", base, models, mps, **kw)))
    from surgeon.merge.kernels import ties_compiled as _ties_fused

    assert kernel is not None and kernel.compiled == _ties_fused.available()
    got = apply_method(method, build_merge("ties", base, models, mps, **kw))
    assert torch.equal(got, ref)


def _meta(tm: TensorMerge):

    return tm


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("quantized", [False, True])
def test_breadcrumbs_kernel_edge_ranges_equal_reference(method, quantized) -> None:
    """Rank ranges the conformance suite's parameters do not reach: a lower
    cut at 0 (large gamma), density 0 (keep none), density just below 1."""
    base, models = _family((600, 1000), quantized, seed=2)
    m = get_method(method)
    mps = [{"density": 0.5, "gamma": 0.6}, {"density": 0.0}, {"density": 0.999, "gamma": 0.0}]
    ref = m.fn(build_merge(method, base, models, mps))
    assert torch.equal(apply_method(m, build_merge(method, base, models, mps)), ref)


def test_ties_kernel_keeps_exactly_k_with_ties_across_blocks() -> None:
    # |delta| = 1 everywhere except a few larger entries; k falls inside the
    # tied group, whose members span three blocks: the first ones (lowest
    # flat index) are kept, exactly k in all.
    n = 3 * BLOCK_ELEMS + 11
    base = torch.zeros(n)
    d = torch.ones(n)
    d[::2] = -1.0
    big = torch.tensor([5, BLOCK_ELEMS + 7, n - 1])
    d[big] = 3.0
    density = 0.6
    k = int(density * n)
    out = apply_method(get_method("ties"), build_merge("ties", base, [d], [{"density": density}]))
    kept = out != 0
    assert int(kept.sum()) == k
    assert bool(kept[big].all())
    tied_kept = torch.nonzero(kept & (d.abs() == 1.0)).squeeze(1)
    assert tied_kept.tolist() == [i for i in range(n) if i not in set(big.tolist())][: k - 3]


def test_ties_model_scope_kernel_equals_reference() -> None:
    base, models = _family((400, 900), quantized=True, seed=3)
    thr = [float((m - base).abs().median()) for m in models]
    for state in ({"thresholds": [thr[0], None, float("inf")], "densities": [0.5, 1.0, 0.0], "zero_sign": -1.0},
                  {"thresholds": thr, "densities": [0.5] * 3, "zero_sign": 1.0}):
        mps = [{"density": d} for d in state["densities"]]
        for zs in ("auto", "positive"):
            tm = build_merge("ties", base, models, mps, trim_scope="model", zero_sign=zs, state=state)
            ref = get_method("ties").fn(tm)
            tm = build_merge("ties", base, models, mps, trim_scope="model", zero_sign=zs, state=state)
            assert torch.equal(apply_method(get_method("ties"), tm), ref)


def test_ties_options_needing_whole_tensor_sums_fall_back_to_fn() -> None:
    base, models = _family((50, 40), quantized=False)
    for kw in ({"rescale": True}, {"zero_sign": "majority"}):
        tm = build_merge("ties", base, models, [{"density": 0.3}] * 3, **kw)
        assert get_method("ties").block_kernel(_meta(tm)) is None


@pytest.mark.parametrize("shape,role", [((300, 1000), "other"), ((1000, 300), "embedding"), ((40, 3, 5), "other"),
                                        ((3, BLOCK_ELEMS // 2 + 1), "lm_head")])
@pytest.mark.parametrize("compiled", [True, False])
def test_widen_row_kernel_equals_whole_matrix(shape, role, compiled, monkeypatch) -> None:
    from surgeon.merge.kernels import widen_compiled as _widen_fused

    if not compiled:
        monkeypatch.setattr(_widen_fused, "_kernels", lambda: None)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    models = [base + 0.05 * torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) for _ in range(3)]
    method = get_method("widen")
    ref = method.fn(build_merge("widen", base, models, role=role))
    kernel = method.block_kernel(_meta(build_merge("widen", base, models, role=role)))
    assert kernel is not None
    assert kernel.fused == (compiled and _widen_fused.available())
    assert torch.equal(apply_method(method, build_merge("widen", base, models, role=role)), ref)


def test_uniform_numbers_do_not_depend_on_how_the_tensor_is_cut() -> None:
    n = 2 * BLOCK_ELEMS + 1234
    x = torch.zeros(n)
    whole = TensorMerge("w", x, [x], [{}], {}, seed=5).uniform("s")
    for cut in (1000, BLOCK_ELEMS, BLOCK_ELEMS + 17):
        parts = []
        for a in range(0, n, cut):
            b = min(a + cut, n)
            parts.append(TensorMerge("w", x[a:b], [x[a:b]], [{}], {}, seed=5, offset=a).uniform("s"))
        assert torch.equal(torch.cat(parts), whole)
    other = TensorMerge("w", x, [x], [{}], {}, seed=6).uniform("s")
    assert not torch.equal(other, whole)
    assert 0.49 < float(whole.mean()) < 0.51


def test_block_ranges_cut_at_global_multiples() -> None:
    assert list(block_ranges(5, 30, 10)) == [(5, 10), (10, 20), (20, 30)]
    assert list(block_ranges(10, 10, 4)) == []
    assert list(block_ranges(3, 9, None)) == [(3, 9)]


# --------------------------------------------------------------------------- engine: pieces vs whole tensors
RECIPE = """\
name: pieces
seed: 11
{models_section}steps:
  - id: merged
    merge:
      method: {method}
      base: base
      models:
        - {{model: ft1{d1}}}
        - {{model: ft2{d2}}}
        - {{model: ft3{d3}}}
{params}output:
  path: ./out
  max_shard_size: 30KB
"""


@pytest.mark.parametrize("method,params", [
    ("ties", ""),
    ("ties", "      parameters: {trim_scope: model}\n"),
    ("dare_ties", ""),
    ("dare_linear", ""),
    ("task_arithmetic", ""),
    ("widen", ""),
    ("model_stock", ""),
])
def test_row_pieces_give_the_same_bytes_as_whole_tensors(tmp_path: Path, tiny_family: dict[str, Path], method: str,
                                                         params: str) -> None:
    recipe = tmp_path / "r.yaml"
    def model_params(w: float, d: float) -> str:
        if method in ("widen", "model_stock"):
            return ""
        return f", weight: {w}" + (f", density: {d}" if method != "task_arithmetic" else "")

    dens = {f"d{i}": model_params(w, d) for i, w, d in ((1, 0.5, 0.3), (2, 0.3, 0.6), (3, 0.3, 0.5))}
    recipe.write_text(RECIPE.format(method=method, params=params, **dens, models_section=models_section(tiny_family)))
    outs = {}
    for piece in ("0", "1KB", "32MiB"):  # whole tensors through fn; 1 KB: several pieces per tensor; default
        out = tmp_path / f"out-{piece}"
        surgeon.run(recipe, output=str(out), quiet=True, piece_size=piece)
        outs[piece] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert outs["0"] == outs["1KB"] == outs["32MiB"]


def test_compute_threads_give_the_same_bytes(tmp_path: Path, tiny_family: dict[str, Path], monkeypatch) -> None:
    recipe = tmp_path / "r.yaml"
    mp = lambda w, d: f", weight: {w}, density: {d}"  # noqa: E731
    recipe.write_text(RECIPE.format(method="ties", params="", d1=mp(0.5, 0.3), d2=mp(0.3, 0.6), d3=mp(0.3, 0.5),
                                    models_section=models_section(tiny_family)))
    outs = []
    for workers in ("1", "3"):
        monkeypatch.setenv("SURGEON_COMPUTE_WORKERS", workers)
        out = tmp_path / f"out-{workers}"
        surgeon.run(recipe, output=str(out), quiet=True, piece_size="2KB", threads=2)
        outs.append({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))})
    assert outs[0] == outs[1]


def test_write_rows_in_any_order_and_journal_on_completion(tmp_path: Path) -> None:
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    specs = [TensorSpec("a", (10, 4), torch.float32), TensorSpec("b", (3,), torch.bfloat16)]
    with CheckpointWriter(tmp_path / "out", specs) as w:
        w.write_rows("a", 6, t[6:])
        assert not w.is_written("a")
        w.write_rows("a", 0, t[:3])
        w.write_rows("a", 3, t[3:6])
        assert w.is_written("a")
        with pytest.raises(Exception, match="do not fit"):
            w.write_rows("b", 2, torch.zeros(2, dtype=torch.bfloat16))
        w.write("b", torch.ones(3, dtype=torch.bfloat16))
        w.commit()
    ck = Checkpoint.open(tmp_path / "out")
    assert torch.equal(ck.get("a"), t)
    assert torch.equal(ck.get_rows("a", 2, 5), t[2:5])
    assert ck.get_rows("b", 1, 3).tolist() == [1.0, 1.0]
    with pytest.raises(Exception, match="out of range"):
        ck.get_rows("a", 8, 11)


# ---------------------------------------------------------------------------
# The compiled counting loops behind exact selection (numba on CPU) against bincount.

def _record_stages(kernel) -> list[str | None]:
    """Wrap ``kernel.end_pass`` so that the returned list gains the kernel's stage at each pass's end."""
    stages: list[str | None] = []
    end_pass = kernel.end_pass

    def record_and_end(pass_no: int) -> None:
        stages.append(kernel._stage)
        end_pass(pass_no)

    kernel.end_pass = record_and_end
    return stages


def _adversarial_magnitudes(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    v = (torch.randn(n, generator=g) * 0.02).abs()
    v[:50] = 0.0
    v[50:60] = torch.tensor(1e-45)          # subnormals (bucket 0)
    v[60:70] = float("inf")                  # the largest bucket that non-negative floats reach
    v[70:80] = torch.finfo(torch.float32).max
    bits = v.view(torch.int32)
    bits[100:200] = (bits[100:200] >> 16) << 16   # exactly at bucket starts
    bits[200:300] |= 0xFFFF                        # bucket ends
    return v


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, BLOCK_ELEMS + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_counts_equal_bincount(n: int, dtype: torch.dtype) -> None:
    """The compiled counting loop against ``bincount`` of the bit patterns of
    ``|m - b|``, and against the torch-ops path, for top-bit and window
    counts (windows at 0, across bucket edges, at the top of the range)."""
    import numpy as np

    from surgeon.merge.select import counting as _hist

    if not _hist.compiled_counts_available():
        pytest.skip("numba unavailable")
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(dtype)
    mag = _adversarial_magnitudes(max(n, 300))[:n]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    models = [(base.float() + sign * mag).to(dtype), (base.float() * 1.5).to(dtype)]
    bits = [(m.float() - base.float()).abs().view(torch.int32).to(torch.int64) for m in models]
    med = int(bits[0].median())
    windows = [(0, 1 << 18), (max(0, med - 70_000), 140_000), ((med >> 16) << 16, 1 << 16), (0x7F7F0000, 0x20000)]
    from surgeon.merge.kernels._raw import raw_inputs

    b, ms = raw_inputs(base, models)
    for lo, width in windows:
        sel = [0, 1, 0, 1, 0]
        kind = [_hist.TOP16, _hist.WINDOW, _hist.WINDOW, _hist.COLLECT, _hist.COLLECT]
        los, widths = [0, lo, max(0, lo - 5), lo, 0], [0, width, width, width, 0x7F800001]
        below = torch.zeros(5, dtype=torch.int64)
        inside = torch.zeros(5, dtype=torch.int64)
        top = torch.zeros(5, _hist.TOP_BINS, dtype=torch.int64)
        fine = torch.zeros(5, width, dtype=torch.int32)
        kept = torch.zeros(5, 2 * n + 1, dtype=torch.int32)  # room for every entry, twice, and the spare slot
        for _ in range(2):  # counts accumulate
            _hist.count_deltas_compiled(b, ms, np.array(sel), np.array(kind, dtype=np.int8),
                                        np.array(los, dtype=np.uint32), np.array(widths, dtype=np.uint32),
                                        below.numpy(), top.numpy(), fine.numpy(), inside.numpy(),
                                        kept.numpy().view(np.uint32))
        assert torch.equal(top[0], 2 * torch.bincount(bits[0] >> 16, minlength=1 << 15))
        for t in (1, 2, 3, 4):
            v = bits[sel[t]] - los[t]
            assert int(below[t]) == 2 * int((v < 0).sum())
            inw = (v >= 0) & (v < widths[t])
            if kind[t] == _hist.WINDOW:
                want = 2 * torch.bincount(v[inw], minlength=widths[t])
                assert torch.equal(fine[t].to(torch.int64), want), (lo, width, t)
            else:  # the patterns in flat order, twice
                assert int(inside[t]) == 2 * int(inw.sum())
                once = bits[sel[t]][inw]
                assert torch.equal(kept[t, :int(inside[t])].to(torch.int64), torch.cat([once, once]))
        below_t = torch.zeros(5, dtype=torch.int64)
        inside_t = torch.zeros(5, dtype=torch.int64)
        top_t = torch.zeros(5, _hist.TOP_BINS, dtype=torch.int64)
        fine_t = torch.zeros(5, width, dtype=torch.int32)
        parts: list[list[torch.Tensor]] = [[] for _ in sel]
        for _ in range(2):
            _hist.count_deltas_torch(base, models, sel, kind, los, widths, below_t, top_t, fine_t, inside_t, parts)
        assert torch.equal(below_t, below) and torch.equal(top_t, top) and torch.equal(fine_t, fine)
        assert torch.equal(inside_t, inside)
        for t in (3, 4):
            assert torch.equal(torch.cat(parts[t]), kept[t, :int(inside[t])].to(torch.int64))


def test_compiled_collect_counts_past_its_capacity_and_keeps_the_first_entries() -> None:
    """A bracket holding more entries than the buffer has room for: every entry
    is counted, the first ``capacity`` are kept in flat order, and nothing is
    written outside the buffer (its last column is the loop's spare slot)."""
    import numpy as np

    from surgeon.merge.kernels._raw import raw_inputs
    from surgeon.merge.select import counting as _hist

    if not _hist.compiled_counts_available():
        pytest.skip("numba unavailable")
    n = 5000 + 3  # ten chunks and a ragged end
    base = torch.zeros(n)
    model = torch.arange(n, dtype=torch.float32) / 64 - 30  # |delta| in [0, 48.1]
    bits = model.abs().view(torch.int32).to(torch.int64)
    lo, hi = int(torch.tensor(2.0).view(torch.int32)), int(torch.tensor(20.0).view(torch.int32))
    inside_ref = bits[(bits >= lo) & (bits < hi)]
    b, ms = raw_inputs(base, [model])
    for capacity in (0, 7, 700, len(inside_ref), len(inside_ref) + 10):
        kept = torch.full((1, capacity + 3), -1, dtype=torch.int32)
        view = kept[:, :capacity + 1]  # the loop's buffer: capacity + the spare slot; two guard columns after
        below, inside = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        _hist.count_deltas_compiled(b, ms, np.array([0]), np.array([_hist.COLLECT], dtype=np.int8),
                                    np.array([lo], dtype=np.uint32), np.array([hi - lo], dtype=np.uint32), below.numpy(),
                                    np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.int32), inside.numpy(),
                                    view.numpy().view(np.uint32))
        assert int(inside[0]) == len(inside_ref) and int(below[0]) == int((bits < lo).sum())
        keep = min(capacity, len(inside_ref))
        assert torch.equal(kept[0, :keep].to(torch.int64), inside_ref[:keep])
        assert kept[0, capacity + 1:].tolist() == [-1, -1]  # nothing past the buffer


def test_counter_uniform_compiled_equals_torch_ops_and_splitmix64() -> None:
    from surgeon.merge.rng import uniform_stream

    def uniform(key: int, i: int) -> float:  # two numbers per SplitMix64 output
        z = splitmix64(key, i >> 1)
        return ((z >> 40) if i % 2 == 0 else ((z >> 8) & 0xFFFFFF)) / 2 ** 24

    key = 0xDEADBEEFCAFEF00D   # a key above 2^63
    for start in ((1 << 40) - 3, (1 << 40) - 2):  # counters past 2^32; odd and even first entries
        ops = uniform_stream(key, start, 5001, compiled=False)
        assert ops.tolist()[:50] + ops.tolist()[-3:] == [uniform(key, start + i) for i in [*range(50), 4998, 4999, 5000]]
        if __import__("surgeon.merge.kernels._jit", fromlist=["x"]).numba_module() is not None:
            assert torch.equal(uniform_stream(key, start, 5001), ops)
            assert torch.equal(uniform_stream(key, start + 1, 5000), ops[1:])  # any slice of the stream
    u = uniform_stream(7, 0, 1 << 20)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 2e-3
    assert float((u[1:] - u[:-1]).abs().mean()) == pytest.approx(1 / 3, abs=2e-3)  # neighbours independent


def test_word_stream_is_splitmix64_in_torch_and_compiled_loops() -> None:
    """Entry ``i`` of a word stream: SplitMix64's whole output for counter ``i`` (by hand in
    Python integers), as int64 bit patterns from torch ops and as uint64 from ``rng.word``
    in a compiled loop."""
    from surgeon.merge import rng
    from surgeon.merge.kernels._jit import numba_module

    key, start = 0xDEADBEEFCAFEF00D, (1 << 40) - 3
    want = [splitmix64(key, start + i) for i in range(64)]
    assert [w % (1 << 64) for w in rng.word_stream(key, start, 64).tolist()] == want
    nb = numba_module()
    if nb is None:
        return
    rng.register()

    @nb.njit
    def words(k, s, n):
        out = np.empty(n, np.uint64)
        for i in range(n):
            out[i] = rng.word(k, s + i)
        return out

    assert words(rng.signed_key(key), start, 64).tolist() == want


DARE_CASES = [
    dict(mps=[{"density": 0.3}, {"density": 0.5}, {"density": 1.0}]),
    dict(mps=[{"density": 0.2, "weight": 0.7}, {"density": 0.0, "weight": 2.0}, {"density": 0.9, "weight": -0.5}],
         normalize=True),
    dict(mps=[{"density": 0.4}] * 3, rescale=False, **{"lambda": 1.5}),
    dict(mps=[{"density": 1e-50}, {"density": 0.6, "weight": 0.5}], normalize=True),
]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("case", range(len(DARE_CASES)))
def test_dare_compiled_kernel_equals_elementwise_fn(method: str, case: int) -> None:
    from surgeon.merge.kernels import ties_compiled as _ties_fused
    from surgeon.merge.kernels.dare import DareKernel

    kw = dict(DARE_CASES[case])
    mps = kw.pop("mps")
    base, models = _family((3 * BLOCK_ELEMS // 2 + 5,), quantized=True, seed=case, n=len(mps))
    m = get_method(method)
    tm = build_merge(method, base, models, mps, name="model.layers.3.mlp.up_proj.weight", seed=11, **kw)
    kernel = m.block_kernel(_meta(tm))
    assert isinstance(kernel, DareKernel) == _ties_fused.available()
    ref = m.fn(build_merge(method, base, models, mps, name="model.layers.3.mlp.up_proj.weight", seed=11, **kw))
    got = apply_method(m, build_merge(method, base, models, mps, name="model.layers.3.mlp.up_proj.weight", seed=11, **kw))
    assert torch.equal(got, ref, ) or torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_compiled_kernels_keep_nan_visible(method: str) -> None:
    # a NaN input entry must give a NaN output entry (the engine's non-finite
    # check then stops the merge), as the torch reference does
    base, models = _family((1000,), quantized=False, seed=4)
    models[1][17] = float("nan")
    mps = [{"density": 0.5}] * 3
    m = get_method(method)
    ref = m.fn(build_merge(method, base, models, mps))
    got = apply_method(m, build_merge(method, base, models, mps))
    assert bool(torch.isnan(ref[17])) and bool(torch.isnan(got[17]))
    keep = ~torch.isnan(ref)
    assert torch.equal(got[keep], ref[keep])


def test_passes_a_selection_does_not_need_are_not_read(tmp_path: Path, tiny_family: dict[str, Path],
                                                       monkeypatch) -> None:
    """TIES' selection usually settles in its first pass: a tensor cut into
    pieces is then read twice (that pass and the merge), not once per planned
    pass; the output is still the whole-tensor result."""
    from surgeon.engine import merge_step, piecewise

    jobs_seen: list = []
    reads: list = []
    plan_jobs, loader_call = piecewise.plan_jobs, piecewise._PieceLoader.__call__

    def record_jobs(*a, **kw):
        jobs = plan_jobs(*a, **kw)
        jobs_seen.extend(jobs)
        return jobs

    def record_read(self, read):
        reads.append((read.job.task.name, read.passes))
        return loader_call(self, read)

    monkeypatch.setattr(merge_step, "plan_jobs", record_jobs)
    monkeypatch.setattr(piecewise._PieceLoader, "__call__", record_read)
    recipe = tmp_path / "r.yaml"
    mp = lambda w, d: f", weight: {w}, density: {d}"  # noqa: E731
    recipe.write_text(RECIPE.format(method="ties", params="", d1=mp(0.5, 0.3), d2=mp(0.3, 0.6), d3=mp(0.3, 0.5),
                                    models_section=models_section(tiny_family)))
    surgeon.run(recipe, output=str(tmp_path / "pieces"), quiet=True, piece_size="4KB")
    surgeon.run(recipe, output=str(tmp_path / "whole"), quiet=True, piece_size="0")
    assert [f.read_bytes() for f in sorted((tmp_path / "pieces").glob("*.safetensors"))] == \
        [f.read_bytes() for f in sorted((tmp_path / "whole").glob("*.safetensors"))]
    multi = [j for j in jobs_seen if len(j.pieces) > 1 and j.kernel.stat_passes]
    assert multi and any(j.kernel.selector._ended == 1 for j in multi)
    for job in multi:
        closed = job.kernel.selector._ended
        assert 1 <= closed < job.kernel.stat_passes or job.kernel.selector.misses
        n_reads = sum(1 for name, _ in reads if name == job.task.name)
        assert n_reads == len(job.pieces) * (closed + 1), job.task.name


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [True, False])
def test_sce_kernel_keeps_the_first_tied_entries_and_needs_the_weights_pass_only_then(compiled, dtype, split,
                                                                                      monkeypatch) -> None:
    """Entries (a, -a, 0), variance 2a^2/3: 50 distinct larger a, the rest a = 1, tied across blocks.
    When k falls inside the tied group (``split``), the first tied entries in flat order are kept.
    Compiled, the sampled window's pass settles the selection and the weights in one pass; through
    torch, the top-16 and low-16 passes find the threshold and the weights take a pass of their
    own. Equal to the whole-tensor definition either way."""
    from surgeon.merge.kernels.base import run_in_memory
    from surgeon.merge.kernels.sce import LOW, TOP16, WEIGHTS, WINDOW, SceKernel

    if not compiled:
        monkeypatch.setenv("SURGEON_NO_NUMBA", "1")
    n = 3 * BLOCK_ELEMS + 11
    g = torch.Generator().manual_seed(5)
    a = torch.ones(n)
    big = torch.randperm(n, generator=g)[:50]
    a[big] = 2.0 + torch.arange(50) / 64  # distinct, exact in bfloat16
    k = 50 + n // 4 if split else 25
    topk = (k + 0.5) / n
    base = torch.zeros(n).to(dtype)
    models = [a.to(dtype), (-a).to(dtype), torch.zeros(n).to(dtype)]
    mps = [{}, {}, {}]
    meta = TensorMerge.header("model.layers.0.mlp.up_proj.weight", (n,), mps, {"select_topk": topk}, True)
    kernel = SceKernel(meta)
    stages = _record_stages(kernel)
    out = run_in_memory(kernel, meta, base, models)
    ref = get_method("sce").fn(build_merge("sce", base, models, mps, select_topk=topk))
    assert torch.equal(out.to(dtype), ref.to(dtype))
    assert int((out != 0).sum()) == k
    if split:  # the first tied entries are the kept ones
        kept_ties = torch.nonzero((out != 0) & (a == 1.0)).squeeze(1)
        assert kept_ties.tolist() == torch.nonzero(a == 1.0).squeeze(1)[: k - 50].tolist()
    if compiled:
        assert stages == [WINDOW] and kernel.misses == 0
    else:
        assert stages == [TOP16, LOW, WEIGHTS]


@pytest.mark.parametrize("records", ["plenty", "none"])
def test_sce_kernel_after_a_missed_window_finds_the_threshold_from_its_bucket(records, monkeypatch) -> None:
    """A sampled window that misses the threshold (moved here below every non-zero variance, as a
    sample unlike the tensor would) costs passes, not exactness: the top-16 pass finds the bucket,
    whose entries a second window pass gathers (or, when more than MAX_RECORDS, the low-16 and
    weights passes count), and the result is the whole-tensor definition's, bit for bit."""
    from surgeon.merge.kernels import sce
    from surgeon.merge.kernels.base import run_in_memory

    if not sce.sce_compiled.available():
        pytest.skip("numba is off")
    base, models = _family((600, 1000), True, seed=6)  # bf16 values: the threshold's ties are split
    mps = [{}, {}, {}]
    meta = TensorMerge.header("model.layers.0.mlp.up_proj.weight", (600, 1000), mps, {"select_topk": 0.3}, True)
    kernel = sce.SceKernel(meta)
    bracket = kernel._bracket

    def misplaced(piece) -> None:
        bracket(piece)
        assert kernel._window is not None  # the sample did bracket it: now move the window off
        kernel._window = (1, 1000, kernel._window[2])
        if records == "none":
            monkeypatch.setattr(sce, "MAX_RECORDS", 0)

    kernel._bracket = misplaced  # type: ignore[method-assign]
    stages = _record_stages(kernel)
    out = run_in_memory(kernel, meta, base, models)
    ref = get_method("sce").fn(build_merge("sce", base, models, mps, select_topk=0.3))
    assert torch.equal(out, ref)
    assert kernel.misses == 1
    if records == "plenty":
        assert stages == [sce.WINDOW, sce.TOP16, sce.WINDOW]
    else:
        assert stages == [sce.WINDOW, sce.TOP16, sce.LOW, sce.WEIGHTS]
    assert 0 < kernel._quota0  # the boundary splits a group of tied variances


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("quantized", [False, True])
def test_sce_kernel_weights_from_the_selection_pass_equal_the_definition(compiled, quantized, monkeypatch) -> None:
    """Random task vectors whose weights differ (each model's scale differs per region): the
    weights the compiled selection pass sums (above the threshold's bucket, and inside it by the
    variance's low bits) give the whole-tensor definition's result, across blocks."""
    from surgeon.merge.kernels.base import run_in_memory
    from surgeon.merge.kernels.sce import SceKernel

    if not compiled:
        monkeypatch.setenv("SURGEON_NO_NUMBA", "1")
    base, models = _family((600, 1000), quantized, seed=4)
    models[1][:300] = base[:300] + 4 * (models[1][:300] - base[:300])  # model 1 moves further in the top half
    mps = [{}, {}, {}]
    meta = TensorMerge.header("model.layers.0.mlp.up_proj.weight", (600, 1000), mps, {"select_topk": 0.3}, True)
    kernel = SceKernel(meta)
    out = run_in_memory(kernel, meta, base, models)
    ref_t = build_merge("sce", base, models, mps, select_topk=0.3)
    assert torch.equal(out, get_method("sce").fn(ref_t))
    assert kernel.weights[1] > 2 * kernel.weights[0]
