#!/usr/bin/env python
"""Fusion on real models: SmolLM2-135M (pivot) learns from Gemma-3-270M (another tokenizer).

    python scripts/get_real_models.py                  # once: SmolLM2-135M-Instruct and Gemma-3-270M
    nice -n 10 python scripts/fusion_real.py --seeds 0,1,2 --steps 40 --json out.json

Same data, same steps, same seeds for every row; the teacher cache is built once
in ``--work`` and reused by every run and seed (each run adds the examples its
steps read that are not there yet). Rows: the pivot before training, SFT only
(lambda = 0), SFT + the token-wise term (the paper's ULD-like sorted top-k
distance; ``--tokenwise``), SFT + token-wise + GLD (the defaults), and the
teacher itself for reference. Held-out bits per byte of
recipes/data/fusion/<domain>-heldout.txt (never trained on), mean over seeds
with the seeds' standard deviation; "GLD's own contribution" is the per-seed
difference of the last two rows. Also: the cache's size and build time, the
training throughput with and without GLD.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=None, help="real-model cache (default: get_real_models.py's)")
    ap.add_argument("--domain", default="shakespeare", choices=["shakespeare", "wikitext"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--gld-weight", type=float, default=None, help="default: fuse()'s default")
    ap.add_argument("--tokenwise", default=None, help="default: fuse()'s default (the paper's ULD-like term)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-chars", type=int, default=6000, help="held-out characters scored")
    ap.add_argument("--max-examples", type=int, default=None,
                    help="train on the first N windows only (every seed then reads from the same N: one teacher cache)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="also score the held-out text every N steps during training (the curve; the table then "
                         "shows each row's lowest point and its step: an early-stopped SFT is the fair rival)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher-eval", action="store_true", help="also score the teacher (slow: 262k vocabulary)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusion-real"))
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from scripts.get_real_models import cache_dir
    from surgeon.eval.perplexity import evaluate_text
    from surgeon.fusion import fuse

    root = args.models or cache_dir()
    pivot, teacher = root / "smollm2-135m-instruct", root / "gemma-3-270m"
    for m in (pivot, teacher):
        if not (m / "config.json").is_file():
            print(f"{m}: missing; run scripts/get_real_models.py", file=sys.stderr)
            return 2
    data = REPO / "recipes" / "data" / "fusion" / f"{args.domain}-train.txt"
    heldout = REPO / "recipes" / "data" / "fusion" / f"{args.domain}-heldout.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work / "fuse-work"
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = set(args.only.split(",")) if args.only else None

    def score(model_dir: Path) -> dict:
        r = evaluate_text(model_dir, heldout, window=args.max_length * 2, max_chars=args.eval_chars, progress=False)
        return {"bpb": r["bits_per_byte"], "tokens": r["tokens"], "seconds": round(r["seconds"], 1)}

    rows: list[dict] = []
    common = dict(max_length=args.max_length, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                  top_k=args.top_k, progress=True, overwrite=True, schedule="cosine", lambda_=args.lambda_)
    base_opts: dict = {"work_dir": str(work), "warmup_ratio": 0.1}
    if args.max_examples:
        base_opts["max_examples"] = args.max_examples
    if args.tokenwise:
        base_opts["tokenwise"] = args.tokenwise
    if args.eval_every:  # the same text, characters and window as score()
        base_opts.update(eval_path=str(heldout), eval_every=args.eval_every, eval_max_chars=args.eval_chars,
                         eval_window=args.max_length * 2)
    gld_w = {} if args.gld_weight is None else {"gld_weight": args.gld_weight}
    configs = [
        ("SFT only", {"lambda_": 0.0}),
        ("SFT + token-wise", {"gld_weight": 0.0}),
        ("SFT + token-wise + GLD", dict(gld_w)),
    ]
    if wanted is None or "pivot" in wanted:  # (--only pivot,...)
        t = time.time()
        rows.append({"run": "pivot (no training)", "per_seed": [{"seed": None, "eval": score(pivot)}],
                     "seconds": round(time.time() - t, 1)})
        _print(rows[-1])
    if args.teacher_eval:
        rows.append({"run": "teacher Gemma-3-270M (own tokenizer)", "per_seed": [{"seed": None, "eval": score(teacher)}]})
        _print(rows[-1])
    for label, kw in configs:
        if wanted and label not in wanted:
            continue
        per = []
        for seed in seeds:
            out = args.work / ("out-" + "".join(c if c.isalnum() else "-" for c in label) + f"-s{seed}")
            t = time.time()
            rep = fuse(pivot, [{"path": str(teacher)}], data, out, seed=seed, options=dict(base_opts),
                       **{**common, **kw})
            wall = time.time() - t
            log = rep["log"]
            per.append({"seed": seed, "eval": score(out), "wall_s": round(wall, 1), "train_s": rep["train_seconds"],
                        "tokens_per_s": log[-1].get("tokens_per_s") if log else None,
                        "final": rep["final"], "sources": rep["sources"],
                        "curve": [{"step": c["step"], "bpb": c["eval_bpb"]} for c in rep.get("eval_curve") or []]})
        rows.append({"run": label, "settings": kw, "per_seed": per})
        _print(rows[-1])
    print()
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _print(r: dict) -> None:
    m, sd = _stats([p["eval"]["bpb"] for p in r["per_seed"]])
    extra = ""
    if r["per_seed"][0].get("tokens_per_s"):
        extra = f"  {statistics.mean(p['tokens_per_s'] for p in r['per_seed']):.0f} tokens/s, " \
                f"wall {statistics.mean(p['wall_s'] for p in r['per_seed']):.0f} s"
    print(f"{r['run']:<28} held-out bpb {m:.4f} ± {sd:.4f}{extra}", flush=True)


def markdown(rows: list[dict], args) -> str:
    curves = any(p.get("curve") for r in rows for p in r["per_seed"])
    lines = ["| run | held-out bits/byte (mean ± sd) | per seed | tokens/s | wall per run (s) |"
             + (" lowest on the way (step) per seed |" if curves else ""),
             "|---|---|---|---|---|" + ("---|" if curves else "")]
    by = {r["run"]: r for r in rows}
    for r in rows:
        m, sd = _stats([p["eval"]["bpb"] for p in r["per_seed"]])
        seeds = " / ".join(f"{p['eval']['bpb']:.4f}" for p in r["per_seed"])
        tps = [p["tokens_per_s"] for p in r["per_seed"] if p.get("tokens_per_s")]
        wall = [p["wall_s"] for p in r["per_seed"] if p.get("wall_s")]
        best = " / ".join(f"{b['bpb']:.4f} ({b['step']})" for b in
                          (min(p["curve"], key=lambda c: c["bpb"]) for p in r["per_seed"] if p.get("curve")))
        lines.append((f"| {r['run']} | {m:.4f} ± {sd:.4f} | {seeds} | {statistics.mean(tps):.0f} | "
                      f"{statistics.mean(wall):.0f} |" if tps else f"| {r['run']} | {m:.4f} | {seeds} | | |")
                     + (f" {best} |" if curves else ""))
    a, b = by.get("SFT + token-wise"), by.get("SFT + token-wise + GLD")
    if a and b:
        d = [y["eval"]["bpb"] - x["eval"]["bpb"] for x, y in zip(a["per_seed"], b["per_seed"])]
        lines.append("")
        lines.append("GLD's own contribution (bpb with GLD − without, per seed): " + " / ".join(f"{x:+.4f}" for x in d))
    for r in rows:
        for p in r["per_seed"]:
            for s in p.get("sources", []):
                lines.append(f"\n{r['run']} seed {p['seed']}: cache {s.get('cached_examples')} examples, "
                             f"{s.get('cache_seconds')} s (reused {s.get('cache_reused_examples')}), "
                             f"{s.get('cache_bytes_per_token')} bytes/token, align {s.get('align_seconds')} s, "
                             f"coverage {s.get('coverage')}")
    lines.append("")
    data = f"the first {args.max_examples} windows of {args.domain}" if getattr(args, "max_examples", None) else args.domain
    lines.append(f"{args.steps} steps x batch {args.batch_size} x {args.max_length} tokens of {data}, lr {args.lr} "
                 f"cosine (10 % warm-up), lambda {args.lambda_}, top-k {args.top_k}, seeds {args.seeds}; held-out: "
                 f"first {args.eval_chars} characters of {args.domain}-heldout.txt")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
