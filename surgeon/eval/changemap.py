"""What a merge changed where: per layer and tensor kind, computed after the merge.

For every tensor the output shares (by name and shape) with the reference (the
merge's base; for ``surgeon diff A B --plot``, A):

* ``rel_change`` = ||output - reference|| / ||reference||, summed over the
  tensors of one (layer, kind) cell as sqrt(sum ||delta||^2) / sqrt(sum ||ref||^2);
* for sign-electing methods (TIES and its relatives) ``sign_conflict`` = the
  share of entries where the inputs' task vectors (input - base) point both
  ways (at least one positive and one negative entry): where the sign election
  had to throw work away.

Kinds and layers come from tensor names through :mod:`surgeon.arch`
(:func:`~surgeon.arch.tensor_kind`: ``q_proj`` -> q, ``gate_proj`` -> gate,
``input_layernorm`` -> norm, the embedding -> embed ...;
:func:`~surgeon.arch.layer_index`: ``layers.N.`` style indices); tensors
outside the layers (embeddings, final norm, head) form the ``other`` column,
keyed by kind.

Memory and time are bounded whatever the model: each tensor is read in row
blocks of at most :data:`BLOCK_ELEMENTS` entries per input, and a tensor larger
than :data:`SAMPLE_ELEMENTS` is estimated from evenly spaced row blocks adding
up to about that many entries (the result says how many entries were read).
The picture is drawn by :mod:`surgeon.io.plot` when matplotlib is installed
(``pip install 'surgeon[plot]'``); the numbers are written either way.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import KINDS, layer_index, tensor_kind

BLOCK_ELEMENTS = 1 << 21  # entries per input and block (8 MiB as float32)
SAMPLE_ELEMENTS = 1 << 16  # entries read per tensor at most (evenly spaced row blocks): ~1 s for a 300M model
SAMPLE_SPANS = 16  # row blocks a sampled tensor is read in

#: methods that elect a sign per entry and drop the entries that disagree with it
SIGN_ELECTING = frozenset({"ties", "dare_ties", "breadcrumbs_ties", "della", "sce"})

#: the columns of the picture, in the order of a forward pass
KIND_ORDER = KINDS


@dataclass
class _Cell:
    delta_sq: float = 0.0
    ref_sq: float = 0.0
    conflicts: int = 0
    entries: int = 0
    read: int = 0
    total: int = 0
    tensors: list[str] = field(default_factory=list)


def _spans(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges to read: all rows in blocks, or evenly spaced blocks of a sampled tensor."""
    per_block = max(1, BLOCK_ELEMENTS // max(1, cols))
    if rows * cols <= SAMPLE_ELEMENTS:
        return [(s, min(rows, s + per_block)) for s in range(0, rows, per_block)]
    take = max(1, min(per_block, SAMPLE_ELEMENTS // max(1, cols) // SAMPLE_SPANS))
    starts = sorted({int(round(i * (rows - take) / max(1, SAMPLE_SPANS - 1))) for i in range(SAMPLE_SPANS)})
    out: list[tuple[int, int]] = []
    for s in starts:  # merge overlapping spans
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], s + take))
        else:
            out.append((s, min(rows, s + take)))
    return out


def _blocks(cks: Sequence[Any], name: str) -> Iterator[list[torch.Tensor]]:
    """The same row blocks of ``name`` from every checkpoint, as float32."""
    shape = tuple(cks[0].info(name).shape)
    if not shape:
        yield [ck.get(name).float().reshape(1) for ck in cks]
        return
    rows, cols = shape[0], (math.prod(shape[1:]) if len(shape) > 1 else 1)
    for s, e in _spans(rows, cols):
        yield [ck.get_rows(name, s, e).float().reshape(-1) for ck in cks]


def compute_changemap(reference: Any, output: Any, inputs: Sequence[Any] = (), method: str | None = None,
                      labels: tuple[str, str] = ("base", "output")) -> dict[str, Any]:
    """Per (layer, kind) relative change of ``output`` against ``reference`` and, for
    sign-electing ``method`` s with ``inputs``, the share of sign-conflicting entries.

    ``reference``, ``output`` and ``inputs`` are checkpoints (anything with
    ``names``/``info``/``get``/``get_rows``). Returns a JSON-ready dict: ``cells``
    (one per layer and kind: ``layer`` (None outside the stack), ``kind``,
    ``rel_change``, ``sign_conflict`` or None, ``entries_read``, ``entries``),
    ``layers``, ``kinds``, ``sign_electing``, ``sampled`` and ``skipped`` (tensors
    not compared: missing from the reference or of another shape).
    """
    signs = bool(method in SIGN_ELECTING and inputs)
    cells: dict[tuple[int | None, str], _Cell] = {}
    skipped: list[str] = []
    sampled = False
    for name in output.names:
        if name not in reference.names or tuple(reference.info(name).shape) != tuple(output.info(name).shape):
            skipped.append(name)
            continue
        use = [i for i in inputs if name in i.names and tuple(i.info(name).shape) == tuple(output.info(name).shape)]
        cks = [reference, output] + (use if signs else [])
        cell = cells.setdefault((layer_index(name), tensor_kind(name)), _Cell())
        cell.tensors.append(name)
        numel = output.info(name).numel
        cell.total += numel
        for block in _blocks(cks, name):
            ref, out = block[0], block[1]
            d = (out - ref).double()
            cell.delta_sq += float(d.dot(d))
            r = ref.double()
            cell.ref_sq += float(r.dot(r))
            cell.read += ref.numel()
            if signs and len(block) > 3:  # a conflict needs two task vectors
                deltas = torch.stack([b - ref for b in block[2:]])
                pos = (deltas > 0).any(dim=0)
                neg = (deltas < 0).any(dim=0)
                cell.conflicts += int((pos & neg).sum())
                cell.entries += ref.numel()
        sampled = sampled or cell.read < cell.total
    rows = []
    for (layer, kind), c in sorted(cells.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0,
                                                                   _kind_rank(kv[0][1]))):
        rel = math.sqrt(c.delta_sq) / math.sqrt(c.ref_sq) if c.ref_sq > 0 else (0.0 if c.delta_sq == 0 else math.inf)
        rows.append({"layer": layer, "kind": kind, "rel_change": rel,
                     "sign_conflict": (c.conflicts / c.entries if c.entries else None) if signs else None,
                     "entries_read": c.read, "entries": c.total, "tensors": len(c.tensors)})
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    kinds = sorted({r["kind"] for r in rows}, key=_kind_rank)
    return {"schema": "surgeon.changemap/1", "reference": labels[0], "output": labels[1], "method": method,
            "sign_electing": signs, "layers": layers, "kinds": kinds, "cells": rows, "sampled": sampled,
            "skipped": skipped}


def _kind_rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def summary_lines(cm: dict[str, Any]) -> list[str]:
    """Two or three plain sentences a card or terminal can show beside (or instead of) the picture."""
    cells = [c for c in cm["cells"] if math.isfinite(c["rel_change"])]
    if not cells:
        return ["no tensor of the output could be compared with the reference"]
    top = max(cells, key=lambda c: c["rel_change"])
    where = f"layer {top['layer']}" if top["layer"] is not None else "outside the layers"
    lines = [f"largest relative change: {top['rel_change']:.3g} ({top['kind']}, {where}); "
             f"median over {len(cells)} cells: {sorted(c['rel_change'] for c in cells)[len(cells) // 2]:.3g}"]
    conf = [c for c in cells if c["sign_conflict"] is not None]
    if conf:
        share = sum(c["sign_conflict"] * c["entries_read"] for c in conf) / max(1, sum(c["entries_read"] for c in conf))
        worst = max(conf, key=lambda c: c["sign_conflict"])
        wl = f"layer {worst['layer']}" if worst["layer"] is not None else "outside the layers"
        lines.append(f"inputs' task vectors disagree in sign on {share:.1%} of entries "
                     f"(most: {worst['sign_conflict']:.1%} in {worst['kind']}, {wl})")
    if cm.get("sampled"):
        lines.append(f"large tensors estimated from evenly spaced rows (up to {SAMPLE_ELEMENTS:,} entries each)")
    return lines


PLOT_HINT = "install matplotlib (`pip install 'surgeon[plot]'`) and rerun to get the picture"


def write_changemap(folder: str | Path, cm: dict[str, Any], stem: str = "changemap",
                    title: str | None = None) -> dict[str, Any]:
    """Write ``<stem>.json`` and, with matplotlib, ``<stem>.png`` into ``folder``;
    returns ``{"json": path, "png": path or None, "card": markdown section body}``."""
    from ..io.plot import plot_changemap

    folder = Path(folder)
    js = folder / f"{stem}.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cm, indent=1) + "\n", encoding="utf-8")
    tmp.replace(js)
    png = folder / f"{stem}.png"
    drawn = plot_changemap(cm, png, title=title)
    return {"json": str(js), "png": str(png) if drawn else None,
            "card": card_section(cm, js.name, png.name if drawn else None)}


def card_section(cm: dict[str, Any], json_name: str, png_name: str | None) -> str:
    """The model card's "What changed where" section: the picture (or how to get it) and a summary."""
    body = [f"![per-layer change]({png_name})" if png_name else f"(No picture: {PLOT_HINT}.)", ""]
    what = (f"Relative change of each layer's tensors against the {cm['reference']} "
            "(||output - base|| / ||base||, per layer and tensor kind)")
    if cm["sign_electing"]:
        what += ", and the share of entries where the inputs' task vectors disagree in sign"
    body.append(what + f"; numbers in `{json_name}`.")
    body += [""] + [f"- {line}" for line in summary_lines(cm)]
    return "\n".join(body)


def existing_section(folder: str | Path, stem: str = "changemap") -> str | None:
    """The card section of a change map already written into ``folder`` (a resumed run), or None."""
    js = Path(folder) / f"{stem}.json"
    try:
        cm = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    png = js.with_suffix(".png")
    return card_section(cm, js.name, png.name if png.is_file() else None)


def changemap_for_merge(output_dir: str | Path, method: str, base: Any | None, inputs: Sequence[Any],
                        output: Any | None = None) -> dict[str, Any] | None:
    """The change map of a finished merge, written beside its card (``changemap.json`` / ``.png``).

    The reference is the base (the first input for base-free methods). Returns
    :func:`write_changemap`'s dict, or None when there is nothing to compare (no inputs).
    """
    from ..io.checkpoint import Checkpoint

    if not inputs:
        return None
    from ..io.plot import preload

    reference = base if base is not None else inputs[0]
    out = output if output is not None else Checkpoint.open(output_dir)
    preload()  # the picture's imports on the other core while the numbers are computed
    cm = compute_changemap(reference, out, inputs, method,
                           labels=("base" if base is not None else "first input", "output"))
    return write_changemap(output_dir, cm, title=f"{method}: what changed where")
