"""``python -m surgeon`` (and ``accelerate launch -m surgeon``) runs the CLI."""
from .cli import entry

entry()
