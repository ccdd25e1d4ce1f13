#!/usr/bin/env bash
# Create .venv and install surgeon into it (editable). `--test` adds the test extras.
# Torch comes first and on its own: a CPU build where the machine offers one
# (this keeps CI and laptops from downloading multi-GB CUDA wheels they cannot use).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
py=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
quiet() { grep -v "^WARNING: Location" || true; }  # this machine's pip config lists index folders that may be absent
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "torch>=2.1,<2.14" 2>&1 | quiet
fi
"${pip[@]}" install -e ".${extras}" 2>&1 | quiet
.venv/bin/python -c "import surgeon, torch; print(f'surgeon {surgeon.__version__} ready (torch {torch.__version__})')"
