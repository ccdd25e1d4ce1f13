"""Error types and the exit codes they map to.

Every failure a user can cause is raised as a :class:`SurgeonError` subclass
carrying a message that names the file, key or tensor involved; the CLI turns
it into one line on stderr and the documented exit code, never a traceback.
"""
from __future__ import annotations

EXIT_INVALID = 2      # invalid recipe or input
EXIT_STEP_FAILED = 3  # a step failed while running
EXIT_INTERRUPTED = 130


class SurgeonError(Exception):
    """Base class of every error surgeon raises on purpose."""

    exit_code = EXIT_STEP_FAILED


class InvalidInputError(SurgeonError):
    """The user's input (recipe, checkpoint, tokenizer, argument) is wrong."""

    exit_code = EXIT_INVALID


class RecipeError(InvalidInputError):
    """A recipe does not validate; the message starts with ``file:line``."""


class CheckpointError(InvalidInputError):
    """A checkpoint cannot be read: missing, corrupt, pickled, inconsistent."""


class StepError(SurgeonError):
    """A step failed while running (after validation passed)."""

    exit_code = EXIT_STEP_FAILED
