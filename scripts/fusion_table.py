#!/usr/bin/env python
"""Fusion on the pico zoo: does distilling the Shakespeare teachers beat SFT alone?

    python scripts/fusion_table.py --seeds 0,1 --steps 40   # the zoo table in docs/fusion.md
    python scripts/fusion_table.py --steps 40          # the short run, where GLD costs perplexity
    python scripts/fusion_table.py --only "fuse: token-wise + GLD" --gld-weight 0.3 --gld '{"nodes": "rank"}'

Pivot: zoo/bpe-base (byte-level BPE, trained on prose). Sources: zoo/bpe-shakespeare
(same tokenizer) and zoo/sp-shakespeare (SentencePiece-style tokenizer, another
architecture). Data: the first ``--chars`` characters of zoo/data/shakespeare/train.txt;
every run sees the same batches for the same number of steps with the same seed
(``--seeds 0,1,2`` averages several and prints the seeds' standard deviation).
GLD options: ``--gld-weight``, ``--gld`` (JSON of ``gld_loss`` options), ``--gld-top-k``.
Evaluation: held-out perplexity and bits per byte on zoo/data/shakespeare/heldout.txt
(the teachers' domain) and zoo/data/prose/heldout.txt (the pivot's own domain).

Rows: the untouched pivot, SFT alone (lambda = 0), fusion with the token-wise term
only (gld_weight = 0; fuse's default term unless --tokenwise), fusion with token-wise
+ GLD (the defaults), the token-wise KL alone, GLD alone, and fusion from the
cross-tokenizer teacher alone (with and without GLD); the teachers themselves for
reference (their bits per byte are comparable, their perplexities are not: other
tokenizer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def configs(args) -> list[tuple[str, list[str], dict]]:
    both = ["bpe-shakespeare", "sp-shakespeare"]
    cross = ["sp-shakespeare"]
    return [
        ("SFT only", both, {"lambda_": 0.0}),
        ("fuse: token-wise", both, {"gld_weight": 0.0}),
        ("fuse: token-wise + GLD", both, {}),
        ("fuse: token-wise KL", both, {"gld_weight": 0.0, "tokenwise": "kl"}),
        ("fuse: GLD only", both, {"tokenwise_weight": 0.0}),
        ("fuse sp only: token-wise", cross, {"gld_weight": 0.0}),
        ("fuse sp only: token-wise + GLD", cross, {}),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps (120 = 8 epochs of the default data)")
    ap.add_argument("--chars", type=int, default=60_000, help="training text: this many characters of train.txt")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    ap.add_argument("--gld-weight", type=float, default=1.0)
    ap.add_argument("--tokenwise", default=None, choices=["kl", "uld", "kl+uld"],
                    help="token-wise term (default: fuse's, the paper's ULD-like sorted distance)")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--gld", default=None, help='JSON dict of gld_loss options, e.g. \'{"nodes": "rank"}\'')
    ap.add_argument("--gld-top-k", type=int, default=None, help="top-k of the graphs (default: --top-k)")
    ap.add_argument("--no-reference", action="store_true", help="skip evaluating the untouched pivot and teachers")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; rows show the mean over them")
    ap.add_argument("--eval-chars", type=int, default=None, help="cut the held-out texts (faster)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the pico models run several times faster on a shared 2-core machine)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (caches are reused across runs)")
    ap.add_argument("--only", default=None, help="comma-separated row names to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from surgeon.eval.perplexity import evaluate_text
    from surgeon.fusion import fuse

    zoo = args.zoo
    pivot = zoo / "bpe-base"
    for name in ("bpe-base", "bpe-shakespeare", "sp-shakespeare"):
        if not (zoo / name / "config.json").is_file():
            print(f"{zoo / name}: missing; build the zoo first (python scripts/build_zoo.py)", file=sys.stderr)
            return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="fusion-table-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "shakespeare-train.txt"
    data.write_text((zoo / "data" / "shakespeare" / "train.txt").read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
    evals = {"shakespeare": zoo / "data" / "shakespeare" / "heldout.txt", "prose": zoo / "data" / "prose" / "heldout.txt"}

    def evaluate(model_dir: Path) -> dict:
        out = {}
        for dom, f in evals.items():
            r = evaluate_text(model_dir, f, window=128, max_chars=args.eval_chars, progress=False)
            out[dom] = {"ppl": r["perplexity"], "bpb": r["bits_per_byte"]}
        return out

    rows = []
    refs = (("pivot bpe-base (no training)", pivot), ("teacher bpe-shakespeare", zoo / "bpe-shakespeare"),
            ("teacher sp-shakespeare", zoo / "sp-shakespeare"))
    for label, model in () if args.no_reference else refs:
        rows.append({"run": label, "eval": evaluate(model), "seconds": None})
        _print_row(rows[-1])
    wanted = set(args.only.split(",")) if args.only else None
    seeds = [int(x) for x in args.seeds.split(",")]
    for label, sources, kw in configs(args):
        if wanted and label not in wanted:
            continue
        opts = dict(lambda_=args.lambda_, gld_weight=args.gld_weight, tokenwise_weight=1.0)
        opts.update(kw)
        tokenwise = opts.pop("tokenwise", args.tokenwise)
        per_seed, t = [], time.time()
        for seed in seeds:
            out = work / ("out-" + "".join(c if c.isalnum() else "-" for c in label) + f"-s{seed}")
            rep = fuse(pivot, [{"path": str(zoo / s)} for s in sources], data, out, max_length=args.max_length,
                       batch_size=args.batch_size, lr=args.lr, steps=args.steps, top_k=args.top_k, seed=seed,
                       overwrite=True, progress=False, schedule="cosine",
                       options={"work_dir": str(work / "fuse-work"),
                                **({"tokenwise": tokenwise} if tokenwise else {}),
                                "gld": json.loads(args.gld) if args.gld else None, "gld_top_k": args.gld_top_k},
                       **opts)
            per_seed.append({"seed": seed, "eval": evaluate(out), "final": rep["final"],
                             "coverage": {s["id"]: s["coverage"] for s in rep["sources"]}})
        mean = {dom: {m: sum(p["eval"][dom][m] for p in per_seed) / len(per_seed) for m in ("ppl", "bpb")}
                for dom in evals}
        for dom in evals:
            xs = [p["eval"][dom]["ppl"] for p in per_seed]
            mean[dom]["ppl_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append({"run": label, "sources": sources, "settings": opts, "eval": mean, "per_seed": per_seed,
                     "seconds": round((time.time() - t) / len(seeds), 1),
                     "final": {k: sum(p["final"][k] for p in per_seed) / len(per_seed) for k in per_seed[0]["final"]}})
        _print_row(rows[-1])
    print()
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


def _print_row(r: dict) -> None:
    e = r["eval"]
    def sd(dom: str) -> str:
        return f" ± {e[dom]['ppl_std']:5.2f}" if "ppl_std" in e[dom] else ""

    print(f"{r['run']:<34} shakespeare ppl {e['shakespeare']['ppl']:8.2f}{sd('shakespeare')} bpb {e['shakespeare']['bpb']:.4f}   "
          f"prose ppl {e['prose']['ppl']:8.2f}{sd('prose')}   {'' if r['seconds'] is None else str(r['seconds']) + ' s'}",
          flush=True)


def markdown(rows: list[dict], args) -> str:
    head = ("| run | Shakespeare held-out ppl | bpb | prose held-out ppl | final SFT CE | time (s) |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        e = r["eval"]
        sft = r.get("final", {}).get("sft")

        def pm(dom: str, e: dict = e) -> str:
            return f"{e[dom]['ppl']:.2f}" + (f" ± {e[dom]['ppl_std']:.2f}" if "ppl_std" in e[dom] else "")

        lines.append(f"| {r['run']} | {pm('shakespeare')} | {e['shakespeare']['bpb']:.4f} | "
                     f"{pm('prose')} | {'' if sft is None else f'{sft:.3f}'} | "
                     f"{'' if r['seconds'] is None else r['seconds']} |")
    lines.append("")
    lines.append(f"{args.steps} steps x batch {args.batch_size} x {args.max_length} tokens, lr {args.lr} cosine, "
                 f"lambda {args.lambda_}, token-wise {args.tokenwise or 'uld (default)'}, GLD weight {args.gld_weight}, top-k {args.top_k}, "
                 f"mean ± standard deviation over seeds {args.seeds}; teacher perplexities use their own tokenizers (compare bpb).")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
