"""``surgeon diff``: per-tensor comparison of two checkpoints (a CI gate with --atol).

Every statistic is accumulated in float64 over row blocks of the two tensors
(bounded memory whatever the tensor's size); tensors whose stored bytes are
equal are reported as exactly identical (cosine 1, relative norm 0) without
arithmetic, so rounding never makes two identical tensors look different.
Tensors of different shapes are reported as ``shape mismatch`` (no numbers).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import Checkpoint

BLOCK_ELEMENTS = 1 << 22  # float64 elements per block and tensor (32 MiB)


def tensor_stats(ta: torch.Tensor, tb: torch.Tensor) -> dict[str, float]:
    """max |a-b|, ||a-b|| / ||a||, cosine(a, b) of two same-shaped tensors, in float64 blocks.

    Equal tensors give exactly 0, 0 and 1. The relative norm is ||a-b|| when ||a|| is 0;
    the cosine of a zero tensor with anything is 1 when both are zero, else 0.
    """
    if ta.dtype == tb.dtype and torch.equal(ta, tb):
        return {"max_abs_diff": 0.0, "rel_norm": 0.0, "cosine": 1.0}
    fa, fb = ta.reshape(-1), tb.reshape(-1)
    aa = bb = ab = dd = 0.0
    mx = 0.0
    for s in range(0, fa.numel(), BLOCK_ELEMENTS):
        a = fa[s:s + BLOCK_ELEMENTS].to(torch.float64)
        b = fb[s:s + BLOCK_ELEMENTS].to(torch.float64)
        d = a - b
        aa += float(a.dot(a))
        bb += float(b.dot(b))
        ab += float(a.dot(b))
        dd += float(d.dot(d))
        if d.numel():
            mx = max(mx, float(d.abs().max()))
    if mx == 0.0:  # equal values in different dtypes (or -0.0 vs 0.0)
        return {"max_abs_diff": 0.0, "rel_norm": 0.0, "cosine": 1.0}
    na, nb = math.sqrt(aa), math.sqrt(bb)
    cos = ab / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb == 0 else 0.0)
    return {"max_abs_diff": mx, "rel_norm": math.sqrt(dd) / na if na > 0 else math.sqrt(dd),
            "cosine": max(-1.0, min(1.0, cos))}


def diff_checkpoints(a: str | Path, b: str | Path, atol: float | None = None) -> dict[str, Any]:
    """Compare tensors by name, one tensor at a time.

    Each compared tensor gets ``max_abs_diff``, ``rel_norm`` (||a-b|| / ||a||) and
    ``cosine``, or ``status: "shape mismatch"`` with both shapes. The result says
    ``identical`` (every tensor equal, same names) and, with ``atol``, ``within_atol``
    (false on any shape mismatch or missing tensor).
    """
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    only_a = sorted(set(ca.names) - set(cb.names))
    only_b = sorted(set(cb.names) - set(ca.names))
    tensors: dict[str, dict[str, Any]] = {}
    worst = 0.0
    mismatched = []
    for name in ca.names:
        if name not in cb:
            continue
        ia, ib = ca.info(name), cb.info(name)
        if tuple(ia.shape) != tuple(ib.shape):
            tensors[name] = {"status": "shape mismatch", "shape_a": list(ia.shape), "shape_b": list(ib.shape)}
            mismatched.append(name)
            continue
        stats = tensor_stats(ca.get(name), cb.get(name))
        tensors[name] = {**stats, "dtype_a": str(ia.dtype).removeprefix("torch."),
                         "dtype_b": str(ib.dtype).removeprefix("torch.")}
        worst = max(worst, stats["max_abs_diff"])
    result: dict[str, Any] = {
        "a": str(a), "b": str(b), "compared": len(tensors), "only_in_a": only_a, "only_in_b": only_b,
        "shape_mismatch": mismatched,
        "max_abs_diff": worst,
        "identical": worst == 0.0 and not only_a and not only_b and not mismatched,
        "tensors": tensors,
    }
    if atol is not None:
        result["atol"] = atol
        result["within_atol"] = worst <= atol and not only_a and not only_b and not mismatched
    return result


def format_diff(result: dict[str, Any], top: int = 10) -> str:
    """The summary table: shape mismatches first, then the ``top`` largest differences."""
    def key(kv: tuple[str, dict[str, Any]]) -> float:
        return math.inf if kv[1].get("status") else kv[1]["max_abs_diff"]

    rows = sorted(result["tensors"].items(), key=lambda kv: -key(kv))[:top]
    head = f"{result['compared']} tensors compared; max |a-b| = {result['max_abs_diff']:.3g}"
    if result.get("identical"):
        head += " (identical)"
    lines = [head]
    if result.get("shape_mismatch"):
        lines.append(f"shape mismatch: {len(result['shape_mismatch'])} (e.g. {result['shape_mismatch'][0]})")
    if result["only_in_a"]:
        lines.append(f"only in A: {len(result['only_in_a'])} (e.g. {result['only_in_a'][0]})")
    if result["only_in_b"]:
        lines.append(f"only in B: {len(result['only_in_b'])} (e.g. {result['only_in_b'][0]})")
    if rows:
        width = max(len(n) for n, _ in rows)
        lines.append(f"{'tensor':<{width}}  {'max_abs':>10}  {'rel_norm':>10}  {'cosine':>8}")
        for n, r in rows:
            if r.get("status"):
                lines.append(f"{n:<{width}}  {r['status']}: {tuple(r['shape_a'])} vs {tuple(r['shape_b'])}")
            else:
                lines.append(f"{n:<{width}}  {r['max_abs_diff']:>10.3g}  {r['rel_norm']:>10.3g}  {r['cosine']:>8.5f}")
    if "within_atol" in result:
        lines.append(("PASS" if result["within_atol"] else "FAIL") + f": max |a-b| {'<=' if result['within_atol'] else '>'} atol {result['atol']}"
                     + ("" if not result.get("shape_mismatch") else " (and shapes differ)"))
    return "\n".join(lines)
