"""Import of mergekit YAML configs (mergekit-yaml and mergekit-multi) as surgeon recipes.

A mergekit config becomes one ``merge`` step: ``merge_method``/``base_model``/
``models[].parameters``/``parameters``/``dtype``/``out_dtype``/
``tokenizer_source``/``tokenizer``/``chat_template`` map one-to-one, and
``slices:`` (layer surgery) becomes the step's ``slices``. Parameter values
(scalars, gradients, filter lists) keep mergekit's syntax and semantics. A file
of several YAML documents (mergekit-multi) becomes one recipe with a step per
document; a document's ``name`` is its step id and later documents may read
it as a model. surgeon's own methods (``merge_method: widen``) are accepted in
the same format.

Nothing is dropped silently. Keys mergekit itself ignores (a per-model
``weight`` under slerp, ``residual_weight``, ``int8_mask``, ...) are dropped
with a note that :func:`surgeon.recipe.load.load_recipe` prints even under
``-q``; keys surgeon cannot honour are refused with ``file:line``.

One deliberate difference: mergekit computes in the input dtype (bf16 for most
checkpoints); surgeon always computes in float32 and only stores in ``dtype``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError
from .yamlio import Located

# mergekit method name -> surgeon method name (identical where absent)
METHOD_ALIASES: dict[str, str] = {}

# mergekit 0.1.5's declared parameters per method: (shared, per-input). A key outside them
# is ignored by mergekit (its resolver only looks up declared names); per-input keys given
# on the base model are ignored too (NON_BASE scope). Source: MergeMethodSpec of each method.
_GTA_SHARED = {"int8_mask", "normalize", "rescale", "lambda"}
MERGEKIT_PARAMS: dict[str, tuple[set[str], set[str]]] = {
    "arcee_fusion": (set(), set()),
    "breadcrumbs": (_GTA_SHARED, {"weight", "density", "gamma"}),
    "breadcrumbs_ties": (_GTA_SHARED, {"weight", "density", "gamma"}),
    "dare_linear": (_GTA_SHARED, {"weight", "density"}),
    "dare_ties": (_GTA_SHARED, {"weight", "density"}),
    "della": (_GTA_SHARED, {"weight", "density", "epsilon"}),
    "della_linear": (_GTA_SHARED, {"weight", "density", "epsilon"}),
    "karcher": ({"max_iter", "tol"}, set()),
    "linear": ({"normalize"}, {"weight"}),
    "model_stock": ({"filter_wise"}, set()),
    "multislerp": ({"normalize_weights", "eps"}, {"weight"}),
    "nearswap": ({"t"}, set()),
    "nuslerp": ({"nuslerp_row_wise", "nuslerp_flatten"}, {"weight"}),
    "passthrough": (set(), {"scale"}),
    "ram": ({"epsilon"}, set()),
    "ramplus_tl": ({"r", "alpha", "epsilon"}, set()),
    "sce": ({"int8_mask", "select_topk"}, set()),
    "slerp": ({"t"}, set()),
    "task_arithmetic": (_GTA_SHARED, {"weight", "density"}),
    "ties": (_GTA_SHARED, {"weight", "density"}),
}
# mergekit methods whose base model is merged as an ordinary input (base policy IGNORED)
_BASE_IS_INPUT = {"linear", "passthrough", "karcher"}
# declared by mergekit but only about its own memory use: dropped with a note
_NO_EFFECT_PARAMS = {"int8_mask": "mergekit's int8 masks only save memory; surgeon's masks are bool already"}

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name", "seed")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32",
               "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _as_rules(value: Any) -> list[Any]:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return list(value)
    return [{"value": value}]


def layered(high: dict[str, Any], low: dict[str, Any]) -> dict[str, Any]:
    """Two parameter scopes as one: ``high``'s rules first, then ``low``'s (mergekit's fall-through).

    A scope whose rules match nothing for a tensor leaves the next scope's value
    in force; written as one rule list: ``high``'s rules, then ``low``'s (a bare
    value becomes a catch-all rule).
    """
    out = dict(low)
    for key, value in high.items():
        out[key] = _as_rules(value) + _as_rules(low[key]) if key in low else value
    return out


@dataclass
class Conversion:
    """A converted recipe, where each of its paths came from, and the notes to show the user."""

    data: dict[str, Any]
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Ids:
    """Model ids for paths (stable, readable, unique)."""

    def __init__(self, reserved: set[str] | None = None):
        self.by_id: dict[str, str] = {}
        self.reserved = reserved or set()

    def get(self, path: str) -> str:
        for ident, p in self.by_id.items():
            if p == path:
                return ident
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rstrip("/").split("/")[-1].split("@")[0]) or "model"
        if not re.match(r"^[A-Za-z_]", stem):
            stem = "m_" + stem
        ident, i = stem, 2
        while ident in self.by_id or ident in self.reserved:
            ident, i = f"{stem}_{i}", i + 1
        self.by_id[ident] = path
        return ident


class _Doc:
    """One mergekit document being converted into one merge step."""

    def __init__(self, data: dict[str, Any], file: str, lines: dict[tuple[Any, ...], int], step: int,
                 ids: _Ids, steps: dict[str, str], conv: Conversion):
        self.data, self.file, self.src_lines, self.step, self.ids, self.steps, self.conv = \
            data, file, lines, step, ids, steps, conv

    def where(self, *path: Any) -> str:
        p = tuple(path)
        while p and p not in self.src_lines:
            p = p[:-1]
        line = self.src_lines.get(p)
        return f"{self.file}:{line}" if line else self.file

    def fail(self, msg: str, *path: Any) -> RecipeError:
        return RecipeError(f"{self.where(*path)}: {msg}")

    def note(self, msg: str, *path: Any) -> None:
        self.conv.notes.append(f"{self.where(*path)}: {msg}")

    def mark(self, dst: tuple[Any, ...], *src: Any) -> None:
        line = self.src_lines.get(tuple(src))
        if line:
            self.conv.lines[("steps", self.step, "merge", *dst)] = line

    def ref(self, value: Any, *path: Any) -> str:
        """A model reference: an earlier document's name (its step) or a model path."""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"a model reference must be a path or hub id, got {value!r}", *path)
        if value in self.steps:
            return self.steps[value]
        if "+" in value and not value.startswith(("/", "./", "../")) and value.count("+") == 1:
            pass  # model+adapter: passed through as written (LoRA inputs are handled where models are opened)
        return self.ids.get(value)

    # -- parameters ----------------------------------------------------------
    def params(self, given: Any, method: str, *path: Any, per_model: bool, is_base: bool = False) -> dict[str, Any]:
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise self.fail(f"parameters must be a mapping, got {type(given).__name__}", *path)
        shared, per_input = MERGEKIT_PARAMS.get(method, (None, None))
        out: dict[str, Any] = {}
        for key, value in given.items():
            if key in _NO_EFFECT_PARAMS:
                self.note(f"{key!r}: no effect ({_NO_EFFECT_PARAMS[key]})", *path, key)
                continue
            if shared is not None and per_input is not None:
                declared = per_input if per_model else shared | per_input
                if key not in declared:
                    where = "per-model" if per_model else "step-level"
                    has = (f"it takes {', '.join(sorted(declared))}" if declared else
                           f"it takes no {where} parameters")
                    self.note(f"{where} parameter {key!r} is ignored by mergekit's {method} ({has}); "
                              "ignored here too", *path, key)
                    continue
                if is_base and method not in _BASE_IS_INPUT:
                    self.note(f"parameter {key!r} on the base model is ignored by mergekit's {method} (the base "
                              "is not merged as a task); ignored here too", *path, key)
                    continue
            out[key] = value
        return out

    # -- the document ----------------------------------------------------------
    def convert(self) -> dict[str, Any]:
        data = self.data
        unknown = [k for k in data if k not in TOP_KEYS]
        if unknown:
            raise self.fail(f"unknown mergekit key {unknown[0]!r}; mergekit keys: {', '.join(TOP_KEYS)}", unknown[0])
        method = data["merge_method"]
        if not isinstance(method, str):
            raise self.fail(f"merge_method must be a name, got {method!r}", "merge_method")
        for key, kind in (("models", list), ("slices", list), ("parameters", dict), ("tokenizer", dict),
                          ("modules", dict)):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise self.fail(f"mergekit {key!r} must be a {'list' if kind is list else 'mapping'}, "
                                f"got {type(data[key]).__name__}", key)
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise self.fail(f"'seed' must be an integer, got {seed!r}", "seed")
        body: dict[str, Any] = {"models": data.get("models"), "slices": data.get("slices"),
                                "parameters": data.get("parameters")}
        body_path: tuple[Any, ...] = ()
        if data.get("modules") is not None:
            modules = data["modules"]
            if len(modules) != 1:
                raise self.fail(f"modules: surgeon merges one module (the model's layer stack) per step; this config "
                                f"has {len(modules)} ({', '.join(map(str, modules))}); write one document per module "
                                "or use 'slices'", "modules")
            (mname, module), = modules.items()
            if not isinstance(module, dict):
                raise self.fail("a module must be a mapping with slices or models", "modules", mname)
            extra = sorted(set(module) - {"slices", "models", "parameters"})
            if extra:
                raise self.fail(f"unknown module key {extra[0]!r} (slices, models, parameters)", "modules", mname)
            body_path = ("modules", mname)
            body = {"models": module.get("models"), "slices": module.get("slices"),
                    "parameters": layered(dict(module.get("parameters") or {}), dict(data.get("parameters") or {}))}
            if data.get("models") or data.get("slices"):
                raise self.fail("give 'modules' or top-level models/slices, not both", "modules")
        given = [k for k in ("models", "slices") if body.get(k)]
        if len(given) != 1:
            raise self.fail("a mergekit config needs exactly one of 'models', 'slices' or 'modules'", *body_path)
        base = data.get("base_model")
        base_id = self.ref(base, "base_model") if base else None
        step: dict[str, Any] = {"method": METHOD_ALIASES.get(method, method)}
        self.mark(("method",), "merge_method")
        if base_id:
            step["base"] = base_id
            self.mark(("base",), "base_model")
        if body["models"]:
            step["models"] = self._models(body["models"], method, base_id, body_path)
        else:
            step["slices"] = self._slices(body["slices"], method, base_id, body_path)
        params = self.params(body.get("parameters"), method, *body_path, "parameters", per_model=False)
        if params:
            step["parameters"] = params
            for key in params:
                self.mark(("parameters", key), *body_path, "parameters", key)
        dtype = data.get("out_dtype") or data.get("dtype")
        if dtype:
            if str(dtype) not in DTYPE_NAMES:
                key = "out_dtype" if data.get("out_dtype") else "dtype"
                raise self.fail(f"{key} {dtype!r} is not one of float32, bfloat16, float16", key)
            step["dtype"] = DTYPE_NAMES[str(dtype)]
            self.mark(("dtype",), "out_dtype" if data.get("out_dtype") else "dtype")
        self._tokenizer(step)
        return step

    def _models(self, models: list[Any], method: str, base_id: str | None, path: tuple[Any, ...]) -> list[dict[str, Any]]:
        entries = []
        for i, m in enumerate(models):
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict) or "model" not in m:
                raise self.fail(f"models[{i}] must have a 'model' key", *path, "models", i)
            extra = sorted(set(m) - {"model", "parameters"})
            if extra:
                raise self.fail(f"models[{i}]: unknown key {extra[0]!r} (model, parameters)", *path, "models", i, extra[0])
            mid = self.ref(m["model"], *path, "models", i, "model")
            is_base = mid == base_id
            params = self.params(m.get("parameters"), method, *path, "models", i, "parameters", per_model=True,
                                 is_base=is_base)
            if is_base and method not in _BASE_IS_INPUT:
                continue  # mergekit lists the base among the models; surgeon keeps it apart
            j = len(entries)
            entries.append({"model": mid, **params})
            self.mark(("models", j), *path, "models", i)
            for key in params:
                self.mark(("models", j, key), *path, "models", i, "parameters", key)
        if base_id and method in _BASE_IS_INPUT and all(e["model"] != base_id for e in entries):
            # mergekit adds a base that is missing from the models as one more input
            entries.append({"model": base_id})
            self.note(f"base_model is merged as one more input by mergekit's {method} (it is not in 'models'); "
                      "so here too", "base_model")
        return entries

    def _slices(self, slices: list[Any], method: str, base_id: str | None, path: tuple[Any, ...]) -> list[dict[str, Any]]:
        out = []
        for k, sl in enumerate(slices):
            here = (*path, "slices", k)
            if not isinstance(sl, dict) or "sources" not in sl:
                raise self.fail(f"slices[{k}] must be a mapping with 'sources'", *here)
            extra = sorted(set(sl) - {"sources", "base_model", "parameters", "residual_weight", "merge_method"})
            if extra:
                raise self.fail(f"slices[{k}]: unknown key {extra[0]!r} (sources, base_model, parameters)",
                                *here, extra[0])
            if sl.get("residual_weight") is not None:
                self.note("residual_weight is ignored by mergekit 0.1.5 (declared, never read); ignored here too",
                          *here, "residual_weight")
            slice_method = sl.get("merge_method") or method
            if sl.get("merge_method"):
                self.note(f"merge_method in a slice: mergekit 0.1.5 ignores it (every slice uses {method!r}); "
                          f"surgeon merges this slice with {slice_method!r}", *here, "merge_method")
            entry: dict[str, Any] = {"sources": []}
            if sl.get("merge_method"):
                entry["method"] = METHOD_ALIASES.get(slice_method, slice_method)
            if sl.get("base_model"):
                entry["base"] = self.ref(sl["base_model"], *here, "base_model")
            slice_base = entry.get("base") or base_id
            sources = sl["sources"]
            if not isinstance(sources, list) or not sources:
                raise self.fail("'sources' must be a non-empty list", *here, "sources")
            for j, src in enumerate(sources):
                at = (*here, "sources", j)
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise self.fail("a slice source needs 'model' and 'layer_range'", *at)
                extra = sorted(set(src) - {"model", "layer_range", "parameters"})
                if extra:
                    raise self.fail(f"unknown key {extra[0]!r} (model, layer_range, parameters)", *at, extra[0])
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in lr)):
                    raise self.fail(f"layer_range must be [start, stop] (two integers), got {lr!r}", *at, "layer_range")
                mid = self.ref(src["model"], *at, "model")
                params = self.params(src.get("parameters"), slice_method, *at, "parameters", per_model=True,
                                     is_base=mid == slice_base and len(sources) > 1)
                entry["sources"].append({"model": mid, "layer_range": list(lr), **params})
                self.mark(("slices", k, "sources", j), *at)
                for key in params:
                    self.mark(("slices", k, "sources", j, key), *at, "parameters", key)
            params = self.params(sl.get("parameters"), slice_method, *here, "parameters", per_model=False)
            if params:
                entry["parameters"] = params
            self.mark(("slices", k), *here)
            out.append(entry)
        return out

    def _tokenizer(self, step: dict[str, Any]) -> None:
        from .schema import MergeSpec

        data = self.data
        fields = MergeSpec.model_fields
        tok_source = data.get("tokenizer_source")
        if tok_source is not None:
            step["tokenizer_source"] = tok_source if tok_source in ("base", "union") else \
                self.ref(tok_source, "tokenizer_source")
            self.mark(("tokenizer_source",), "tokenizer_source")
        if data.get("tokenizer") is not None:
            if "tokenizer" not in fields:
                raise self.fail("the 'tokenizer' section is not supported by this surgeon version", "tokenizer")
            section = dict(data["tokenizer"])
            src = section.get("source")
            if isinstance(src, str) and src not in ("base", "union"):
                section["source"] = self.ref(src, "tokenizer", "source")
            tokens = section.get("tokens")
            if isinstance(tokens, dict):
                fixed = {}
                for tok, spec in tokens.items():
                    spec = dict(spec) if isinstance(spec, dict) else spec
                    if isinstance(spec, dict):
                        s = spec.get("source")
                        if isinstance(s, str):
                            spec["source"] = self.ref(s, "tokenizer", "tokens", tok, "source")
                        elif isinstance(s, dict) and isinstance(s.get("model"), str):
                            spec["source"] = {**s, "model": self.ref(s["model"], "tokenizer", "tokens", tok, "source")}
                    fixed[tok] = spec
                section["tokens"] = fixed
            step["tokenizer"] = section
            self.mark(("tokenizer",), "tokenizer")
        if data.get("chat_template") is not None:
            if "chat_template" not in fields:
                raise self.fail("chat_template is not supported by this surgeon version", "chat_template")
            step["chat_template"] = data["chat_template"]
            self.mark(("chat_template",), "chat_template")


def convert_documents(docs: list[tuple[dict[str, Any], dict[tuple[Any, ...], int]]], file: str,
                      output_path: str = "./merged") -> Conversion:
    """Convert one or more mergekit documents (``(data, lines)`` each) into one recipe.

    Several documents are mergekit-multi: each becomes a step; a document's
    ``name`` is its step id and later documents may use it as a model; the
    output is the one document without a name (or the last one).
    """
    conv = Conversion({})
    names: dict[str, str] = {}
    taken: set[str] = set()
    for d, (data, lines) in enumerate(docs):
        if not is_mergekit_config(data):
            raise RecipeError(f"{file}:{min(lines.values(), default=1)}: document {d + 1} is not a mergekit config "
                              "(no merge_method)")
        name = data.get("name")
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise RecipeError(f"{file}:{lines.get(('name',), 1)}: 'name' must be a text, got {name!r}")
            if name in names:
                raise RecipeError(f"{file}:{lines.get(('name',), 1)}: name {name!r} is used by two documents")
    unnamed = [d for d, (data, _) in enumerate(docs) if data.get("name") is None]
    if len(docs) > 1 and len(unnamed) > 1:
        data, lines = docs[unnamed[1]]
        raise RecipeError(f"{file}:{min(lines.values(), default=1)}: documents {unnamed[0] + 1} and {unnamed[1] + 1} "
                          "both have no 'name'; in a multi-document config only the final merge may be unnamed")
    step_ids = [_step_id(str(data["name"]) if data.get("name") is not None else "merge", taken) for data, _ in docs]
    ids = _Ids(reserved=set(step_ids))
    steps = []
    for d, (data, lines) in enumerate(docs):
        name = data.get("name")
        step_id = step_ids[d]
        doc = _Doc(data, file, lines, d, ids, names, conv)
        steps.append({"id": step_id, "merge": doc.convert()})
        conv.lines[("steps", d)] = min(lines.values(), default=1)
        conv.lines[("steps", d, "merge")] = min(lines.values(), default=1)
        if name is not None:
            names[str(name)] = step_id
    final = steps[unnamed[0]]["id"] if unnamed else steps[-1]["id"]
    first = docs[0][0]
    conv.data = {
        "name": str(first.get("name", "mergekit-config")) if len(docs) == 1 else "mergekit-multi",
        "seed": int(first.get("seed", 0)),
        "models": dict(ids.by_id),
        "steps": steps,
        "output": {"from": final, "path": output_path},
    }
    if not ids.by_id:
        raise RecipeError(f"{file}: the config names no models")
    return conv


def _step_id(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "merge"
    if not re.match(r"^[A-Za-z_]", stem):
        stem = "s_" + stem
    ident, i = stem, 2
    while ident in taken:
        ident, i = f"{stem}_{i}", i + 1
    taken.add(ident)
    return ident


def convert_mergekit(data: dict[str, Any], file: str, output_path: str = "./merged") -> dict[str, Any]:
    """A surgeon recipe dict equivalent to the (single-document) mergekit config ``data``."""
    return convert_documents([(data, {(): 1})], file, output_path).data


@dataclass
class Documents(Located):
    """Several YAML documents of one file (a mergekit-multi config)."""

    docs: list[Located] = field(default_factory=list)


def one_or_documents(docs: list[Located]) -> Located:
    """The only document of a file, or all of them as :class:`Documents`."""
    if len(docs) == 1:
        return docs[0]
    return Documents(None, docs[0].file, {(): 1}, docs)


def convert_located(located: Located, output_path: str) -> tuple[dict[str, Any], Located, list[str]]:
    """A mergekit config (one document or several) as recipe data, its line map, and the notes to print."""
    docs = located.docs if isinstance(located, Documents) else [located]
    for d in docs:
        if not is_mergekit_config(d.data):
            line = min(d.lines.values(), default=1)
            raise RecipeError(f"{d.file}:{line}: this file has {len(docs)} YAML documents; a surgeon recipe is one "
                              "document, and several are read as a mergekit-multi config, where each document "
                              "needs a merge_method (this one has none)")
    try:
        conv = convert_documents([(d.data, d.lines) for d in docs], located.file, output_path)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a shape the checks did not foresee
        raise RecipeError(f"{located.file}: not a valid mergekit config ({type(exc).__name__}: {exc})") from None
    return conv.data, Located(conv.data, located.file, {(): 1, **conv.lines}), conv.notes
