"""Loading a recipe file: YAML -> schema -> references, with file:line errors.

Every error is a :class:`~surgeon.errors.RecipeError` whose message starts
with ``file:line``, names the key, says what was expected and, for misspelt
keys or method names, suggests the closest valid one.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import InvalidInputError, RecipeError
from ..suggest import closest, did_you_mean
from .mergekit import Documents, convert_located, is_mergekit_config, one_or_documents
from .schema import MergeSpec, Recipe, Step
from .yamlio import Located, load_yaml_documents, load_yaml_file_documents


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


    def local_typo(self, ref: str) -> str | None:
        """For a reference taken as a hub id (``org/name``) whose ``org`` is a local folder: the
        message for a misspelt local path, e.g. ``no local folder 'zoo/bpe-pythn' (did you mean
        'zoo/bpe-python'?)``; None when the reference does not look like a local path."""
        if ref.startswith("hf://") or ref.count("/") != 1:
            return None
        rel = Path(ref.partition("@")[0])
        parent = self.base_dir / rel.parent
        if (self.base_dir / rel).exists() or not parent.is_dir():
            return None
        try:
            siblings = [c.name for c in parent.iterdir() if c.is_dir()]
        except OSError:
            siblings = []
        best = closest(rel.name, siblings)
        hint = f" (did you mean {str(rel.parent / best)!r}?)" if best else ""
        return f"no local folder {ref!r}{hint}"


@dataclass
class FlagLocated(Located):
    """Positions of a recipe built from command-line flags: errors name the flag, not a line."""

    labels: dict[tuple[Any, ...], str] = field(default_factory=dict)

    def where(self, path: tuple[Any, ...]) -> str:
        p = tuple(path)
        while True:
            if p in self.labels:
                return self.labels[p]
            if not p:
                return self.file
            p = p[:-1]


def _mergekit_base_dir(recipe: Recipe, config_dir: Path) -> Path:
    """Where a mergekit config's relative model paths start: the working directory, as in
    mergekit, when every relative path that is not a hub id exists there; else the config's folder."""
    cwd = Path.cwd()
    rel = [v.split("+")[0] for v in recipe.models.values()
           if not v.startswith(("/", "~", "hf://")) and (v.startswith(".") or v.count("/") != 1)]
    if rel and all((cwd / v).exists() for v in rel) and not all((config_dir / v).exists() for v in rel):
        return cwd
    return config_dir


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
    located = one_or_documents(load_yaml_file_documents(p))  # several: a mergekit-multi config
    text = p.read_text(encoding="utf-8")
    return _validate(located, text, p.parent.resolve(), output_path)


def load_recipe_text(text: str, file: str = "<recipe>", base_dir: str | Path = ".", output_path: str | None = None,
                     labels: dict[tuple[Any, ...], str] | None = None) -> LoadedRecipe:
    """Load a recipe from text. ``labels`` (recipes built from command-line flags) map recipe paths
    such as ``("steps", 0, "merge", "method")`` to what the user typed; errors then start with
    that label (``file`` for anything unlabelled) instead of a line the user never wrote."""
    located = one_or_documents(load_yaml_documents(text, file))
    if labels is not None:
        located = FlagLocated(located.data, file, located.lines, labels)
    return _validate(located, text, Path(base_dir).resolve(), output_path)


def _validate(located: Located, text: str, base_dir: Path, output_path: str | None) -> LoadedRecipe:
    data = located.data
    from_mergekit = is_mergekit_config(data) or isinstance(located, Documents)
    if from_mergekit:
        data, located, notes = convert_located(located, output_path or "./merged")
        for note in notes:  # keys mergekit itself ignores: said even under -q (nothing is silently ignored)
            print(f"note: {note}", file=sys.stderr)
    if not isinstance(data, dict):
        raise RecipeError(f"{located.file}:1: a recipe must be a mapping with models, steps and output")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(report_problems(_format_errors(exc, located).splitlines())) from None
    if from_mergekit:
        base_dir = _mergekit_base_dir(recipe, base_dir)
    loaded = LoadedRecipe(recipe, located.file, base_dir, located, text, from_mergekit)
    problems: list[str] = []
    check_references(loaded, problems)
    check_methods(loaded, problems)
    if problems:
        raise RecipeError(report_problems(problems))
    return loaded


MAX_PROBLEMS = 20  # like a compiler: enough to fix a recipe in one pass, never a wall of text

_LINE = re.compile(r"^[^\n]*?:(\d+):")


def report_problems(problems: list[str], limit: int = MAX_PROBLEMS) -> str:
    """Every problem once, in file order (by the ``file:line`` each starts with), at most ``limit``."""
    unique = list(dict.fromkeys(problems))

    def line(msg: str) -> int:
        m = _LINE.match(msg)
        return int(m.group(1)) if m else 0

    ordered = sorted(unique, key=line)  # stable: problems on one line keep their order
    shown = ordered[:limit]
    if len(ordered) > limit:
        shown.append(f"... and {len(ordered) - limit} more problem{'s' if len(ordered) - limit > 1 else ''}")
    elif len(ordered) > 1:
        shown.append(f"({len(ordered)} problems)")
    return "\n".join(shown)


# ---------------------------------------------------------------------------
def _format_errors(exc: ValidationError, located: Located) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = located.where(loc)
        key = ".".join(_shown_key(x) for x in loc) or "(top level)"
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # models / pydantic dataclasses
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


def _shown_key(part: Any) -> str:
    """A key of an error's path as printed: as written, or quoted with escapes when it holds
    characters that do not print (a ``"\\r"`` key once split its error line in two)."""
    text = str(part)
    return text if text.isprintable() else repr(text)


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
    if isinstance(current, type) and hasattr(current, "__dataclass_fields__"):  # surgeon.recipe.options.FuseOptions
        return list(current.__dataclass_fields__)
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
def check_references(loaded: LoadedRecipe, problems: list[str] | None = None) -> None:
    """Ids unique; every reference names a model or an EARLIER step; no cycles.

    With ``problems`` every problem is appended there; without, the first one is raised.
    """
    collect: list[str] = [] if problems is None else problems
    r = loaded.recipe
    seen: dict[str, int] = {}
    for i, step in enumerate(r.steps):
        if step.id in r.models:
            collect.append(f"{loaded.where('steps', i, 'id')}: step id {step.id!r} is also a model id")
        if step.id in seen:
            collect.append(f"{loaded.where('steps', i, 'id')}: step id {step.id!r} is used twice")
            continue
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
                collect.append(
                    f"{where}: step {step.id!r} reads {ref!r}, which is "
                    + ("itself" if ref == step.id else "a later step")
                    + " (a cycle): a step can only read models and earlier steps"
                )
                continue
            valid = list(r.models) + [s.id for s in r.steps[:i]]
            collect.append(f"{where}: {ref!r} is not a model or an earlier step{did_you_mean(ref, valid)}")
    final = r.final_step
    if final not in seen:
        collect.append(f"{loaded.where('output', 'from')}: output.from {final!r} is not a step{did_you_mean(final, seen)}")
    if problems is None and collect:
        raise RecipeError(collect[0])


def _reference_paths(step: Step) -> list[tuple[tuple[Any, ...], str]]:
    s = step.spec
    out: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(s, MergeSpec):
        if s.base:
            out.append((("base",), s.base))
        out += [(("models", j, "model"), m.model) for j, m in enumerate(s.models)]
        for k, sl in enumerate(s.slices or []):
            if sl.base:
                out.append((("slices", k, "base"), sl.base))
            out += [(("slices", k, "sources", j, "model"), src.model) for j, src in enumerate(sl.sources)]
        if s.tokenizer_source and s.tokenizer_source not in ("base", "union"):
            out.append((("tokenizer_source",), s.tokenizer_source))
        if s.tokenizer is not None:  # the tokenizer: section names models too
            if s.tokenizer.source not in ("base", "union"):
                out.append((("tokenizer", "source"), s.tokenizer.source))
            for tok, t in s.tokenizer.tokens.items():
                src = t.source if isinstance(t.source, str) else (t.source.model if t.source is not None else None)
                if src is not None:
                    out.append((("tokenizer", "tokens", tok, "source"), src))
    elif step.kind == "transplant":
        out += [(("model",), s.model), (("donor",), s.donor)]  # type: ignore[union-attr]
    else:
        out.append((("pivot",), s.pivot))  # type: ignore[union-attr]
        out += [(("sources", j, "model"), src.model) for j, src in enumerate(s.sources)]  # type: ignore[union-attr]
    return out


def check_methods(loaded: LoadedRecipe, problems: list[str] | None = None) -> None:
    """Merge methods exist; parameters are declared, typed and in range.

    With ``problems`` every problem is appended there; without, the first one is raised.
    """
    from ..merge import get_method

    collect: list[str] = [] if problems is None else problems
    for i, step in enumerate(loaded.recipe.steps):
        if not isinstance(step.spec, MergeSpec):
            continue
        spec = step.spec
        if spec.slices:
            _check_slices(loaded, i, spec)
            continue
        try:
            method = get_method(spec.method)
        except InvalidInputError as exc:
            collect.append(f"{loaded.where('steps', i, 'merge', 'method')}: {exc}")
            continue
        if method.needs_base and not spec.base:
            collect.append(f"{loaded.where('steps', i, 'merge')}: method {method.name!r} needs a 'base' model")
        n = len(spec.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = f"{method.min_models}" + ("" if method.max_models == method.min_models else
                                              f" to {method.max_models}" if method.max_models else " or more")
            plural = "model" if want == "1" else "models"
            collect.append(f"{loaded.where('steps', i, 'merge', 'models')}: method {method.name!r} takes {want} "
                           f"{plural} besides the base, got {n}")
        global_names = {p.name for p in method.global_params} | {a for p in method.global_params for a in p.aliases}
        model_names = {p.name for p in method.model_params} | {a for p in method.model_params for a in p.aliases}
        for key, value in spec.parameters.items():
            where = loaded.where("steps", i, "merge", "parameters", key)
            if key not in global_names and key not in model_names:  # per-model names are step-level defaults
                collect.append(
                    f"{where}: method {method.name!r} has no parameter {key!r}"
                    f"{did_you_mean(key, global_names | model_names)}; parameters: {', '.join(sorted(global_names | model_names)) or 'none'}"
                )
                continue
            _collect(collect, _check_param_value, method, key, value, where)
        for j, entry in enumerate(spec.models):
            for key, value in entry.params.items():
                where = loaded.where("steps", i, "merge", "models", j, key)
                if key not in model_names:
                    collect.append(
                        f"{where}: method {method.name!r} has no per-model parameter {key!r}"
                        f"{did_you_mean(key, model_names | global_names)}; per-model parameters: {', '.join(sorted(model_names)) or 'none'}"
                    )
                    continue
                _collect(collect, _check_param_value, method, key, value, where)
    if problems is None and collect:
        raise RecipeError(collect[0])


def _collect(problems: list[str], check: Any, *args: Any) -> None:
    try:
        check(*args)
    except InvalidInputError as exc:
        problems.append(str(exc))


def _check_slices(loaded: LoadedRecipe, i: int, spec: MergeSpec) -> None:
    """A sliced merge: each slice's method exists, takes that many sources, knows every parameter given."""
    from ..merge.registry import get_method

    step = ("steps", i, "merge")
    for k, sl in enumerate(spec.slices or []):
        name = sl.method or spec.method
        if name == "passthrough":
            if len(sl.sources) != 1:
                raise RecipeError(f"{loaded.where(*step, 'slices', k, 'sources')}: passthrough takes exactly "
                                  f"one source per slice, got {len(sl.sources)}")
            for where, keys in [((*step, "parameters"), spec.parameters), ((*step, "slices", k, "parameters"),
                                                                           sl.parameters),
                                ((*step, "slices", k, "sources", 0), sl.sources[0].params)]:
                extra = sorted(set(keys) - {"scale"})
                if extra:
                    raise RecipeError(f"{loaded.where(*where, extra[0])}: passthrough takes only 'scale', got {extra}")
            continue
        try:
            method = get_method(name)
        except InvalidInputError as exc:
            key = (*step, "slices", k, "method") if sl.method else (*step, "method")
            raise RecipeError(f"{loaded.where(*key)}: {exc}") from None
        base = sl.base or spec.base
        in_sources = any(src.model == base for src in sl.sources)
        n = len(sl.sources) - (1 if in_sources and method.needs_base else 0)
        if method.needs_base and not in_sources:
            raise RecipeError(f"{loaded.where(*step, 'slices', k, 'sources')}: method {method.name!r} needs its base "
                              f"({base!r}) among each slice's sources" if base else
                              f"{loaded.where(*step)}: method {method.name!r} needs a 'base' model")
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            raise RecipeError(f"{loaded.where(*step, 'slices', k, 'sources')}: method {method.name!r} cannot merge "
                              f"{n} source(s) besides the base in one slice")
        global_names = {p.name for p in method.global_params} | {a for p in method.global_params for a in p.aliases}
        model_names = {p.name for p in method.model_params} | {a for p in method.model_params for a in p.aliases}
        scopes = [((*step, "parameters"), spec.parameters, global_names | model_names),
                  ((*step, "slices", k, "parameters"), sl.parameters, global_names | model_names)]
        scopes += [((*step, "slices", k, "sources", j), src.params, model_names) for j, src in enumerate(sl.sources)]
        for path, params, names in scopes:
            for key, value in params.items():
                where = loaded.where(*path, key)
                if key not in names:
                    raise RecipeError(f"{where}: method {method.name!r} has no parameter {key!r}"
                                      f"{did_you_mean(key, names)}; parameters: {', '.join(sorted(names)) or 'none'}")
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
