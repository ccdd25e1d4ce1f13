"""surgeon: model surgery for language-model checkpoints.

Merge (TIES, WIDEN, DARE, SLERP, ...), transplant tokenizers (OMP) and fuse
models (graph-on-logits distillation), streaming one tensor at a time.
"""
from .api import (convert, diff, evaluate, fuse_models, inspect_checkpoint, merge_models, plan, push, run,
                  transplant_tokenizer, validate)
from .errors import SurgeonError
from .settings import configure_process

__version__ = "0.1.0"
__all__ = ["SurgeonError", "configure_process", "convert", "diff", "evaluate", "fuse_models", "inspect_checkpoint", "merge_models",
           "plan", "push", "run", "transplant_tokenizer", "validate", "__version__"]
