"""Peak RSS of a merge (base + 3) must not grow with the model's size.

Builds synthetic bf16 Llama families that differ in depth (8 and 32 layers by
default) or, with ``--vocabs``, in the size of their largest tensors (the
embedding and head: vocab x hidden), runs `surgeon run` on each in a child
process, and prints peak RSS (through GNU time), wall time and input size
side by side.

    python scripts/bench_memory.py [--root DIR] [--method ties]
    python scripts/bench_memory.py --depths 8 --vocabs 8192 131072
"""
from __future__ import annotations

import argparse
import shutil
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
      method: {method}
      base: base
      models: [{{model: ft1, weight: 0.5{extra}}}, {{model: ft2, weight: 0.3{extra}}}, {{model: ft3, weight: 0.2{extra}}}]
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
    ap.add_argument("--vocabs", type=int, nargs="+", help="vary the vocabulary (largest tensors) at the first depth")
    ap.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "ties", "dare_ties", "linear"])
    a = ap.parse_args()
    shapes = [(a.depths[0], v) for v in a.vocabs] if a.vocabs else [(d, a.vocab) for d in a.depths]
    extra = ", density: 0.3" if a.method in ("ties", "dare_ties") else ""
    rows = []
    for depth, vocab in shapes:
        root = a.root / f"L{depth}-V{vocab}"
        fam = build_family(root, depth, a.hidden, a.intermediate, vocab)
        recipe = root / "recipe.yaml"
        out = root / "out"
        recipe.write_text(RECIPE.format(**{k: v for k, v in fam.items()}, out=out, method=a.method, extra=extra))
        size = sum(f.stat().st_size for p in fam.values() for f in p.glob("*.safetensors"))
        shutil.rmtree(out, ignore_errors=True)  # a finished identical output would be kept, not recomputed
        wall, rss = run_child([sys.executable, "-m", "surgeon", "run", str(recipe), "--overwrite", "-q"])
        rows.append((depth, vocab, size, wall, rss))
    print(f"method {a.method}, hidden {a.hidden}")
    print(f"{'layers':>6} {'vocab':>7} {'largest MB':>10} {'input GB':>9} {'wall s':>8} {'peak RSS MB':>12} {'GB/s in':>8}")
    for depth, vocab, size, wall, rss in rows:
        largest = vocab * a.hidden * 2 / 1e6
        print(f"{depth:>6} {vocab:>7} {largest:>10.1f} {size / 1e9:>9.3f} {wall:>8.2f} {rss / 1e6:>12.1f} "
              f"{size / 1e9 / wall:>8.2f}")
    if len(rows) >= 2:
        lo, hi = min(r[4] for r in rows), max(r[4] for r in rows)
        print(f"peak RSS spread: {100 * (hi - lo) / lo:.1f}% (target: within 15%)")


if __name__ == "__main__":
    main()
