"""Cross-tokenizer knowledge fusion.

* :func:`gld_loss` — InfiGFusion's graph-on-logits distillation loss (sorted-feature
  closed form of Gromov-Wasserstein between co-activation graphs);
* :mod:`~surgeon.fusion.tokenwise` — KL on aligned distributions, ULD;
* :mod:`~surgeon.fusion.align` — FuseLLM-style sequence and vocabulary alignment;
* :mod:`~surgeon.fusion.cache` — teacher top-k caches (safetensors shards, resumable);
* :func:`fuse` — the training loop (accelerate), writing an atomic checkpoint.
"""
from .gld import TopK, co_activation_graph, gld_loss, sorted_gw


def fuse(*args, **kwargs):  # imported lazily: accelerate and transformers are heavy
    from .distill import fuse as _fuse

    return _fuse(*args, **kwargs)


fuse.__doc__ = "Distil source models into a pivot; see :func:`surgeon.fusion.distill.fuse`."

__all__ = ["TopK", "gld_loss", "sorted_gw", "co_activation_graph", "fuse"]
