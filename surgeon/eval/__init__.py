"""Evaluation: perplexity and bits per byte of a model on text files, checkpoint diffs, change maps.

Submodules load torch and transformers; nothing is imported until it is used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["evaluate_text"]


def __getattr__(name: str) -> Any:
    if name == "evaluate_text":
        from .perplexity import evaluate_text

        return evaluate_text
    raise AttributeError(name)
