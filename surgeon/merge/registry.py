"""The merge-method registry: every method declares its parameters.

A merge method is a pure function of one tensor's inputs (:class:`TensorMerge`)
that returns the merged tensor in float32. It is registered with the typed
parameters it accepts, so the recipe validator can reject unknown or
out-of-range parameters before any weight is read, and so the engine can
resolve per-tensor parameter rules (name filters, layer gradients) into plain
values before calling the method.

DESIGN.md sketches ``fn(base, others, params)``; we pass one
:class:`TensorMerge` instead because methods also need the tensor's name (for
seeded randomness and role-specific conventions such as WIDEN's embedding
orientation) and per-model parameters, and a single object keeps every method's
signature identical.

Methods that need a whole-model statistic before merging (TIES with
``trim_scope: model``) provide ``prepare``: the engine streams every tensor's
inputs through it once (see :class:`Preparer`) and hands the resulting state to
each call as ``TensorMerge.state``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from ..errors import InvalidInputError
from ..suggest import did_you_mean

_REQUIRED = object()

@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method.

    ``per_model`` parameters are given on each model entry of a recipe
    (``{model: math, weight: 0.7}``); the others once for the step.
    """

    name: str
    kind: type = float
    default: Any = _REQUIRED
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    per_model: bool = False
    help: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Coerce and range-check one resolved value; raise with ``where``."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidInputError(f"{where}: parameter {self.name!r} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise InvalidInputError(f"{where}: parameter {self.name!r} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise InvalidInputError(
                    f"{where}: parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}"
                    + did_you_mean(value, self.choices)
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"{where}: parameter {self.name!r} must be a number, got {value!r}")
        if self.kind is int:
            if float(value) != int(value):
                raise InvalidInputError(f"{where}: parameter {self.name!r} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.min is not None and value < self.min:
            raise InvalidInputError(f"{where}: parameter {self.name!r} must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise InvalidInputError(f"{where}: parameter {self.name!r} must be <= {self.max}, got {value}")
        return value


@dataclass
class TensorMerge:
    """Everything a merge method sees for one output tensor.

    Tensors are float32 on the compute device, all of the same shape (the
    engine has aligned vocabularies and checked shapes). ``models`` excludes
    the base. ``model_params[i]`` holds the resolved per-model parameters of
    ``models[i]``; ``params`` the resolved step parameters.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int = 0
    role: str = "other"  # "embedding" | "lm_head" | "other"
    state: Any = None
    # A block of a larger tensor (see surgeon.merge.blocks): the flat index of
    # this block's first entry.
    offset: int = 0

    def generator(self, salt: str = "") -> torch.Generator:
        """A torch generator seeded from the recipe seed and the tensor name.

        Seeding per tensor (not per run) makes random methods reproducible
        whatever order or process computes the tensors.
        """
        from ._random import stream_key

        gen = torch.Generator(device=self.device if self.device.type != "mps" else "cpu")
        gen.manual_seed(stream_key(self.seed, self.name, salt) & ((1 << 63) - 1))
        return gen

    @property
    def device(self) -> torch.device:
        ref = self.base if self.base is not None else self.models[0]
        return ref.device

    def uniform(self, salt: str = "") -> torch.Tensor:
        """Uniform [0, 1) floats for this tensor's entries, shaped like the inputs.

        Entry ``i`` of the tensor (flat index ``offset + i``) is a pure
        function of (recipe seed, tensor name, ``salt``, flat index): see
        :mod:`surgeon.merge._random`. A block of the tensor therefore gets
        exactly the numbers the whole tensor would, however the engine cut it,
        and every device draws the same numbers.
        """
        from ._random import stream_key, uniform_stream

        ref = self.base if self.base is not None else self.models[0]
        return uniform_stream(stream_key(self.seed, self.name, salt), self.offset, ref.numel(),
                              ref.device).reshape(ref.shape)

    def weights(self, key: str = "weight") -> list[float]:
        return [float(p[key]) for p in self.model_params]

    def deltas(self) -> list[torch.Tensor]:
        """Task vectors: each model minus the base."""
        if self.base is None:
            raise InvalidInputError(f"tensor {self.name!r}: this method needs a base model")
        return [m - self.base for m in self.models]


class Preparer(Protocol):
    """Whole-model pre-pass: ``prepare(stream, params) -> state``.

    ``stream`` yields one :class:`TensorMerge` per tensor (state None); it may be
    iterated more than once (each iteration streams the checkpoints again), so
    exact multi-pass selections stay within bounded memory.
    """

    def __call__(self, stream: "ReiterableMerges", params: dict[str, Any]) -> Any: ...


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
    # block-wise kernel factory (surgeon.merge.blocks): TensorMeta -> BlockKernel | None
    kernel: Callable[[Any], Any] | None = None
    # each output entry depends only on the same input entries: fn runs block by block
    elementwise: bool = False

    @property
    def blockwise(self) -> bool:
        return self.elementwise or self.kernel is not None

    def block_kernel(self, meta: Any) -> Any:
        """This tensor's block kernel (surgeon.merge.blocks), or None: use ``fn`` on the whole tensor.
        A registered kernel factory comes first; an elementwise method's ``fn``
        serves blocks when the factory declines (returns None)."""
        kernel = self.kernel(meta) if self.kernel is not None else None
        if kernel is None and self.elementwise:
            from .blocks import Elementwise

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


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (names are unique)."""
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


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
    kernel: Callable[[Any], Any] | None = None,
    elementwise: bool = False,
) -> Callable[[Callable[[TensorMerge], torch.Tensor]], Callable[[TensorMerge], torch.Tensor]]:
    """Decorator registering ``fn`` as merge method ``name``.

    The first line of ``fn``'s docstring becomes the method's summary.
    ``elementwise=True`` declares that each output entry depends only on the
    same entry of the inputs (and the parameters), so the engine may run
    ``fn`` block by block (:class:`surgeon.merge.blocks.Elementwise`).
    """

    def deco(fn: Callable[[TensorMerge], torch.Tensor]) -> Callable[[TensorMerge], torch.Tensor]:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        register(
            MergeMethod(
                name=name,
                fn=fn,
                params=tuple(params),
                needs_base=needs_base,
                min_models=min_models,
                max_models=max_models,
                summary=summary,
                paper=paper,
                randomized=randomized,
                prepare=prepare,
                mergekit_name=mergekit_name,
                kernel=kernel,
                elementwise=elementwise,
            )
        )
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a clear error with a suggestion otherwise."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown merge method {name!r}{did_you_mean(name, _METHODS)}; known: {', '.join(sorted(_METHODS))}"
        ) from None


def all_methods() -> dict[str, MergeMethod]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method module.
    from . import methods  # noqa: F401


# ---------------------------------------------------------------------------
# Per-tensor parameter values: scalars, layer gradients and name filters.

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.7.x`` -> 7)."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def interpolate_gradient(values: Sequence[float], position: float) -> float:
    """Linear interpolation of a gradient list at ``position`` in [0, 1].

    Matches mergekit: the list's points are spread evenly over the layers.
    """
    if len(values) == 1:
        return float(values[0])
    x = min(max(position, 0.0), 1.0) * (len(values) - 1)
    lo = int(x)
    hi = min(lo + 1, len(values) - 1)
    frac = x - lo
    return float(values[lo]) * (1 - frac) + float(values[hi]) * frac


def filter_matches(rule: dict[str, Any], tensor_name: str) -> bool:
    """Whether a ``{filter|glob|regex: ..., value: ...}`` rule applies.

    ``filter`` is mergekit's test: ``"*"`` (or ``null``) matches every
    tensor, anything else is a substring of the name (no other wildcards:
    ``"*proj"`` is the literal text). ``glob`` is an fnmatch pattern over the
    whole name, ``regex`` a Python regular expression searched in the name. A
    rule without a matcher is the catch-all.
    """
    import fnmatch

    if "filter" in rule:
        pattern = rule["filter"]
        return pattern is None or pattern == "*" or (bool(tensor_name) and str(pattern) in tensor_name)
    if "glob" in rule:
        return fnmatch.fnmatchcase(tensor_name, str(rule["glob"]))
    if "regex" in rule:
        return re.search(str(rule["regex"]), tensor_name) is not None
    return True


def resolve_value(value: Any, tensor_name: str, num_layers: int | None, position: float | None = None) -> Any:
    """Turn a recipe parameter value into the plain value for one tensor.

    - scalar: itself;
    - list of numbers: a gradient over layer index, layer i of n at position
      i / (n - 1). As in mergekit, tensors outside the layer stack (embeddings,
      final norm, head) take the first value (position 0) and a one-layer
      model takes the last, so a mergekit config means the same here;
    - list of rules ``{filter|glob|regex: pattern, value: v}``: the first rule
      that matches; ``v`` may itself be a gradient. No match gives ``None``
      (the caller falls back to the next scope, as mergekit does);
    - a list holding a boolean or a string is stepped, not interpolated:
      mergekit takes entry ``int(position * (len - 1))``.

    ``position`` overrides the position in the layer stack (a mergekit
    ``slices:`` entry counts its own layers from 0 to 1).
    """
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for rule in value:
            if filter_matches(rule, tensor_name):
                return resolve_value(rule["value"], tensor_name, num_layers, position)
        return None
    if isinstance(value, list):
        if position is None:
            idx = layer_index(tensor_name)
            if idx is None:
                position = 0.0
            elif num_layers is None or num_layers <= 1:
                position = 1.0
            else:
                position = idx / (num_layers - 1)
        if any(isinstance(v, (bool, str)) for v in value):
            return value[int(min(max(position, 0.0), 1.0) * (len(value) - 1))]
        return interpolate_gradient(value, position)
    return value


def resolve_params(
    declared: Iterable[Param],
    given: dict[str, Any] | Sequence[dict[str, Any]],
    tensor_name: str,
    num_layers: int | None,
    where: str,
    position: float | None = None,
) -> dict[str, Any]:
    """Resolve and check every declared parameter for one tensor.

    ``given`` is one mapping or a sequence of scopes, highest precedence first
    (a model's own parameters, then the step's): as in mergekit, a scope whose
    rules match nothing for this tensor falls through to the next one, then to
    the parameter's default.
    """
    scopes = [given] if isinstance(given, dict) else list(given)
    out: dict[str, Any] = {}
    for p in declared:
        value: Any = _REQUIRED
        for scope in scopes:
            raw = scope.get(p.name, _REQUIRED)
            if raw is _REQUIRED:
                for alias in p.aliases:
                    if alias in scope:
                        raw = scope[alias]
                        break
            if raw is _REQUIRED:
                continue
            value = resolve_value(raw, tensor_name, num_layers, position)
            if value is not None:
                break
        if value is _REQUIRED or value is None:
            if p.required:
                raise InvalidInputError(f"{where}: parameter {p.name!r} is required (tensor {tensor_name!r})")
            value = p.default
        out[p.name] = p.check(value, where)
    return out
