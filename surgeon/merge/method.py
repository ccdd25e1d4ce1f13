"""A merge method's declaration: :class:`MergeMethod` and the :func:`merge_method` decorator.

A merge method is a pure function of one tensor's inputs (:class:`TensorMerge`)
that returns the merged tensor in float32: the *reference function*, the
definition of the method. It declares the typed parameters it accepts, so the
recipe validator can reject unknown or out-of-range parameters before any
weight is read, and may offer a *kernel factory* (:mod:`surgeon.merge.kernels`):
an optimisation of the reference, proven equal to it by
tests/test_merge_conformance.py.

Methods that need a whole-model statistic before merging (TIES with
``trim_scope: model``) provide ``prepare``: the engine streams every tensor's
inputs through it once and hands the resulting state to each call as
``TensorMerge.state``.

How to add a method: docs/architecture.md ("How to add a merge method").
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .kernels.base import Elementwise, Kernel
from .params import Param
from .tensor import TensorMerge


class Preparer(Protocol):
    """Whole-model pre-pass: ``prepare(stream, params) -> state``.

    ``stream`` yields one :class:`TensorMerge` per tensor (state None); it may be
    iterated more than once (each iteration streams the checkpoints again), so
    exact multi-pass selections stay within bounded memory.
    """

    def __call__(self, stream: ReiterableMerges, params: dict[str, Any]) -> Any: ...


class ReiterableMerges(Protocol):
    def __iter__(self) -> Iterator[TensorMerge]: ...


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and its declared interface."""

    name: str
    fn: Callable[[TensorMerge], torch.Tensor]
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    summary: str = ""
    paper: str = ""
    randomized: bool = False
    prepare: Preparer | None = None
    # mergekit's name for the same method, when it differs or exists
    mergekit_name: str | None = None
    # kernel factory (surgeon.merge.kernels): header-only TensorMerge -> Kernel | None
    kernel: Callable[[TensorMerge], Kernel | None] | None = None
    # each output entry depends only on the same input entries: fn runs block by block
    elementwise: bool = False

    @property
    def blockwise(self) -> bool:
        return self.elementwise or self.kernel is not None

    def __call__(self, t: TensorMerge) -> torch.Tensor:
        """The reference function on one whole tensor."""
        return self.fn(t)

    def block_kernel(self, meta: TensorMerge) -> Kernel | None:
        """This tensor's kernel (:mod:`surgeon.merge.kernels`), or None: use ``fn`` on the whole tensor.
        A registered kernel factory comes first; an elementwise method's ``fn``
        serves blocks when the factory declines (returns None)."""
        kernel = self.kernel(meta) if self.kernel is not None else None
        if kernel is None and self.elementwise:
            return Elementwise(self.fn)
        return kernel

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        return None


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    needs_base: bool = True,
    min_models: int = 1,
    max_models: int | None = None,
    paper: str = "",
    randomized: bool = False,
    prepare: Preparer | None = None,
    mergekit_name: str | None = None,
    kernel: Callable[[TensorMerge], Kernel | None] | None = None,
    elementwise: bool = False,
) -> Callable[[Callable[[TensorMerge], torch.Tensor]], MergeMethod]:
    """Decorator turning reference function ``fn`` into merge method ``name``.

    The result is the :class:`MergeMethod` (callable like ``fn``); list it in
    its module's ``METHODS`` and the module in :data:`surgeon.merge.registry.MODULES`.

    The first line of ``fn``'s docstring becomes the method's summary.
    ``elementwise=True`` declares that each output entry depends only on the
    same entry of the inputs (and the parameters), so the engine may run
    ``fn`` block by block (:class:`surgeon.merge.kernels.base.Elementwise`).
    """

    def deco(fn: Callable[[TensorMerge], torch.Tensor]) -> MergeMethod:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return MergeMethod(name=name, fn=fn, params=tuple(params), needs_base=needs_base, min_models=min_models,
                           max_models=max_models, summary=summary, paper=paper, randomized=randomized,
                           prepare=prepare, mergekit_name=mergekit_name, kernel=kernel, elementwise=elementwise)

    return deco
