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


def gains_kept(evaluation: dict[str, dict[str, dict[str, Any]]], base: str, models: Sequence[str],
               output: str = "output") -> list[dict[str, Any]]:
    """What to read from a merge's evaluation table: for each input model, its gain on the text
    where it beats the base most (bits per byte below the base's) and the share of that gain
    the merged output keeps: ``(base - output) / (base - model)`` (1 = all of it, 0 = none,
    negative = worse than the base). Models that beat the base nowhere are left out."""
    rows: list[dict[str, Any]] = []
    if base not in evaluation or output not in evaluation:
        return rows
    b, o = evaluation[base], evaluation[output]
    for m in models:
        if m in (base, output) or m not in evaluation:
            continue
        gains = {t: b[t]["bits_per_byte"] - r["bits_per_byte"] for t, r in evaluation[m].items()
                 if t in b and t in o}
        if not gains:
            continue
        text = max(gains, key=lambda t: gains[t])
        if gains[text] <= 0:
            continue
        rows.append({"model": m, "text": text, "base_bpb": b[text]["bits_per_byte"],
                     "model_bpb": evaluation[m][text]["bits_per_byte"], "output_bpb": o[text]["bits_per_byte"],
                     "kept": (b[text]["bits_per_byte"] - o[text]["bits_per_byte"]) / gains[text]})
    return rows


def format_gains(rows: list[dict[str, Any]], base: str) -> list[str]:
    """Plain lines for :func:`gains_kept`: one per input model."""
    if not rows:
        return []
    out = [f"share of each input's gain the merge keeps (bits per byte on its best text, against {base!r}):"]
    for r in rows:
        out.append(f"  {r['model']} on {r['text']}: {base} {r['base_bpb']:.3f} -> {r['model']} {r['model_bpb']:.3f}, "
                   f"merge {r['output_bpb']:.3f}: keeps {r['kept']:.0%}")
    return out


def reading_lines(evaluation: dict[str, dict[str, dict[str, Any]]], final_step: dict[str, Any] | None) -> list[str]:
    """The sentences printed under an evaluation table: how many tokens each number was scored
    on and, after a merge with a base, the share of each input's gain the merge keeps."""
    lines: list[str] = []
    caps = {r.get("max_tokens") for per in evaluation.values() for r in per.values()}
    tokens = sorted({r.get("tokens") for per in evaluation.values() for r in per.values() if r.get("tokens")})
    if caps and None not in caps and len(caps) == 1:
        cap = caps.pop()
        lines.append(f"each text scored on its first {cap} tokens (eval.max_tokens; default {DEFAULT_MAX_TOKENS})"
                     + (f"; {tokens[0]}-{tokens[-1]} scored" if tokens and tokens[0] != tokens[-1] else ""))
    step = final_step or {}
    if step.get("kind") == "merge" and step.get("base"):
        lines += format_gains(gains_kept(evaluation, step["base"], step.get("models", [])), step["base"])
    return lines
