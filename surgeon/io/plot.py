"""Small PNG pictures; matplotlib is optional (``pip install 'surgeon[plot]'``).

Only the object-oriented Agg API is used (no pyplot, no global backend
switch), so drawing never touches a caller's matplotlib state or a display.
"""
from __future__ import annotations

import atexit
import importlib.util
import math
import os
import threading
from pathlib import Path
from typing import Any

from .. import settings


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (``SURGEON_NO_PLOT=1`` pretends it cannot)."""
    if settings.current().no_plot:
        return False
    return importlib.util.find_spec("matplotlib") is not None


def preload() -> threading.Thread | None:
    """Start importing matplotlib's Agg figure machinery on a daemon thread (about 0.6 s of
    CPU) and drawing a tiny throw-away figure (~0.1 s: it loads the fonts and the PNG
    writer, which otherwise cost the first real picture ~0.4 s more), so that a caller can
    overlap both with other work before drawing; returns the thread (join it or not: a
    later import simply waits for it), or None without matplotlib."""
    if not have_matplotlib():
        return None

    def load() -> None:
        try:
            import io

            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(2, 1.5), dpi=20)  # big enough that tight_layout fits it: no warning
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            image = ax.imshow([[0.0, 1.0]], cmap="viridis")
            ax.set_xticks([0, 1], ["0", "1"], fontsize=7)
            ax.set_title("-", fontsize=8)
            fig.colorbar(image, ax=ax)
            fig.tight_layout()
            fig.savefig(io.BytesIO(), format="png")
        except Exception:  # noqa: BLE001 - the drawing itself reports a broken install
            pass

    thread = threading.Thread(target=load, name="surgeon-plot-preload", daemon=True)
    _preloads.append(thread)
    thread.start()
    finish_before_exit(thread)
    return thread


#: drawing threads the process waits for before it exits (:func:`finish_before_exit`)
_exiting: list[threading.Thread] = []


def finish_before_exit(thread: threading.Thread) -> None:
    """Have the process's exit wait (up to ``EXIT_WAIT_S`` each) for the daemon ``thread``, which
    draws with matplotlib: a daemon thread still inside matplotlib's C and C++ code while the
    interpreter tears down aborted the process (an interrupted run exited with SIGABRT or
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


#: preload threads started so far: drawing waits for them (matplotlib is not thread-safe: the
#: throw-away figure and a real one must not share its font objects at the same time)
_preloads: list[threading.Thread] = []


#: held while a picture is drawn: pictures drawn on two threads (a merge's change map is
#: drawn beside the output's final sync) take turns
_drawing = threading.Lock()


def _after_preloads() -> None:
    while _preloads:
        _preloads.pop().join()


def plot_changemap(cm: dict[str, Any], path: str | Path, title: str | None = None) -> bool:
    """Draw a change map into the PNG file ``path`` (:func:`render_changemap`; written whole
    or not at all). Returns False (and writes nothing) without matplotlib."""
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
    heat maps: kinds down, layers across (then ``other`` for tensors outside the layers);
    a second panel with the sign-conflict share when the method elects signs. None
    without matplotlib. Safe to call from any thread (drawings take turns)."""
    if not have_matplotlib():
        return None
    with _drawing:
        return _render_changemap(cm, title)


def _render_changemap(cm: dict[str, Any], title: str | None) -> bytes:
    _after_preloads()
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(cm["layers"])
    cols = [str(x) for x in layers] + (["other"] if any(c["layer"] is None for c in cm["cells"]) else [])
    kinds = list(cm["kinds"])
    index = {k: i for i, k in enumerate(kinds)}
    ref, out = cm.get("reference", "base"), cm.get("output", "output")
    ref = "base" if ref in ("base", "first input") else ref
    out = "out" if out == "output" else out
    panels = [("rel_change", f"relative change ||{out} - {ref}|| / ||{ref}||")]
    if cm.get("sign_electing"):
        panels.append(("sign_conflict", "share of entries whose task-vector signs conflict"))
    width = min(12.0, 2.2 + 0.32 * len(cols)) * len(panels)
    fig = Figure(figsize=(max(4.5, width), 0.9 + 0.3 * len(kinds)), dpi=110)
    FigureCanvasAgg(fig)
    for p, (key, label) in enumerate(panels):
        grid = np.full((len(kinds), len(cols)), np.nan)
        for c in cm["cells"]:
            v = c.get(key)
            if v is None or not math.isfinite(v):
                continue
            col = layers.index(c["layer"]) if c["layer"] is not None else len(cols) - 1
            grid[index[c["kind"]], col] = v
        ax = fig.add_subplot(1, len(panels), p + 1)
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis" if p == 0 else "magma",
                       interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        step = max(1, len(cols) // 16)
        ticks = list(range(0, len(cols), step))
        if cols and cols[-1] == "other" and len(cols) - 1 not in ticks:
            ticks.append(len(cols) - 1)
        ax.set_xticks(ticks, [cols[i] for i in ticks], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(label, fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
    _after_preloads()
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
