"""How much of each fine-tune's gain a merge keeps, on the pico zoo.

Merges zoo/bpe-shakespeare and zoo/bpe-python onto zoo/bpe-base with each
method, scores every model on held-out prose, Shakespeare and Python (bits per
byte), and prints, per domain, the share of the fine-tune's improvement over
the base that the merge keeps: 100% = as good as the specialist, 0% = no
better than the base.

    python scripts/merge_table.py [--methods ties widen ...] [--max-tokens 4096]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
DOMAINS = {"prose": "prose", "shakespeare": "shakespeare", "python": "python"}
SPECIALISTS = {"shakespeare": "bpe-shakespeare", "python": "bpe-python"}
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"base": False, "models": [{}, {}], "parameters": {}},
    "task_arithmetic": {"models": [{}, {}], "parameters": {"lambda": 1.0}},
    "ties": {"models": [{"density": 0.7}, {"density": 0.7}], "parameters": {"lambda": 1.0}},
    "widen": {"models": [{}, {}], "parameters": {}},
    "dare_ties": {"models": [{"density": 0.7}, {"density": 0.7}], "parameters": {}},
    "breadcrumbs_ties": {"models": [{"density": 0.8, "gamma": 0.02}, {"density": 0.8, "gamma": 0.02}], "parameters": {}},
    "della": {"models": [{"density": 0.7, "epsilon": 0.1}, {"density": 0.7, "epsilon": 0.1}], "parameters": {}},
    "sce": {"models": [{}, {}], "parameters": {"select_topk": 0.5}},
    "model_stock": {"models": [{}, {}], "parameters": {}},
}


def score(model: Path, max_tokens: int) -> dict[str, float]:
    import surgeon

    return {d: surgeon.evaluate(str(model), str(ZOO / "data" / d / "heldout.txt"), max_tokens=max_tokens,
                                progress=False)["bits_per_byte"] for d in DOMAINS}


def merge(method: str, out: Path) -> Path:
    import surgeon

    cfg = METHODS[method]
    models = [{"model": str(ZOO / SPECIALISTS[d]), **p} for d, p in zip(("shakespeare", "python"), cfg["models"])]
    surgeon.merge_models(method, models, str(out), base=None if cfg.get("base") is False else str(ZOO / "bpe-base"),
                         parameters=cfg["parameters"], overwrite=True, quiet=True)
    return out


def gain_kept(base: float, specialist: float, merged: float) -> float:
    """Share of the specialist's bits-per-byte improvement over the base that ``merged`` keeps."""
    return (base - merged) / (base - specialist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--max-tokens", type=int, default=4096)
    a = ap.parse_args()
    rows = {"bpe-base": score(ZOO / "bpe-base", a.max_tokens)}
    for d, name in SPECIALISTS.items():
        rows[name] = score(ZOO / name, a.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            rows[method] = score(merge(method, Path(tmp) / method), a.max_tokens)
            print(f"scored {method}", file=sys.stderr, flush=True)
    base = rows["bpe-base"]
    print(f"{'model':<18}{'prose bpb':>11}{'shakesp. bpb':>14}{'python bpb':>12}{'shakesp. kept':>15}{'python kept':>13}")
    for name, r in rows.items():
        kept = [gain_kept(base[d], rows[SPECIALISTS[d]][d], r[d]) for d in ("shakespeare", "python")]
        print(f"{name:<18}{r['prose']:>11.3f}{r['shakespeare']:>14.3f}{r['python']:>12.3f}"
              f"{100 * kept[0]:>14.0f}%{100 * kept[1]:>12.0f}%")


if __name__ == "__main__":
    main()
