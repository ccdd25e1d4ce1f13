"""surgeon: model surgery for language-model checkpoints.

Merge (TIES, WIDEN, DARE, SLERP, ...), transplant tokenizers (OMP) and fuse
models (graph-on-logits distillation), streaming one tensor at a time.
"""
import os as _os

# Large tensors on Linux: back them with transparent huge pages. Every merge
# allocates and frees tensors of hundreds of MB; with 4 KiB pages the page
# faults of first touch cost more than the arithmetic (measured: bf16->f32
# casts into fresh memory 0.65 GB/s with 4 KiB pages, 2.7 GB/s with THP, on
# one core). torch reads this once, at its first allocation.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import (convert, diff, evaluate, fuse_models, inspect_checkpoint, merge_models, plan, push, run,
                  transplant_tokenizer, validate)
from .errors import SurgeonError

__version__ = "0.1.0"
__all__ = ["SurgeonError", "convert", "diff", "evaluate", "fuse_models", "inspect_checkpoint", "merge_models",
           "plan", "push", "run", "transplant_tokenizer", "validate", "__version__"]
