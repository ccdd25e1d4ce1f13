"""What a merge changed where: per layer and tensor kind, gathered while the merge writes.

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
A merge run gathers the numbers as its output is written
(:class:`ChangeMapSampler`, watching the writer): the output is never read
back. The picture is drawn by :mod:`surgeon.io.plot` when Pillow is installed
(``pip install 'surgeon[plot]'``); the numbers are written either way.
"""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch import KINDS, layer_index, tensor_kind
from ..io.plot import PLOT_HINT

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


def _row_size(shape: tuple[int, ...]) -> int:
    """Entries per row (dim 0) of a tensor of ``shape`` (a 0-d or 1-D tensor: 1)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _tensor_spans(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """:func:`_spans` of a tensor of ``shape`` (a 0-d tensor is one row of one entry)."""
    return _spans(shape[0] if shape else 1, _row_size(shape))


#: the stored dtypes :func:`_widen` takes, as numpy reads them (bfloat16 as its uint16 patterns)
_RAW_DTYPES = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


def _raw_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A flat CPU tensor's entries as a numpy array :func:`_widen` takes (bfloat16 as its
    uint16 patterns), or None for a dtype it does not widen."""
    dtype = _RAW_DTYPES.get(t.dtype)
    if dtype is None:
        return None
    return t.view(torch.int16).numpy().view(dtype) if t.dtype == torch.bfloat16 else t.numpy()


def _widen(raw: np.ndarray) -> np.ndarray:
    """:func:`_raw_numpy` entries as float32 (exactly: bfloat16 is float32's top half)."""
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class _Rows:
    """Rows of one tensor of a checkpoint, handed out span by span as flat float32 numpy
    arrays. Where the checkpoint reads plain files
    (:meth:`surgeon.io.checkpoint.Checkpoint.read_row_bytes`) each span is one ``pread``
    of its bytes; else it is read with ``get_rows``. A span is a few KB: torch's per-call
    cost (~5-10 us an op on the development VM, a dozen ops a read) and, for a view of the
    page cache, the faults (a whole large folio, up to 2 MB, mapped at a touch) and the
    page-table teardown after it (~35 us a span) cost more than the copy (~3 us): 10k spans
    of four checkpoints a 1.1B merge."""

    def __init__(self, ck: Any, name: str, shape: tuple[int, ...]):
        self.ck, self.name, self.shape = ck, name, shape
        self.cols = _row_size(shape)
        plain = shape and getattr(ck, "read_row_bytes", None) is not None
        self.raw_dtype = _RAW_DTYPES.get(ck.info(name).dtype) if plain else None

    def span(self, s: int, e: int) -> np.ndarray:
        """Rows ``[s, e)``, flat float32 (a copy)."""
        if self.raw_dtype is not None:
            data = self.ck.read_row_bytes(self.name, s, e)
            if data is not None:
                return _widen(np.frombuffer(data, dtype=self.raw_dtype))
            self.raw_dtype = None
        return _flat_f32(self.ck.get_rows(self.name, s, e) if self.shape else self.ck.get(self.name))


def _flat_f32(t: torch.Tensor) -> np.ndarray:
    """A tensor's entries as flat float32 numpy (output rows handed to the sampler)."""
    raw = _raw_numpy(t.reshape(-1))
    return _widen(raw) if raw is not None else t.float().reshape(-1).numpy()


@dataclass
class _Span:
    """The comparison of one span of a tensor's rows."""

    delta_sq: float
    ref_sq: float
    conflicts: int
    entries: int
    read: int


class ChangeMapSampler:
    """The change map's numbers, gathered from the rows of a merge's output as they are written.

    :meth:`rows_written` takes each output tensor's rows when the writer places
    them (any order and split; :attr:`surgeon.step.StepContext.watch_output`).
    Each sampled span is compared as soon as all its rows have been shown (a
    span split between two writes waits as a small copy), with the same rows of
    the reference and the inputs, read while the merge has just brought them
    into the page cache: the output is never read back, and the work runs on
    the writer's thread beside the merge. :meth:`result` reads the spans it did
    not see (tensors another rank or an earlier, resumed run wrote) from the
    finished output and adds all spans up in one fixed order, so the numbers
    do not depend on how the rows arrived: a resumed run writes the same
    ``changemap.json`` as an uninterrupted one. A failure while watching is
    kept, never raised into the merge; :meth:`result` then reads every span.
    """

    def __init__(self, reference: Any, inputs: Sequence[Any] = (), method: str | None = None,
                 labels: tuple[str, str] = ("base", "output")):
        self.reference, self.inputs, self.method, self.labels = reference, list(inputs), method, labels
        self.signs = bool(method in SIGN_ELECTING and self.inputs)
        self._done: dict[str, dict[tuple[int, int], _Span]] = {}
        self._parts: dict[tuple[str, tuple[int, int]], list[tuple[int, torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self.failure: BaseException | None = None
        self._layout: Any = None  # the planned output (expect): its picture is drawn once every span is in
        self._title: str | None = None
        self._pending = -1  # spans of the planned output not compared yet (-1: no plan)
        self._early: threading.Thread | None = None
        self._drawn: tuple[dict[str, Any], str | None, bytes | None] | None = None
        self._name_sets: dict[int, tuple[Any, frozenset[str]]] = {}

    def expect(self, layout: Any, title: str | None = None) -> None:
        """Draw the picture early: ``layout`` is the output as planned (``names``,
        ``info``); once the merge has shown every span of it, the numbers
        (:meth:`result` of ``layout``) and their picture titled ``title`` are
        drawn on a thread of their own, beside the output's final sync, and
        :meth:`picture` hands the picture out when the finished output's numbers
        are the same. Call before the merge writes."""
        spans = 0
        for name in layout.names:
            shape = tuple(layout.info(name).shape)
            if self._comparable(name, shape) is not None:
                spans += len(_tensor_spans(shape))
        with self._lock:
            self._layout, self._title, self._pending = layout, title, spans

    def _draw_early(self) -> None:
        """The planned output's numbers and picture (on the early drawing thread)."""
        from ..io.plot import render_changemap

        try:
            cm = self.result(self._layout)
            self._drawn = (cm, self._title, render_changemap(cm, title=self._title))
        except Exception:  # noqa: BLE001 - picture() then has none; the caller draws after the merge
            self._drawn = None

    def picture(self, cm: dict[str, Any], title: str | None) -> bytes | None | bool:
        """The early drawing of ``cm`` titled ``title`` (PNG bytes, or None when there is no
        Pillow), waiting for it if it is still being drawn; False when none was drawn
        of these numbers (no plan, spans never shown, or the output differs from its plan)."""
        if self._early is None:
            return False
        self._early.join()
        if self._drawn is None or self._drawn[0] != cm or self._drawn[1] != title:
            return False
        return self._drawn[2]

    def _comparable(self, name: str, shape: tuple[int, ...]) -> list[Any] | None:
        """The inputs a tensor of ``shape`` is compared with (None: not comparable to the reference)."""
        if name not in self._names(self.reference) or tuple(self.reference.info(name).shape) != shape:
            return None
        if not self.signs:
            return []
        return [i for i in self.inputs if name in self._names(i) and tuple(i.info(name).shape) == shape]

    def _names(self, ck: Any) -> frozenset[str]:
        """``ck.names`` as a set, made once per checkpoint (``names`` builds a list per call;
        :meth:`_comparable` asks for every written piece)."""
        known = self._name_sets.get(id(ck))
        if known is None or known[0] is not ck:
            known = self._name_sets[id(ck)] = (ck, frozenset(ck.names))
        return known[1]

    def _compare(self, s: int, e: int, out: np.ndarray, sources: list[_Rows]) -> _Span:
        """Rows ``[s, e)`` of one tensor: ``out`` the output's (flat float32), ``sources`` the
        reference's rows and then those of the inputs compared for sign conflicts."""
        # numpy, not torch: a span is a few thousand entries, where torch's per-op cost dominated
        # (~450 us a span of a three-model TIES against ~60 us), and numpy's sums are pairwise on
        # the calling thread alone (torch may split a span across its thread pool, whose size
        # differs between the writer's thread and the main one: the last bits would then depend
        # on which thread compared the span)
        ref = sources[0].span(s, e)
        d = (out - ref).astype(np.float64)
        r = ref.astype(np.float64)
        conflicts = entries = 0
        if len(sources) > 2:  # a sign conflict needs two task vectors
            pos = np.zeros(ref.shape, dtype=bool)
            neg = np.zeros(ref.shape, dtype=bool)
            for src in sources[1:]:
                delta = src.span(s, e) - ref
                pos |= delta > 0
                neg |= delta < 0
            conflicts = int(np.count_nonzero(pos & neg))
            entries = ref.size
        return _Span(float(np.square(d).sum()), float(np.square(r).sum()),
                     conflicts, entries, ref.size)

    def _sources(self, name: str, shape: tuple[int, ...], use: list[Any]) -> list[_Rows]:
        """The rows of tensor ``name`` in the reference and in ``use`` (:meth:`_comparable`)."""
        return [_Rows(ck, name, shape) for ck in [self.reference, *use]]

    def rows_written(self, name: str, shape: tuple[int, ...], start: int, rows: torch.Tensor) -> None:
        """Rows ``[start, start + len(rows))`` of output tensor ``name`` (of ``shape``) were written."""
        if self.failure is not None:
            return
        try:
            shape = tuple(shape)
            use = self._comparable(name, shape)
            if use is None:
                return
            cols = _row_size(shape)
            flat = rows.reshape(-1) if shape else rows.reshape(1)
            stop = start + (flat.numel() // cols if shape else 1)
            with self._lock:
                done = self._done.setdefault(name, {})
                ready: list[tuple[int, int, np.ndarray]] = []
                raw = _raw_numpy(flat)  # the written rows as numpy (a view; None: widened span by span)
                for s, e in _tensor_spans(shape):
                    a, b = max(s, start), min(e, stop)
                    if a >= b:
                        continue
                    if (a, b) != (s, e):  # part of a span: keep a copy until the rest arrives
                        parts = self._parts.setdefault((name, (s, e)), [])
                        parts.append((a, flat[(a - start) * cols:(b - start) * cols].float().clone()))
                        if sum(p.numel() for _, p in parts) < (e - s) * cols:
                            continue
                        ready.append((s, e, _flat_f32(torch.cat([p for _, p in sorted(parts, key=lambda x: x[0])]))))
                        del self._parts[(name, (s, e))]
                        continue
                    a, b = (s - start) * cols, (e - start) * cols
                    ready.append((s, e, _widen(raw[a:b]) if raw is not None else _flat_f32(flat[a:b])))
                if not ready:
                    return
                sources = self._sources(name, shape, use)
                for s, e, part in ready:
                    fresh = (s, e) not in done
                    done[(s, e)] = self._compare(s, e, part, sources)
                    if fresh and self._pending > 0:
                        self._pending -= 1
                if self._pending == 0 and self._early is None:  # every planned span is in: draw now
                    self._early = threading.Thread(target=self._draw_early, name="surgeon-changemap", daemon=True)
                    self._early.start()
                    from ..io.plot import finish_before_exit

                    finish_before_exit(self._early)
        except Exception as exc:  # noqa: BLE001 - the picture is an extra; result() reads the files instead
            self.failure = exc
            with self._lock:
                self._done.clear()
                self._parts.clear()

    def result(self, output: Any) -> dict[str, Any]:
        """Per (layer, kind) relative change of ``output`` against the reference and, for
        sign-electing methods with inputs, the share of sign-conflicting entries.

        Returns a JSON-ready dict: ``cells`` (one per layer and kind: ``layer`` (None
        outside the stack), ``kind``, ``rel_change``, ``sign_conflict`` or None,
        ``entries_read``, ``entries``), ``layers``, ``kinds``, ``sign_electing``,
        ``sampled`` and ``skipped`` (tensors not compared: missing from the reference or
        of another shape).
        """
        cells: dict[tuple[int | None, str], _Cell] = {}
        skipped: list[str] = []
        sampled = False
        with self._lock:
            seen = {name: dict(done) for name, done in self._done.items()}
        for name in sorted(output.names):  # sorted: the planned output and the written one add up alike
            shape = tuple(output.info(name).shape)
            use = self._comparable(name, shape)
            if use is None:
                skipped.append(name)
                continue
            done = seen.get(name, {})
            cell = cells.setdefault((layer_index(name), tensor_kind(name)), _Cell())
            cell.tensors.append(name)
            cell.total += output.info(name).numel
            spans = _tensor_spans(shape)
            missed = [se for se in spans if se not in done]
            if missed:  # rows the sampler did not see: read them
                sources = [_Rows(output, name, shape), *self._sources(name, shape, use)]
                done = {**done, **{(s, e): self._compare(s, e, sources[0].span(s, e), sources[1:])
                                   for s, e in missed}}
            for s, e in spans:  # one order, however the rows came
                span = done[(s, e)]
                cell.delta_sq += span.delta_sq
                cell.ref_sq += span.ref_sq
                cell.conflicts += span.conflicts
                cell.entries += span.entries
                cell.read += span.read
            sampled = sampled or cell.read < cell.total
        rows = []
        for (layer, kind), c in sorted(cells.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0,
                                                                       _kind_rank(kv[0][1]))):
            rel = math.sqrt(c.delta_sq) / math.sqrt(c.ref_sq) if c.ref_sq > 0 else (0.0 if c.delta_sq == 0 else math.inf)
            rows.append({"layer": layer, "kind": kind, "rel_change": rel,
                         "sign_conflict": (c.conflicts / c.entries if c.entries else None) if self.signs else None,
                         "entries_read": c.read, "entries": c.total, "tensors": len(c.tensors)})
        layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
        kinds = sorted({r["kind"] for r in rows}, key=_kind_rank)
        return {"schema": "surgeon.changemap/1", "reference": self.labels[0], "output": self.labels[1],
                "method": self.method, "sign_electing": self.signs, "layers": layers, "kinds": kinds,
                "cells": rows, "sampled": sampled, "skipped": skipped}


def compute_changemap(reference: Any, output: Any, inputs: Sequence[Any] = (), method: str | None = None,
                      labels: tuple[str, str] = ("base", "output")) -> dict[str, Any]:
    """Per (layer, kind) relative change of ``output`` against ``reference`` and, for
    sign-electing ``method`` s with ``inputs``, the share of sign-conflicting entries,
    all read from the checkpoints (anything with ``names``/``info``/``get``/``get_rows``).
    Returns :meth:`ChangeMapSampler.result`'s dict."""
    return ChangeMapSampler(reference, inputs, method, labels).result(output)


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


def write_changemap(folder: str | Path, cm: dict[str, Any], stem: str = "changemap",
                    title: str | None = None, picture: bytes | None | bool = False) -> dict[str, Any]:
    """Write ``<stem>.json`` and, with Pillow, ``<stem>.png`` into ``folder``;
    returns ``{"json": path, "png": path or None, "card": markdown section body}``.
    ``picture``: ``cm`` already drawn (:meth:`ChangeMapSampler.picture`: PNG bytes, or
    None without Pillow); False draws it here."""
    from ..io.plot import render_changemap, write_png

    folder = Path(folder)
    js = folder / f"{stem}.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cm, indent=1) + "\n", encoding="utf-8")
    tmp.replace(js)
    png = folder / f"{stem}.png"
    image = render_changemap(cm, title=title) if picture is False else picture
    drawn = image is not None
    if image is not None:
        write_png(image, png)
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


def sampler_for_merge(method: str, base: Any | None, inputs: Sequence[Any]) -> ChangeMapSampler | None:
    """The sampler of a merge's change map (to watch its output being written): the
    reference is the base, the first input for base-free methods. None without inputs."""
    if not inputs:
        return None
    return ChangeMapSampler(base if base is not None else inputs[0], inputs, method,
                            labels=("base" if base is not None else "first input", "output"))


def changemap_for_merge(output_dir: str | Path, method: str, base: Any | None, inputs: Sequence[Any],
                        output: Any | None = None, sampler: ChangeMapSampler | None = None) -> dict[str, Any] | None:
    """The change map of a finished merge, written beside its card (``changemap.json`` / ``.png``).

    ``sampler`` (:func:`sampler_for_merge`) is the one that watched the output
    being written, if any: what it compared is not read again. Returns
    :func:`write_changemap`'s dict, or None when there is nothing to compare (no inputs).
    """
    from ..io.checkpoint import Checkpoint

    sampler = sampler or sampler_for_merge(method, base, inputs)
    if sampler is None:
        return None
    out = output if output is not None else Checkpoint.open(output_dir)
    cm = sampler.result(out)
    title = changemap_title(method)
    return write_changemap(output_dir, cm, title=title, picture=sampler.picture(cm, title))


def changemap_title(method: str) -> str:
    """The title of a merge's change-map picture."""
    return f"{method}: what changed where"
