"""Command-line flags for every ``fuse`` option (``surgeon fuse --help``).

The flags are derived from :class:`surgeon.recipe.options.FuseOptions` (the
``options:`` of a recipe) and from the ``gld_loss`` options (``options.gld``), so
an option added there gets a flag here; :data:`HELP` gives each its help text.
A flag left out is not passed, so the function's default applies (and is shown
in the help).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, get_args, get_origin, get_type_hints

__all__ = ["add_fuse_flags", "fuse_kwargs", "HELP", "GLD_FLAGS", "TRAIN_FLAGS"]

# fuse() keyword arguments that are not FuseOptions: (name, type, default, help)
TRAIN_FLAGS: list[tuple[str, type, Any, str]] = [
    ("grad_accum", int, 1, "batches accumulated per optimizer step"),
    ("schedule", str, "cosine", "learning-rate schedule after warm-up: constant, linear or cosine"),
    ("warmup_steps", int, 0, "optimizer steps of linear warm-up (or --warmup-ratio)"),
    ("mixed_precision", str, "no", "autocast of the pivot's forward pass: no (fp32), bf16 or fp16"),
]

# gld_loss options, passed as options.gld: (name, type, choices, default, help)
GLD_FLAGS: list[tuple[str, type, Optional[tuple], Any, str]] = [
    ("values", str, ("logits", "probs", "logprobs"), "logits", "values kept per position (the paper: top-k logits)"),
    ("normalize", str, ("minmax", "none", "sum", "l2", "standardize"), "minmax",
     "per-position rescaling of the kept values (the paper does not say; minmax maps them to [1/k, 1])"),
    ("nodes", str, ("rank", "vocab"), "rank", "graph nodes: the k rank slots (the paper's formula) or vocabulary ids"),
    ("feature", str, ("degree", "self", "l2"), "degree", "node feature compared after sorting (the paper does not say)"),
    ("p", float, None, 1.0, "exponent of the per-node difference (the paper: 1, absolute value)"),
    ("aggregate", str, ("mean", "sum"), "mean", "graph over positions: mean or sum"),
    ("node_reduction", str, ("sum", "mean"), "sum", "over nodes: sum (the paper) or mean"),
    ("temperature", float, None, 1.0, "temperature of the graph's values (probabilities; no effect with minmax)"),
    ("scale", str, ("gw", "sum"), "gw", "gw: the sum rescaled to the closed-form GW distance (k rank nodes: / k^2); "
     "sum: the raw sum"),
]

CHOICES: dict[str, tuple[str, ...]] = {
    "tokenwise": ("uld", "kl", "kl+uld", "none"),
    "pairing": ("dp", "dp_checked", "exact", "offsets"),
    "kl_sparse": ("rest", "topk", "fusellm"),
    "vocab_merge": ("sum", "first"),
    "cache_dtype": ("float16", "bfloat16", "float32"),
}
TRAIN_CHOICES = {"schedule": ("constant", "linear", "cosine"), "mixed_precision": ("no", "bf16", "fp16")}

HELP: dict[str, str] = {
    "tokenwise": "token-wise term: uld (sorted top-k probabilities, the paper's), kl, kl+uld or none",
    "pairing": "position pairing across tokenizers: dp (FuseLLM's DP, pairs of tokens that start together), "
               "dp_checked (and whose offsets agree), exact (FuseLLM's same-token rule) or offsets",
    "temperature": "temperature of the token-wise terms (both sides; the cache stores the normaliser at it)",
    "kl_sparse": "KL to a sparse teacher: rest (top-k + one bucket), topk (both renormalised) or fusellm",
    "vocab_merge": "teacher ids mapped onto one pivot id: sum their probabilities, or keep the first (FuseLLM)",
    "gld_top_k": "top-k of the graphs (default: --top-k)",
    "gld": "extra gld_loss options as JSON (the --gld-* flags set them one by one)",
    "weight_decay": "AdamW weight decay of matrices",
    "max_grad_norm": "gradient clipping norm (0: none)",
    "warmup_ratio": "warm-up as a share of the steps (when --warmup-steps is 0)",
    "min_lr_ratio": "final learning rate as a share of --lr (linear and cosine schedules)",
    "save_every": "optimizer steps between saved training states (default: about 10 per run, >= 10 steps apart)",
    "log_every": "optimizer steps between log rows",
    "eval_path": "held-out text: bits per byte before and after (and every --eval-every steps)",
    "eval_window": "tokens per evaluation window",
    "eval_max_chars": "evaluate only this many characters of the held-out text",
    "eval_every": "optimizer steps between held-out evaluations (the curve in the report and plot)",
    "max_examples": "use only the first N training examples",
    "dtype": "output dtype (default: the pivot's)",
    "work_dir": "folder for teacher caches, alignments and training state (kept; shared by runs)",
    "keep_state": "keep the training state after success",
    "cache_batch_size": "sequences per teacher forward pass while caching",
    "shard_size": "examples per teacher-cache shard",
    "cache_dtype": "teacher cache values: float16, bfloat16 or float32",
    "transplant_k": "OMP k of --align transplant",
    "num_workers": "data-loader worker processes",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    if get_origin(tp) is not None:  # Optional[X] -> X
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_fuse_flags(p: argparse.ArgumentParser, existing: Optional[set[str]] = None) -> None:
    """Add a flag for every FuseOptions field, every gld_loss option and the training arguments.

    ``existing``: flags the parser already has (skipped). Every flag's ``dest`` is
    prefixed (``fo_``, ``fg_``, ``ft_``); a flag not given leaves no attribute.
    """
    from ..recipe.options import FuseOptions  # its home: importing the trainer (distill) cost every command 0.07 s

    existing = existing or set()
    for name, tp, default, text in TRAIN_FLAGS:
        if _flag(name) not in existing:
            p.add_argument(_flag(name), dest=f"ft_{name}", type=tp, default=argparse.SUPPRESS,
                           choices=TRAIN_CHOICES.get(name), metavar=None if name in TRAIN_CHOICES else name.upper(),
                           help=f"{text} (default: {default})")
    hints = get_type_hints(FuseOptions)
    for f in dataclasses.fields(FuseOptions):
        flag = _flag(f.name)
        if flag in existing:
            continue
        tp = _base_type(hints[f.name])
        text = HELP.get(f.name, f.name.replace("_", " "))
        default = f.default
        if tp is bool:
            p.add_argument(flag, dest=f"fo_{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{text} (default: {'yes' if default else 'no'})")
        elif tp is dict:
            p.add_argument(flag, dest=f"fo_{f.name}", default=argparse.SUPPRESS, metavar="JSON", help=text)
        else:
            choices = CHOICES.get(f.name)
            p.add_argument(flag, dest=f"fo_{f.name}", type=tp if tp in (int, float) else str, choices=choices,
                           default=argparse.SUPPRESS, metavar=None if choices else f.name.upper(),
                           help=f"{text} (default: {default})")
    for name, tp, choices, default, text in GLD_FLAGS:
        p.add_argument(_flag("gld_" + name), dest=f"fg_{name}", type=tp, choices=choices, default=argparse.SUPPRESS,
                       metavar=None if choices else name.upper(), help=f"GLD: {text} (default: {default})")


def fuse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``fuse`` that the flags of :func:`add_fuse_flags` set.

    Returns ``{"options": {...}, <training arguments>}`` with only what was given
    (flags not given are absent from ``args``: their default is ``argparse.SUPPRESS``).
    """
    import json

    from ..errors import InvalidInputError

    out: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    gld: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("ft_"):
            out[key[3:]] = value
        elif key.startswith("fo_"):
            opts[key[3:]] = value
        elif key.startswith("fg_"):
            gld[key[3:]] = value
    if "gld" in opts:
        try:
            extra = json.loads(opts["gld"])
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"--gld: not valid JSON ({exc.msg})") from None
        if not isinstance(extra, dict):
            raise InvalidInputError("--gld: expected a JSON object of gld_loss options")
        opts["gld"] = {**extra, **gld}
    elif gld:
        opts["gld"] = gld
    if opts:
        out["options"] = opts
    return out
