"""Loading a recipe file: YAML -> schema -> references, with file:line errors.

Every error is a :class:`~surgeon.errors.RecipeError` whose message starts
with ``file:line``, names the key, says what was expected and, for misspelt
keys or method names, suggests the closest valid one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import InvalidInputError, RecipeError
from ..suggest import did_you_mean
from .mergekit import convert_mergekit, is_mergekit_config
from .schema import MergeSpec, Recipe, Step
from .yamlio import Located, load_yaml_file, load_yaml_text


@dataclass
class LoadedRecipe:
    """A validated recipe plus where it came from."""

    recipe: Recipe
    file: str
    base_dir: Path
    located: Located
    text: str
    from_mergekit: bool = False

    def where(self, *path: Any) -> str:
        return self.located.where(tuple(path))

    def resolve_path(self, value: str) -> str:
        """Local paths are relative to the recipe's folder; hub refs pass through."""
        try:
            if _looks_local(value, self.base_dir):
                return str((self.base_dir / Path(value).expanduser()).resolve())
        except (RuntimeError, ValueError, OSError) as exc:  # ~nosuchuser/x, an embedded NUL, a loop of links
            raise RecipeError(f"{self.file}: path {value!r} cannot be used ({exc})") from None
        return value


def _looks_local(ref: str, base_dir: Path) -> bool:
    """Paths are local; ``org/name(@rev)`` is a hub id unless a folder of that name sits beside the recipe."""
    if ref.startswith("hf://"):
        return False
    if ref.startswith(("/", "./", "../", "~")) or ref in (".", ".."):
        return True
    return (base_dir / Path(ref).expanduser()).exists() or ref.count("/") != 1


def load_recipe(path: str | Path, *, output_path: str | None = None) -> LoadedRecipe:
    """Load and validate a surgeon recipe or a mergekit config file."""
    p = Path(path)
    located = load_yaml_file(p)
    text = p.read_text(encoding="utf-8")
    return _validate(located, text, p.parent.resolve(), output_path)


def load_recipe_text(text: str, file: str = "<recipe>", base_dir: str | Path = ".", output_path: str | None = None) -> LoadedRecipe:
    return _validate(load_yaml_text(text, file), text, Path(base_dir).resolve(), output_path)


def _validate(located: Located, text: str, base_dir: Path, output_path: str | None) -> LoadedRecipe:
    data = located.data
    from_mergekit = is_mergekit_config(data)
    if from_mergekit:
        try:
            data = convert_mergekit(data, located.file, output_path or "./merged")
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a shape the checks above did not foresee
            raise RecipeError(f"{located.file}: not a valid mergekit config ({type(exc).__name__}: {exc})") from None
        located = Located(data, located.file, {(): 1})
    if not isinstance(data, dict):
        raise RecipeError(f"{located.file}:1: a recipe must be a mapping with models, steps and output")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, located)) from None
    loaded = LoadedRecipe(recipe, located.file, base_dir, located, text, from_mergekit)
    check_references(loaded)
    check_methods(loaded)
    return loaded


# ---------------------------------------------------------------------------
def _format_errors(exc: ValidationError, located: Located) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = located.where(loc)
        key = ".".join(str(x) for x in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(Recipe, loc[:-1])
            hint = did_you_mean(str(loc[-1]), valid)
            expected = f"; expected one of: {', '.join(sorted(valid))}" if valid and not hint else ""
            lines.append(f"{where}: unknown key {key!r}{hint}{expected}")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing required key {key!r}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{where}: {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the schema object at ``loc`` (for suggestions)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                field = next((f for f in current.model_fields.values() if f.alias == part), None)
            current = _unwrap(field.annotation) if field else None
        else:
            current = None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """Optional[X] / list[X] / dict[str, X] -> X (the model class inside)."""
    while get_origin(tp) is not None:
        args = [a for a in get_args(tp) if a is not type(None)]
        if not args:
            return None
        tp = args[-1]
    return tp


# ---------------------------------------------------------------------------
def check_references(loaded: LoadedRecipe) -> None:
    """Ids unique; every reference names a model or an EARLIER step; no cycles."""
    r = loaded.recipe
    seen: dict[str, int] = {}
    for i, step in enumerate(r.steps):
        if step.id in r.models:
            raise RecipeError(f"{loaded.where('steps', i, 'id')}: step id {step.id!r} is also a model id")
        if step.id in seen:
            raise RecipeError(f"{loaded.where('steps', i, 'id')}: step id {step.id!r} is used twice")
        seen[step.id] = i
    known_later = set(seen)
    for i, step in enumerate(r.steps):
        for ref_path, ref in _reference_paths(step):
            if ref in r.models:
                continue
            if ref in seen and seen[ref] < i:
                continue
            where = loaded.where("steps", i, step.kind, *ref_path)
            if ref == step.id or (ref in known_later and seen[ref] >= i):
                raise RecipeError(
                    f"{where}: step {step.id!r} reads {ref!r}, which is "
                    + ("itself" if ref == step.id else "a later step")
                    + " (a cycle): a step can only read models and earlier steps"
                )
            valid = list(r.models) + [s.id for s in r.steps[:i]]
            raise RecipeError(f"{where}: {ref!r} is not a model or an earlier step{did_you_mean(ref, valid)}")
    final = r.final_step
    if final not in seen:
        raise RecipeError(f"{loaded.where('output', 'from')}: output.from {final!r} is not a step{did_you_mean(final, seen)}")


def _reference_paths(step: Step) -> list[tuple[tuple[Any, ...], str]]:
    s = step.spec
    out: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(s, MergeSpec):
        if s.base:
            out.append((("base",), s.base))
        out += [(("models", j, "model"), m.model) for j, m in enumerate(s.models)]
        if s.tokenizer_source and s.tokenizer_source not in ("base", "union"):
            out.append((("tokenizer_source",), s.tokenizer_source))
    elif step.kind == "transplant":
        out += [(("model",), s.model), (("donor",), s.donor)]  # type: ignore[union-attr]
    else:
        out.append((("pivot",), s.pivot))  # type: ignore[union-attr]
        out += [(("sources", j, "model"), src.model) for j, src in enumerate(s.sources)]  # type: ignore[union-attr]
    return out


def check_methods(loaded: LoadedRecipe) -> None:
    """Merge methods exist; parameters are declared, typed and in range."""
    from ..merge.registry import get_method, resolve_value

    for i, step in enumerate(loaded.recipe.steps):
        if not isinstance(step.spec, MergeSpec):
            continue
        spec = step.spec
        try:
            method = get_method(spec.method)
        except InvalidInputError as exc:
            raise RecipeError(f"{loaded.where('steps', i, 'merge', 'method')}: {exc}") from None
        if method.needs_base and not spec.base:
            raise RecipeError(f"{loaded.where('steps', i, 'merge')}: method {method.name!r} needs a 'base' model")
        n = len(spec.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = f"{method.min_models}" + ("" if method.max_models == method.min_models else
                                              f" to {method.max_models}" if method.max_models else " or more")
            raise RecipeError(f"{loaded.where('steps', i, 'merge', 'models')}: method {method.name!r} takes {want} models besides the base, got {n}")
        global_names = {p.name for p in method.global_params} | {a for p in method.global_params for a in p.aliases}
        model_names = {p.name for p in method.model_params} | {a for p in method.model_params for a in p.aliases}
        for key, value in spec.parameters.items():
            where = loaded.where("steps", i, "merge", "parameters", key)
            if key not in global_names:
                if key in model_names:
                    # mergekit allows per-model parameters at step level as defaults
                    p = method.param(key)
                else:
                    raise RecipeError(
                        f"{where}: method {method.name!r} has no parameter {key!r}"
                        f"{did_you_mean(key, global_names | model_names)}; parameters: {', '.join(sorted(global_names | model_names)) or 'none'}"
                    )
            _check_param_value(method, key, value, where)
        for j, entry in enumerate(spec.models):
            for key, value in entry.params.items():
                where = loaded.where("steps", i, "merge", "models", j, key)
                if key not in model_names:
                    raise RecipeError(
                        f"{where}: method {method.name!r} has no per-model parameter {key!r}"
                        f"{did_you_mean(key, model_names | global_names)}; per-model parameters: {', '.join(sorted(model_names)) or 'none'}"
                    )
                _check_param_value(method, key, value, where)


def _check_param_value(method: Any, key: str, value: Any, where: str) -> None:
    """Check every concrete value a parameter can take (scalars, gradient points, rules)."""
    param = method.param(key)
    for v in _leaf_values(value, where):
        if isinstance(v, float) and not math.isfinite(v):
            raise RecipeError(f"{where}: parameter {key!r} must be a finite number, got {v}")
        try:
            param.check(v, where)
        except InvalidInputError as exc:
            raise RecipeError(str(exc)) from None


def _leaf_values(value: Any, where: str) -> list[Any]:
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{where}: empty list")
        out: list[Any] = []
        for v in value:
            if isinstance(v, dict):
                keys = set(v) - {"value"}
                if "value" not in v or len(keys) > 1 or keys - {"filter", "glob", "regex"}:
                    raise RecipeError(f"{where}: a rule must be {{filter|glob|regex: pattern, value: v}}, got {v!r}")
                out += _leaf_values(v["value"], where)
            else:
                out.append(v)
        return out
    return [value]
