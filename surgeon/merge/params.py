"""Merge parameters: :class:`Param` declarations and per-tensor values.

A method declares typed, ranged parameters (:class:`Param`), so a recipe is
checked before any weight is read. A recipe value may be a scalar, a layer
gradient (a list of numbers) or a list of name-filter rules; :func:`resolve_params`
turns it into the plain value for one tensor. See docs/architecture.md.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..arch import layer_index
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


# ---------------------------------------------------------------------------
# Per-tensor parameter values: scalars, layer gradients and name filters.

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
