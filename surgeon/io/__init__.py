"""Checkpoint input and output: lazy readers, the atomic sharded writer."""
from .checkpoint import Checkpoint, TensorInfo
from .writer import CheckpointWriter, TensorSpec, parse_size

__all__ = ["Checkpoint", "TensorInfo", "CheckpointWriter", "TensorSpec", "parse_size"]
