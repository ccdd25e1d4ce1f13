"""The engine: plans recipes from headers and streams tensors through steps."""
from .pipeline import Pipeline, RunOptions

__all__ = ["Pipeline", "RunOptions"]
