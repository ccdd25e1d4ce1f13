"""The one way surgeon calls transformers' ``from_pretrained``: never with remote code.

A model folder (or hub repository) can ship ``modeling_*.py`` / ``tokenization_*.py``
and point at them from ``config.json`` or ``tokenizer_config.json`` through an
``auto_map``. Left at its default, transformers then asks on the terminal
whether to run that code (and prints the prompt twice without one). surgeon
never runs it: every loader here passes ``trust_remote_code=False`` explicitly,
and a folder whose ``auto_map`` would be needed (the model type or tokenizer
class is not one transformers knows) is refused up front with one line naming
the folder and the ``auto_map`` found. A folder whose model type transformers
implements itself loads with transformers' own classes; its code is not run.
See docs/reliability.md (Safety).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

#: files whose ``auto_map`` can make transformers import code from the folder
_MAP_FILES = ("config.json", "tokenizer_config.json")


class RemoteCodeError(InvalidInputError):
    """A model folder needs its own Python code to load; surgeon never runs it."""


def _json(path: Path) -> dict[str, Any]:
    from .safe_files import read_regular

    try:
        data = json.loads(read_regular(path, limit=64 * 2**20).decode("utf-8"))
    except (ValueError, RecursionError):  # the loaders report unreadable files themselves
        return {}
    return data if isinstance(data, dict) else {}


def _known_model_type(model_type: Any) -> bool:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers without the auto mapping
        return False
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _known_tokenizer_class(name: Any) -> bool:
    if not isinstance(name, str) or not name:
        return True  # no class named: transformers picks one from the model type
    import transformers

    base = name.removesuffix("Fast")
    return any(hasattr(transformers, n) for n in (name, base, base + "Fast"))


def remote_code_needed(folder: str | Path) -> str | None:
    """Why loading ``folder`` would need code from it (a one-line reason naming the ``auto_map``), or None."""
    folder = Path(folder)
    for fname in _MAP_FILES:
        f = folder / fname
        if not f.is_file():
            continue
        data = _json(f)
        amap = data.get("auto_map")
        if not amap:
            continue
        if fname == "config.json":
            needed = not _known_model_type(data.get("model_type"))
        else:
            needed = not _known_tokenizer_class(data.get("tokenizer_class"))
        if needed:
            shown = json.dumps(amap, sort_keys=True)
            if len(shown) > 200:
                shown = shown[:197] + "..."
            return f"{f} has an auto_map {shown}"
    return None


def refuse_remote_code(folder: str | Path) -> None:
    """Raise :class:`RemoteCodeError` when loading ``folder`` would need its own code."""
    reason = remote_code_needed(folder)
    if reason is not None:
        raise RemoteCodeError(
            f"{folder}: this model needs its own Python code to load ({reason}); surgeon never runs code "
            "from a model folder (trust_remote_code is always off). Use a model whose architecture "
            "transformers implements."
        )


def _call(loader: Any, folder: str | Path, kwargs: dict[str, Any]) -> Any:
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("surgeon never lets transformers run remote code")
    refuse_remote_code(folder)
    try:
        return loader.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except ValueError as exc:  # transformers' own refusal of custom code, should our check miss a case
        if "trust_remote_code" in str(exc):
            raise RemoteCodeError(f"{folder}: this model needs its own Python code to load; surgeon never runs "
                                  "code from a model folder (trust_remote_code is always off)") from None
        raise


def load_tokenizer(folder: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)``, after the check."""
    from transformers import AutoTokenizer

    return _call(AutoTokenizer, folder, kwargs)


def load_config(folder: str | Path, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)``, after the check."""
    from transformers import AutoConfig

    return _call(AutoConfig, folder, kwargs)


def refuse_pickles(folder: str | Path) -> None:
    """Refuse a folder whose only weights are pickles: loading them can run code (safetensors only here)."""
    from ..errors import CheckpointError
    from .checkpoint import PICKLE_PATTERNS

    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted({f.name for pat in PICKLE_PATTERNS for f in folder.glob(pat)})
    if pickles:
        raise CheckpointError(f"{folder}: only pickled weights found ({', '.join(pickles)}); pickle files can run "
                              "code when loaded, so surgeon loads models from safetensors only here (convert them "
                              "to safetensors, e.g. with a surgeon merge of the one model and --allow-pickle)")


def load_causal_lm(folder: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, use_safetensors=True, ...)``,
    after the remote-code and pickle checks."""
    from transformers import AutoModelForCausalLM

    refuse_pickles(folder)
    kwargs.setdefault("use_safetensors", True)
    return _call(AutoModelForCausalLM, folder, kwargs)


def strip_auto_map(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config without ``auto_map`` (outputs never ship the code it points to)."""
    return {k: v for k, v in obj.items() if k != "auto_map"}
