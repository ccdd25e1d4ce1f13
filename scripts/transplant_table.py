#!/usr/bin/env python
"""Bits per byte of base models, their OMP transplants and baseline transplants: one table.

For each (base, donor) pair the base model is given the donor's tokenizer with
OMP and with the baselines, and every model is scored on the same text slice
(held-out wikitext by default: zoo/data/prose/heldout.txt, the end of the WikiText-2
test split, which no zoo model was trained on) in bits per byte, which is comparable across
tokenizers. Default pairs:

* gemma->smollm2   Gemma-3-270M onto SmolLM2-135M's tokenizer   (scripts/get_real_models.py)
* bpe->sp          zoo/bpe-base onto zoo/sp-base's tokenizer   (scripts/build_zoo.py)
* sp->bpe          zoo/sp-base onto zoo/bpe-base's tokenizer

    .venv/bin/python scripts/transplant_table.py [--pairs gemma->smollm2,bpe->sp,sp->bpe]
        [--methods omp,mean,subword] [--k 64] [--screen auto] [--max-chars 20000] [--work DIR] [--json FILE]

Transplants are cached in ``--work`` (default ~/.cache/surgeon/transplant-table)
and reused when their report is there (``--fresh`` recomputes). Pairs whose
models are missing are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pairs_available(real: Path) -> dict[str, tuple[Path, Path, int]]:
    """name -> (base, donor, scoring window in tokens: the zoo was trained on [bos] + 127)."""
    zoo = ROOT / "zoo"
    return {
        "gemma->smollm2": (real / "gemma-3-270m", real / "smollm2-135m-instruct", 512),
        "bpe->sp": (zoo / "bpe-base", zoo / "sp-base", 127),
        "sp->bpe": (zoo / "sp-base", zoo / "bpe-base", 127),
    }


def main(argv: list[str] | None = None) -> int:
    from scripts.get_real_models import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="gemma->smollm2,bpe->sp,sp->bpe",
                    help="comma-separated pair names, or BASE_DIR:DONOR_DIR")
    ap.add_argument("--methods", default="omp,mean,subword", help="transplant methods (omp, mean, zero, subword)")
    ap.add_argument("--k", default="64", help="OMP atoms per token; several values give several OMP columns (e.g. 64,8)")
    ap.add_argument("--screen", default="auto",
                    help="OMP candidate screening: an integer, 'none' (exact) or 'auto' (exact up to 8192 shared "
                         "tokens, else 128)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", type=Path, default=ROOT / "zoo" / "data" / "prose" / "heldout.txt")
    ap.add_argument("--max-chars", type=int, default=20000, help="score this many characters of the text")
    ap.add_argument("--window", type=int, default=None, help="scoring window (default: 512 for real models, 127 for the zoo)")
    ap.add_argument("--no-donor", action="store_true", help="do not score the donor models")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "surgeon" / "transplant-table")
    ap.add_argument("--fresh", action="store_true", help="recompute transplants and scores")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.ks = [int(x) for x in str(args.k).split(",") if x.strip()]

    from surgeon.eval import evaluate_text
    from surgeon.transplant import transplant

    if not args.text.is_file():
        raise SystemExit(f"{args.text}: no such text file (pass --text)")
    screen_opt = args.screen.lower()
    known = pairs_available(cache_dir())
    args.work.mkdir(parents=True, exist_ok=True)
    scores_file = args.work / "scores.json"
    scores: dict[str, dict] = json.loads(scores_file.read_text()) if scores_file.exists() and not args.fresh else {}

    def score(model: Path, window: int) -> float:
        key = f"{model.resolve()}|{args.text.resolve()}|{args.max_chars}|{window}"
        stamp = max((f.stat().st_mtime for f in model.glob("*.safetensors")), default=0)
        hit = scores.get(key)
        if hit and hit.get("stamp") == stamp:
            return hit["bits_per_byte"]
        t = time.time()
        r = evaluate_text(model, args.text, max_chars=args.max_chars, window=window, device=args.device,
                          progress=sys.stderr.isatty())
        print(f"  scored {model} in {time.time() - t:.0f}s: {r['bits_per_byte']:.4f} bpb ({r['tokens']} tokens)",
              flush=True)
        scores[key] = {"bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"], "bytes": r["bytes"], "stamp": stamp}
        scores_file.write_text(json.dumps(scores, indent=1))
        return r["bits_per_byte"]

    rows = []
    notes = []
    for name in [p.strip() for p in args.pairs.split(",") if p.strip()]:
        if name in known:
            base, donor, window = known[name]
        elif ":" in name:
            b, d = name.split(":", 1)
            base, donor, window = Path(b), Path(d), 512
        else:
            raise SystemExit(f"unknown pair {name!r} (known: {', '.join(known)}, or BASE_DIR:DONOR_DIR)")
        window = args.window or window
        missing = [str(p) for p in (base, donor) if not (p / "config.json").is_file()]
        if missing:
            notes.append(f"{name}: skipped, missing {', '.join(missing)} (scripts/get_real_models.py or scripts/build_zoo.py)")
            print(notes[-1], flush=True)
            continue
        print(f"{name}: {base} <- tokenizer of {donor}", flush=True)
        row = {"pair": name, "base": str(base), "donor": str(donor), "window": window, "bpb": {}, "seconds": {}}
        row["bpb"]["base"] = score(base, window)
        if not args.no_donor:
            row["bpb"]["donor"] = score(donor, window)
        if screen_opt == "auto":
            from surgeon.transplant import load_tokenizer_info, match_vocabularies

            n_shared = len(match_vocabularies(load_tokenizer_info(base), load_tokenizer_info(donor)).shared)
            screen = None if n_shared <= 8192 else 128
        else:
            screen = None if screen_opt == "none" else int(screen_opt)
        row["screen"] = screen
        for col in columns(args):
            method, k = (col.split("@") + [None])[:2] if "@" in col else (col, None)
            k = int(k) if k else args.ks[0]
            tag = method + (f"-k{k}-s{screen}" if method == "omp" else "")
            out = args.work / f"{name.replace('->', '-to-').replace('/', '_')}-{tag}"
            rep_file = out / "transplant-report.json"
            if rep_file.exists() and not args.fresh:
                rep = json.loads(rep_file.read_text())
            else:
                t = time.time()
                rep = transplant(base, donor, out, method=method, k=k, screen=screen if method == "omp" else None,
                                 batch_size=args.batch_size, device=args.device, overwrite=True,
                                 progress=sys.stderr.isatty())
                rep_file.write_text(json.dumps(rep, indent=1))
                print(f"  transplant {method}: {time.time() - t:.0f}s", flush=True)
            row["counts"] = {k: rep["counts"][k] for k in ("shared", "new", "output_rows", "base_vocab")}
            row["seconds"][col] = rep["seconds"] if not isinstance(rep["seconds"], dict) else rep["seconds"]["total"]
            if method == "omp":
                row.setdefault("omp_fit", {})[col] = rep["approximation"].get("embed")
            row["bpb"][col] = score(out, window)
        rows.append(row)

    print_table(rows, args)
    for n in notes:
        print(n)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "notes": notes, "text": str(args.text),
                                         "max_chars": args.max_chars, "k": args.ks}, indent=2))
    return 0


def columns(args) -> list[str]:
    """Method columns; OMP once per k (``omp@8``) when several k are asked for."""
    out = []
    for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if m == "omp" and len(args.ks) > 1:
            out += [f"omp@{k}" for k in args.ks]
        else:
            out.append(m)
    return out


def print_table(rows: list[dict], args) -> None:
    methods = columns(args)
    first_omp = next((m for m in methods if m.startswith("omp")), None)
    cols = ["base"] + methods + ([] if args.no_donor else ["donor"])
    names = {m: (f"omp k={m.split('@')[1]}" if "@" in m else ("omp k=" + str(args.ks[0]) if m == "omp" else m))
             for m in cols}
    print(f"\nBits per byte on the first {args.max_chars} characters of {args.text} "
          f"(bos prepended; lower is better).\n")
    head = "| pair | window | shared / new tokens | OMP | " + " | ".join(names[c] for c in cols) + \
        f" | mean - {names.get(first_omp, 'OMP')} |"
    print(head)
    print("|" + "---|" * (len(cols) + 5))
    for r in rows:
        b = r["bpb"]
        c = r.get("counts", {})
        cells = [f"{b[k]:.4f}" if k in b else "" for k in cols]
        gain = f"{b['mean'] - b[first_omp]:+.4f}" if first_omp in b and "mean" in b else ""
        how = "exact" if r.get("screen") is None else f"screen {r['screen']}"
        print(f"| {r['pair']} | {r['window']} | {c.get('shared', '')} / {c.get('new', '')} | {how} | " + " | ".join(cells)
              + f" | {gain} |")


if __name__ == "__main__":
    raise SystemExit(main())
