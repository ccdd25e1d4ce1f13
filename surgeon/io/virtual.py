"""What a checkpoint looks like before it exists.

``surgeon validate`` and ``surgeon plan`` check a whole pipeline from headers
alone, including steps that read the output of earlier steps. Each step's plan
therefore describes its output as a :class:`VirtualCheckpoint`: a
:class:`surgeon.io.Checkpoint` with the same read-only surface (names, shapes,
dtypes, config, tokenizer) but no data, which later steps plan against.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import TOKENIZER_FILES, Checkpoint, TensorInfo
from .writer import TensorSpec

PLANNED = Path("<planned>")


class VirtualCheckpoint(Checkpoint):
    """A planned step output: tensor specs, config and where its tokenizer will come from."""

    def __init__(self, label: str, specs: dict[str, TensorSpec], config: dict[str, Any] | None,
                 tokenizer_dir: Path | None = None):
        tensors = {n: TensorInfo(n, s.shape, s.dtype, PLANNED, 0, s.nbytes) for n, s in specs.items()}
        super().__init__(PLANNED, tensors, config, label=label)
        self.specs = specs
        self.tokenizer_dir = tokenizer_dir

    @property
    def tokenizer_files(self) -> list[Path]:
        if self.tokenizer_dir is None:
            return []
        return [self.tokenizer_dir / f for f in TOKENIZER_FILES if (self.tokenizer_dir / f).is_file()]

    def get(self, name: str, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        raise CheckpointError(f"{self.label}: planned checkpoint has no data yet (tensor {name!r})")
