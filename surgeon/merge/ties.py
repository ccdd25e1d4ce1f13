"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, 2023, "TIES-Merging: Resolving
Interference When Merging Models" (NeurIPS 2023, arXiv 2306.01708); reference
code prateeky2806/ties-merging (src/utils/merge_utils.py).

Two trim scopes:

- ``trim_scope: tensor`` (default, mergekit's ``ties``): each task vector is
  trimmed per tensor to exactly ``k = max(1, int(density * numel))`` entries,
  the largest by magnitude. Ties at the k-th magnitude go to the lowest flat
  (row-major) indices; mergekit's ``argsort`` leaves that order unspecified.
- ``trim_scope: model`` (the paper's reference code): one magnitude threshold
  per task vector over the WHOLE model: with ``d`` entries in all and
  ``K = density``, threshold = the ``k``-th smallest ``|tau|`` for
  ``k = d - int(d * K)``, and every entry with ``|tau| >= threshold`` is kept
  (so ties at the threshold are all kept and slightly more than ``d * K``
  entries may survive). The threshold is exact: :func:`prepare_ties` streams
  the model twice through 16-bit histograms of the float32 bit patterns of
  ``|tau|`` (see :func:`surgeon.merge._select.stream_kth_smallest`), holding
  no more than one tensor at a time. A model's ``density`` must then be the
  same for every tensor.

Sign election and zero sums: the elected sign of an entry is the sign of the
sum of the weighted trimmed task vectors (``consensus: sum``, the paper's
"mass") or of the sum of their signs (``consensus: count``). Where that sum is
exactly zero, ``zero_sign`` decides: ``positive`` (mergekit: a zero sum counts
as +1) or ``majority`` (the reference: the sign of the sum of all elected
signs; over the whole model with ``trim_scope: model`` — one more streaming
pass — and over the tensor with ``trim_scope: tensor``; if that global sum is
itself 0 the reference's selection keeps the negative entries, and so do we).
``auto`` (default) picks ``positive`` for tensor scope and ``majority`` for
model scope. Entries that were trimmed (zero) never agree with any sign.

Mixing: ``mean`` (the disjoint mean) divides each entry by the summed weights
of the models whose sign agrees there (1 where none agree) — with unit
weights exactly the paper's count of agreeing entries, and mergekit's
``normalize: true``; ``sum`` adds the agreeing weighted entries. mergekit's
spelling ``normalize: false`` also selects ``sum`` (the mean is used only when
``mixing: mean`` and ``normalize: true``, both defaults). Finally
``base + lambda * merged``.

Defaults follow mergekit: ``density`` 1.0 (no trimming; the paper uses 0.2),
``weight`` 1.0, ``lambda`` 1.0, ``normalize`` true. Compute is float32
(mergekit computes in the checkpoint dtype, usually bf16).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError, StepError
from ._common import DENSITY, LAMBDA, WEIGHT, check_inputs, combine, elect_sign, l1_rescale, normalize_param, rescale_param
from ._select import largest_mask, stream_kth_smallest
from . import _ties_fused
from ._streamselect import SelectionPasses, StreamSelector, next_float
from ._raw import raw_inputs, raw_view
from .blocks import PieceInputs, TensorMeta, consensus_mix
from .registry import Param, ReiterableMerges, TensorMerge, merge_method


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude sparsification, in place: keep the
    ``max(1, int(density * numel))`` largest ``|delta|`` (ties: lowest index).

    ``density >= 1`` keeps everything; ``density <= 0`` keeps nothing.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    keep = largest_mask(delta.abs(), k)
    return delta.mul_(keep)


def model_scope_k(total: int, density: float) -> int | None:
    """The reference's order statistic: ``k = d - int(d * K)`` (1-based);
    None when nothing is trimmed (``density >= 1``)."""
    if density >= 1:
        return None
    if density <= 0:
        return -1  # keep nothing
    return total - int(total * density)


def _resolve_zero_sign(params: dict[str, Any]) -> str:
    z = params.get("zero_sign", "auto")
    if z == "auto":
        return "majority" if params.get("trim_scope", "tensor") == "model" else "positive"
    return z


def prepare_ties(stream: ReiterableMerges, params: dict[str, Any]) -> dict[str, Any] | None:
    """Whole-model pre-pass for ``trim_scope: model`` (None for tensor scope).

    Returns ``{"thresholds": [float|None per model], "densities": [...],
    "total": d, "zero_sign": s}``: model ``i`` keeps ``|tau_i| >=
    thresholds[i]`` (None: keep all; ``inf``: keep none); ``zero_sign`` is the
    sign filled in where the elected sum is exactly zero.
    """
    if params.get("trim_scope", "tensor") != "model":
        return None
    # Distributed runs stream each rank's share of the tensors; sums go through this.
    reduce = getattr(stream, "all_reduce_sum", None)
    n_series = getattr(stream, "num_models", None)

    # Pass 1 (inside stream_kth_smallest) also checks the inputs and that
    # each model's density is the same for every tensor.
    seen: dict[str, Any] = {"densities": None, "total": 0}

    def passes():
        first_pass = seen["densities"] is None
        total = 0
        for t in stream:
            check_inputs(t, "ties", needs_base=True, min_models=1)
            ds = [float(mp["density"]) for mp in t.model_params]
            if seen["densities"] is None:
                seen["densities"] = ds
            elif ds != seen["densities"]:
                raise InvalidInputError(
                    f"tensor {t.name!r}: ties with trim_scope: model needs one density per model for the whole "
                    f"model (one threshold per task vector), got {ds} here and {seen['densities']} elsewhere"
                )
            total += t.base.numel()
            yield [(m - t.base).abs_() if 0 < ds[i] < 1 else None for i, m in enumerate(t.models)]
        if first_pass:
            seen["total"] = total

    def order_statistics(_lengths: list[int]) -> list[int | None]:
        if reduce is not None:
            seen["total"] = int(reduce(torch.tensor([seen["total"]], dtype=torch.int64))[0])
            if seen["densities"] is None and n_series:  # this rank streamed no tensor
                seen["densities"] = [float(d) for d in stream.densities]
        ks = [model_scope_k(seen["total"], d) for d in seen["densities"] or []]
        return [k if (k is not None and k > 0) else None for k in ks]

    found = stream_kth_smallest(passes, order_statistics, reduce=reduce, n_series=n_series)
    densities = seen["densities"]
    if densities is None:  # empty model
        return {"thresholds": [], "densities": [], "total": 0, "zero_sign": 1.0}
    total = seen["total"]
    thresholds: list[float | None] = []
    for i, d in enumerate(densities):
        k = model_scope_k(total, d)
        if k is None:
            thresholds.append(None)
        elif k < 0:
            thresholds.append(float("inf"))
        else:
            thresholds.append(found[i] if i < len(found) else None)

    zero_sign = 1.0
    if _resolve_zero_sign(params) == "majority":
        consensus = params.get("consensus", "sum")
        acc = 0
        for t in stream:
            deltas = _trimmed_model_scope(t, thresholds)
            _weight(t, deltas)
            elected = elect_sign(deltas, consensus, 0.0)
            acc += int(elected.sum(dtype=torch.float64))
        if reduce is not None:
            acc = int(reduce(torch.tensor([acc], dtype=torch.int64))[0])
        zero_sign = 1.0 if acc > 0 else -1.0  # acc == 0: the reference keeps negatives
    return {"thresholds": thresholds, "densities": densities, "total": total, "zero_sign": zero_sign}


def _weight(t: TensorMerge, deltas: list[torch.Tensor]) -> None:
    for d, w in zip(deltas, t.weights()):
        if w != 1.0:
            d.mul_(w)


def _trimmed_model_scope(t: TensorMerge, thresholds: list[float | None]) -> list[torch.Tensor]:
    out = []
    for m, thr in zip(t.models, thresholds):
        d = m - t.base
        if thr is not None:
            d.mul_(d.abs() >= thr)
        out.append(d)
    return out


# ---------------------------------------------------------------------------
# Block-wise kernel (the engine's path; see surgeon.merge.blocks).

def _below(x: float) -> float:
    """The largest float32 below ``x`` (>= 0): ``hardshrink(d, _below(t))`` keeps ``|d| >= t``."""
    return next_float(x, 0.0)


class TiesKernel(SelectionPasses):
    """TIES, block by block, with the same trim as :func:`magnitude_trim`.

    Tensor scope: each trimmed model's exact k-th largest ``|delta|`` comes
    from counting passes over the tensor (one, unless a sampled bracket
    misses: :class:`surgeon.merge._streamselect.StreamSelector`), without
    sorting or holding the tensor. The merge pass keeps ``|delta| > t`` (``hardshrink``)
    and, of the entries equal to ``t``, the first ``k - #(> t)`` in flat order
    (a running quota; blocks come in flat order) — exactly mergekit's k
    entries, ties to the lowest indices. Model scope: thresholds come from the
    whole-model pre-pass and every ``|delta| >= t`` is kept (the reference's
    rule); no passes.
    """

    def __init__(self, meta: TensorMeta):
        p = meta.params
        self.meta = meta
        self.weights = [float(mp["weight"]) for mp in meta.model_params]
        self.consensus = p["consensus"]
        self.normalize = p["normalize"] and p["mixing"] == "mean"
        self.lam = float(p["lambda"])
        n = meta.numel
        self.keep_ge: list[float | None] = []   # keep |d| >= value (None: keep all)
        self.ks: list[int | None] = []           # tensor scope: entries to keep (None: all, 0: none)
        if p["trim_scope"] == "model":
            st = meta.state
            self.keep_ge = [None if thr is None else float(thr) for thr in st["thresholds"]]
            self.ks = [None] * len(self.keep_ge)
            self.zero_sign = float(st.get("zero_sign", 1.0)) if _resolve_zero_sign(p) == "majority" else 1.0
        else:
            for mp in meta.model_params:
                d = float(mp["density"])
                self.ks.append(None if d >= 1 else (0 if d <= 0 or n == 0 else max(1, int(d * n))))
            self.keep_ge = [None] * len(self.ks)
            self.zero_sign = 1.0
        # the k-th largest is the (n - k + 1)-th smallest
        self.selector = StreamSelector({i: n - k + 1 for i, k in enumerate(self.ks) if k}, n)
        self.stat_passes = StreamSelector.passes if self.selector.ks else 0
        self.row = n // meta.shape[0] if meta.shape and meta.shape[0] else 1
        self._thr: dict[int, float] = {}
        self._quota: dict[int, int] = {}       # tied entries still to keep (partial ties)
        self._next = 0
        self._fused = meta.device.type == "cpu" and _ties_fused.available()
        self._fused_args: _ties_fused.BlockArgs | None = None

    # -- statistic passes (observe, observe_raw, pass_needed: SelectionPasses) --
    def end_pass(self, pass_no: int) -> None:
        self.selector.end_pass(pass_no)
        if not self.selector.done:
            return
        n = self.meta.numel
        for i, sel in self.selector.result.items():
            quota = self.ks[i] - (n - sel.below - sel.equal)  # tied entries among the k largest
            if quota >= sel.equal:
                self.keep_ge[i] = sel.value
            else:
                self._thr[i] = sel.value
                self._quota[i] = quota

    # -- merge pass -----------------------------------------------------------
    def _trim(self, i: int, d: torch.Tensor) -> torch.Tensor:
        k = self.ks[i]
        if k == 0:
            return d.zero_()
        thr = self.keep_ge[i]
        if thr is not None:
            if thr == float("inf"):
                return d.zero_()
            return d if thr <= 0 else torch.nn.functional.hardshrink(d, _below(thr))
        if i not in self._thr:
            return d  # keep all
        t = self._thr[i]
        out = torch.nn.functional.hardshrink(d, t)  # strictly above the threshold
        quota = self._quota[i]
        if quota > 0:
            # the tied entries' values: (|d| >= t) minus (|d| > t), in float ops (t > 0 here)
            with_ties = torch.nn.functional.hardshrink(d, _below(t))
            tied_values = with_ties - out
            tied = int(torch.count_nonzero(tied_values))
            if tied <= quota:  # every tied entry of this block belongs
                self._quota[i] = quota - tied
                return with_ties
            idx = torch.nonzero(tied_values.reshape(-1)).squeeze(1)[:quota]
            flat_out, flat_d = out.reshape(-1), d.reshape(-1)
            flat_out[idx] = flat_d[idx]
            self._quota[i] = 0
        return out

    def _trim_thresholds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per model, :meth:`_trim` as hardshrink thresholds for the compiled
        merge: (sure keeps, keeps with ties, tied entries still to keep)."""
        strict, with_ties, quota = [], [], []
        for i, k in enumerate(self.ks):
            thr = self.keep_ge[i]
            if k == 0 or thr == float("inf"):
                t = tt = float("inf")       # drop everything
            elif thr is not None:
                t = tt = -1.0 if thr <= 0 else _below(thr)
            elif i in self._thr:
                t, tt = self._thr[i], _below(self._thr[i])
            else:
                t = tt = -1.0               # keep everything
            strict.append(t)
            with_ties.append(tt)
            quota.append(self._quota.get(i, 0) if i in self._thr else 0)
        return (np.array(strict, dtype=np.float32), np.array(with_ties, dtype=np.float32),
                np.array(quota, dtype=np.int64))

    def _in_order(self, offset: int, numel: int) -> None:
        if offset != self._next:
            raise RuntimeError(f"tensor {self.meta.name!r}: ties blocks out of order ({offset} != {self._next})")
        self._next = offset + numel

    def _compiled_args(self) -> _ties_fused.BlockArgs:
        if self._fused_args is None:  # thresholds are final once the passes are done
            self._fused_args = _ties_fused.ties_args(*self._trim_thresholds(), np.array(self.weights, dtype=np.float32),
                                                     self.consensus == "count", self.zero_sign, self.normalize,
                                                     self.lam)
        return self._fused_args

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """The whole piece through the compiled merge, from and to the stored
        dtypes (None: these inputs need float32 blocks)."""
        if not self._fused:
            return None
        raw, o = raw_inputs(piece.base, piece.models), raw_view(out)
        if raw is None or raw[0] is None or o is None:
            return None
        self._in_order(piece.start, piece.numel)
        return _ties_fused.merge_raw(raw[0], raw[1], self._compiled_args(), o)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        self._in_order(blk.offset, blk.base.numel())
        if self._fused:
            return _ties_fused.merge_block(blk.base, blk.models, self._compiled_args()).reshape(blk.base.shape)
        deltas = []
        for i, (m, w) in enumerate(zip(blk.models, self.weights)):
            d = self._trim(i, m - blk.base)
            if w != 1.0:
                d.mul_(w)
            deltas.append(d)
        mixed = consensus_mix(deltas, self.weights, self.consensus, self.normalize, self.zero_sign)
        if self.lam != 1.0:
            mixed.mul_(self.lam)
        return mixed.add_(blk.base)


def ties_kernel(meta: TensorMeta) -> TiesKernel | None:
    """The block kernel, or None where the whole tensor is needed: L1
    ``rescale`` and tensor-scope ``zero_sign: majority`` need whole-tensor sums
    after trimming (the whole-tensor :func:`ties` handles them)."""
    p = meta.params
    if not meta.has_base or p.get("rescale") or len(meta.model_params) < 1:
        return None
    if p["trim_scope"] == "model":
        st = meta.state
        if st is None or len(st.get("thresholds", [])) != len(meta.model_params):
            return None  # the whole-tensor path raises the clear error
        dens = st.get("densities")
        if dens is not None and [float(mp["density"]) for mp in meta.model_params] != list(dens):
            return None
    elif _resolve_zero_sign(p) == "majority":
        return None
    return TiesKernel(meta)


@merge_method(
    "ties",
    params=[
        WEIGHT,
        DENSITY,
        LAMBDA,
        normalize_param(True),
        Param("consensus", str, default="sum", choices=("sum", "count"),
              help="sign election: sign of the summed weighted deltas (sum, the paper's mass) or of the summed signs (count)"),
        Param("mixing", str, default="mean", choices=("mean", "sum"),
              help="disjoint mean (divide by the agreeing models' summed weights) or disjoint sum"),
        Param("trim_scope", str, default="tensor", choices=("tensor", "model"),
              help="trim per tensor (mergekit) or with one threshold per task vector over the whole model (paper)"),
        Param("zero_sign", str, default="auto", choices=("auto", "positive", "majority"),
              help="sign where the elected sum is exactly 0: positive (mergekit), majority (reference); auto: by scope"),
        rescale_param(False, "after trimming, rescale each task vector to its original L1 norm (mergekit's rescale)"),
    ],
    needs_base=True,
    min_models=1,
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv 2306.01708)",
    prepare=prepare_ties,
    mergekit_name="ties",
    kernel=ties_kernel,
)
def ties(t: TensorMerge) -> torch.Tensor:
    """TIES: trim each task vector by magnitude, elect a sign per entry, average the agreeing entries.

    See the module docstring for the trim scopes, tie and zero-sign rules.
    """
    check_inputs(t, "ties", needs_base=True, min_models=1)
    p = t.params
    scope = p["trim_scope"]
    zero_mode = _resolve_zero_sign(p)
    if scope == "model":
        if t.state is None:
            raise StepError(
                f"tensor {t.name!r}: ties with trim_scope: model needs the whole-model pre-pass "
                "(the engine must call the method's prepare hook first)"
            )
        thresholds = t.state["thresholds"]
        if len(thresholds) != len(t.models):
            raise StepError(f"tensor {t.name!r}: ties pre-pass state has {len(thresholds)} models, got {len(t.models)}")
        densities = t.state.get("densities")
        if densities is not None:
            here = [float(mp["density"]) for mp in t.model_params]
            if here != list(densities):
                raise InvalidInputError(
                    f"tensor {t.name!r}: ties with trim_scope: model needs one density per model for the whole model"
                )
        deltas = []
        for m, thr in zip(t.models, thresholds):
            d = m - t.base
            if thr is not None:
                original = d.clone() if p["rescale"] else None
                d.mul_(d.abs() >= thr)
                if original is not None:
                    l1_rescale(original, d)
            deltas.append(d)
        zero_sign = float(t.state.get("zero_sign", 1.0)) if zero_mode == "majority" else 1.0
    else:
        deltas = []
        for m, mp in zip(t.models, t.model_params):
            d = m - t.base
            original = d.clone() if p["rescale"] and mp["density"] < 1 else None
            magnitude_trim(d, float(mp["density"]))
            if original is not None:
                l1_rescale(original, d)
            deltas.append(d)
        zero_sign = 1.0
        if zero_mode == "majority":
            weighted = [d * w for d, w in zip(deltas, t.weights())]
            elected = elect_sign(weighted, p["consensus"], 0.0)
            s = float(elected.sum(dtype=torch.float64))
            zero_sign = 1.0 if s > 0 else -1.0
            del weighted, elected
    normalize = p["normalize"] and p["mixing"] == "mean"
    return combine(t, deltas, consensus=p["consensus"], normalize=normalize, lam=p["lambda"], zero_sign=zero_sign)
