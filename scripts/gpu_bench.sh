#!/usr/bin/env bash
# One GPU check, run on a machine with CUDA: the merge benchmark on the GPU, then
# CPU-vs-GPU agreement of every method on one checkpoint. Wheels for packages the
# machine lacks (pydantic, mergekit, ...) may be carried in .whl/.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 scripts/gpu_agreement.py 2>&1 | tee "$out/agreement.txt"
python3 scripts/bench_merge.py --preset "${PRESET:-1b}" --device cuda --root /tmp/bench --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.txt"
