"""surgeon vs mergekit on the same synthetic bf16 Llama checkpoints, side by side in one run.

Builds base + 3 fine-tunes of a chosen size (default ~1.1B parameters, TinyLlama
shapes), measures the machine's floors on the spot — reading the input files
(page cache) and one bf16 -> float32 pass over the same number of elements —
then runs each method through both tools from the same mergekit config:

    surgeon:  python -m surgeon run config.yml OUT   (or torchrun -m surgeon with --processes N)
    mergekit: mergekit-yaml config.yml OUT

and prints wall time, peak RSS (of the largest process, through GNU time), input
GB/s, the ratio of wall time to the floor (the slower of the read and the cast)
and to the floor plus a torch process's start-up (measured too: every tool pays
it), and surgeon's own run time from its report. Methods mergekit lacks (widen)
show only surgeon.

    python scripts/bench_merge.py [--preset 1b|300m|tiny] [--methods ties linear ...]
                                  [--device cpu|cuda] [--processes N] [--no-mergekit] [--no-warmup]

Before timing, each surgeon method runs once on the tiny family so that numba's
one-time kernel compilation is not timed (see warm_kernels).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402
from synthetic import build_family  # noqa: E402

PRESETS = {  # layers, hidden, intermediate, vocab
    "1b": (22, 2048, 5632, 32000),
    "300m": (16, 1024, 2816, 32000),
    "tiny": (4, 256, 704, 4096),
}
CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: {w}}}}}\n" for k, w in (("ft1", 0.4), ("ft2", 0.3), ("ft3", 0.3))),
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: {w}}}}}\n" for k, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.3))),
    "ties": "merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 1.0, density: 0.3}}}}\n" for k in ("ft1", "ft2", "ft3")),
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 1.0, density: 0.3}}}}\n" for k in ("ft1", "ft2", "ft3")),
    "widen": "merge_method: widen\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n" for k in ("ft1", "ft2", "ft3")),
}
MERGEKIT_HAS = {"linear", "task_arithmetic", "ties", "dare_ties"}


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes, largest process), exit code."""
    m = measure(cmd, env)
    if m.exit_code != 0:
        print(f"  ! {' '.join(cmd[:4])} ... exited {m.exit_code}: {m.stderr_tail.strip().splitlines()[-1:]}",
              file=sys.stderr)
    return m.wall_s, m.peak_rss_bytes, m.exit_code


def measure_floors(files: list[Path], threads: int) -> tuple[float, float]:
    """Seconds to read every input byte (page cache) and to cast the same bf16 elements to float32."""
    import torch


    # The buffer must be 64-byte aligned, as a tool's read buffers are (torch allocates so):
    # into a bytearray (16 bytes past a 64-byte boundary) the kernel's copy ran at ~2 GB/s on
    # the development VM instead of ~6, which made this floor (sessions 2-3) 3x too slow.
    buf = memoryview(torch.empty(1 << 25, dtype=torch.uint8).numpy())
    for _ in range(2):  # the first pass warms the page cache
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        read_s = time.perf_counter() - t0
    total_elems = sum(f.stat().st_size for f in files) // 2
    torch.set_num_threads(threads)
    chunk = 64 * 2**20
    src = torch.randn(chunk).to(torch.bfloat16)
    dst = torch.empty(chunk, dtype=torch.float32)
    t0 = time.perf_counter()
    done = 0
    while done < total_elems:
        dst.copy_(src)
        done += chunk
    cast_s = (time.perf_counter() - t0) * total_elems / done
    return read_s, cast_s


def measure_startup(repeats: int = 3) -> float:
    """Seconds for a fresh Python process to import torch (the best of a few): every tool
    here pays it before it reads a byte, so the table also shows the wall time over
    floor + start-up."""
    import subprocess

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def warm_kernels(root: Path, methods: list[str], device: str, env: dict[str, str]) -> None:
    """Run each surgeon method once, untimed, on the tiny family: the first run
    after installing compiles surgeon's numba kernels (seconds, and a higher
    peak RSS), a one-time cost that this bench leaves out as it leaves out a
    cold page cache."""
    import subprocess

    fam = build_family(root / "tiny", *PRESETS["tiny"])
    for method in methods:
        cfg = root / "tiny" / f"{method}.yml"
        cfg.write_text(CONFIGS[method].format(**{k: str(v) for k, v in fam.items()}))
        out = root / "tiny" / f"out-warm-{method}"
        subprocess.run([sys.executable, "-m", "surgeon", "run", str(cfg), str(out), "--overwrite", "-q",
                        "--device", device], env=env, check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "surgeon-bench-merge")
    ap.add_argument("--methods", nargs="+", default=["linear", "task_arithmetic", "ties", "widen", "dare_ties"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-warmup", action="store_true", help="do not compile surgeon's kernels before timing")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()

    layers, hidden, inter, vocab = PRESETS[a.preset]
    fam_root = a.root / a.preset
    t0 = time.perf_counter()
    fam = build_family(fam_root, layers, hidden, inter, vocab)
    files = sorted(f for p in fam.values() for f in p.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    params = size // 2 // len(fam)
    print(f"inputs: base + {len(fam) - 1} x {params / 1e9:.2f}B params bf16, {size / 1e9:.2f} GB "
          f"(built or found in {time.perf_counter() - t0:.0f}s) under {fam_root}")
    threads = os.cpu_count() or 1
    read_s, cast_s = measure_floors(files, threads)
    print(f"floors on this machine: read {size / 1e9 / read_s:.2f} GB/s ({read_s:.1f}s), "
          f"bf16->f32 pass {size / 1e9 / cast_s:.2f} GB/s ({cast_s:.1f}s) with {threads} threads")
    floor = max(read_s, cast_s)
    startup_s = measure_startup()
    print(f"start-up of a torch process (python -c 'import torch'): {startup_s:.1f}s; "
          f"floor {floor:.1f}s, floor + start-up {floor + startup_s:.1f}s")

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not a.no_warmup:
        warm_kernels(a.root, a.methods, a.device, env)
    bindir = Path(sys.executable).parent
    rows = []
    for method in a.methods:
        cfg = fam_root / f"{method}.yml"
        cfg.write_text(CONFIGS[method].format(**{k: str(v) for k, v in fam.items()}))
        tools = [("surgeon", None)]
        if not a.no_mergekit and method in MERGEKIT_HAS and importlib.util.find_spec("mergekit") is not None:
            tools.append(("mergekit", None))
        for tool, _ in tools:
            out = fam_root / f"out-{tool}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "surgeon":
                launcher = [sys.executable, "-m", "surgeon"] if a.processes == 1 else [
                    str(bindir / "torchrun"), "--nproc_per_node", str(a.processes), "-m", "surgeon"]
                report = fam_root / f"report-{method}.json"
                report.unlink(missing_ok=True)
                cmd = [*launcher, "run", str(cfg), str(out), "--overwrite", "-q", "--device", a.device,
                       "--report", str(report)]
            else:
                cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out)] + (
                    ["--cuda"] if a.device.startswith("cuda") else [])
            wall, rss, code = run_measured(cmd, env)
            merge_s = None  # surgeon's own timing of its run, from process start-up's end to the last byte
            if tool == "surgeon" and report.exists():
                merge_s = json.loads(report.read_text()).get("seconds")
            rows.append({"method": method, "tool": tool, "wall_s": round(wall, 2), "peak_rss_gb": round(rss / 1e9, 3),
                         "input_gbps": round(size / 1e9 / wall, 3), "x_floor": round(wall / floor, 2),
                         "x_floor_startup": round(wall / (floor + startup_s), 2), "run_s": merge_s, "exit": code,
                         "processes": a.processes if tool == "surgeon" else 1, "device": a.device})
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {method:<16} {tool:<9} {wall:8.1f}s  RSS {rss / 1e9:6.2f} GB", flush=True)

    print()
    print(f"{'method':<16} {'tool':<9} {'wall s':>8} {'run s':>6} {'peak RSS GB':>12} {'in GB/s':>8} "
          f"{'x floor':>8} {'x fl+st':>8} {'speedup':>8}")
    for r in rows:
        mk = next((x for x in rows if x["method"] == r["method"] and x["tool"] == "mergekit"), None)
        speed = f"{mk['wall_s'] / r['wall_s']:.1f}x" if mk and r["tool"] == "surgeon" else ""
        run_s = f"{r['run_s']:.1f}" if r["run_s"] is not None else ""
        print(f"{r['method']:<16} {r['tool']:<9} {r['wall_s']:>8.1f} {run_s:>6} {r['peak_rss_gb']:>12.2f} "
              f"{r['input_gbps']:>8.2f} {r['x_floor']:>8.2f} {r['x_floor_startup']:>8.2f} {speed:>8}")
    print("run s: surgeon's own run time from its report (after start-up); x fl+st: wall / (floor + start-up)")
    if a.json:
        a.json.write_text(json.dumps({"preset": a.preset, "input_bytes": size, "read_s": read_s, "cast_s": cast_s,
                                      "startup_s": startup_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
