"""A transplant's picture: how well new tokens' embeddings are rebuilt, by k.

OMP (surgeon.transplant.omp) expresses each new token's donor embedding ``e``
as k donor embeddings of shared tokens; the relative error
``||e - fit|| / ||e||`` after each pick comes free from the pursuit
(:func:`surgeon.transplant.omp.relative_residuals`). Because OMP is greedy,
the value at pick t is exactly what a transplant with ``k = t`` would end
with, so one run draws the whole curve. It measures the fit in the donor's
space, not how well the coefficients transfer to the base (larger k always
fits better there; docs/transplant.md measures held-out bits per byte by k).

Written into the output folder as ``omp_error.json`` (always) and
``omp_error.png`` (with matplotlib), and summarised in the model card.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..io.plot import PLOT_HINT, render_error_by_k

STEM = "omp_error"
SECTION = "Reconstruction error by k"


class _BytesWriter(Protocol):
    def write_bytes(self, relpath: str, data: bytes) -> None: ...


def summarize(residuals: torch.Tensor) -> dict[str, Any]:
    """Per k = 1..K: mean, median, 10th and 90th percentile of the targets'
    relative errors (``residuals``: targets x K, :func:`relative_residuals`)."""
    r = residuals.double()
    if r.shape[0] == 0:
        return {"targets": 0, "k": [], "mean": [], "median": [], "p10": [], "p90": []}
    q = np.quantile(r.numpy(), [0.1, 0.5, 0.9], axis=0)  # linear interpolation, as torch.quantile

    def rounded(t: torch.Tensor) -> list[float]:
        return [round(float(x), 5) for x in t]

    return {"targets": int(r.shape[0]), "k": list(range(1, r.shape[1] + 1)), "mean": rounded(r.mean(0)),
            "median": rounded(q[1]), "p10": rounded(q[0]), "p90": rounded(q[2])}


def summary_line(label: str, c: dict[str, Any]) -> str:
    """``embed: mean error 0.81 at k=1, 0.40 at k=8, 0.12 at k=64 (300 new tokens)``."""
    ks = c["k"]
    if not ks:
        return f"{label}: no new tokens"
    marks = sorted({1, *[k for k in (4, 8, 16, 32) if k < ks[-1]], ks[-1]})
    parts = ", ".join(f"{c['mean'][k - 1]:.3f} at k={k}" for k in marks)
    return f"`{label}`: mean relative error {parts} ({c['targets']} new tokens)"


def card_section(curves: dict[str, dict[str, Any]], json_name: str, png_name: str | None) -> str:
    """The model card's "Reconstruction error by k" section."""
    body = [f"![reconstruction error by k]({png_name})" if png_name else f"(No picture: {PLOT_HINT}.)", "",
            "How closely OMP rebuilds each new token's embedding from shared tokens' embeddings in the donor's "
            "space, after each of the k picks (the value at pick t is what k = t would give); "
            f"numbers in `{json_name}`. A lower error here is not by itself a better model: larger k fits the "
            "donor space better but the coefficients may transfer worse to the base.", ""]
    body += [f"- {summary_line(label, c)}" for label, c in curves.items()]
    return "\n".join(body)


def write_error_curve(writer: _BytesWriter, curves: dict[str, dict[str, Any]], k_used: int | None,
                      title: str | None = None) -> dict[str, Any]:
    """Write ``omp_error.json`` and, with matplotlib, ``omp_error.png`` through the
    output ``writer``; returns ``{"json": name, "png": name or None, "card": section}``."""
    writer.write_bytes(f"{STEM}.json", (json.dumps({"k_used": k_used, "curves": curves}, indent=1) + "\n").encode())
    png = render_error_by_k(curves, k_used, title)
    if png is not None:
        writer.write_bytes(f"{STEM}.png", png)
    return {"json": f"{STEM}.json", "png": f"{STEM}.png" if png is not None else None,
            "card": card_section(curves, f"{STEM}.json", f"{STEM}.png" if png is not None else None)}


def existing_section(folder: str | Path) -> str | None:
    """The card section of the error curve in ``folder`` (a transplant's output), or None."""
    js = Path(folder) / f"{STEM}.json"
    try:
        data = json.loads(js.read_text(encoding="utf-8"))
        curves = data["curves"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    png = js.with_suffix(".png")
    return card_section(curves, js.name, png.name if png.is_file() else None)
