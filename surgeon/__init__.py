"""surgeon: model surgery for language-model checkpoints.

Merge (TIES, WIDEN, DARE, SLERP, ...), transplant tokenizers (OMP) and fuse
models (graph-on-logits distillation), streaming one tensor at a time.
"""
import gc as _gc

# The imports below (torch's among them) create a few hundred thousand objects, and the cycle
# collector's full passes over them cost ~0.2 s of every start (of ~2.8 on the development VM).
# They run with the collector off; its state is restored after, so importing surgeon changes nothing.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from .api import (convert, diff, evaluate, fuse_models, inspect_checkpoint, merge_models, plan, push, run,
                      transplant_tokenizer, validate)
    from .errors import SurgeonError
    from .settings import configure_process
    from .version import __version__
finally:
    if _collecting:
        _gc.enable()
__all__ = ["SurgeonError", "configure_process", "convert", "diff", "evaluate", "fuse_models", "inspect_checkpoint", "merge_models",
           "plan", "push", "run", "transplant_tokenizer", "validate", "__version__"]
