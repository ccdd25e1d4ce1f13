"""``surgeon inspect``: what a checkpoint is, from headers and small files only."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .io.checkpoint import Checkpoint


def tokenizer_summary(folder: Path) -> dict[str, Any] | None:
    """Kind and vocabulary size of the tokenizer in ``folder`` (None if none)."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        if (folder / "tokenizer.model").is_file():
            return {"kind": "sentencepiece (tokenizer.model)", "vocab_size": None}
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"kind": "unreadable tokenizer.json", "vocab_size": None}
    model = data.get("model") or {}
    pre = json.dumps(data.get("pre_tokenizer") or {}) + json.dumps(data.get("decoder") or {})
    mtype = model.get("type", "?")
    if "ByteLevel" in pre:
        style = "byte-level"
    elif "Metaspace" in pre or "\u2581" in pre:
        style = "sentencepiece-style"
    else:
        style = "other"
    vocab = model.get("vocab")
    size = len(vocab) if isinstance(vocab, (dict, list)) else None
    added = data.get("added_tokens") or []
    extra = sum(1 for t in added if isinstance(vocab, dict) and t.get("content") not in vocab)
    return {"kind": f"{style} {mtype}", "vocab_size": (size or 0) + extra if size is not None else None,
            "byte_fallback": bool(model.get("byte_fallback")), "added_tokens": len(added)}


def inspect_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    ck = Checkpoint.open(path, allow_pickle=allow_pickle)
    cfg = ck.config or {}
    dtypes = Counter()
    for info in ck.infos():
        dtypes[str(info.dtype).removeprefix("torch.")] += info.numel
    return {
        "path": str(ck.path),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0],
        "model_type": cfg.get("model_type"),
        "parameters": ck.num_parameters,
        "tensors": len(ck),
        "bytes": ck.total_bytes,
        "dtypes": dict(dtypes),
        "shards": [f.name for f in ck.files],
        "layers": ck.num_layers,
        "tied_embeddings": ck.tied_embeddings,
        "vocab_size": cfg.get("vocab_size"),
        "tokenizer": tokenizer_summary(ck.path),
    }


def format_inspect(info: dict[str, Any]) -> str:
    tok = info["tokenizer"]
    rows = [
        ("path", info["path"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters']:,}"),
        ("tensors", str(info["tensors"])),
        ("size", human_bytes(info["bytes"])),
        ("dtypes", ", ".join(f"{k} ({v:,} params)" for k, v in info["dtypes"].items())),
        ("shards", f"{len(info['shards'])}: {', '.join(info['shards'][:3])}{' ...' if len(info['shards']) > 3 else ''}"),
        ("layers", str(info["layers"])),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
        ("config vocab_size", str(info["vocab_size"])),
        ("tokenizer", f"{tok['kind']}, vocab {tok['vocab_size']}" if tok else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"
