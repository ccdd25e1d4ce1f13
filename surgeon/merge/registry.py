"""The merge-method registry: an explicit list of method modules.

Every module of :mod:`surgeon.merge.methods` lists its methods in ``METHODS``;
:data:`MODULES` lists the modules. Nothing is found by scanning file names:
a new method is registered by adding its module here (docs/architecture.md,
"How to add a merge method"). :func:`register` adds a method at run time
(plugins, tests).
"""
from __future__ import annotations

from types import ModuleType

from ..errors import InvalidInputError
from ..suggest import did_you_mean
from .method import MergeMethod, ReiterableMerges, merge_method
from .methods import (
    arcee_fusion,
    basic,
    breadcrumbs,
    dare,
    della,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    ties,
    widen,
)
from .params import Param, layer_index, resolve_params, resolve_value
from .tensor import TensorMerge

__all__ = ["MODULES", "MergeMethod", "Param", "ReiterableMerges", "TensorMerge", "all_methods", "get_method",
           "layer_index", "merge_method", "register", "resolve_params", "resolve_value"]

#: the built-in method modules, each with a ``METHODS`` tuple
MODULES: tuple[ModuleType, ...] = (basic, ties, dare, breadcrumbs, della, sce, widen, model_stock, slerp,
                                   passthrough, nuslerp, multislerp, karcher, arcee_fusion, ram, nearswap)

_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (names are unique)."""
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


for _module in MODULES:
    for _method in _module.METHODS:
        register(_method)


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a clear error with a suggestion otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown merge method {name!r}{did_you_mean(name, _METHODS)}; known: {', '.join(sorted(_METHODS))}"
        ) from None


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method, by name."""
    return dict(sorted(_METHODS.items()))
