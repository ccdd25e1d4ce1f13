"""Aligning embedding rows when models' vocabularies differ.

Padded vocabularies and added tokens are a top cause of broken merges: a model
whose ``embed_tokens`` has 32_064 rows cannot be averaged row by row with one
of 32_000. We never truncate silently. For each model whose vocabulary-sized
tensors differ from the template's, we build a row map (template row -> model
row, or -1):

- when both have a tokenizer, by token string (so reordered or added tokens
  land on the right rows);
- otherwise, when the model has *fewer* rows, rows are matched by index and
  the missing ones are -1;
- otherwise (more rows and no tokenizer to tell which are real) we refuse.

Rows mapped to -1 are filled with the base's row (or the template's when there
is no base), i.e. that model contributes no change there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import is_vocab_tensor, tensor_role
from ..errors import InvalidInputError

__all__ = ["RowMap", "build_row_map", "is_vocab_tensor", "tensor_role"]


def _vocab_of(tokenizer_files: list[Path]) -> dict[str, int] | None:
    tj = next((f for f in tokenizer_files if f.name == "tokenizer.json"), None)
    if tj is None:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
    except Exception:  # a tokenizer.json tokenizers cannot read: fall back to index matching
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
            vocab = dict(data["model"]["vocab"]) if isinstance(data["model"]["vocab"], dict) else None
            return vocab
        except Exception:
            return None


@dataclass
class RowMap:
    """Template row -> model row (-1: not present in that model)."""

    index: torch.Tensor  # int64 [template_rows]
    how: str
    missing: int

    def apply(self, model_rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        out = fill.clone()
        present = self.index >= 0
        out[present] = model_rows[self.index[present]]
        return out


def build_row_map(
    template_rows: int,
    model_rows: int,
    template_tok: list[Path],
    model_tok: list[Path],
    model_label: str,
    tensor: str,
) -> RowMap:
    tv, mv = _vocab_of(template_tok), _vocab_of(model_tok)
    if tv is not None and mv is not None:
        index = torch.full((template_rows,), -1, dtype=torch.long)
        for tok, row in tv.items():
            mrow = mv.get(tok)
            if 0 <= row < template_rows and mrow is not None and 0 <= mrow < model_rows:
                index[row] = mrow
        missing = int((index < 0).sum())
        return RowMap(index, "by token string", missing)
    if model_rows < template_rows:
        index = torch.arange(template_rows)
        index[model_rows:] = -1
        return RowMap(index, "by index, padded with the base's rows", template_rows - model_rows)
    raise InvalidInputError(
        f"model {model_label}: tensor {tensor!r} has {model_rows} rows but the base has {template_rows}, and no "
        "tokenizer.json on both sides tells which rows are real tokens; refusing to truncate. Add the tokenizer "
        "files, or make the vocabularies match."
    )

