"""Heat-map PNGs drawn with Pillow: panels of coloured cells, labels and a colour bar each.

Why not matplotlib. A merge's change map is drawn at the end of every run
(:mod:`surgeon.eval.changemap`); with matplotlib its imports and first figure
cost ~0.8 s of CPU, taken from a merge that keeps both cores busy, and the
run waited ~0.25 s more for the drawing after its last tensor. Pillow draws
the same picture in ~0.1 s, import included.

The picture. Each panel is a grid of ``rows x cols`` cells, one colour per
value on a linear scale from the panel's smallest to its largest finite value
(a cell without a value is left white), row labels on the left, the chosen
columns labelled below, the panel's title above, and a colour bar with ticks
at round values on the right. Colour maps are matplotlib's ``viridis`` and
``magma`` (public domain), kept as 33 evenly spaced colours and interpolated
linearly (within 3/255 of the 256-colour maps). The same inputs give the same
bytes.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: 33 evenly spaced colours (RRGGBB) of matplotlib's colour maps, lowest value first
_COLOURS = {
    "viridis": "440154470d6048186a482374472d7b4537814240863e49893b528b375b8d33638d2f6b8e2c728e297a8e"
               "26828e23898e21918c1f988b1fa08822a78528ae8032b67a3fbc734ec36b5ec96270cf5784d44b98d83eaddc"
               "30c2df23d8e219ece51bfde725",
    "magma": "0000040303120a0822130d341d114729115a36106b440f7651127c5d177f6a1c81762181832681902a819c2e7f"
             "aa337db73779c43c75d0416fdc4869e75263ef5d5ef56b5cf9795dfc8961fd9869fea772feb67cfec488fed395"
             "fde2a3fcf0b2fcfdbf",
}

#: font sizes in pixels: the picture's title, a panel's title, labels, colour-bar labels
TITLE_PX, PANEL_TITLE_PX, LABEL_PX, BAR_LABEL_PX = 14, 12, 11, 10
#: a cell's height, and its width bounds (cells share the panel's width, ~700 pixels)
CELL_H, CELL_W_MIN, CELL_W_MAX, GRID_W = 24, 10, 44, 700
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class Panel:
    """One heat map: ``grid`` (float ``[rows, cols]``; NaN or inf: no value, drawn white),
    its title, and its colour map (``"viridis"`` or ``"magma"``)."""

    grid: np.ndarray
    title: str
    colour_map: str = "viridis"


def colour_table(name: str) -> np.ndarray:
    """The colour map ``name`` as uint8 ``[33, 3]`` (lowest value first)."""
    hexes = _COLOURS[name]
    return np.frombuffer(bytes.fromhex(hexes), dtype=np.uint8).reshape(-1, 3)


def colours(name: str, t: np.ndarray) -> np.ndarray:
    """RGB (uint8 ``[..., 3]``) of positions ``t`` in [0, 1] (clipped) on colour map ``name``."""
    table = colour_table(name).astype(np.float64)
    x = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * (len(table) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(table) - 2)
    f = (x - lo)[..., None]
    return np.rint(table[lo] * (1 - f) + table[lo + 1] * f).astype(np.uint8)


def nice_ticks(lo: float, hi: float, target: int = 8) -> tuple[list[float], str]:
    """Round values in ``[lo, hi]`` about ``target`` of them (steps of 1, 2, 2.5 or 5 times a
    power of ten) and the format that prints them; ``[lo]`` when the range is empty."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo], "{:.3g}"
    raw = (hi - lo) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return ticks or [lo], _format_for(step)


def _format_for(step: float) -> str:
    """A format printing multiples of ``step`` without noise digits."""
    if not math.isfinite(step) or step <= 0:
        return "{:.3g}"
    if step >= 1e5 or step < 1e-4:
        return "{:.2g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:  # 2.5 times a power of ten
        decimals += 1
    return "{:.%df}" % decimals


def _label(fmt: str, v: float) -> str:
    s = fmt.format(v)
    return s[1:] if s.startswith("-") and float(s) == 0 else s


@dataclass(frozen=True)
class PanelBox:
    """Where one panel's cells and colour bar lie in the picture (pixels, ends exclusive)."""

    left: int
    top: int
    cell_w: int
    cell_h: int
    rows: int
    cols: int
    bar_left: int
    bar_w: int

    def cell_centre(self, r: int, c: int) -> tuple[int, int]:
        """(x, y) of the middle of cell ``(r, c)``."""
        return self.left + c * self.cell_w + self.cell_w // 2, self.top + r * self.cell_h + self.cell_h // 2


def draw_heatmaps(panels: Sequence[Panel], row_labels: Sequence[str], col_labels: Sequence[str],
                  labelled_cols: Sequence[int], xlabel: str = "", title: str | None = None
                  ) -> tuple[Any, list[PanelBox]]:
    """The picture (a Pillow RGB image) of ``panels`` side by side, all of ``len(row_labels)``
    rows and ``len(col_labels)`` columns, the columns ``labelled_cols`` labelled below each
    grid over ``xlabel``, ``title`` above them all; and each panel's :class:`PanelBox`."""
    from PIL import Image, ImageDraw, ImageFont

    rows, cols = len(row_labels), len(col_labels)
    for p in panels:
        if p.grid.shape != (rows, cols):
            raise ValueError(f"heat map {p.title!r}: grid {p.grid.shape} for {rows} row and {cols} column labels")
    font = {px: ImageFont.load_default(size=px) for px in (TITLE_PX, PANEL_TITLE_PX, LABEL_PX, BAR_LABEL_PX)}
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str, px: int) -> int:
        return math.ceil(probe.textlength(text, font=font[px]))

    cell_w = max(CELL_W_MIN, min(CELL_W_MAX, GRID_W // max(cols, 1)))
    grid_w, grid_h = cell_w * cols, CELL_H * rows
    label_w = max([width(s, LABEL_PX) for s in row_labels] + [0])
    scales = []
    for p in panels:
        finite = p.grid[np.isfinite(p.grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        ticks, fmt = nice_ticks(lo, hi)
        scales.append((lo, hi, [(t, _label(fmt, t)) for t in ticks if lo <= t <= hi or lo == hi]))
    bar_w, bar_gap, tick = 14, 12, 4
    bar_text_w = max([width(s, BAR_LABEL_PX) for _, _, ts in scales for _, s in ts] + [0])
    left_pad = 12 + label_w + tick + 4
    panel_w = max(left_pad + grid_w + bar_gap + bar_w + tick + 3 + bar_text_w + 16,
                  max([width(p.title, PANEL_TITLE_PX) for p in panels] + [0]) + 24)
    top = 10 + (TITLE_PX + 14 if title else 0) + PANEL_TITLE_PX + 10
    height = top + grid_h + tick + LABEL_PX + 8 + (LABEL_PX + 8 if xlabel else 0) + 8
    image = Image.new("RGB", (panel_w * len(panels), height), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((image.width // 2, 10), title, font=font[TITLE_PX], fill=BLACK, anchor="ma")
    boxes = []
    for k, (p, (lo, hi, ticks)) in enumerate(zip(panels, scales)):
        x0 = k * panel_w + left_pad
        box = PanelBox(x0, top, cell_w, CELL_H, rows, cols, x0 + grid_w + bar_gap, bar_w)
        boxes.append(box)
        span = hi - lo if hi > lo else 1.0
        valid = np.isfinite(p.grid)
        cells = colours(p.colour_map, np.where(valid, (p.grid - lo) / span, 0.0))
        cells[~valid] = WHITE
        # the cells: each grid entry scaled to a cell_w x CELL_H block
        image.paste(Image.fromarray(np.repeat(np.repeat(cells, CELL_H, axis=0), cell_w, axis=1), "RGB"), (x0, top))
        draw.rectangle((x0 - 1, top - 1, x0 + grid_w, top + grid_h), outline=BLACK)
        draw.text((x0 + grid_w // 2, top - 8), p.title, font=font[PANEL_TITLE_PX], fill=BLACK, anchor="md")
        for r, s in enumerate(row_labels):
            y = top + r * CELL_H + CELL_H // 2
            draw.line((x0 - 1 - tick, y, x0 - 1, y), fill=BLACK)
            draw.text((x0 - tick - 4, y), s, font=font[LABEL_PX], fill=BLACK, anchor="rm")
        for c in labelled_cols:
            x = x0 + c * cell_w + cell_w // 2
            draw.line((x, top + grid_h, x, top + grid_h + tick), fill=BLACK)
            draw.text((x, top + grid_h + tick + 2), col_labels[c], font=font[LABEL_PX], fill=BLACK, anchor="ma")
        if xlabel:
            draw.text((x0 + grid_w // 2, top + grid_h + tick + LABEL_PX + 10), xlabel, font=font[LABEL_PX],
                      fill=BLACK, anchor="ma")
        # the colour bar: the highest value at the top
        bx = box.bar_left
        ramp = colours(p.colour_map, np.linspace(1.0, 0.0, grid_h))
        image.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1), "RGB"), (bx, top))
        draw.rectangle((bx - 1, top - 1, bx + bar_w, top + grid_h), outline=BLACK)
        for t, s in ticks:
            y = top + grid_h - 1 - round((t - lo) / span * (grid_h - 1)) if hi > lo else top + grid_h // 2
            draw.line((bx + bar_w, y, bx + bar_w + tick, y), fill=BLACK)
            draw.text((bx + bar_w + tick + 3, y), s, font=font[BAR_LABEL_PX], fill=BLACK, anchor="lm")
    return image, boxes


def render_heatmaps(panels: Sequence[Panel], row_labels: Sequence[str], col_labels: Sequence[str],
                    labelled_cols: Sequence[int], xlabel: str = "", title: str | None = None) -> bytes:
    """PNG bytes of :func:`draw_heatmaps`."""
    image, _ = draw_heatmaps(panels, row_labels, col_labels, labelled_cols, xlabel, title)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
