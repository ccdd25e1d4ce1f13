"""The writer's last check: the tokenizer it ships must fit the embedding rows it writes.

A checkpoint whose ``tokenizer.json`` has token ids beyond the rows of its
input embeddings (or output head) loads, then raises ``IndexError`` on the
first new token. :func:`check_tokenizer_fits` refuses to finish such a
checkpoint (a :class:`~surgeon.errors.StepError`, exit 3, nothing moved into
place). See docs/merging.md ("Tokenizers").
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..arch import is_vocab_tensor
from ..errors import StepError


def tokenizer_ids(folder: Path) -> int | None:
    """One past the largest token id of ``folder/tokenizer.json`` (vocabulary and added tokens), or None."""
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not ours to judge here; loading it reports the problem
    ids: list[int] = []
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        ids.append(len(vocab) - 1)
    for e in (data.get("added_tokens") or []) if isinstance(data, dict) else []:
        if isinstance(e, dict) and isinstance(e.get("id"), int):
            ids.append(e["id"])
    return max(ids) + 1 if ids else None


def check_tokenizer_fits(folder: Path, specs: Iterable[Any], dest: Path) -> None:
    """Raise StepError when ``folder``'s tokenizer uses ids beyond any vocabulary tensor's rows
    (a 2-D input embedding or output head: :func:`surgeon.arch.is_vocab_tensor`)."""
    n = tokenizer_ids(folder)
    if n is None:
        return
    for s in specs:
        if is_vocab_tensor(s.name) and len(s.shape) == 2 and s.shape[0] < n:
            raise StepError(f"{dest}: tokenizer.json has token ids up to {n - 1} but tensor {s.name!r} has only "
                            f"{s.shape[0]} rows; refusing to finish a checkpoint whose tokenizer does not fit "
                            "its embeddings")
