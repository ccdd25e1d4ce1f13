"""mergekit-yaml's command-line flags, accepted by ``surgeon run``.

Users type ``surgeon run config.yml OUT --cuda --allow-crimes --lazy-unpickle``
out of habit. Every flag of mergekit 0.1.5's ``MergeOptions`` is accepted:

- mapped where surgeon has the equivalent (``--cuda``/``--device`` ->
  ``--device``, ``--out-shard-size`` -> ``--max-shard-size``, ``-j``/
  ``--num-threads`` -> ``--threads``, ``--quiet``);
- refused where surgeon deliberately differs (``--trust-remote-code``: surgeon
  never runs code from a checkpoint);
- otherwise accepted with a one-line note on stderr saying it has no effect
  here and why. Notes are printed even with ``-q``: nothing a user writes is
  silently ignored.

The CLI calls :func:`add_mergekit_flags` on the ``run`` parser and
:func:`apply_mergekit_flags` before running.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from ..errors import InvalidInputError

# mergekit boolean option -> why it changes nothing in surgeon (given either way, --x or --no-x)
_NO_EFFECT_BOOL: dict[str, str] = {
    "allow_crimes": "surgeon checks every tensor's name and shape instead of architecture names",
    "unsafe_truncate_embeddings": "surgeon aligns embedding rows by token (a tokenizer_source or the vocab rules) "
                                  "instead of truncating",
    "low_cpu_memory": "surgeon streams tensors and keeps only a few pieces in memory",
    "copy_tokenizer": "surgeon always writes the output's tokenizer (the base's, or the one the config builds)",
    "clone_tensors": "surgeon writes every output tensor from its own buffer",
    "lazy_unpickle": "surgeon reads safetensors lazily and refuses pickled checkpoints unless --allow-pickle",
    "write_model_card": "surgeon always writes README.md (model card) and the recipe beside the weights",
    "safe_serialization": "surgeon writes safetensors only",
    "read_to_gpu": "with --device cuda surgeon moves each piece to the GPU as it is read",
    "multi_gpu": "surgeon uses one device per process; launch several with torchrun or accelerate (--distributed)",
    "async_write": "surgeon always writes on a background thread while the next tensor is merged",
}
_NO_EFFECT_VALUE: dict[str, str] = {
    "transformers_cache": "surgeon reads the Hugging Face cache from HF_HOME / HF_HUB_CACHE",
    "lora_merge_cache": "surgeon adds a LoRA's B @ A while the model's tensors stream; nothing is cached",
    "lora_merge_dtype": "surgeon applies LoRA deltas in float32 and stores in the step's dtype",
    "write_threads": "surgeon writes on one background thread",
    "random_seed": "surgeon's random methods are seeded per tensor from the recipe's top-level `seed:` "
                   "(0 unless the config sets it)",
}
_FLAG_HELP = "mergekit-yaml flag, accepted for compatibility"


def add_mergekit_flags(p: argparse.ArgumentParser) -> None:
    """Add mergekit-yaml's flags to the ``run`` parser (see the module docstring)."""
    g = p.add_argument_group("mergekit-yaml flags (mapped where surgeon has the equivalent, otherwise noted)")
    for name in _NO_EFFECT_BOOL:
        flag = name.replace("_", "-")
        g.add_argument(f"--{flag}", dest=f"mk_{name}", action="store_const", const=True, default=None,
                       help=argparse.SUPPRESS)
        g.add_argument(f"--no-{flag}", dest=f"mk_{name}", action="store_const", const=False, help=argparse.SUPPRESS)
    for name in _NO_EFFECT_VALUE:
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"mk_{name}", default=None, metavar="X",
                       help=argparse.SUPPRESS)
    g.add_argument("--cuda", dest="mk_cuda", action="store_const", const=True, default=None,
                   help="= --device cuda")
    g.add_argument("--no-cuda", dest="mk_cuda", action="store_const", const=False, help=argparse.SUPPRESS)
    g.add_argument("--gpu-rich", dest="mk_gpu_rich", action="store_true", help="= --device cuda")
    g.add_argument("--out-shard-size", dest="mk_out_shard_size", metavar="SIZE",
                   help="= --max-shard-size (mergekit's units: 500M, 5B bytes)")
    g.add_argument("-j", "--num-threads", dest="mk_num_threads", type=int, metavar="N", help="= --threads")
    g.add_argument("--no-quiet", dest="mk_no_quiet", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", dest="mk_verbosity", action="count", default=0,
                   help="mergekit's log verbosity; surgeon prints its progress unless -q")
    g.add_argument("--trust-remote-code", dest="mk_trust_remote_code", action="store_const", const=True,
                   default=None, help="refused: surgeon never runs code from a checkpoint")
    g.add_argument("--no-trust-remote-code", dest="mk_trust_remote_code", action="store_const", const=False,
                   help=argparse.SUPPRESS)
    p.set_defaults(mk_flags=True)
    # one line in --help naming every other accepted flag
    g.description = ("also accepted, with a note that they change nothing here: "
                     + ", ".join("--[no-]" + n.replace("_", "-") for n in _NO_EFFECT_BOOL) + ", "
                     + ", ".join("--" + n.replace("_", "-") for n in _NO_EFFECT_VALUE))


def parse_kmb(value: str) -> int:
    """mergekit's size syntax: ``123``, ``500k``, ``20M``, ``5B`` (powers of 1000, bytes)."""
    text = str(value).strip()
    units = {"k": 10**3, "m": 10**6, "b": 10**9}
    try:
        if text.isdigit():
            size = int(text)
        elif text[-1:].lower() in units and text[:-1].isdigit():
            size = int(text[:-1]) * units[text[-1].lower()]
        else:
            raise ValueError
    except ValueError:
        raise InvalidInputError(f"--out-shard-size: cannot read {value!r} (mergekit's syntax: 500M, 5B; "
                                "or use --max-shard-size 2GB)") from None
    if size <= 0:
        raise InvalidInputError(f"--out-shard-size: must be positive, got {value!r}")
    return size


def apply_mergekit_flags(args: argparse.Namespace, err: TextIO | None = None) -> list[str]:
    """Map the mergekit flags in ``args`` onto surgeon's options (in place); print and return the notes.

    Raises :class:`InvalidInputError` (exit 2) for ``--trust-remote-code``
    and for a flag that contradicts surgeon's own one.
    """
    err = err or sys.stderr
    if not getattr(args, "mk_flags", False):
        return []
    notes: list[str] = []
    if getattr(args, "mk_trust_remote_code", None):
        raise InvalidInputError("--trust-remote-code: refused; surgeon never runs code shipped with a checkpoint "
                                "(safetensors and config.json are all it reads)")
    if args.mk_trust_remote_code is False:
        notes.append("--no-trust-remote-code: surgeon never runs remote code anyway")
    cuda = bool(args.mk_cuda) or args.mk_gpu_rich
    device = getattr(args, "device", "cpu")
    if device == "auto":
        import torch

        args.device = device = "cuda" if torch.cuda.is_available() else "cpu"
        notes.append(f"--device auto: using {device}")
    if cuda:
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda"):
            raise InvalidInputError(f"--cuda contradicts --device {device}")
        if device == "cpu":
            args.device = "cuda"
        if args.mk_gpu_rich:
            notes.append("--gpu-rich: mapped to --device cuda (surgeon moves each piece to the GPU as it is read)")
    if args.mk_out_shard_size is not None:
        size = parse_kmb(args.mk_out_shard_size)
        if getattr(args, "max_shard_size", None) and str(args.max_shard_size) != str(size):
            raise InvalidInputError(f"--out-shard-size {args.mk_out_shard_size} contradicts --max-shard-size "
                                    f"{args.max_shard_size}; give one of them")
        args.max_shard_size = str(size)
    if args.mk_num_threads is not None:
        if args.mk_num_threads < 1:
            raise InvalidInputError(f"--num-threads must be >= 1, got {args.mk_num_threads}")
        if getattr(args, "threads", None) and args.threads != args.mk_num_threads:
            raise InvalidInputError(f"-j/--num-threads {args.mk_num_threads} contradicts --threads {args.threads}")
        args.threads = args.mk_num_threads
    if args.mk_no_quiet:
        args.quiet = False
    if args.mk_verbosity:
        notes.append("-v: no effect (surgeon prints its progress and notes unless -q; --debug shows tracebacks)")
    for name, why in _NO_EFFECT_BOOL.items():
        value = getattr(args, f"mk_{name}", None)
        if value is not None:
            flag = ("--" if value else "--no-") + name.replace("_", "-")
            if name == "safe_serialization" and not value:
                why = "surgeon writes safetensors only (never pickles)"
            notes.append(f"{flag}: no effect here ({why})")
    for name, why in _NO_EFFECT_VALUE.items():
        value = getattr(args, f"mk_{name}", None)
        if value is not None:
            notes.append(f"--{name.replace('_', '-')} {value}: no effect here ({why})")
    for note in notes:
        print(f"note: {note}", file=err)
    return notes


def flag_summary() -> dict[str, Any]:
    """Every mergekit-yaml flag and what ``surgeon run`` does with it (for docs and tests)."""
    out: dict[str, Any] = {
        "--cuda": "mapped: --device cuda",
        "--device": "same flag (auto picks cuda when available)",
        "--gpu-rich": "mapped: --device cuda",
        "--out-shard-size": "mapped: --max-shard-size (mergekit's 500M / 5B syntax, bytes)",
        "-j/--num-threads": "mapped: --threads",
        "--quiet": "same flag (-q)",
        "-v/--verbosity": "accepted, note: no effect",
        "--trust-remote-code": "refused (exit 2)",
    }
    for name, why in {**_NO_EFFECT_BOOL, **_NO_EFFECT_VALUE}.items():
        out["--" + name.replace("_", "-")] = f"accepted, note: no effect ({why})"
    return out
