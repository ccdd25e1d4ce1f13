"""Merge methods, one module per family.

Each module declares its :class:`~surgeon.merge.params.Param` s, its reference
function (plain torch, float32: the definition of the method), and a factory
for its kernel (:mod:`surgeon.merge.kernels`), and lists its methods in
``METHODS``. :data:`surgeon.merge.registry.MODULES` lists the modules.
No numba here. Importing this package imports nothing.
"""
