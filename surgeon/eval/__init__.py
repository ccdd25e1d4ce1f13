"""Evaluation: perplexity and bits per byte of a model on a text file."""
from .perplexity import evaluate_text

__all__ = ["evaluate_text"]
