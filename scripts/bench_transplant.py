#!/usr/bin/env python
"""surgeon transplant vs mergekit-tokensurgeon, side by side on the same base/donor/k.

Each tool runs in its own child process (so neither pays for the other's
imports or caches); wall time and peak RSS come from ``os.wait4`` on that
child. Afterwards the new embedding rows of both outputs are compared: cosine
similarity row by row over the tokens surgeon approximated, and how many
copied rows are identical.

    .venv/bin/python scripts/bench_transplant.py                       # Gemma-3-270M onto SmolLM2's tokenizer
    .venv/bin/python scripts/bench_transplant.py --base zoo/bpe-base --donor zoo/sp-base
    .venv/bin/python scripts/bench_transplant.py --screen none --screen 256 --screen 128/4 --eval-chars 0

Defaults use the real models of scripts/get_real_models.py. ``--screen`` may be
repeated: each value is one surgeon run (``auto`` = the default, ``none`` = exact
OMP, ``N`` candidates, or ``N/S``: N candidates re-ranked every S picks); default:
``auto`` and ``none``. Results are printed as a table and written as JSON
(``--json``). Every output is scored in bits per byte on the first
``--eval-chars`` characters of each ``--text`` (default 100,000: the zoo's
held-out WikiText-2 slice whole, tinyshakespeare, the WikiText-2 test set, and
Python source from this interpreter's standard library): the texts differ in
how they write newlines, which matters (docs/transplant.md). Fewer characters
judge on fewer distinct new tokens: at 20,000 two equally good pursuits
(different atoms, the same fit in the donor space) differed by up to 0.015
bits per byte in either direction. Wall time depends on what else the machine
runs; CPU time (user + system of the child) is the steadier comparison on a
shared machine.

The FLOP floor: the pursuit's matrix products (:func:`surgeon.transplant.omp.omp_flops`;
exact OMP and mergekit do k vocabulary-wide products per new token, the default
screened pursuit 8 plus its small candidate products) divided by the float32
GEMM rate per CPU-second measured on the spot with one product of the same shape
(the fastest of torch's and numpy's float32 BLAS and, where exact OMP's
certified search uses it, torch's bfloat16 product: the fastest GEMM at hand
that gives exact OMP's picks); each run's CPU time over that floor says how
far from the hardware's pace it ran. A donor that ties its head to its
embeddings needs one pursuit for both of an untied base's matrices: the floor
counts one (mergekit-tokensurgeon runs two).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_TEXTS = (ROOT / "zoo" / "data" / "prose" / "heldout.txt",
                 ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                 ROOT.parent / "shared" / "data" / "wikitext2-test.raw")
#: standard-library modules whose source makes the code text (in this order)
STDLIB_SOURCES = ("textwrap", "json.decoder", "json.encoder", "argparse")


def stdlib_text(folder: Path) -> Path:
    """Python source from this interpreter's standard library, one text file (its version in the name)."""
    import importlib.util

    out = folder / f"python{sys.version_info[0]}.{sys.version_info[1]}-stdlib.py.txt"
    parts = [Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8") for m in STDLIB_SOURCES]
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def gemm_rate(n_atoms: int, dim: int, rows: int = 512, repeats: int = 3) -> dict[str, float]:
    """FLOP per CPU-second (user + system, all threads) of one (rows x dim) @ (dim x n_atoms) product,
    best of ``repeats``: float32 through torch and through numpy's BLAS (surgeon's pursuit runs its
    products through numpy's on CPU: ``surgeon.transplant.products``), and bfloat16 through torch
    where exact OMP's certified search uses it. CPU time, not wall time: on a
    shared machine the wall-clock rate falls with the load while the CPU-time rate holds, and it is
    CPU time the runs are compared in."""
    import resource

    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, dim, generator=g), torch.randn(n_atoms, dim, generator=g)
    an, bt = a.numpy(), np.ascontiguousarray(b.numpy().T)
    out = np.empty((rows, n_atoms), dtype=np.float32)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    products = [("torch", lambda: a @ b.T), ("numpy", lambda: np.matmul(an, bt, out=out))]
    from surgeon.transplant.products import bf16_search_available

    if bf16_search_available():  # exact OMP's search runs on bfloat16 products here, certified
        products.append(("torch bfloat16", lambda: ab @ bb.T))
    rates = {}
    for name, product in products:
        best = float("inf")
        for _ in range(repeats):
            t = cpu()
            product()
            best = min(best, max(cpu() - t, 1e-6))
        rates[name] = 2.0 * rows * dim * n_atoms / best
    return rates


def torch_float32():
    import torch

    return torch.float32


SURGEON_CHILD = r"""
import json, sys
from surgeon.transplant import transplant
a = json.loads(sys.argv[1])
extra = {"refresh": a["refresh"]} if a.get("refresh") is not None else {}
rep = transplant(a["base"], a["donor"], a["out"], method="omp", k=a["k"], screen=a["screen"], **extra,
                 batch_size=a["batch_size"], device=a["device"], overwrite=True, progress=False)
json.dump(rep, open(a["report"], "w"))
"""


def parse_screen(text: str) -> tuple[int | str | None, int | None]:
    """One ``--screen`` value: ``none`` (exact), ``auto``, ``N`` or ``N/S`` -> (screen, refresh or None)."""
    head, _, tail = text.lower().partition("/")
    screen = None if head == "none" else "auto" if head == "auto" else int(head)
    return screen, (int(tail) if tail else None)


def run_child(cmd: list[str], log: Path, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"ok": proc.returncode == 0, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log), "returncode": proc.returncode}


def embed_rows(folder: Path):
    from surgeon.io import Checkpoint
    from surgeon.transplant import find_embeddings

    with Checkpoint.open(folder) as ck:
        name, _, _ = find_embeddings(ck)
        return ck.get(name).float()


def compare(a: Path, b: Path, new_ids: list[int]) -> dict:
    import torch

    ea, eb = embed_rows(a), embed_rows(b)
    n = min(ea.shape[0], eb.shape[0])
    ids = torch.tensor([i for i in new_ids if i < n], dtype=torch.long)
    cos = torch.nn.functional.cosine_similarity(ea[ids], eb[ids], dim=1)
    other = torch.ones(n, dtype=torch.bool)
    other[ids] = False
    same = (ea[:n][other] == eb[:n][other]).all(1)
    return {
        "rows": [int(ea.shape[0]), int(eb.shape[0])],
        "new_rows_compared": int(len(ids)),
        "cosine_mean": round(float(cos.mean()), 4),
        "cosine_median": round(float(cos.median()), 4),
        "cosine_p05": round(float(cos.quantile(0.05)), 4),
        "frac_cosine_gt_0.99": round(float((cos > 0.99).float().mean()), 4),
        "copied_rows_identical": f"{int(same.sum())}/{int(other.sum())}",
    }


def kernel_check(base: Path, donor: Path, k: int, n: int) -> dict:
    """Both OMP kernels on identical inputs: our dictionary of shared tokens, the first n new tokens."""
    import torch
    from mergekit.tokensurgeon import batch_omp as mergekit_omp

    from surgeon.io import Checkpoint
    from surgeon.transplant import find_embeddings, load_tokenizer_info, match_vocabularies
    from surgeon.transplant.omp import omp_exact, reconstruct

    m = match_vocabularies(load_tokenizer_info(base), load_tokenizer_info(donor))
    with Checkpoint.open(base) as b, Checkpoint.open(donor) as d:
        bw = b.get(find_embeddings(b)[0]).float()
        dw = d.get(find_embeddings(d)[0]).float()
    d_ids = torch.tensor([x for x, _ in m.shared])
    b_ids = torch.tensor([y for _, y in m.shared])
    new = torch.tensor([x for x in m.new if x < dw.shape[0]][:n])
    targets, atoms = dw[new], dw[d_ids]
    t = time.perf_counter()
    i1, c1 = omp_exact(targets, atoms, k)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    i2, c2 = mergekit_omp(targets, atoms, k)
    t2 = time.perf_counter() - t
    same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(i1, i2)) / len(new)
    first8 = float((i1[:, :8] == i2[:, :8]).all(1).float().mean())
    r1, r2 = reconstruct(i1, c1, bw[b_ids]), reconstruct(i2, c2.float(), bw[b_ids])
    cos = torch.nn.functional.cosine_similarity(r1, r2, dim=1)
    fit = [float(torch.nn.functional.cosine_similarity(reconstruct(i, c.float(), atoms), targets, dim=1).mean())
           for i, c in ((i1, c1), (i2, c2))]
    return {"targets": int(len(new)), "surgeon_s": round(t1, 2), "mergekit_s": round(t2, 2),
            "same_atom_sets": round(same, 4), "same_first_8_picks": round(first8, 4),
            "row_cosine_mean": round(float(cos.mean()), 5), "row_cosine_min": round(float(cos.min()), 5),
            "donor_fit_surgeon": round(fit[0], 5), "donor_fit_mergekit": round(fit[1], 5)}


def main(argv: list[str] | None = None) -> int:
    from scripts.get_real_models import cache_dir

    real = cache_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=real / "gemma-3-270m")
    ap.add_argument("--donor", type=Path, default=real / "smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--screen", action="append", default=None,
                    help="surgeon candidate screening per run ('auto' = the default, 'none' = exact, N, or N/S: "
                         "N candidates re-ranked every S picks; repeatable; default: auto and none)")
    ap.add_argument("--batch-size", type=int, default=512, help="tokens per batch for both tools")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for both children")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--kernel-sample", type=int, default=256,
                    help="also run both OMP kernels on the same inputs for this many new tokens (0: skip)")
    ap.add_argument("--eval-chars", type=int, default=100000,
                    help="score each output on the first this many characters of each text (bits per byte; 0: skip)")
    ap.add_argument("--text", type=Path, action="append", default=None,
                    help="score on this text (repeatable; default: zoo/data/prose/heldout.txt (41k characters), "
                         "../shared/data/tinyshakespeare.txt, ../shared/data/wikitext2-test.raw and Python source "
                         "from this interpreter's standard library)")
    ap.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--prior", type=Path, default=None,
                    help="JSON with runs of an interrupted bench ({'runs': {label: result}}) whose outputs are still "
                         "in --work: those runs are not repeated (their times are the earlier ones)")
    args = ap.parse_args(argv)
    for p in (args.base, args.donor):
        if not (p / "config.json").is_file():
            raise SystemExit(f"{p}: not a model folder (run scripts/get_real_models.py for the default models)")
    texts = args.text or [p for p in DEFAULT_TEXTS if p.is_file()]
    runs = [parse_screen(s) for s in (args.screen or ["auto", "none"])]

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-transplant-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"base": str(args.base), "donor": str(args.donor), "k": args.k, "batch_size": args.batch_size,
                     "device": args.device, "runs": {}}
    new_ids: list[int] = []
    if not args.text and args.eval_chars:
        texts.append(stdlib_text(work))
    for screen, refresh in runs:
        name = f"{screen or 'exact'}" + (f"-{refresh}" if refresh is not None else "")
        label = "surgeon" + (" exact" if screen is None else " default" if screen == "auto" else f" screen={screen}") \
            + (f" refresh={refresh}" if refresh is not None else "")
        out = work / f"surgeon-{name}"
        rep_path = work / f"surgeon-{name}.json"
        spec = {"base": str(args.base), "donor": str(args.donor), "out": str(out), "k": args.k, "screen": screen,
                "refresh": refresh,
                "batch_size": args.batch_size, "device": args.device, "report": str(rep_path)}
        prior = json.loads(args.prior.read_text())["runs"].get(label) if args.prior else None
        if prior and prior.get("ok") and out.is_dir() and rep_path.is_file():
            print(f"reusing {label} from {args.prior}", flush=True)
            r = {k: v for k, v in prior.items() if k in ("ok", "wall_s", "cpu_s", "peak_rss_mb", "log", "returncode")}
        else:
            print(f"running {label} ...", flush=True)
            r = run_child([sys.executable, "-c", SURGEON_CHILD, json.dumps(spec)], work / f"{out.name}.log",
                          args.threads)
        r["out"] = str(out)
        if r["ok"]:
            rep = json.loads(rep_path.read_text())
            r["omp"] = rep["approximation"].get("embed")
            r["counts"] = {k: rep["counts"][k] for k in ("shared", "new", "output_rows")}
            r["screen_used"] = rep.get("screen")
            r["pursuits"] = sum(1 for st in rep["approximation"].values() if not st.get("same_pursuit_as"))
            r["refresh"] = rep.get("refresh")
            if not new_ids:
                from surgeon.transplant import load_tokenizer_info, match_vocabularies

                m = match_vocabularies(load_tokenizer_info(args.base), load_tokenizer_info(args.donor))
                shared = {d for d, _ in m.shared}
                new_ids = [d for d in range(rep["counts"]["output_rows"]) if d not in shared]
        results["runs"][label] = r
        print(f"  {r}", flush=True)
    if not args.skip_mergekit:
        exe = shutil.which("mergekit-tokensurgeon") or str(Path(sys.executable).parent / "mergekit-tokensurgeon")
        out = work / "mergekit"
        cmd = [exe, str(args.base), str(args.donor), str(out), "-k", str(args.k), "-a", "omp",
               "--batch-size", str(args.batch_size), "--device", args.device, "--no-copy-tokenizer"]
        print("running mergekit-tokensurgeon ...", flush=True)
        r = run_child(cmd, work / "mergekit.log", args.threads)
        r["out"] = str(out)
        results["runs"]["mergekit-tokensurgeon"] = r
        print(f"  {r}", flush=True)
        if r["ok"] and new_ids:
            for label, sr in results["runs"].items():
                if label.startswith("surgeon") and sr["ok"]:
                    sr["vs_mergekit"] = compare(Path(sr["out"]), out, new_ids)
            mk = r["wall_s"]
            for label, sr in results["runs"].items():
                if label.startswith("surgeon") and sr["ok"]:
                    sr["speedup_vs_mergekit"] = round(mk / sr["wall_s"], 2)
                    sr["cpu_speedup_vs_mergekit"] = round(r["cpu_s"] / max(sr["cpu_s"], 1e-9), 2)
    exact = results["runs"].get("surgeon exact")
    if exact and exact["ok"] and new_ids:
        for label, sr in results["runs"].items():
            if label.startswith("surgeon ") and label != "surgeon exact" and sr["ok"]:
                sr["vs_surgeon_exact"] = compare(Path(sr["out"]), Path(exact["out"]), new_ids)
    flop_floor(results, args.donor, args.k)
    if args.kernel_sample and not args.skip_mergekit:
        print("kernel check: both OMP implementations on identical inputs ...", flush=True)
        results["kernel_check"] = kernel_check(args.base, args.donor, args.k, args.kernel_sample)
    if args.eval_chars:
        from surgeon.eval.perplexity import _load, evaluate_text

        for label, r in results["runs"].items():
            if r["ok"]:
                out = Path(r["out"])
                if not (out / "tokenizer.json").exists():  # mergekit run without tokenizer copy
                    for f in args.donor.glob("tokenizer*"):
                        shutil.copy(f, out / f.name)
                tok, model = _load(out, "cpu", torch_float32())
                r["bits_per_byte"] = {}
                for text in texts:
                    ev = evaluate_text(out, text, max_chars=args.eval_chars, progress=False, model=model, tokenizer=tok)
                    r["bits_per_byte"][text.name] = round(ev["bits_per_byte"], 4)
                del model, tok
                print(f"  bits per byte {label}: {r['bits_per_byte']}", flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def flop_floor(results: dict, donor: Path, k: int) -> None:
    """Add each run's FLOPs, the float32 GEMM rate measured now, and floor seconds (see the module docstring)."""
    from surgeon.io import Checkpoint
    from surgeon.transplant import find_embeddings
    from surgeon.transplant.omp import omp_flops

    counts = next((r["counts"] for r in results["runs"].values() if r.get("counts")), None)
    if counts is None:
        return
    with Checkpoint.open(donor) as d:
        dim = int(d.info(find_embeddings(d)[0]).shape[1])
    # each embedding matrix the tool rebuilds costs one pursuit (tied models: one)
    pursuits = next((r["pursuits"] for r in results["runs"].values() if r.get("pursuits")), 1)
    rates = gemm_rate(counts["shared"], dim)
    rate = max(rates.values())  # the floor: the fastest GEMM at hand that gives exact OMP's picks
    results["gemm_gflops"] = round(rate / 1e9, 1)
    results["gemm_gflops_by_library"] = {k: round(v / 1e9, 1) for k, v in rates.items()}
    results["width"] = dim
    for label, r in results["runs"].items():
        if not r["ok"]:
            continue
        screen = r.get("screen_used") if label.startswith("surgeon") else None
        refresh = r.get("refresh") or 0
        f = omp_flops(counts["new"], counts["shared"], dim, k, screen, refresh)["total"] * pursuits
        r["tflop"] = round(f / 1e12, 3)
        r["floor_s"] = round(f / rate, 1)
        r["cpu_over_floor"] = round(r["cpu_s"] / max(r["floor_s"], 1e-9), 2)
        r["wall_over_floor"] = round(r["wall_s"] / max(r["floor_s"], 1e-9), 2)


def print_table(results: dict) -> None:
    print(f"\nbase {results['base']}\ndonor {results['donor']}\nk = {results['k']}, batch {results['batch_size']}, "
          f"device {results['device']}\n")
    texts: list[str] = []
    for r in results["runs"].values():
        for t in r.get("bits_per_byte", {}):
            if t not in texts:
                texts.append(t)
    if results.get("gemm_gflops"):
        by = ", ".join(f"{k} {v}" for k, v in results.get("gemm_gflops_by_library", {}).items())
        print(f"FLOP floor at the fastest GEMM rate measured now: {results['gemm_gflops']} GFLOP per CPU-second "
              f"({by}; donor width {results['width']}); floor s and cpu / floor are in CPU seconds\n")
    cols = ["tool", "OMP", "wall s", "cpu s", "peak RSS MB", "speed-up wall / cpu", "TFLOP", "floor s", "cpu / floor",
            "row cos vs mergekit (mean / p05)"]
    cols += [f"bpb {t}" for t in texts]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * 7 + ["---"] + ["---:"] * len(texts)) + "|")
    for label, r in results["runs"].items():
        vs = r.get("vs_mergekit")
        cos = f"{vs['cosine_mean']:.3f} / {vs['cosine_p05']:.3f}" if vs else ""
        sp = f"{r['speedup_vs_mergekit']:.1f}x" if "speedup_vs_mergekit" in r else ""
        if "cpu_speedup_vs_mergekit" in r:
            sp += f" / {r['cpu_speedup_vs_mergekit']:.1f}x"
        bpb = [f"{r['bits_per_byte'][t]:.4f}" if t in r.get("bits_per_byte", {}) else "" for t in texts]
        status = "" if r["ok"] else " (FAILED)"
        omp = ("exact" if not r.get("screen_used") else f"screen {r['screen_used']}/{r.get('refresh') or 0}") \
            if label.startswith("surgeon") else "exact"
        fl = [f"{r['tflop']:.2f}", f"{r['floor_s']:.1f}", f"{r['cpu_over_floor']:.1f}x"] if "tflop" in r else ["", "", ""]
        print("| " + " | ".join([label + status, omp, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                                 sp, *fl, cos] + bpb) + " |")
    kc = results.get("kernel_check")
    if kc:
        print(f"\nOMP kernels on identical inputs ({kc['targets']} new tokens, our shared-token dictionary): "
              f"same atom sets {kc['same_atom_sets']:.1%}, same first 8 picks {kc['same_first_8_picks']:.1%}, "
              f"base-row cosine mean {kc['row_cosine_mean']} (min {kc['row_cosine_min']}); donor fit "
              f"{kc['donor_fit_surgeon']} vs {kc['donor_fit_mergekit']}; time {kc['surgeon_s']} s vs {kc['mergekit_s']} s")
    for label, r in results["runs"].items():
        if "vs_surgeon_exact" in r:
            v = r["vs_surgeon_exact"]
            print(f"\n{label} vs surgeon exact: cosine mean {v['cosine_mean']}, p05 {v['cosine_p05']}, "
                  f"share > 0.99: {v['frac_cosine_gt_0.99']}")


if __name__ == "__main__":
    raise SystemExit(main())
