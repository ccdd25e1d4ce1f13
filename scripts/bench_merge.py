"""surgeon vs mergekit on the same synthetic bf16 Llama checkpoints, side by side in one run.

Builds base + 3 fine-tunes of a chosen size (default ~1.1B parameters, TinyLlama
shapes), measures the machine's floors on the spot — reading the input files
(page cache) and one bf16 -> float32 pass over the same number of elements —
then runs each method through both tools from the same mergekit config:

    surgeon:  python -m surgeon run config.yml OUT   (or torchrun -m surgeon with --processes N)
    mergekit: mergekit-yaml config.yml OUT

and prints wall time, CPU time (user + system), peak RSS (of the largest
process, through GNU time), input GB/s, and wall time over the **whole-job
floor**: what the hardware needs for the job whatever the tool does, each part
measured on the spot —

    start-up  a fresh Python process importing torch, ended with ``os._exit``
              (every tool pays the start-up; the interpreter's teardown,
              ~0.5 s more, is not needed and surgeon's command skips it),
    read      every input byte from the page cache into an aligned buffer,
    write     one output's bytes (the size of one input model) to a new file on
              the output's file system, then fsync: the faster of a buffered
              write and one past the page cache (``O_DIRECT``, as surgeon writes) —

floor = start-up + read + write. (The bf16 -> float32 pass over the inputs is
measured and printed too, but not added: a tool can overlap it with reading.)
Each row also gives ``wall / floor here``: over the floor with its start-up and
read parts measured again just before that run (:func:`floor_here`), which a
shared host's drift over a long bench leaves comparable.
``--repeats N`` times each tool's run N times and keeps the fastest, as the floor's
read and write parts are the best of two.
Before each timed run the inputs are read through once, untimed, so every run
starts with them in the page cache, as the read floor does. Tools run as
installed: with their modules' bytecode caches (``pip install`` writes them; an
editable install writes them on first import), so a ``PYTHONDONTWRITEBYTECODE``
in this bench's environment is not passed on (it would recompile surgeon's ~100
modules on every start, ~0.13 s, while torch's and mergekit's caches exist).
Every registry method with a config here runs (``--methods all``, the default);
methods mergekit lacks (widen) show only surgeon.

    python scripts/bench_merge.py [--preset 1b|300m|tiny] [--methods all | ties linear ...]
                                  [--device cpu|cuda] [--processes N] [--no-mergekit] [--no-warmup]
    python scripts/bench_merge.py --remote [--preset 300m] [--hub-mb-per-s R] [--hub-latency-ms L]

``--remote``: base + 2 fine-tunes are served by the local fake hub of the tests
(tests/hub_server.py, over HTTP on 127.0.0.1) and one TIES merge runs twice in
fresh hub caches — ``--remote-stream`` (range requests, nothing stored) and
``--no-remote-stream`` (download, then merge) — reporting wall and CPU time,
weight bytes fetched over input weight bytes, and disk used (hub cache + output).
``--hub-mb-per-s`` and ``--hub-latency-ms`` make the loopback hub behave more like
a real one: each weight response is paced to that rate and waits that long first.

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
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import host, measure  # noqa: E402
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
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 0.5, density: 0.3}}}}\n" for k in ("ft1", "ft2", "ft3")),
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 0.5, density: 0.9, gamma: 0.01}}}}\n"
        for k in ("ft1", "ft2", "ft3")),
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 0.5, density: 0.9, gamma: 0.01}}}}\n"
        for k in ("ft1", "ft2", "ft3")),
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 0.5, density: 0.3, epsilon: 0.1}}}}\n"
        for k in ("ft1", "ft2", "ft3")),
    "della_linear": "merge_method: della_linear\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 0.5, density: 0.3, epsilon: 0.1}}}}\n"
        for k in ("ft1", "ft2", "ft3")),
    "sce": "merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.3}}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n" for k in ("ft1", "ft2", "ft3")),
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n" for k in ("ft1", "ft2", "ft3")),
    "slerp": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.4}}\nmodels:\n  - model: {base}\n"
             "  - model: {ft1}\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 0.5}}}}\n" for k in ("ft1", "ft2")),
    "multislerp": "merge_method: multislerp\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 1.0}}}}\n" for k in ("ft1", "ft2", "ft3")),
    "karcher": "merge_method: karcher\nmodels:\n" + "".join(f"  - model: {{{k}}}\n" for k in ("ft1", "ft2", "ft3")),
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.001}}\nmodels:\n  - model: {base}\n"
                "  - model: {ft1}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {{{k}}}\n" for k in ("ft1", "ft2", "ft3")),
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n" for k in ("ft1", "ft2", "ft3")),
    "passthrough": "merge_method: passthrough\nmodels:\n  - model: {ft1}\n",  # a copy through the engine
}
MERGEKIT_HAS = set(CONFIGS) - {"widen"}  # mergekit 0.1.5 has every other method here


class _Frankenmerge(str):
    """mergekit's examples/orcamini-platy-44layer.yml scaled to the family: a passthrough stack of the first
    60 % of ft1's layers and the last 50 % of ft2's (24 of 40 and 20 of 40 there; the ranges overlap by 10 %).
    The layer count is read from the base's config.json when the config is filled in."""

    def format(self, **paths: str) -> str:  # type: ignore[override]
        n = json.loads((Path(paths["base"]) / "config.json").read_text())["num_hidden_layers"]
        lo, hi = round(n * 0.6), n - round(n * 0.5)
        return ("merge_method: passthrough\ndtype: bfloat16\nslices:\n"
                f"  - sources:\n      - model: {paths['ft1']}\n        layer_range: [0, {lo}]\n"
                f"  - sources:\n      - model: {paths['ft2']}\n        layer_range: [{hi}, {n}]\n")


CONFIGS["frankenmerge"] = _Frankenmerge("frankenmerge")  # layer surgery (slices:), not a registry method
MERGEKIT_HAS.add("frankenmerge")


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, float]:
    """Wall seconds, peak RSS (bytes, largest process), exit code, CPU seconds (user + system)."""
    m = measure(cmd, env)
    if m.exit_code != 0:
        print(f"  ! {' '.join(cmd[:4])} ... exited {m.exit_code}: {m.stderr_tail.strip().splitlines()[-1:]}",
              file=sys.stderr)
    return m.wall_s, m.peak_rss_bytes, m.exit_code, m.cpu_s


def measure_floors(files: list[Path], threads: int) -> tuple[float, float]:
    """Seconds to read every input byte (page cache) and to cast the same bf16 elements to float32."""
    import torch

    read_through(files)  # warms the page cache
    read_s = float("inf")
    for _ in range(2):  # best of two, as the write floor: a shared host's stalls are not the hardware's pace
        t0 = time.perf_counter()
        read_through(files)
        read_s = min(read_s, time.perf_counter() - t0)
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


def read_through(files: list[Path]) -> None:
    """Read every byte of ``files`` once: the read floor times it, and each tool's run is
    preceded by it (untimed), so that every run starts with the inputs in the page cache as the
    floor assumes (a run after mergekit, whose 4-7 GB evicted part of them, read them from disk:
    +5-7 s on the 1.1B family)."""
    import torch

    # The buffer must be 64-byte aligned, as a tool's read buffers are (torch allocates so):
    # into a bytearray (16 bytes past a 64-byte boundary) the kernel's copy ran at ~2 GB/s on
    # the development VM instead of ~6, which made the floor (sessions 2-3) 3x too slow.
    buf = memoryview(torch.empty(1 << 25, dtype=torch.uint8).numpy())
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def floor_here(files: list[Path], write_s: float) -> float:
    """The whole-job floor again, just before a timed run: start-up (best of two) and the read
    re-timed (after an untimed read that brings back what a previous run evicted), with the
    write measured at the start (re-timing it costs two output-sized writes a run). A shared
    host's pace drifts over a bench of many minutes (on the development VM the read floor
    went 1.6 -> 1.9 s and every method ~10 % slower within an hour): a run's ``wall / floor
    here`` compares it with the machine as it was then, which the one floor measured at the
    start does not."""
    read_through(files)
    t0 = time.perf_counter()
    read_through(files)
    read_s = time.perf_counter() - t0
    return measure_startup(2) + read_s + write_s


def measure_write(nbytes: int, folder: Path) -> tuple[float, float | None]:
    """Seconds to write ``nbytes`` to a new file in ``folder`` and fsync it (best of two), buffered
    and past the page cache (``O_DIRECT`` from a page-aligned buffer, as surgeon's writer does; None
    where the file system refuses it): the least of the two is the least any tool pays to put one
    output on that file system."""
    import mmap

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    chunk = 4 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    buf[:] = torch.randint(0, 256, (chunk,), dtype=torch.uint8).numpy().tobytes()
    view = memoryview(buf)

    def once(flags: int) -> float:
        path = folder / ".bench-write-floor"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            at = 0
            while at < nbytes:  # whole chunks (O_DIRECT writes whole blocks): at most one chunk more
                at += os.pwrite(fd, view, at)
            os.ftruncate(fd, nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)
            path.unlink()
        return time.perf_counter() - t0

    buffered = min(once(0) for _ in range(2))
    direct = None
    if hasattr(os, "O_DIRECT"):
        try:
            direct = min(once(os.O_DIRECT) for _ in range(2))
        except OSError:
            direct = None
    return buffered, direct


def measure_startup(repeats: int = 3) -> float:
    """Seconds for a fresh Python process to import torch and leave without tearing the
    interpreter down (the best of a few): every tool here pays it before it reads a byte."""
    import subprocess

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import os, torch; os._exit(0)"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def without_bytecode_switch(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less ``PYTHONDONTWRITEBYTECODE``: the timed tools keep their bytecode caches."""
    return {k: v for k, v in environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def warm_kernels(root: Path, methods: list[str], device: str, env: dict[str, str]) -> None:
    """Run each surgeon method untimed on the tiny family, whole and in small row
    pieces (the two paths the engine takes): the first run after installing
    compiles surgeon's numba kernels (seconds, and a higher peak RSS), a one-time
    cost that this bench leaves out as it leaves out a cold page cache."""
    fam = build_family(root / "tiny", *PRESETS["tiny"])
    for method in methods:
        warm_config(root, method, CONFIGS[method].format(**{k: str(v) for k, v in fam.items()}), device, env)


def warm_config(root: Path, name: str, config: str, device: str, env: dict[str, str]) -> None:
    """Run ``config`` (a recipe over the tiny family) untimed, whole and in small row pieces.

    numba compiles a kernel once per signature, and the number of inputs is part
    of it: a warm-up must merge as many models as the timed run."""
    import subprocess

    cfg = root / "tiny" / f"{name}.yml"
    cfg.write_text(config)
    out = root / "tiny" / f"out-warm-{name}"
    for pieces in ([], ["--piece-size", "64KB"]):
        subprocess.run([sys.executable, "-m", "surgeon", "run", str(cfg), str(out), "--overwrite", "-q",
                        "--device", device, *pieces], env=env, check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "surgeon-bench-merge")
    ap.add_argument("--methods", nargs="+", default=["all"],
                    help="methods to run ('all': every surgeon method with a config here)")
    ap.add_argument("--remote", action="store_true",
                    help="instead: one TIES merge of base + 2 fine-tunes from a local fake hub, streamed vs downloaded")
    ap.add_argument("--hub-mb-per-s", type=float, default=0.0,
                    help="--remote: the fake hub sends each weight response at most this fast (MB/s per "
                         "connection, like a CDN; 0: as fast as loopback goes)")
    ap.add_argument("--hub-latency-ms", type=float, default=0.0,
                    help="--remote: the fake hub waits this long before answering each weight request")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--mergekit-methods", nargs="+", default=None,
                    help="run mergekit only for these methods (default: every method it has)")
    ap.add_argument("--no-warmup", action="store_true", help="do not compile surgeon's kernels before timing")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each tool's run this many times and keep the fastest (the floors' parts are "
                         "best of two): on a 2-core VM one run of a 5-second merge varies by 1.5x")
    a = ap.parse_args()
    if a.remote:
        return bench_remote(a)
    if a.methods == ["all"]:
        from surgeon.merge import all_methods

        have = set(all_methods())
        a.methods = [m for m in CONFIGS if m in have]
        a.methods.append("frankenmerge")  # slices: (layer surgery) runs with every method list
        missing = sorted(have - set(CONFIGS))
        if missing:
            print(f"no config here for: {', '.join(missing)}")

    layers, hidden, inter, vocab = PRESETS[a.preset]
    fam_root = a.root / a.preset
    t0 = time.perf_counter()
    fam = build_family(fam_root, layers, hidden, inter, vocab)
    files = sorted(f for p in fam.values() for f in p.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    params = size // 2 // len(fam)
    print(f"inputs: base + {len(fam) - 1} x {params / 1e9:.2f}B params bf16, {size / 1e9:.2f} GB "
          f"(built or found in {time.perf_counter() - t0:.0f}s) under {fam_root}")
    machine = host()
    print(f"host: {machine['cpu']} ({machine['simd']}), {machine['cpus']} CPUs, {machine['os']}")
    threads = os.cpu_count() or 1
    read_s, cast_s = measure_floors(files, threads)
    print(f"floors on this machine: read {size / 1e9 / read_s:.2f} GB/s ({read_s:.1f}s), "
          f"bf16->f32 pass {size / 1e9 / cast_s:.2f} GB/s ({cast_s:.1f}s) with {threads} threads")
    floor = max(read_s, cast_s)
    startup_s = measure_startup()
    out_bytes = size // len(fam)
    buffered_s, direct_s = measure_write(out_bytes, fam_root)
    write_s = min(buffered_s, direct_s if direct_s is not None else buffered_s)
    job_floor = startup_s + read_s + write_s
    print(f"start-up of a torch process (import torch; os._exit): {startup_s:.1f}s; write + fsync of one "
          f"output ({out_bytes / 1e9:.2f} GB): {write_s:.1f}s ({out_bytes / 1e9 / write_s:.2f} GB/s; buffered "
          f"{buffered_s:.1f}s, O_DIRECT " + (f"{direct_s:.1f}s)" if direct_s is not None else "refused)"))
    print(f"whole-job floor = start-up + read + write = {startup_s:.1f} + {read_s:.1f} + {write_s:.1f} = "
          f"{job_floor:.1f}s (old floor max(read, cast) {floor:.1f}s)")

    env = {**without_bytecode_switch(os.environ), "HF_HUB_OFFLINE": "1"}
    if not a.no_warmup:
        warm_kernels(a.root, a.methods, a.device, env)
    bindir = Path(sys.executable).parent
    rows = []
    for method in a.methods:
        cfg = fam_root / f"{method}.yml"
        cfg.write_text(CONFIGS[method].format(**{k: str(v) for k, v in fam.items()}))
        tools = [("surgeon", None)]
        if not a.no_mergekit and method in MERGEKIT_HAS and importlib.util.find_spec("mergekit") is not None \
                and (a.mergekit_methods is None or method in a.mergekit_methods):
            tools.append(("mergekit", None))
        for tool, _ in tools:
            out = fam_root / f"out-{tool}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "surgeon":
                launcher = [sys.executable, "-m", "surgeon"] if a.processes == 1 else [
                    str(bindir / "torchrun"), "--nproc_per_node", str(a.processes), "-m", "surgeon"]
                # as a user types it: without --report (which also hashes the output for its sha256)
                cmd = [*launcher, "run", str(cfg), str(out), "--overwrite", "-q", "--device", a.device]
            else:
                cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out)] + (
                    ["--cuda"] if a.device.startswith("cuda") else [])
            runs = []
            for _ in range(max(1, a.repeats)):
                here = floor_here(files, write_s)
                wall, rss, code, cpu = run_measured(cmd, env)
                runs.append((wall, rss, code, cpu, here))
                if code != 0:
                    break
                shutil.rmtree(out, ignore_errors=True)
            walls = [r[0] for r in runs]
            wall, rss, code, cpu, here = min(runs, key=lambda r: (r[2] != 0, r[0]))  # the fastest clean run
            rows.append({"method": method, "tool": tool, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "peak_rss_gb": round(rss / 1e9, 3), "x_job_floor": round(wall / job_floor, 2),
                         "job_floor_here_s": round(here, 2), "x_job_floor_here": round(wall / here, 2),
                         "input_gbps": round(size / 1e9 / wall, 3), "x_floor": round(wall / floor, 2),
                         "x_floor_startup": round(wall / (floor + startup_s), 2), "exit": code,
                         "processes": a.processes if tool == "surgeon" else 1, "device": a.device,
                         "walls_s": [round(w, 2) for w in walls]})
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {method:<16} {tool:<9} {wall:8.1f}s wall {cpu:8.1f}s cpu  RSS {rss / 1e9:6.2f} GB"
                  f"  floor here {here:4.1f}s"
                  + ("" if code == 0 else f"  (exit {code})")
                  + (f"  (best of {len(walls)}: {', '.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1 else ""),
                  flush=True)

    print()
    print("| method | tool | wall s | cpu s | peak RSS GB | in GB/s | wall / job floor | wall / floor here "
          "| speed-up vs mergekit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mk = next((x for x in rows if x["method"] == r["method"] and x["tool"] == "mergekit"), None)
        speed = f"{mk['wall_s'] / r['wall_s']:.1f}x" if mk and r["tool"] == "surgeon" else ""
        fail = "" if r["exit"] == 0 else f" (exit {r['exit']})"
        print(f"| {r['method']} | {r['tool']}{fail} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {r['input_gbps']:.2f} | {r['x_job_floor']:.2f} | "
              f"{r['x_job_floor_here']:.2f} | {speed} |")
    print(f"whole-job floor {job_floor:.1f}s = start-up {startup_s:.1f} + read {read_s:.1f} + write+fsync {write_s:.1f}")
    if a.json:
        a.json.write_text(json.dumps({"preset": a.preset, "host": machine, "repeats": a.repeats,
                                      "input_bytes": size, "read_s": read_s,
                                      "cast_s": cast_s,
                                      "startup_s": startup_s, "write_s": write_s, "write_buffered_s": buffered_s,
                                      "write_direct_s": direct_s, "job_floor_s": job_floor,
                                      "rows": rows}, indent=2))


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed: the hub cache links blobs)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def bench_remote(a: argparse.Namespace) -> None:
    """One TIES merge of base + 2 fine-tunes from the tests' fake hub: streamed vs download-then-merge."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    from hub_server import FakeHub  # the tests' local stand-in for the hub, served over HTTP on 127.0.0.1

    layers, hidden, inter, vocab = PRESETS[a.preset]
    fam_root = a.root / a.preset
    fam = build_family(fam_root, layers, hidden, inter, vocab)
    names = ["base", "ft1", "ft2"]
    cfg_text = ("merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:\n" + "".join(
        f"  - model: {{{k}}}\n    parameters: {{{{weight: 1.0, density: 0.3}}}}\n" for k in names[1:]))
    if not a.no_warmup:  # base + 2 is not the local bench's arity: its kernels may not be compiled yet
        tiny = build_family(a.root / "tiny", *PRESETS["tiny"])
        warm_config(a.root, "remote-ties", cfg_text.format(**{n: str(tiny[n]) for n in names}), "cpu",
                    without_bytecode_switch(os.environ))
    rows = []
    with FakeHub() as hub:
        for n in names:
            hub.add_folder(f"bench/{n}", fam[n])
        hub.weight_bytes_per_s = a.hub_mb_per_s * 1e6
        hub.weight_delay_s = a.hub_latency_ms / 1e3
        weight_bytes = 0
        for n in names:
            for fname, data in hub.files(f"bench/{n}").items():
                if fname.endswith(".safetensors"):
                    weight_bytes += len(data) - 8 - int.from_bytes(data[:8], "little")
        pacing = ([f"waits {a.hub_latency_ms:g} ms"] if a.hub_latency_ms else []) + \
            ([f"sends at most {a.hub_mb_per_s:g} MB/s"] if a.hub_mb_per_s else [])
        network = f"; each weight response {' and '.join(pacing)}" if pacing else ""
        print(f"fake hub at {hub.url}: {len(names)} models, {weight_bytes / 1e9:.2f} GB of tensor data{network}")
        cfg = fam_root / "remote-ties.yml"
        cfg.write_text(cfg_text.format(**{n: f"bench/{n}" for n in names}))
        for mode in ("--remote-stream", "--no-remote-stream"):
            home = a.root / f"hf-home{mode}"
            out = fam_root / f"out-remote{mode}"
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            env = {**without_bytecode_switch(os.environ), "HF_ENDPOINT": hub.url, "HF_HOME": str(home),
                   "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            env.pop("HF_TOKEN", None)
            report = fam_root / f"report-remote{mode}.json"
            report.unlink(missing_ok=True)
            hub.reset_counters()
            cmd = [sys.executable, "-m", "surgeon", "run", str(cfg), str(out), "--overwrite", "-q", mode,
                   "--report", str(report)]
            wall, rss, code, cpu = run_measured(cmd, env)
            served = hub.weight_bytes_served()
            rep = json.loads(report.read_text()) if report.exists() else {}
            rows.append({"mode": "streamed" if mode == "--remote-stream" else "download, then merge",
                         "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_gb": round(rss / 1e9, 3),
                         "weight_bytes_served": served, "input_weight_bytes": weight_bytes,
                         "served_over_input": round(served / weight_bytes, 4),
                         "hub_cache_bytes": _du(home), "output_bytes": _du(out), "exit": code,
                         "remote": rep.get("remote")})
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {rows[-1]['mode']:<22} {wall:7.1f}s wall {cpu:7.1f}s cpu, served {served / 1e9:.2f} GB "
                  f"({served / weight_bytes:.3f}x input), hub cache {rows[-1]['hub_cache_bytes'] / 1e9:.2f} GB, "
                  f"output {rows[-1]['output_bytes'] / 1e9:.2f} GB" + ("" if code == 0 else f" (exit {code})"),
                  flush=True)
    print()
    print("| TIES, base + 2 from the local fake hub | wall s | cpu s | peak RSS GB | tensor bytes fetched / input | "
          "disk used (hub cache + output) GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{r['served_over_input']:.3f} | {(r['hub_cache_bytes'] + r['output_bytes']) / 1e9:.2f} |")
    if a.json:
        a.json.write_text(json.dumps({"preset": a.preset, "host": host(), "hub_mb_per_s": a.hub_mb_per_s,
                                      "hub_latency_ms": a.hub_latency_ms, "remote": rows}, indent=2))


if __name__ == "__main__":
    main()
