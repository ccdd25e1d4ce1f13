"""The ``surgeon`` command. Thin: parses arguments, calls :mod:`surgeon.api`, prints.

Exit codes (stable, for CI): 0 success; 1 a ``diff --atol`` gate failed;
2 invalid recipe, input or arguments; 3 a step failed; 130 interrupted
(SIGINT or SIGTERM; finished steps and written tensors are kept, and the same
command resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .settings import configure_process, exit_process
from .errors import EXIT_INTERRUPTED, EXIT_STEP_FAILED, InvalidInputError, SurgeonError
from .eval.protocol import DEFAULT_MAX_TOKENS
from .recipe.mergekit_flags import add_mergekit_flags, apply_mergekit_flags

EPILOG = """exit codes: 0 success, 1 diff gate failed, 2 invalid recipe or input, 3 a step failed, 130 interrupted.
docs: README.md and docs/*.md of the surgeon source (merging.md, transplant.md, fusion.md, hub.md, report.md)."""

# One line of purpose and one example per subcommand: the first thing `surgeon CMD --help` shows.
ABOUT: dict[str, tuple[str, str]] = {
    "run": (("Execute a recipe YAML (or a mergekit config, like `mergekit-yaml CONFIG OUT`); finished steps "
            "are skipped when the same command runs again."),
            "surgeon run recipes/quickstart.yaml --overwrite"),
    "validate": (("Check a recipe from safetensors headers only (schema, references, every tensor's shape and "
                 "dtype); no weights are read. Reports every problem at once."),
                 "surgeon validate recipes/quickstart.yaml"),
    "plan": ("Show what each step reads and writes, and an estimate of its peak memory.",
             "surgeon plan recipes/quickstart.yaml"),
    "merge": ("Merge models with one method, without writing a recipe file.",
              ("surgeon merge ties out/m --base zoo/bpe-base --model zoo/bpe-shakespeare --model "
              "zoo/bpe-python:density=0.5 --set lambda=1.0")),
    "transplant": (("Give a model another model's tokenizer, training-free: each new token's embedding is "
                   "built from shared tokens' embeddings (OMP by default)."),
                   "surgeon transplant zoo/bpe-base zoo/sp-base out/bpe-with-sp-tokenizer --k 8"),
    "fuse": (("Distil one or more source models into a pivot model on a text file (graph-on-logits loss, "
             "works across tokenizers)."),
             ("surgeon fuse zoo/bpe-base out/fused --source zoo/sp-shakespeare "
             "--data zoo/data/shakespeare/train.txt --steps 10")),
    "eval": ("Perplexity and bits per byte of a model folder on one or more text files.",
             "surgeon eval zoo/bpe-base --text zoo/data/prose/heldout.txt --text zoo/data/python/heldout.txt"),
    "inspect": ("Summarise a checkpoint from its headers: architecture, parameters, dtypes, shards, tokenizer.",
                "surgeon inspect zoo/bpe-base"),
    "diff": (("Compare two checkpoints tensor by tensor (max |a-b|, relative norm, cosine); with --atol a CI "
             "gate, with --plot a per-layer picture of the change."),
             "surgeon diff zoo/bpe-base zoo/bpe-python --plot diff.png"),
    "push": ("Upload a checkpoint folder (with its model card) to the Hugging Face hub.",
             "surgeon push out/quickstart org/pico-merge --private"),
    "convert": ("Print the surgeon recipe equivalent to a mergekit config.",
                "surgeon convert mergekit.yml > recipe.yaml"),
}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == []
                or default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: {default})"


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "overwrite": getattr(args, "overwrite", False),
        "work_dir": getattr(args, "work_dir", None),
        "device": getattr(args, "device", "cpu"),
        "quiet": getattr(args, "quiet", False),
        "threads": getattr(args, "threads", None),
        "allow_nonfinite": getattr(args, "allow_nonfinite", False),
        "allow_pickle": getattr(args, "allow_pickle", False),
        "max_shard_size": getattr(args, "max_shard_size", None),
        "piece_size": getattr(args, "piece_size", None),
        "remote_stream": getattr(args, "remote_stream", None),
        # the output's sha256 is hashed only for a report that is written (--report)
        "digests": getattr(args, "report", None) is not None,
    }


def _add_run_flags(p: argparse.ArgumentParser, output: bool = True) -> None:
    if output:
        p.add_argument("-o", "--output", help="output folder (overrides the recipe's output.path)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--work-dir", help="folder for intermediate steps (default: .OUTPUT.surgeon-work beside the output)")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu (default), cuda, cuda:1")
    p.add_argument("--threads", type=int, help="threads for arithmetic (merges: that many tensors at once, each single-threaded) and for reading (default: all cores, up to 4)")
    p.add_argument("--max-shard-size", help="largest shard, e.g. 2GB, 500MiB (default 5GB)")
    p.add_argument("--piece-size", help="stream tensors in row pieces of at most this many bytes per input, e.g. "
                   "32MiB (default), 8MiB to use less memory; 0 reads whole tensors")
    p.add_argument("--allow-nonfinite", action="store_true", help="write tensors with NaN/Inf instead of failing")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled *.bin checkpoints (loaded with torch.load(weights_only=True))")
    p.add_argument("--remote-stream", action=argparse.BooleanOptionalAction, default=None,
                   help="hub models: read their tensors over HTTP range requests as the merge needs them, "
                   "storing nothing but the output (default: only when they are not cached and the disk lacks "
                   "the room; --no-remote-stream always downloads); see docs/hub.md")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or step messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgeon",
        description="Model surgery for language-model checkpoints: merge, transplant tokenizers, fuse; "
        "streaming one tensor at a time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"surgeon {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="execute a recipe (or a mergekit config)", epilog=EPILOG,
                       description="Execute a recipe YAML (or a mergekit config: like `mergekit-yaml CONFIG OUT`).")
    p.add_argument("recipe", help="recipe YAML or mergekit config")
    p.add_argument("output_positional", nargs="?", metavar="OUT", help="output folder (mergekit-yaml style)")
    _add_run_flags(p)
    add_mergekit_flags(p)  # mergekit-yaml's flags: mapped, noted or refused
    p.add_argument("--report", help="write a machine-readable JSON report here")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; read no weights")
    p.add_argument("--no-eval", action="store_true", help="skip the recipe's eval block")
    p.add_argument("--no-push", action="store_true", help="skip the recipe's output.push")
    p.add_argument("--distributed", action="store_true",
                   help="split the merge across the processes of `accelerate launch` / torchrun "
                   "(automatic when WORLD_SIZE > 1)")

    for name, helptext in (("validate", "check a recipe from headers only (no weights read)"),
                           ("plan", "show what each step reads and writes and its peak memory")):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".", epilog=EPILOG)
        p.add_argument("recipe", help="recipe YAML or mergekit config")
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("merge", help="one merge without a recipe file", epilog=EPILOG,
                       description="Merge models with one method. Example: surgeon merge ties OUT --base B "
                       "--model M1 --model M2 --set density=0.5 --set lambda=1.0")
    p.add_argument("method", help="merge method (listed below)")
    p.add_argument("output", help="output folder")
    p.add_argument("--base", help="base model (for task-vector methods)")
    p.add_argument("--model", action="append", required=True,
                   help="model path, optionally with per-model parameters: PATH:weight=0.5,density=0.7")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a step parameter")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the output (default: the base's, else the first model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of randomised methods (dare_*, della*)")
    p.add_argument("--report", help="write a JSON report here")
    _add_run_flags(p, output=False)

    p = sub.add_parser("transplant", help="give a model another model's tokenizer (training-free, OMP)", epilog=EPILOG)
    p.add_argument("base", help="model whose weights are kept")
    p.add_argument("donor", help="model (or folder) whose tokenizer the output gets")
    p.add_argument("output", help="output folder")
    p.add_argument("--method", default="omp", choices=["omp", "mean", "zero", "subword"],
                   help="how new tokens' embeddings are built: omp (sparse combination of shared tokens), "
                   "mean of all rows, zero, or subword (mean of the base pieces spelling the token)")
    p.add_argument("--k", type=int, default=64, help="OMP atoms per new token (default 64)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--screen", type=_screen_arg, default="auto",
                   help="OMP candidates per new token: N (its N nearest shared tokens, re-ranked every 8 picks: "
                   "several times faster than exact, a near-equal fit, bits per byte within about 0.008 either way "
                   "on the real pairs of docs/transplant.md), 'auto' (default: exact unless its products exceed "
                   "1e14 FLOPs, then 128) or 'none' (exact OMP over all shared tokens)")
    g.add_argument("--exact", action="store_true", help="exact OMP over all shared tokens (same as --screen none)")
    p.add_argument("--batch-size", type=int, default=512, help="new tokens solved at once")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu, cuda, cuda:1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, notes or summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("fuse", help="distil source models into a pivot (graph-on-logits loss)", epilog=EPILOG)
    p.add_argument("pivot", help="model that is trained (its tokenizer and architecture are kept)")
    p.add_argument("output", help="output folder")
    p.add_argument("--source", action="append", required=True, help="source model (repeat)")
    p.add_argument("--data", required=True, help="text file or JSONL (text or chat messages)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per training sequence (longer ones are cut)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--top-k", type=int, default=16, help="teacher logits kept per position for the graph loss")
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.5, help="distillation share of the loss")
    p.add_argument("--gld-weight", type=float, default=1.0, help="weight of the graph-on-logits loss")
    p.add_argument("--tokenwise-weight", type=float, default=1.0, help="weight of the token-wise distillation loss")
    p.add_argument("--align", choices=["dp", "transplant"], default="dp",
                   help="how tokens of different tokenizers are matched: dp (dynamic programming on the "
                   "text) or transplant (map the sources' vocabularies)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    p.add_argument("--device", default="cpu", help="where training runs: cpu, cuda, cuda:1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    from .fusion.cli_flags import add_fuse_flags

    add_fuse_flags(p.add_argument_group("fuse options (recipe options:)"))

    p = sub.add_parser("eval", help="perplexity and bits per byte on a text file", epilog=EPILOG)
    p.add_argument("model", help="model folder (config, weights and tokenizer)")
    p.add_argument("--text", action="append", required=True,
                   help="UTF-8 text file to score; repeat for several (one row each)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="score the first N tokens of each text; 0 scores the whole text")
    p.add_argument("--max-bytes", metavar="SIZE",
                   help="read at most this much of each text, e.g. 10MB (default: what --max-tokens needs; "
                   "with --max-tokens 0 the whole file)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print JSON: one object per text, in a list")

    p = sub.add_parser("inspect", help="summarise a checkpoint from its headers", epilog=EPILOG)
    p.add_argument("path", help="checkpoint folder or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled *.bin checkpoints")

    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor", epilog=EPILOG)
    p.add_argument("a", help="first checkpoint (the reference: relative norms are against it)")
    p.add_argument("b", help="second checkpoint")
    p.add_argument("--atol", type=float, help="exit 1 when any |a-b| exceeds this (a CI gate)")
    p.add_argument("--top", type=int, default=10, help="rows in the summary table")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw the per-layer relative change of B against A "
                   "as a PNG (drawn with Pillow); its numbers go to PNG's .json")

    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face hub", epilog=EPILOG)
    p.add_argument("folder", help="checkpoint folder written by surgeon")
    p.add_argument("repo", help="org/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--commit-message", help="commit message (default: one naming surgeon)")

    p = sub.add_parser("convert", help="print the surgeon recipe for a mergekit config", epilog=EPILOG)
    p.add_argument("config", help="mergekit YAML config")
    _teach(sub)
    return parser


def _teach(sub: Any) -> None:
    """Every subcommand: its purpose and an example first, option defaults shown, the docs named."""
    for name, sp in sub.choices.items():
        purpose, example = ABOUT.get(name, (sp.description or "", ""))
        sp.description = purpose + (f"\n\nexample:\n  {example}" if example else "")
        sp.formatter_class = _Help
        sp.epilog = sp.epilog or EPILOG
    merge = sub.choices.get("merge")
    if merge is not None:  # the method list needs the registry: built only when the help is shown
        plain = merge.format_help
        merge.format_help = lambda: plain().rstrip("\n") + "\n\n" + methods_help() + "\n"


def methods_help() -> str:
    """Every registered merge method with its summary and parameters (name=default, or required)."""
    from .merge import all_methods

    lines = ["methods (set step parameters with --set KEY=VALUE, per-model ones with --model PATH:KEY=VALUE):"]
    for name, m in all_methods().items():
        needs = "base + " if m.needs_base else ""
        count = (f"{m.min_models}" if m.max_models == m.min_models else
                 f"{m.min_models}-{m.max_models}" if m.max_models else f"{m.min_models}+")
        lines.append(f"  {name:<18} {m.summary.rstrip('.')} ({needs}{count} model{'s' if count != '1' else ''})")
        for label, params in (("step", m.global_params), ("per model", m.model_params)):
            if params:
                shown = ", ".join(p.name + ("" if p.required else f"={p.default}") for p in params)
                lines.append(f"  {'':<18}   {label}: {shown}")
    return "\n".join(lines)


def _version() -> str:
    from . import __version__

    return __version__


def _parse_value(text: str, option: str = "--set") -> Any:
    from .cli_checks import parse_option_value

    return parse_option_value(text, option)


def _parse_model(arg: str) -> str | dict[str, Any]:
    path, sep, params = arg.rpartition(":") if ":" in arg and "=" in arg.rpartition(":")[2] else (arg, "", "")
    if not sep:
        return arg
    entry: dict[str, Any] = {"model": path}
    for item in params.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"surgeon merge: cannot read model parameter {item!r} (use PATH:key=value,key=value)")
        entry[key.strip()] = _parse_value(value, f"--model {arg}: {key.strip()}")
    return entry


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _write_report(path: str | None, report: dict[str, Any]) -> None:
    if not path:
        return
    from .cli_checks import write_report_file

    write_report_file(path, json.dumps(report, indent=2, default=str) + "\n")
    png = (report.get("changemap") or {}).get("png")
    if png and Path(png).is_file():  # the change picture beside the report too
        import shutil

        beside = Path(path).with_suffix(".changemap.png")
        shutil.copyfile(png, beside.with_name(beside.name + ".tmp"))
        os.replace(beside.with_name(beside.name + ".tmp"), beside)


def _screen_arg(text: str) -> int | str | None:
    """``--screen``: a positive integer, ``auto`` or ``none`` (exact OMP)."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        n = int(low)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'none', got {text!r}")
    return n


def _print_plan(summaries: list[dict[str, Any]]) -> None:
    from .inspection import human_bytes

    print(f"{'step':<16} {'kind':<11} {'tensors':>8} {'bytes in':>10} {'bytes out':>10} {'peak (est.)':>12}  reads")
    for s in summaries:
        peak = human_bytes(s["peak_bytes_estimate"]) if s.get("peak_bytes_estimate") else "n/a"  # never "0 B"
        print(f"{s['id']:<16} {s['kind']:<11} {s['tensors']:>8} {human_bytes(s['bytes_in']):>10} "
              f"{human_bytes(s['bytes_out']):>10} {peak:>12}  {', '.join(s['reads'])}")
        for note in s.get("notes", []):
            print(f"  note: {note}")


def _print_run(report: dict[str, Any]) -> None:
    for s in report.get("steps", []):
        state = "skipped (already done)" if s.get("skipped") else f"{s.get('seconds', 0):.1f}s"
        print(f"step {s['id']:<16} {s['kind']:<11} {state}")
    ev = report.get("evaluation")
    if ev:
        from .eval.report import reading_lines

        print()
        print(format_evaluation(ev))
        steps = report.get("steps") or [{}]
        for line in reading_lines(ev, steps[-1].get("parameters")):
            print(line)
    print()
    print(f"output: {report['output']['path']}")
    cm = report.get("changemap")
    if cm:
        from .io.plot import PLOT_HINT

        print(f"what changed where: {cm.get('png') or cm.get('json') + ' (' + PLOT_HINT + ')'}")
    if report.get("push"):
        print(f"pushed: {report['push'].get('url', report['push'])}")


def format_transplant(report: dict[str, Any]) -> str:
    """What a transplant did in a few lines: rows copied and approximated, the fit, its picture, where it went."""
    c = report.get("counts", {})
    how = report.get("method", "?") + (f", k={report['k']}" if report.get("k") else "")
    lines = [f"tokens: {c.get('shared', '?')} shared (rows copied), {c.get('new', '?')} new ({how}); "
             f"{c.get('output_rows', '?')} rows in the output"]
    for label, st in (report.get("approximation") or {}).items():
        if "donor_cosine_mean" in st:
            how = (f"screened, {st['screen']} candidates" if st.get("screen") else
                   "exact, picks certified from bfloat16 products" if st.get("search") == "bfloat16" else "exact")
            lines.append(f"fit of {label} in the donor space ({how}): mean cosine {st['donor_cosine_mean']:.3f}, "
                         f"mean relative error {st['donor_rel_error_mean']:.3f}")
        elif st.get("same_pursuit_as"):
            lines.append(f"{label}: rows from the pursuit of {st['same_pursuit_as']} (the donor ties the two)")
    curve = report.get("error_by_k")
    if curve:
        lines.append("error by k: " + (curve["png"] or f"{curve['json']} (no picture: install matplotlib)"))
    lines.append(f"output: {report.get('output')}")
    return "\n".join(lines)


def format_evaluation(ev: dict[str, dict[str, Any]]) -> str:
    """Perplexity and bits per byte of every model on every text, one row per model."""
    texts = sorted({t for per in ev.values() for t in per})
    width = max([len("model"), *(len(m) for m in ev)])
    cols = [(f"{t} ppl", f"{t} bpb") for t in texts]
    cw = [max(10, len(a) + 2, len(b) + 2) for a, b in cols]
    lines = [f"{'model':<{width}}" + "".join(f"{a:>{w}}{b:>{w}}" for (a, b), w in zip(cols, cw))]
    for model, per in ev.items():
        cells = []
        for t, w in zip(texts, cw):
            r = per.get(t)
            cells.append(f"{r['perplexity']:>{w}.2f}{r['bits_per_byte']:>{w}.3f}" if r else f"{'-':>{w}}{'-':>{w}}")
        lines.append(f"{model:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _dispatch(args: argparse.Namespace) -> int:
    from . import api

    cmd = args.command
    if cmd == "run":
        apply_mergekit_flags(args)
        out = args.output or args.output_positional
        if args.dry_run:
            loaded = api.load_recipe(args.recipe, output_path=out)
            summaries = api.validate(loaded)
            _print_plan(summaries)
            _write_report(args.report, {"schema": "surgeon.report/1", "dry_run": True, "steps": summaries})
            return 0
        report = api.run(args.recipe, output=out, evaluate=not args.no_eval, push=not args.no_push,
                         distributed=args.distributed, **_run_options(args))
        if "output" not in report:  # a non-main rank of a distributed run: rank 0 reports
            return 0
        _write_report(args.report, report)
        if not args.quiet:
            _print_run(report)
        return 0
    if cmd in ("validate", "plan"):
        summaries = api.validate(args.recipe)
        if args.json:
            _print_json({"valid": True, "steps": summaries})
        elif cmd == "plan":
            _print_plan(summaries)
        else:
            print(f"{args.recipe}: valid ({len(summaries)} step{'s' if len(summaries) != 1 else ''}, "
                  f"{sum(s['tensors'] for s in summaries)} tensors planned; no weights read)")
        return 0
    if cmd == "merge":
        params = {}
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"surgeon merge: --set expects KEY=VALUE, got {item!r}")
            params[key.strip()] = _parse_value(value, f"--set {key.strip()}")
        report = api.merge_models(args.method, [_parse_model(m) for m in args.model], args.output, base=args.base,
                                  parameters=params, dtype=args.dtype, seed=args.seed, **_run_options(args))
        _write_report(args.report, report)
        if not args.quiet:
            _print_run(report)
        return 0
    if cmd == "transplant":
        import warnings

        with warnings.catch_warnings():  # its advice is in the report: shown once below, as a note
            warnings.filterwarnings("ignore", category=UserWarning, module=r"surgeon\.")
            report = api.transplant_tokenizer(args.base, args.donor, args.output, method=args.method, k=args.k,
                                              screen=None if args.exact else args.screen, batch_size=args.batch_size, device=args.device,
                                              overwrite=args.overwrite,
                                              progress=not args.quiet and sys.stderr.isatty())
        if not args.quiet:
            for w in report.get("warnings", []):
                print(f"note: {w}", file=sys.stderr)
        _print_json(report) if args.json else (None if args.quiet else print(format_transplant(report)))
        return 0
    if cmd == "fuse":
        from .fusion.cli_flags import fuse_kwargs

        report = api.fuse_models(
            args.pivot, [{"path": s, "align": args.align} for s in args.source], args.data, args.output,
            steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
            top_k=args.top_k, lambda_=args.lambda_, gld_weight=args.gld_weight,
            tokenwise_weight=args.tokenwise_weight, seed=args.seed, device=args.device, overwrite=args.overwrite,
            progress=not args.quiet, **fuse_kwargs(args))  # progress lines also when not a terminal
        _print_json(report) if args.json else print(f"output: {args.output}")
        return 0
    if cmd == "eval":
        from .eval.report import evaluate_texts, format_texts

        rows = evaluate_texts(args.model, args.text, max_tokens=args.max_tokens, device=args.device,
                              progress=not args.quiet and sys.stderr.isatty(), max_bytes=args.max_bytes)
        _print_json(rows) if args.json else print(format_texts(rows))
        return 0
    if cmd == "inspect":
        from .inspection import format_inspect

        info = api.inspect_checkpoint(args.path, allow_pickle=args.allow_pickle)
        _print_json(info) if args.json else print(format_inspect(info))
        return 0
    if cmd == "diff":
        from .eval.diff import format_diff

        r = api.diff(args.a, args.b, atol=args.atol)
        if args.plot:
            r["plot"] = _diff_plot(args.a, args.b, args.plot)
        _print_json(r) if args.json else print(format_diff(r, args.top))
        if args.plot and not args.json:
            print(f"plot: {r['plot']['png'] or r['plot']['note']}")
        return 0 if r.get("within_atol", True) else 1
    if cmd == "push":
        r = api.push(args.folder, args.repo, private=args.private, revision=args.revision,
                     commit_message=args.commit_message)
        print(f"pushed: {r.get('url', args.repo)}")
        return 0
    if cmd == "convert":
        print(api.convert(args.config), end="")
        return 0
    raise AssertionError(cmd)


def _quiet_libraries() -> None:
    """-q: no loading or download bars and no advisory messages from transformers / huggingface-hub."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _diff_plot(a: str, b: str, png: str) -> dict[str, Any]:
    """``diff --plot``: the change map of B against A, drawn to ``png`` (numbers beside it as .json)."""
    from .eval.changemap import compute_changemap, summary_lines, write_changemap
    from .io.checkpoint import Checkpoint
    from .io.plot import PLOT_HINT

    target = Path(png)
    if target.suffix.lower() != ".png":
        raise InvalidInputError(f"--plot {png}: expected a .png file name")
    if not target.parent.is_dir():
        raise InvalidInputError(f"--plot {png}: no such folder {target.parent}")
    cm = compute_changemap(Checkpoint.open(a), Checkpoint.open(b), labels=("A", "B"))
    written = write_changemap(target.parent, cm, stem=target.stem, title=f"{Path(b).name} vs {Path(a).name}")
    return {"png": written["png"], "json": written["json"], "summary": summary_lines(cm),
            "note": None if written["png"] else PLOT_HINT}


_MISSING = re.compile(r"^(?P<label>(?:[a-z]+ )?)(?P<path>[^:\n]+): no such (?:[a-z]+ )?(?:file or folder|folder|file)\b")


def _suggest_path(message: str) -> str:
    """A missing path in an error gets the closest existing sibling: ``zoo/bpe-bse: no such folder
    (did you mean 'zoo/bpe-base'?)``."""
    m = _MISSING.match(message)
    if not m or "did you mean" in message:
        return message
    from .suggest import closest

    path = Path(m.group("path"))
    try:
        siblings = [c.name for c in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return message
    best = closest(path.name, siblings)
    if not best:
        return message
    end = m.end()
    return f"{message[:end]} (did you mean {str(path.parent / best)!r}?){message[end:]}"


def _surgeon_warnings_as_notes(quiet: bool) -> None:
    """surgeon's own warnings (advice, e.g. a transplant's digit splitting) print as one
    ``note: ...`` line, without a source path and code line; -q hides them (they are in the
    model card and the report). Other libraries' warnings keep Python's format."""
    import warnings

    shown = getattr(warnings.showwarning, "surgeon_original", warnings.showwarning)  # main() may run again
    root = str(Path(__file__).resolve().parent)

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if str(filename).startswith(root) and issubclass(category, UserWarning):
            if not quiet:
                print(f"note: {message}", file=sys.stderr)
            return
        shown(message, category, filename, lineno, file, line)

    show.surgeon_original = shown  # type: ignore[attr-defined]
    warnings.showwarning = show


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests, notebooks)
        pass


#: commands that keep finished work on an interruption and resume it when run again
_RESUMABLE = ("run", "merge", "transplant", "fuse")


def _terminate(signum: int, frame: Any) -> None:
    # One interruption is enough: later SIGTERMs are ignored while the run cleans up and exits 130
    # (with the default handler back in place, a third one used to kill the process with 143).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def entry() -> NoReturn:
    """The ``surgeon`` command: :func:`main`, then :func:`surgeon.settings.exit_process`
    (a normal exit less the interpreter's teardown)."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    exit_process(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        _quiet_libraries()
    _surgeon_warnings_as_notes(quiet=getattr(args, "quiet", False))
    # this process is ours: allocator thresholds, no transparent huge pages, import-time objects
    # frozen out of the cycle collector's sight (surgeon.settings.configure_process)
    configure_process()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        from .cli_checks import check_args

        check_args(args)  # every value before any work (docs/reliability.md, bad options)
        return _dispatch(args)
    except BrokenPipeError:  # `surgeon ... | head`: the reader left; stop quietly
        _silence_stdout()
        return 0
    except SurgeonError as exc:
        print(f"error: {_suggest_path(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if args.command not in _RESUMABLE:  # inspect, validate, eval...: nothing to keep or resume
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        kept = "; ".join(getattr(exc, "__notes__", [])) or "finished steps and written tensors"
        print(f"interrupted: kept {kept}; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as exc:  # an unexpected failure: one line, traceback only on --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_STEP_FAILED
    finally:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # after a SIGTERM: stay deaf until the exit
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
