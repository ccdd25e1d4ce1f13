"""mergekit's tokenizer keys (``tokenizer_source``, ``tokenizer:``, ``chat_template``) as merge-step keys.

Model paths become recipe model ids (through ``model_id``, the converter's
path -> id function); everything else keeps mergekit's shape, which
:class:`surgeon.recipe.schema.TokenizerSpec` validates. See docs/merging.md
("Tokenizers", "Chat templates").
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import RecipeError

_SECTION_KEYS = {"source", "tokens", "pad_to_multiple_of"}
_TOKEN_KEYS = {"source", "force"}
_SOURCE_KEYS = {"kind", "model", "token", "token_id"}


def tokenizer_keys(data: dict[str, Any], model_id: Callable[[str], str], file: str) -> dict[str, Any]:
    """The merge-step keys for ``data``'s tokenizer settings (empty when it has none)."""
    out: dict[str, Any] = {}
    ts, sec = data.get("tokenizer_source"), data.get("tokenizer")
    if ts is not None and sec is not None:
        raise RecipeError(f"{file}: give tokenizer_source or a tokenizer section, not both (mergekit refuses it too)")
    if ts is not None:
        out["tokenizer_source"] = _source(ts, model_id, file, "tokenizer_source")
    if sec is not None:
        if not isinstance(sec, dict):
            raise RecipeError(f"{file}: mergekit 'tokenizer' must be a mapping, got {type(sec).__name__}")
        unknown = sorted(set(sec) - _SECTION_KEYS)
        if unknown:
            raise RecipeError(f"{file}: tokenizer: unknown key(s) {unknown}; known: {sorted(_SECTION_KEYS)}")
        spec: dict[str, Any] = {"source": _source(sec.get("source", "union"), model_id, file, "tokenizer.source")}
        if sec.get("pad_to_multiple_of") is not None:
            spec["pad_to_multiple_of"] = sec["pad_to_multiple_of"]
        tokens = sec.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, dict):
                raise RecipeError(f"{file}: tokenizer.tokens must be a mapping of token -> settings")
            spec["tokens"] = {str(t): _token(str(t), cfg, model_id, file) for t, cfg in tokens.items()}
        out["tokenizer"] = spec
    if data.get("chat_template") is not None:
        if not isinstance(data["chat_template"], str):
            raise RecipeError(f"{file}: chat_template must be a string (a name, 'auto' or a Jinja template)")
        out["chat_template"] = data["chat_template"]
    return out


def _source(value: Any, model_id: Callable[[str], str], file: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{file}: {key} must be 'base', 'union' or a model, got {value!r}")
    return value if value in ("base", "union") else model_id(value)


def _token(token: str, cfg: Any, model_id: Callable[[str], str], file: str) -> dict[str, Any]:
    where = f"{file}: tokenizer.tokens[{token!r}]"
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where} must be a mapping with source and/or force")
    unknown = sorted(set(cfg) - _TOKEN_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(_TOKEN_KEYS)}")
    out: dict[str, Any] = {}
    if "force" in cfg:
        out["force"] = cfg["force"]
    src = cfg.get("source")
    if isinstance(src, str):
        out["source"] = model_id(src)
    elif isinstance(src, dict):
        unknown = sorted(set(src) - _SOURCE_KEYS)
        if unknown:
            raise RecipeError(f"{where}.source: unknown key(s) {unknown}; known: {sorted(_SOURCE_KEYS)}")
        s = dict(src)
        if isinstance(s.get("model"), str):
            s["model"] = model_id(s["model"])
        out["source"] = s
    elif src is not None:
        raise RecipeError(f"{where}.source must be a model or a mapping with kind, got {src!r}")
    return out
