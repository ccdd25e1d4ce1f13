"""``surgeon diff``: per-tensor comparison of two checkpoints (a CI gate with --atol)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import Checkpoint


def diff_checkpoints(a: str | Path, b: str | Path, atol: float | None = None) -> dict[str, Any]:
    """Compare tensors by name: max |a-b|, ||a-b|| / ||a||, cosine; one tensor at a time."""
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    only_a = sorted(set(ca.names) - set(cb.names))
    only_b = sorted(set(cb.names) - set(ca.names))
    tensors: dict[str, dict[str, Any]] = {}
    worst = 0.0
    for name in ca.names:
        if name not in cb:
            continue
        ia, ib = ca.info(name), cb.info(name)
        if ia.shape != ib.shape:
            tensors[name] = {"shape_a": list(ia.shape), "shape_b": list(ib.shape), "max_abs_diff": float("inf")}
            worst = float("inf")
            continue
        ta, tb = ca.get(name, dtype=torch.float32), cb.get(name, dtype=torch.float32)
        d = ta - tb
        max_abs = float(d.abs().max()) if d.numel() else 0.0
        na = float(ta.norm())
        cos = float(torch.nn.functional.cosine_similarity(ta.flatten(), tb.flatten(), dim=0)) if d.numel() else 1.0
        tensors[name] = {
            "max_abs_diff": max_abs,
            "rel_norm": float(d.norm()) / na if na > 0 else float(d.norm()),
            "cosine": cos,
            "dtype_a": str(ia.dtype).removeprefix("torch."),
            "dtype_b": str(ib.dtype).removeprefix("torch."),
        }
        worst = max(worst, max_abs)
    result: dict[str, Any] = {
        "a": str(a), "b": str(b), "compared": len(tensors), "only_in_a": only_a, "only_in_b": only_b,
        "max_abs_diff": worst,
        "identical": worst == 0.0 and not only_a and not only_b,
        "tensors": tensors,
    }
    if atol is not None:
        result["atol"] = atol
        result["within_atol"] = worst <= atol and not only_a and not only_b
    return result


def format_diff(result: dict[str, Any], top: int = 10) -> str:
    rows = sorted(result["tensors"].items(), key=lambda kv: -kv[1]["max_abs_diff"])[:top]
    lines = [f"{result['compared']} tensors compared; max |a-b| = {result['max_abs_diff']:.3g}"]
    if result["only_in_a"]:
        lines.append(f"only in A: {len(result['only_in_a'])} (e.g. {result['only_in_a'][0]})")
    if result["only_in_b"]:
        lines.append(f"only in B: {len(result['only_in_b'])} (e.g. {result['only_in_b'][0]})")
    if rows:
        width = max(len(n) for n, _ in rows)
        lines.append(f"{'tensor':<{width}}  {'max_abs':>10}  {'rel_norm':>10}  {'cosine':>8}")
        for n, r in rows:
            lines.append(f"{n:<{width}}  {r['max_abs_diff']:>10.3g}  {r.get('rel_norm', float('nan')):>10.3g}  {r.get('cosine', float('nan')):>8.5f}")
    if "within_atol" in result:
        lines.append(("PASS" if result["within_atol"] else "FAIL") + f": max |a-b| {'<=' if result['within_atol'] else '>'} atol {result['atol']}")
    return "\n".join(lines)
