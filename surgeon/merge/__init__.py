"""Merge methods: pure per-tensor functions registered by name.

See :mod:`surgeon.merge.registry` for the contract every method follows.
"""
from .registry import MergeMethod, Param, TensorMerge, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "Param", "TensorMerge", "all_methods", "get_method", "merge_method"]
