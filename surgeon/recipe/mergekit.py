"""Import of mergekit YAML configs as one-step surgeon recipes.

mergekit's ``merge_method``/``base_model``/``models[].parameters``/
``parameters``/``dtype``/``out_dtype``/``tokenizer_source`` map one-to-one onto
a single ``merge`` step. Parameter values (scalars, gradients, filter lists)
keep mergekit's syntax, which surgeon's resolver understands. surgeon's own
methods (``merge_method: widen``) are accepted in the same format.

One deliberate difference: mergekit computes in the input dtype (bf16 for most
checkpoints); surgeon always computes in float32 and only stores in ``dtype``.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import RecipeError
from .mergekit_tokenizer import tokenizer_keys

# mergekit method name -> surgeon method name (identical where absent)
METHOD_ALIASES = {
    "passthrough": "passthrough",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della",
    "della_linear": "della_linear",
    "nuslerp": "nuslerp",
}
_KNOWN_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
              "tokenizer", "chat_template", "slices", "name", "seed"}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _model_id(path: str, taken: dict[str, str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rstrip("/").split("/")[-1].split("@")[0]) or "model"
    if not re.match(r"^[A-Za-z_]", stem):
        stem = "m_" + stem
    ident, i = stem, 2
    while ident in taken and taken[ident] != path:
        ident, i = f"{stem}_{i}", i + 1
    taken[ident] = path
    return ident


def convert_mergekit(data: dict[str, Any], file: str, output_path: str = "./merged") -> dict[str, Any]:
    """A surgeon recipe dict equivalent to the mergekit config ``data``."""
    unknown = sorted(set(data) - _KNOWN_TOP)
    if unknown:
        raise RecipeError(f"{file}: unknown mergekit key(s) {unknown}")
    if "slices" in data:
        raise RecipeError(f"{file}: mergekit 'slices' (layer stacking) are not supported; use 'models'")
    for key, kind in (("models", list), ("parameters", dict), ("tokenizer", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise RecipeError(f"{file}: mergekit {key!r} must be a {'list' if kind is list else 'mapping'}, "
                              f"got {type(data[key]).__name__}")
    if not isinstance(data.get("seed", 0), int) or isinstance(data.get("seed", 0), bool):
        raise RecipeError(f"{file}: mergekit 'seed' must be an integer, got {data['seed']!r}")
    method = str(data["merge_method"])
    ids: dict[str, str] = {}
    base = data.get("base_model")
    base_id = _model_id(str(base), ids) if base else None
    entries = []
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise RecipeError(f"{file}: models[{i}] must have a 'model' key")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"{file}: models[{i}]: unknown key(s) {extra}")
        if m.get("parameters") is not None and not isinstance(m["parameters"], dict):
            raise RecipeError(f"{file}: models[{i}].parameters must be a mapping")
        mid = _model_id(str(m["model"]), ids)
        if mid == base_id and method != "linear":
            continue  # mergekit lists the base among the models; surgeon keeps it apart
        entry = {"model": mid, **(m.get("parameters") or {})}
        entries.append(entry)
    step: dict[str, Any] = {"method": METHOD_ALIASES.get(method, method), "models": entries}
    if base_id:
        step["base"] = base_id
    if data.get("parameters"):
        # int8_mask only saves memory inside mergekit; surgeon's masks are bool already
        step["parameters"] = {k: v for k, v in dict(data["parameters"]).items() if k != "int8_mask"}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        step["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}.get(
            str(dtype), str(dtype)
        )
    step.update(tokenizer_keys(data, lambda path: _model_id(str(path), ids), file))
    return {
        "name": str(data.get("name", "mergekit-config")),
        "seed": int(data.get("seed", 0)),
        "models": {k: v for k, v in ids.items()},
        "steps": [{"id": "merge", "merge": step}],
        "output": {"from": "merge", "path": output_path},
    }
