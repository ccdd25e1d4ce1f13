"""Two CPU processes (torchrun + accelerate's gloo group) write the same bytes as one.

The recipe ends with a whole-model TIES whose per-model magnitude thresholds
are reduced across the ranks, each of which streams only its own tensors.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.io.distributed import assign_owners

RECIPE = """\
name: dist
seed: 3
models: {{base: {base}, ft1: {ft1}, ft2: {ft2}, ft3: {ft3}}}
steps:
  - id: a
    merge: {{method: task_arithmetic, base: base, models: [{{model: ft1, weight: 0.6}}, ft2]}}
  - id: b
    merge: {{method: linear, models: [a, ft2]}}
  - id: c
    merge:
      method: ties
      base: b
      models: [{{model: ft1, density: 0.3}}, {{model: ft3, density: 0.6, weight: 0.5}}]
      parameters: {{trim_scope: model}}
output: {{path: {out}, max_shard_size: 15KB}}
"""


def test_owners_balance_bytes() -> None:
    owners = assign_owners([10, 1, 9, 2, 5, 5], 2)
    loads = [sum(s for s, o in zip([10, 1, 9, 2, 5, 5], owners) if o == r) for r in (0, 1)]
    assert sorted(loads) == [16, 16]
    assert assign_owners([3, 3], 1) == [0, 0]


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_match_one(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    outs = {}
    for label, launcher in (("single", [sys.executable, "-m", "surgeon"]),
                            ("dist", [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                                      "--master_port", "29533", "-m", "surgeon"])):
        out = tmp_path / label
        recipe = tmp_path / f"{label}.yaml"
        recipe.write_text(RECIPE.format(out=out, **{k: v for k, v in tiny_family.items()}))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*launcher, "run", str(recipe), "-q"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[label] = out
    shards = sorted(p.name for p in outs["single"].glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == sorted(p.name for p in outs["dist"].glob("*.safetensors"))
    for name in shards + ["model.safetensors.index.json", "config.json"]:
        assert (outs["single"] / name).read_bytes() == (outs["dist"] / name).read_bytes(), name
