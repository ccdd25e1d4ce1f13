"""Merge methods: pure per-tensor functions, their kernels, and the registry.

Layout (docs/architecture.md, "The merge wing"): :mod:`.tensor` and
:mod:`.params` (what a method sees and declares), :mod:`.methods` (one module
per family: the reference functions), :mod:`.kernels` (their optimisations
and the piece/block driver), :mod:`.select` (exact selection),
:mod:`.registry` (the explicit list of methods), :mod:`.apply` (running a
method on in-memory tensors).
"""
from .apply import build_merge, merge_tensors
from .method import MergeMethod, merge_method
from .params import Param
from .registry import all_methods, get_method, register
from .tensor import TensorMerge

__all__ = ["MergeMethod", "Param", "TensorMerge", "all_methods", "build_merge", "get_method", "merge_method",
           "merge_tensors", "register"]
