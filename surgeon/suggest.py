"""'Did you mean ...?' hints for misspelt keys and names."""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid choice to ``word``, or None when nothing is close."""
    matches = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A suffix like `` (did you mean 'ties'?)`` or an empty string."""
    best = closest(word, choices)
    return f" (did you mean {best!r}?)" if best else ""
