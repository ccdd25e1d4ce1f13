"""``python -m surgeon`` (and ``accelerate launch -m surgeon``) runs the CLI."""
import sys

from .cli import main

sys.exit(main())
