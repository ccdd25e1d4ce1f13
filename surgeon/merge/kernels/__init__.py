"""Merge kernels: optimisations of the reference functions in :mod:`surgeon.merge.methods`.

:mod:`.base` holds the contract (:class:`~.base.Kernel`, every hook with its
default) and the piece/block driver; one module per family holds its torch
kernel (``ties``, ``dare``, ``widen``, ``breadcrumbs``, ``model_stock``,
``slerp``, ``linear``), the ``*_compiled`` modules and ``linear`` the numba
loops, :mod:`._jit` the numba set-up and :mod:`._raw` the stored-dtype
loads and stores. Each kernel is proven equal to its reference by
tests/test_merge_conformance.py. Importing this package imports nothing.
"""
