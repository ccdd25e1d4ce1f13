"""NearSwap: take the other model's value where it is near the base's, keep the base's elsewhere.

alchemonaut, 2024, QuartetAnemoi-70B-t0.0001 (model card on the Hugging Face
hub); semantics of mergekit 0.1.5's ``nearswap``. With ``a`` the base and
``b`` the one other model, per entry::

    w = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w * b + (1 - w) * a

so entries that differ by at most ``t`` become ``b``'s and entries far apart
stay ``a``'s, blending in between (``w = t / |a - b|``). ``t`` may follow layer
gradients or name filters, as in mergekit. Each entry depends only on the same
entries of the inputs, so the engine streams it block by block
(``elementwise``). Arithmetic in float32 (mergekit: in the tensor's dtype).
"""
from __future__ import annotations

import torch

from ..kernels import nearswap as nearswap_kernels
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge
from .common import check_inputs

#: |a - b| is clamped below at this before dividing (mergekit's constant)
MIN_DIFF = 1e-6


def _kernel(meta: TensorMerge) -> nearswap_kernels.NearSwapKernel | None:
    """The compiled blend on CPU with numba; None (``fn`` serves the blocks) elsewhere
    and where ``fn`` must raise its clear error (no base, not exactly one model)."""
    if meta.device.type != "cpu" or not nearswap_kernels.available():
        return None
    if not meta.has_base or len(meta.model_params) != 1:
        return None
    return nearswap_kernels.NearSwapKernel(meta, MIN_DIFF)


@merge_method(
    "nearswap",
    params=[Param("t", float, help="distance below which the other model's value is taken (w = t / |a - b|, "
                                   "clamped to [0, 1])")],
    needs_base=True,
    min_models=1,
    max_models=1,
    elementwise=True,
    paper="alchemonaut 2024, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
    mergekit_name="nearswap",
    kernel=_kernel,
)
def nearswap(t: TensorMerge) -> torch.Tensor:
    """NearSwap: the other model's value where |base - other| <= t, the base's far away, blended in between."""
    check_inputs(t, "nearswap", needs_base=True, min_models=1, max_models=1)
    a = t.base
    assert a is not None
    b = t.models[0]
    w = (float(t.params["t"]) / (a - b).abs_().clamp_(min=MIN_DIFF)).clamp_(0.0, 1.0)
    return w * b + (1.0 - w) * a


METHODS = (nearswap,)
