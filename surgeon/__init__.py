"""surgeon: model surgery for language-model checkpoints.

Merge (TIES, WIDEN, DARE, SLERP, ...), transplant tokenizers (OMP) and fuse
models (graph-on-logits distillation), streaming one tensor at a time.
"""
from .api import (convert, diff, evaluate, fuse_models, inspect_checkpoint, merge_models, plan, push, run,
                  transplant_tokenizer, validate)
from .errors import SurgeonError
from .settings import configure_process
from .version import __version__
__all__ = ["SurgeonError", "configure_process", "convert", "diff", "evaluate", "fuse_models", "inspect_checkpoint", "merge_models",
           "plan", "push", "run", "transplant_tokenizer", "validate", "__version__"]
