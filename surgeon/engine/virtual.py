"""What a checkpoint looks like before it exists.

``surgeon validate`` and ``surgeon plan`` check a whole pipeline from headers
alone, including steps that read the output of earlier steps. Each step's plan
therefore describes its output as a :class:`VirtualCheckpoint` with the same
read-only surface as :class:`surgeon.io.Checkpoint` (names, shapes, dtypes,
config, tokenizer), which later steps plan against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CheckpointError
from ..io.checkpoint import TensorInfo
from ..io.writer import TensorSpec


@dataclass
class VirtualCheckpoint:
    label: str
    specs: dict[str, TensorSpec]
    config: dict[str, Any] | None
    tokenizer_dir: Path | None = None
    path: Path = field(default_factory=lambda: Path("<planned>"))

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    def info(self, name: str) -> TensorInfo:
        s = self.specs.get(name)
        if s is None:
            raise CheckpointError(f"{self.label}: no tensor {name!r}")
        return TensorInfo(name, s.shape, s.dtype, self.path, 0, s.nbytes)

    def infos(self) -> Iterator[TensorInfo]:
        return (self.info(n) for n in self.specs)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    @property
    def tokenizer_files(self) -> list[Path]:
        from ..io.checkpoint import TOKENIZER_FILES

        if self.tokenizer_dir is None:
            return []
        return [self.tokenizer_dir / f for f in TOKENIZER_FILES if (self.tokenizer_dir / f).is_file()]

    @property
    def has_tokenizer(self) -> bool:
        return any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in self.tokenizer_files)

    @property
    def tied_embeddings(self) -> bool:
        cfg = self.config or {}
        tied = cfg.get("tie_word_embeddings")
        return bool(tied) if tied is not None else "lm_head.weight" not in self.specs

    @property
    def num_layers(self) -> int | None:
        cfg = self.config or {}
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        return None

    def get(self, name: str, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        raise CheckpointError(f"{self.label}: planned checkpoint has no data yet (tensor {name!r})")
