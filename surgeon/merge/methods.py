"""Imports every method module of :mod:`surgeon.merge` so they register.

Each family lives in its own module (``basic``, ``ties``, ``widen``, ...) and
registers itself with :func:`surgeon.merge.registry.merge_method` on import.
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import merge as _pkg

_NOT_METHODS = {"registry", "methods", "vocab", "engine"}

for _info in sorted(pkgutil.iter_modules(_pkg.__path__), key=lambda i: i.name):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        importlib.import_module(f"{_pkg.__name__}.{_info.name}")
