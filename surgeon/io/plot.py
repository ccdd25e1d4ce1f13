"""Small PNG pictures; their libraries are optional (``pip install 'surgeon[plot]'``).

A merge's change map is a heat map drawn with Pillow (:mod:`surgeon.io.heatmap`:
cheap enough to draw at the end of every run); a transplant's error-by-k curve
is drawn with matplotlib, through its object-oriented Agg API only (no pyplot,
no global backend switch), so drawing never touches a caller's matplotlib
state or a display.
"""
from __future__ import annotations

import atexit
import importlib.util
import math
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .. import settings

#: what a card or a command says where a picture could not be drawn
PLOT_HINT = "install the plot extra (`pip install 'surgeon[plot]'`) and rerun to get the picture"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (``SURGEON_NO_PLOT=1`` pretends it cannot)."""
    if settings.current().no_plot:
        return False
    return importlib.util.find_spec("matplotlib") is not None


def have_pillow() -> bool:
    """Whether Pillow can draw the heat maps: installed, with FreeType (its scalable default
    font; a build without it has only a bitmap font, which cannot anchor text).
    ``SURGEON_NO_PLOT=1`` pretends it cannot."""
    if settings.current().no_plot:
        return False
    return _pillow_draws_text()


@lru_cache(maxsize=1)
def _pillow_draws_text() -> bool:
    if importlib.util.find_spec("PIL") is None:
        return False
    from PIL import features

    return bool(features.check_module("freetype2"))


#: drawing threads the process waits for before it exits (:func:`finish_before_exit`)
_exiting: list[threading.Thread] = []


def finish_before_exit(thread: threading.Thread) -> None:
    """Have the process's exit wait (up to ``EXIT_WAIT_S`` each) for the daemon ``thread``, which
    draws: a daemon thread still inside a drawing library's C or C++ code while the interpreter
    tears down can abort the process (with matplotlib an interrupted run exited with SIGABRT or
    SIGSEGV instead of 130). atexit runs before the teardown, in ``sys.exit`` and in
    :func:`surgeon.settings.exit_process` alike."""
    if not _exiting:
        atexit.register(_wait_for_drawings)
    _exiting.append(thread)


#: seconds the exit waits for one drawing thread (a picture takes about one)
EXIT_WAIT_S = 10.0


def _wait_for_drawings() -> None:
    while _exiting:
        _exiting.pop().join(EXIT_WAIT_S)


#: held while matplotlib draws: it is not thread-safe (Pillow's pictures need no turns)
_drawing = threading.Lock()


def plot_changemap(cm: dict[str, Any], path: str | Path, title: str | None = None) -> bool:
    """Draw a change map into the PNG file ``path`` (:func:`render_changemap`; written whole
    or not at all). Returns False (and writes nothing) without Pillow."""
    png = render_changemap(cm, title)
    if png is None:
        return False
    write_png(png, path)
    return True


def write_png(png: bytes, path: str | Path) -> None:
    """Write PNG bytes to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)


def render_changemap(cm: dict[str, Any], title: str | None = None) -> bytes | None:
    """PNG bytes of a change map (:func:`surgeon.eval.changemap.compute_changemap`) as
    heat maps (:mod:`surgeon.io.heatmap`): kinds down, layers across (then ``other`` for
    tensors outside the layers); a second panel with the sign-conflict share when the
    method elects signs. None without Pillow. Safe to call from any thread."""
    if not have_pillow():
        return None
    from .heatmap import Panel, render_heatmaps

    layers = list(cm["layers"])
    cols = [str(x) for x in layers] + (["other"] if any(c["layer"] is None for c in cm["cells"]) else [])
    kinds = list(cm["kinds"])
    index = {k: i for i, k in enumerate(kinds)}
    ref, out = cm.get("reference", "base"), cm.get("output", "output")
    ref = "base" if ref in ("base", "first input") else ref
    out = "out" if out == "output" else out
    panels = [("rel_change", f"relative change ||{out} - {ref}|| / ||{ref}||", "viridis")]
    if cm.get("sign_electing"):
        panels.append(("sign_conflict", "share of entries whose task-vector signs conflict", "magma"))
    grids = []
    for key, label, colour_map in panels:
        grid = np.full((len(kinds), len(cols)), np.nan)
        for c in cm["cells"]:
            v = c.get(key)
            if v is None or not math.isfinite(v):
                continue
            col = layers.index(c["layer"]) if c["layer"] is not None else len(cols) - 1
            grid[index[c["kind"]], col] = v
        grids.append(Panel(grid, label, colour_map))
    step = max(1, len(cols) // 16)
    ticks = list(range(0, len(cols), step))
    if cols and cols[-1] == "other" and len(cols) - 1 not in ticks:
        ticks.append(len(cols) - 1)
    return render_heatmaps(grids, kinds, cols, ticks, xlabel="layer", title=title)


def render_error_by_k(curves: dict[str, dict[str, Any]], k_used: int | None = None, title: str | None = None) -> bytes | None:
    """PNG bytes of a transplant's reconstruction error by k (one line per rebuilt
    matrix: the mean, with the median dashed and the 10-90 % band shaded), or None
    without matplotlib. ``curves``: :func:`surgeon.transplant.error_curve.summarize`
    per matrix label; ``k_used`` marks the k the transplant ran with."""
    if not have_matplotlib() or not curves:
        return None
    with _drawing:
        return _render_error_by_k(curves, k_used, title)


def _render_error_by_k(curves: dict[str, dict[str, Any]], k_used: int | None, title: str | None) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        line, = ax.plot(c["k"], c["mean"], label=f"{label}: mean ({c['targets']} new tokens)", linewidth=1.6)
        ax.plot(c["k"], c["median"], linestyle="--", linewidth=1.0, color=line.get_color(), label=f"{label}: median")
        ax.fill_between(c["k"], c["p10"], c["p90"], color=line.get_color(), alpha=0.15, linewidth=0,
                        label=f"{label}: 10-90 % of tokens")
    if k_used:
        ax.axvline(k_used, color="0.4", linewidth=0.8, linestyle=":")
    ax.set_xlabel("k (atoms picked by OMP)", fontsize=8)
    ax.set_ylabel("relative error ||e - fit|| / ||e||", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "new tokens' embeddings rebuilt from shared tokens (donor space)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
