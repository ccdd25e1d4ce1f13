"""Several texts, one model: ``surgeon eval --text A --text B`` (a table, or a JSON list).

The model is loaded once and every text is scored with the same protocol
(:mod:`surgeon.eval.perplexity`) and the same token cap
(:data:`surgeon.eval.protocol.DEFAULT_MAX_TOKENS` unless told otherwise).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .protocol import DEFAULT_MAX_TOKENS, cap_note

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_folder(path: str | Path) -> Path:
    """``path`` if it is a model folder (config.json and weights); else a one-line error that says
    what it is instead and, for a folder of model folders, names them."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such model folder")
    if not p.is_dir():
        raise InvalidInputError(f"{p}: not a model folder (a file; give the folder that holds config.json)")
    has_config = (p / "config.json").is_file()
    has_weights = any((p / w).is_file() for w in WEIGHT_FILES) or any(p.glob("*.safetensors"))
    if has_config and has_weights:
        return p
    inside = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / "config.json").is_file())
    missing = "config.json" if not has_config else "weights (*.safetensors)"
    hint = ""
    if inside:
        shown = ", ".join(f"{p / n}" for n in inside[:4]) + (" ..." if len(inside) > 4 else "")
        hint = f"; it holds model folders: {shown}"
    raise InvalidInputError(f"{p}: not a model folder (no {missing}){hint}")


def evaluate_texts(model: str | Path, texts: Sequence[str | Path], max_tokens: int | None = DEFAULT_MAX_TOKENS,
                   device: str = "cpu", progress: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Score every text with one loaded model; one result dict per text, in the given order.

    ``max_tokens``: the cap per text (0 or None: the whole text). Each result carries
    ``max_tokens`` (the cap used, None for the whole text) beside ``tokens`` (scored).
    """
    import torch

    from .perplexity import _load, evaluate_text

    if max_tokens is not None and max_tokens < 0:
        raise InvalidInputError(f"--max-tokens must be 0 (whole text) or positive, got {max_tokens}")
    cap = max_tokens or None
    folder = check_model_folder(model)
    for t in texts:
        if not Path(t).is_file():
            raise InvalidInputError(f"{t}: no such text file")
    tok, lm = _load(folder, device, options.pop("dtype", torch.float32))
    rows = []
    for t in texts:
        r = evaluate_text(folder, t, max_tokens=cap, device=device, progress=progress, model=lm, tokenizer=tok,
                          **options)
        rows.append({**r, "max_tokens": cap})
    return rows


def format_texts(rows: list[dict[str, Any]]) -> str:
    """One row per text: perplexity, bits per byte, tokens scored (with the cap), bytes."""
    names = [str(r["text"]) for r in rows]
    width = max(len("text"), *(len(n) for n in names))
    lines = [f"{'text':<{width}}  {'perplexity':>10}  {'bits/byte':>9}  {'tokens':>7}  {'bytes':>8}  scored on"]
    for n, r in zip(names, rows):
        lines.append(f"{n:<{width}}  {r['perplexity']:>10.3f}  {r['bits_per_byte']:>9.4f}  {r['tokens']:>7}  "
                     f"{r['bytes']:>8}  {cap_note(r.get('max_tokens'))}")
    return "\n".join(lines)
