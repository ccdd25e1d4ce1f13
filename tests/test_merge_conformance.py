"""Conformance: every registered merge method x every backend it exposes, against its reference.

The reference function (``MergeMethod.fn`` on whole float32 tensors) is the
definition of a method; every other way of computing it must give the same
result:

- ``torch``: the method's kernel (if its factory offers one for these
  parameters) with the compiled loops switched off (``SURGEON_NO_NUMBA=1``);
- ``compiled``: the same kernel with the numba loops on (skipped without numba);

each driven exactly as the engine drives it (statistic passes over row
pieces in flat order, then the merge pass: :mod:`surgeon.merge.kernels.base`),
for stored dtypes float32 and bfloat16, several piece and block sizes, and
torch thread counts 1 and 2. Parameters are the method's defaults and a
"varied" set derived from the declarations (weights apart, fractions at 0.5),
so a newly registered method is covered the moment it is in the registry.

Results must be bit-identical, except for the methods in :data:`FLOAT64_SUMS`
whose kernels sum float64 statistics block by block (in a different order
than the whole-tensor reduction; documented in their modules).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from surgeon.merge import all_methods, build_merge
from surgeon.merge.kernels import base as kbase
from surgeon.merge.kernels._jit import numba_module
from surgeon.merge.method import MergeMethod
from surgeon.merge.tensor import TensorMerge

#: kernels whose statistics are float64 sums over blocks (equal to the reference to float64 rounding)
FLOAT64_SUMS = {"widen", "slerp", "model_stock", "nuslerp", "multislerp", "karcher"}
SHAPE = (12, 40)  # 480 entries: a few small blocks when BLOCK_ELEMS is patched down
NAME = "model.layers.1.mlp.up_proj.weight"
#: (rows per piece or None for one piece, block elements or None for the default)
CUTS = [(None, None), (1, 24), (5, 80), (7, 16)]


def _n_models(m: MergeMethod) -> int:
    n = max(m.min_models, 3)
    return min(n, m.max_models) if m.max_models is not None else n


def _params(m: MergeMethod, varied: bool, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and step parameters: the defaults, or values derived from each declaration."""
    mps: list[dict[str, Any]] = [{} for _ in range(n)]
    glob: dict[str, Any] = {}
    for p in m.params:
        if not varied and not p.required:
            continue
        if p.kind is float:
            lo = p.min if p.min is not None else 0.0
            hi = p.max if p.max is not None else (lo + 1.0)
            if p.name == "weight":
                vals = [1.0, 0.6, 1.4, 0.9][:n]
            elif p.min is not None and p.max is not None:
                vals = [lo + (hi - lo) * f for f in (0.5, 0.4, 0.6, 0.3)][:n]
            elif not p.required:
                vals = [float(p.default)] * n
            else:
                vals = [0.3] * n
        elif p.kind is int:
            vals = [int(p.default) if not p.required else int(p.min or 1)] * n
        else:
            if p.required:
                vals = [p.choices[0] if p.choices else False] * n
            else:
                continue
        if p.per_model:
            for i in range(n):
                mps[i][p.name] = vals[i]
        else:
            glob[p.name] = vals[0]
    return mps, glob


def _inputs(m: MergeMethod, n: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(SHAPE, generator=g)
    models = [base + 0.1 * torch.randn(SHAPE, generator=g) for _ in range(n)]
    # a few exact ties in magnitude and unchanged entries: the trims' tie rules are exercised
    for i, mdl in enumerate(models):
        mdl[0, :8] = base[0, :8] + 0.05
        mdl[1, i] = base[1, i]
    return (base.to(dtype) if m.needs_base else None), [x.to(dtype) for x in models]


def _drive(kernel: kbase.Kernel, meta: TensorMerge, base: torch.Tensor | None, models: list[torch.Tensor],
           rows: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The engine's order: statistic passes over all pieces (asking pass_needed), then the merge pass."""
    r_total = SHAPE[0]
    step = rows or r_total
    cols = SHAPE[1]
    pieces = []
    for r0 in range(0, r_total, step):
        r1 = min(r_total, r0 + step)
        pieces.append(kbase.PieceInputs(r0 * cols, None if base is None else base[r0:r1].reshape(-1),
                                        [mdl[r0:r1].reshape(-1) for mdl in models]))
    for p in range(kernel.stat_passes):
        if not kernel.pass_needed(p):
            continue
        for piece in pieces:
            kbase.observe_piece(kernel, meta, p, piece)
        kernel.end_pass(p)
    out = torch.empty(r_total * cols, dtype=out_dtype)
    for piece in pieces:
        kbase.merge_piece(kernel, meta, piece, out[piece.start:piece.start + piece.numel])
    return out.reshape(SHAPE)


def _cases():
    for name in all_methods():
        for backend in ("torch", "compiled"):
            for dtype in (torch.float32, torch.bfloat16):
                for varied in (False, True):
                    yield pytest.param(name, backend, dtype, varied,
                                       id=f"{name}-{backend}-{str(dtype)[6:]}-{'varied' if varied else 'defaults'}")


@pytest.mark.parametrize("name,backend,dtype,varied", list(_cases()))
def test_backend_equals_reference(name: str, backend: str, dtype: torch.dtype, varied: bool, monkeypatch) -> None:
    m = all_methods()[name]
    if backend == "compiled" and numba_module() is None:
        pytest.skip("numba is not available")
    if backend == "torch":
        monkeypatch.setenv("SURGEON_NO_NUMBA", "1")
    n = _n_models(m)
    mps, params = _params(m, varied, n)
    base, models = _inputs(m, n, dtype)
    tm = build_merge(name, base, models, mps, name=NAME, seed=7, **params)
    ref = m.fn(tm).to(dtype)
    header = TensorMerge.header(NAME, SHAPE, tm.model_params, tm.params, base is not None, seed=7)
    if m.block_kernel(header) is None:
        pytest.skip(f"{name} has no kernel for these parameters (the reference runs)")
    threads = torch.get_num_threads()
    try:
        for rows, block in CUTS:
            if block is not None:
                monkeypatch.setattr(kbase, "BLOCK_ELEMS", block)
            for t in (1, 2):
                torch.set_num_threads(t)
                kernel = m.block_kernel(header)
                assert kernel is not None
                got = _drive(kernel, header, base, models, rows, dtype)
                where = f"{name}/{backend}/{dtype}/rows={rows}/block={block}/threads={t}"
                if name in FLOAT64_SUMS:
                    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-6 if dtype == torch.float32 else 8e-3,
                                               atol=1e-6, msg=where)
                else:
                    assert torch.equal(got, ref), f"{where}: {(got.float() - ref.float()).abs().max()}"
            monkeypatch.setattr(kbase, "BLOCK_ELEMS", 1 << 18)
    finally:
        torch.set_num_threads(threads)


def test_every_method_is_covered() -> None:
    """Every registered method has a reference; those with a kernel factory are exercised above."""
    methods = all_methods()
    assert len(methods) >= 13
    for m in methods.values():
        assert callable(m.fn) and m.summary, m.name


def test_every_compiled_module_stamps_the_kernel_cache() -> None:
    """numba's cache is keyed on all kernel sources (kernels/_jit.py): every
    module that defines or inlines compiled code must be listed, or editing it
    would leave stale machine code behind."""
    from surgeon.merge.kernels import _jit

    root = Path(_jit.__file__).resolve().parent.parent
    users = {p.resolve() for p in root.rglob("*.py")
             if "@compiled" in p.read_text() or "register()" in p.read_text() or p.name in ("_jit.py", "_raw.py")}
    assert users <= set(_jit.KERNEL_SOURCES), sorted(str(p) for p in users - set(_jit.KERNEL_SOURCES))
    assert all(p.exists() for p in _jit.KERNEL_SOURCES)


_VECTOR_PROBE = """
import json, sys
from surgeon.merge.kernels._jit import numba_module
nb = numba_module()
from numba.core import codegen
from numba.core.registry import cpu_target
host = codegen.get_host_cpu_features().split(",")

@nb.njit
def scale(x, y):
    for j in range(x.shape[0]):
        y[j] = x[j] * 2.0 + 1.0

import numpy as np
x = np.ones(1024, np.float32); y = np.empty_like(x); scale(x, y)
asm = next(iter(scale.inspect_asm().values()))
print(json.dumps({"avx512": "+avx512f" in host, "features": cpu_target.target_context.codegen().magic_tuple()[2],
                  "zmm": "zmm" in asm, "ok": bool((y == 3).all())}))
"""


def _vector_probe(env: dict[str, str]) -> dict[str, Any]:
    import json
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _VECTOR_PROBE], capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_numba_compiles_with_wide_vectors_on_avx512_unless_the_user_chose() -> None:
    """On an AVX-512 host numba compiles surgeon's loops without LLVM's 256-bit preference
    (kernels/_jit.py allow_wide_vectors): 512-bit registers in the code; elsewhere, and where
    the user set numba's CPU features, nothing is changed."""
    if numba_module() is None:
        pytest.skip("numba is off")
    from numba.core import codegen

    probe = _vector_probe({})
    assert probe["ok"]
    if probe["avx512"]:
        assert probe["features"].endswith(",-prefer-256-bit") and probe["zmm"], probe
    else:
        assert "prefer-256-bit" not in probe["features"], probe
    mine = codegen.get_host_cpu_features()
    chosen = _vector_probe({"NUMBA_CPU_FEATURES": mine})
    assert chosen["ok"] and chosen["features"] == mine, chosen


def test_no_compiled_loop_closes_over_a_dispatcher() -> None:
    """numba's cache key pickles a loop's closure cells, and a dispatcher pickles
    differently in every process: a loop closing over an inline helper was
    compiled anew by every process. Helpers must be module globals (kernels/_jit.py)."""
    import importlib
    from types import SimpleNamespace

    from surgeon.merge.kernels import _jit

    if numba_module() is None:
        pytest.skip("numba is off")
    from numba.core.dispatcher import Dispatcher

    root = Path(_jit.__file__).resolve().parent.parent
    loops = []
    for path in _jit.KERNEL_SOURCES:
        mod = importlib.import_module("surgeon.merge." + ".".join(path.relative_to(root).with_suffix("").parts))
        for name in ("_kernels", "_compiled_fill"):
            built = getattr(mod, name, lambda: None)()
            if built is not None:
                loops += list(vars(built).values()) if isinstance(built, SimpleNamespace) else [built]
    assert len(loops) >= 10
    for loop in loops:
        cells = loop.py_func.__closure__ or ()
        assert not any(isinstance(c.cell_contents, Dispatcher) for c in cells), loop.py_func.__qualname__
