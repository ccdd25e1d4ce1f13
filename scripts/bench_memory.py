"""Peak RSS of a task_arithmetic merge (base + 3) must not grow with model depth.

Builds two synthetic bf16 Llama families with identical tensor shapes but
different depth (8 and 32 layers by default), runs `surgeon run` on each in a
child process, and prints peak RSS (from the child's rusage), wall time and
input size side by side. Usage: python scripts/bench_memory.py [--root DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402
from synthetic import build_family  # noqa: E402

RECIPE = """\
name: bench-memory
models: {{base: {base}, ft1: {ft1}, ft2: {ft2}, ft3: {ft3}}}
steps:
  - id: merged
    merge:
      method: task_arithmetic
      base: base
      models: [{{model: ft1, weight: 0.5}}, {{model: ft2, weight: 0.3}}, {{model: ft3, weight: 0.2}}]
output: {{path: {out}}}
"""


def run_child(cmd: list[str]) -> tuple[float, int]:
    m = measure(cmd)
    if m.exit_code != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{m.stderr_tail}")
    return m.wall_s, m.peak_rss_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "surgeon-bench-memory")
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    a = ap.parse_args()
    rows = []
    for depth in a.depths:
        root = a.root / f"L{depth}"
        fam = build_family(root, depth, a.hidden, a.intermediate, a.vocab)
        recipe = root / "recipe.yaml"
        out = root / "out"
        recipe.write_text(RECIPE.format(**{k: v for k, v in fam.items()}, out=out))
        size = sum(f.stat().st_size for p in fam.values() for f in p.glob("*.safetensors"))
        wall, rss = run_child([sys.executable, "-m", "surgeon", "run", str(recipe), "--overwrite", "-q"])
        rows.append((depth, size, wall, rss))
    print(f"{'layers':>6} {'input GB':>9} {'wall s':>8} {'peak RSS MB':>12} {'GB/s in':>8}")
    for depth, size, wall, rss in rows:
        print(f"{depth:>6} {size / 1e9:>9.3f} {wall:>8.2f} {rss / 1e6:>12.1f} {size / 1e9 / wall:>8.2f}")
    if len(rows) >= 2:
        lo, hi = min(r[3] for r in rows), max(r[3] for r in rows)
        print(f"peak RSS spread: {100 * (hi - lo) / lo:.1f}% (target: within 15%)")


if __name__ == "__main__":
    main()
