"""surgeon.io.heatmap: the change map's picture drawn with Pillow.

Checked against matplotlib's colour maps (the peer whose maps these are) and by
reading the drawn pixels back: each cell shows its value's colour, cells
without a value are white, the colour bar runs from the smallest value at the
bottom to the largest at the top, the labels are drawn where they belong."""
from __future__ import annotations

import io

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from surgeon.io.heatmap import Panel, colours, draw_heatmaps, nice_ticks, render_heatmaps  # noqa: E402


@pytest.mark.parametrize("name", ["viridis", "magma"])
def test_colour_maps_are_matplotlibs_within_three_levels(name):
    mpl = pytest.importorskip("matplotlib")
    t = np.arange(256) / 255  # matplotlib's 256 colours, each at its own position
    want = np.rint(mpl.colormaps[name](t)[:, :3] * 255)
    got = colours(name, t).astype(np.float64)
    assert np.abs(got - want).max() <= 3
    assert (colours(name, np.array([-1.0, 2.0])) == colours(name, np.array([0.0, 1.0]))).all()  # clipped


@pytest.mark.parametrize("lo, hi, want, label", [
    (0.0, 0.13, [0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12], "0.12"),
    (0.0512, 0.7321, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "0.7"),
    (-3.0, 7.0, [-2.0, 0.0, 2.0, 4.0, 6.0], "6"),
    (1e-6, 9e-6, [1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 6e-6, 7e-6, 8e-6, 9e-6], "9e-06"),
    (0.0, 0.25, [0.0, 0.05, 0.1, 0.15, 0.2, 0.25], "0.25"),
])
def test_ticks_are_round_values_inside_the_range(lo, hi, want, label):
    ticks, fmt = nice_ticks(lo, hi)
    assert ticks == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert fmt.format(ticks[-1]) == label
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)


def test_an_empty_range_has_its_one_value():
    ticks, fmt = nice_ticks(0.123456, 0.123456)
    assert ticks == [0.123456] and fmt.format(ticks[0]) == "0.123"


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_each_cell_shows_its_values_colour_and_missing_values_are_white():
    grid = np.array([[0.0, 1.0, 2.0, np.nan], [4.0, np.inf, 3.0, 0.5]])
    signs = np.array([[0.9, 0.1, np.nan, 0.5], [0.3, 0.3, 0.7, 0.2]])
    panels = [Panel(grid, "change"), Panel(signs, "signs", "magma")]
    image, boxes = draw_heatmaps(panels, ["q", "down"], ["0", "1", "2", "other"], [0, 1, 2, 3], "layer", "t")
    pixels = _decode(render_heatmaps(panels, ["q", "down"], ["0", "1", "2", "other"], [0, 1, 2, 3], "layer", "t"))
    assert (pixels == np.asarray(image)).all()  # the PNG holds exactly the drawn picture
    for panel, box in zip(panels, boxes):
        g = panel.grid
        lo, hi = np.nanmin(g[np.isfinite(g)]), np.nanmax(g[np.isfinite(g)])
        for r in range(2):
            for c in range(4):
                x, y = box.cell_centre(r, c)
                want = (255, 255, 255) if not np.isfinite(g[r, c]) else tuple(
                    colours(panel.colour_map, np.array((g[r, c] - lo) / (hi - lo))))
                assert tuple(pixels[y, x]) == want, (panel.title, r, c)
        # the colour bar: the top is the largest value's colour, the bottom the smallest's
        mid = box.bar_left + box.bar_w // 2
        assert tuple(pixels[box.top, mid]) == tuple(colours(panel.colour_map, np.array(1.0)))
        assert tuple(pixels[box.top + box.rows * box.cell_h - 1, mid]) == tuple(colours(panel.colour_map, np.array(0.0)))


def test_labels_are_drawn_beside_their_rows_and_under_their_columns():
    grid = np.zeros((3, 20))
    image, (box,) = draw_heatmaps([Panel(grid, "title")], ["embed", "q", "head"], [str(i) for i in range(20)],
                                  [0, 10], "layer")
    px = np.asarray(image).min(axis=2)  # dark where anything is drawn
    for r in range(3):  # text to the left of each row
        y = box.top + r * box.cell_h + box.cell_h // 2
        assert (px[y - 3:y + 4, :box.left - 6] < 128).any()
    below = box.top + box.rows * box.cell_h + 6
    for c, drawn in ((0, True), (5, False), (10, True)):  # only the chosen columns are labelled
        x = box.left + c * box.cell_w + box.cell_w // 2
        assert (px[below:below + 12, x - 3:x + 4] < 128).any() == drawn, c


def test_more_columns_widen_the_picture_up_to_a_bound_and_the_shape_is_checked():
    w = [draw_heatmaps([Panel(np.ones((2, n)), "t")], ["a", "b"], [str(i) for i in range(n)], [0])[0].width
         for n in (2, 20, 200)]
    assert w[0] < w[1] < w[2]
    with pytest.raises(ValueError, match="grid"):
        draw_heatmaps([Panel(np.ones((2, 3)), "t")], ["a"], ["0", "1", "2"], [0])


def test_the_same_inputs_give_the_same_bytes():
    panels = [Panel(np.arange(12.0).reshape(3, 4), "t")]
    args = (panels, ["a", "b", "c"], ["0", "1", "2", "3"], [0, 2], "layer", "title")
    assert render_heatmaps(*args) == render_heatmaps(*args)


def test_without_a_pillow_that_draws_text_there_is_no_picture_and_no_error(monkeypatch):
    """A Pillow built without FreeType has only a bitmap font, which cannot anchor text:
    no picture then (the card says how to get one), rather than a failed drawing."""
    from surgeon.io import plot

    cm = {"layers": [0], "kinds": ["q"], "cells": [{"layer": 0, "kind": "q", "rel_change": 0.1}],
          "sign_electing": False}
    assert plot.render_changemap(cm, "t")[:4] == b"\x89PNG"
    monkeypatch.setattr(plot, "_pillow_draws_text", lambda: False)
    assert plot.render_changemap(cm, "t") is None
