"""The documented evaluation defaults, shared by ``surgeon eval``, recipes' ``eval:`` block,
the quickstart, the zoo's tables and the docs, so one model has one headline number.

``DEFAULT_MAX_TOKENS``: every text is scored on its first 4,096 tokens (the model's own
tokens; windows as :mod:`surgeon.eval.perplexity` describes). Small enough that the quickstart
scores three texts for four models in seconds on a laptop CPU, large enough that the bits
per byte of the zoo's models settle to about 0.01. ``--max-tokens 0`` (``max_tokens=0``) scores
the whole text. Every printed number comes with the number of tokens it was scored on.
"""
from __future__ import annotations

DEFAULT_MAX_TOKENS = 4096


def cap_note(max_tokens: int | None) -> str:
    """How a number was scored, for printing beside it: 'first 4096 tokens' or 'whole text'."""
    return "whole text" if not max_tokens else f"first {max_tokens} tokens"
