"""``fuse``: distil source models into a pivot across tokenizers, trained with accelerate.

Loss (InfiGFusion's objective, with FuseLLM-style token-wise alignment)::

    L = (1 - lambda) * CE(pivot, data)
        + lambda * sum_s w_s * ( tokenwise_weight * T_s + gld_weight * G_s )

* ``CE``: next-token cross-entropy on the loss tokens (all text, or the assistant
  turns of chat data);
* ``T_s``: token-wise term against source s on the position pairs of the
  alignment: ``"kl"`` (KL to the source's top-k distribution mapped into the
  pivot vocabulary, FuseLLM), ``"uld"`` (sorted-probability L1, InfiGFusion's
  token-wise term; needs no vocabulary mapping) or ``"kl+uld"``;
* ``G_s``: graph-on-logits loss (:func:`surgeon.fusion.gld_loss`) between the
  pivot's and the source's co-activation graphs over the loss positions (each in
  its own vocabulary and tokenisation);
* ``w_s``: the source weights, normalised to sum to 1.

Sources are run once over the data and cached (:mod:`surgeon.fusion.cache`), so
training holds only the pivot. ``align``: ``"dp"`` aligns each source's own
tokenisation to the pivot's (:mod:`surgeon.fusion.align`); ``"transplant"`` first
gives the source the pivot's tokenizer (``surgeon.transplant``, OMP), after which
positions and ids correspond one to one. A source whose tokenizer is identical to
the pivot's is aligned by identity either way.

Training runs under ``accelerate.Accelerator`` (CPU, one GPU, or ``accelerate
launch``/``torchrun`` with several processes; mixed precision; gradient
accumulation). State is saved every ``save_every`` optimizer steps (safetensors and
JSON, never pickle: :mod:`surgeon.fusion.train_state`) and a rerun with the same
arguments resumes from it. The output is written atomically
(:class:`surgeon.io.CheckpointWriter`) with the pivot's tensor layout, config and
tokenizer, a model card, the loss log (CSV and JSON) and a loss plot (PNG).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, StepError
from ..recipe.options import PAIRING, TOKENWISE, FuseOptions
from ..step import StepContext
from .align import TokenSurfaces, VocabMap, align_tokens, pair_positions
from .cache import TeacherCache, build_teacher_cache, model_fingerprint
from .data import Encoded, bos_id, encode, fingerprint, load_examples
from .gld import TopK, gld_loss
from .tokenwise import kl_loss, uld_loss
from . import train_state

__all__ = ["fuse", "FuseOptions"]



# ----------------------------------------------------------------------------- sources
@dataclass
class _Source:
    id: str
    path: Path                  # the model actually run (the transplanted one for align="transplant")
    original: Path
    weight: float
    align: str
    encoded: list[Encoded]
    cache: TeacherCache
    pairs: list[Optional[torch.Tensor]]  # per example: [P, 2] (pivot position, source position); None: not needed
    vocab_table: torch.Tensor   # source id -> pivot id (-1: none)
    identity: bool
    stats: dict[str, Any]


def _tokenizer_digest(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _max_positions(config: Any) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _pairs_for(piv: Encoded, src: Encoded, sp: TokenSurfaces, ss: TokenSurfaces, how: str,
               memo: Optional[dict] = None) -> torch.Tensor:
    """Position pairs (pivot t, source t') whose next tokens start at the same character.

    ``dp`` (default): FuseLLM's DP alignment over token edit distance, pairs from the path
    (:func:`~surgeon.fusion.align.pair_positions`); ``dp_checked``: the
    same, keeping only pairs whose next tokens' character offsets agree (drops the
    DP's slips, 9-21 % of its pairs on the zoo's held-out texts; measured 2 % worse
    perplexity than ``dp``, docs/fusion.md); ``offsets``: pairs read from
    the character offsets alone (no DP); ``exact``: the DP's pairs whose next tokens have the
    same surface (word-start markers stripped), FuseLLM's exact-token rule. Only positions predicting a loss token of
    both sides are kept.
    """
    pm, sm = piv.position_mask, src.position_mask
    if how == "offsets":
        first: dict[int, int] = {}
        for v in range(1, len(src)):
            if src.starts[v] >= 0:
                first.setdefault(src.starts[v], v)
        seen: set[int] = set()
        out = []
        for u in range(1, len(piv)):
            s = piv.starts[u]
            if s >= 0 and s in first and s not in seen:
                seen.add(s)
                out.append((u - 1, first[s] - 1))
    else:
        _, path = align_tokens(sp.surfaces(piv.ids), ss.surfaces(src.ids), memo=memo)
        out = pair_positions(path, len(piv), len(src))
        if how == "dp_checked":
            out = [(a, b) for a, b in out if piv.starts[a + 1] >= 0 and piv.starts[a + 1] == src.starts[b + 1]]
        elif how == "exact":  # FuseLLM's rule: the next tokens are the same string
            ps_, ss_ = sp.surfaces(piv.ids), ss.surfaces(src.ids)
            out = [(a, b) for a, b in out if ps_[a + 1] == ss_[b + 1]]
    out = [(a, b) for a, b in out if pm[a] and sm[b]]
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def _prepare_source(i: int, spec: dict[str, Any], pivot_dir: Path, pivot_tok: Any, examples: list, piv_enc: list[Encoded],
                    work: Path, top_k: int, opts: FuseOptions, device: str, progress: bool, say: Callable[[str], None],
                    needed: Optional[list[int]] = None) -> _Source:
    """Cache the source's top-k and align it to the pivot, for the examples ``needed`` (default: all)."""
    from ..io.hf_load import load_config, load_tokenizer

    path = Path(spec["path"])
    sid = str(spec.get("id") or path.name)
    align = spec.get("align", "dp")
    if align not in ("dp", "transplant"):
        raise InvalidInputError(f"source {sid}: align must be 'dp' or 'transplant', got {align!r}")
    weight = float(spec.get("weight", 1.0))
    if weight < 0:
        raise InvalidInputError(f"source {sid}: weight must be >= 0")
    if not path.is_dir():
        raise InvalidInputError(f"source {sid}: {path}: no such model folder")
    run_path = path
    try:
        src_tok = load_tokenizer(path)
    except Exception as exc:
        raise InvalidInputError(f"source {sid}: cannot load its tokenizer ({exc})") from None
    same_tok = _tokenizer_digest(src_tok) == _tokenizer_digest(pivot_tok)
    if align == "transplant" and not same_tok:
        try:
            from ..transplant import transplant
        except ImportError:
            raise InvalidInputError("align='transplant' needs surgeon.transplant, which is not available") from None
        key = hashlib.sha256((model_fingerprint(path) + model_fingerprint(pivot_dir) + str(opts.transplant_k)).encode()).hexdigest()[:16]
        run_path = work / f"transplant-{sid}-{key}"
        if not run_path.is_dir():
            say(f"source {sid}: transplanting the pivot's tokenizer (OMP, k={opts.transplant_k})")
            transplant(path, pivot_dir, run_path, method="omp", k=opts.transplant_k, device=device, progress=progress)
        src_tok = load_tokenizer(run_path)
        same_tok = True
    cfg = load_config(run_path)
    limit = _max_positions(cfg)
    src_bos = bos_id(src_tok, cfg)
    if same_tok:
        enc = [Encoded(list(e.ids), list(e.starts), list(e.ends), list(e.target), e.truncated) for e in piv_enc]
        if limit:
            for e in enc:
                if len(e) > limit:
                    e.ids, e.starts, e.ends, e.target, e.truncated = e.ids[:limit], e.starts[:limit], e.ends[:limit], e.target[:limit], True
    else:
        enc = [encode(src_tok, ex, limit, src_bos) for ex in examples]
    need = list(range(len(enc))) if needed is None else sorted(set(needed))
    store = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[opts.cache_dtype]
    fp = hashlib.sha256((model_fingerprint(run_path) + fingerprint(enc) + f"{top_k}/{opts.temperature}/"
                         f"{opts.cache_dtype}").encode()).hexdigest()[:16]
    cache_dir = work / f"cache-{sid}-{fp}"
    t0 = time.time()
    say(f"cache {sid}: teacher top-{top_k} for {len(need)} of {len(enc)} examples")
    cache = build_teacher_cache(run_path, enc, cache_dir, top_k=top_k, indices=need, temperature=opts.temperature,
                                shard_size=opts.shard_size, batch_size=opts.cache_batch_size, device=device,
                                store_dtype=store, progress=progress, say=say)
    stats: dict[str, Any] = {"cache": str(cache_dir), "cache_seconds": round(time.time() - t0, 2),
                             "cache_reused_examples": cache.manifest.get("resumed_examples", 0),
                             "cached_examples": cache.cached, "cache_bytes_per_token": round(cache.bytes_per_token(), 1),
                             "source_tokens": sum(len(enc[j]) for j in need), "identity": same_tok}
    say(f"cache {sid}: done in {stats['cache_seconds']:.1f} s ({stats['cache_reused_examples']} examples reused, "
        f"{stats['cache_bytes_per_token']:.0f} bytes/token)")
    align_file = cache_dir / f"align-{opts.pairing}-{fingerprint(piv_enc)[:16]}.safetensors"
    t0 = time.time()
    pairs: list[Optional[torch.Tensor]] = [None] * len(enc)
    if same_tok:
        for j in need:
            pe, se = piv_enc[j], enc[j]
            n = min(len(pe), len(se))
            pos = [t for t in range(n) if pe.position_mask[t] and se.position_mask[t]]
            pairs[j] = torch.tensor([[t, t] for t in pos], dtype=torch.long).reshape(-1, 2)
        table = torch.arange(cache.vocab_size, dtype=torch.long)
        stats["vocab_map"] = {"identity": cache.vocab_size}
    else:
        from safetensors.torch import load_file, save_file

        sp_surf, src_surf = TokenSurfaces(pivot_tok), TokenSurfaces(src_tok)
        vm = VocabMap(src_surf, sp_surf)
        how: dict[str, int] = dict(vm.how)
        if align_file.is_file():  # earlier runs' pairs and resolved ids
            d = load_file(str(align_file))
            for j, p in zip(d["indices"].tolist(), torch.split(d["pairs"].long(), d["counts"].tolist())):
                pairs[j] = p
            if d["vocab_table"].shape[0] == vm.table.shape[0]:
                vm.table.copy_(d["vocab_table"])
                vm._resolved.copy_(d["resolved"].bool())
                how = json.loads(align_file.with_suffix(".json").read_text())
        todo = [j for j in need if pairs[j] is None]
        if todo:
            say(f"align {sid}: {len(todo)} sequences ({opts.pairing}) and its vocabulary")
            memo: dict = {}
            for c, j in enumerate(todo):
                pairs[j] = _pairs_for(piv_enc[j], enc[j], sp_surf, src_surf, opts.pairing, memo)
                if (c + 1) % max(1, len(todo) // 4) == 0 and c + 1 < len(todo):
                    say(f"align {sid}: {c + 1}/{len(todo)} sequences ({time.time() - t0:.1f} s)")
        before = dict(vm.how)
        vm.resolve(cache.used_ids(need).tolist())
        for k, v in vm.how.items():
            how[k] = how.get(k, 0) + v - before.get(k, 0)
        table = vm.table.clone()
        stats["vocab_map"] = how
        if todo or vm.how != before:
            done = [j for j in range(len(enc)) if pairs[j] is not None]
            counts = torch.tensor([pairs[j].shape[0] for j in done], dtype=torch.long)  # type: ignore[union-attr]
            flat = torch.cat([pairs[j] for j in done]) if done else torch.zeros(0, 2, dtype=torch.long)  # type: ignore[misc]
            tmp = align_file.with_name(align_file.name + ".tmp")
            save_file({"indices": torch.tensor(done, dtype=torch.long), "pairs": flat.to(torch.int32).contiguous(),
                       "counts": counts, "vocab_table": table, "resolved": vm._resolved.to(torch.uint8)}, str(tmp))
            align_file.with_suffix(".json").write_text(json.dumps(how))
            os.replace(tmp, align_file)
        say(f"align {sid}: done in {time.time() - t0:.1f} s")
    n_targets = sum(sum(piv_enc[j].position_mask) for j in need)
    n_pairs = sum(int(pairs[j].shape[0]) for j in need)  # type: ignore[union-attr]
    stats["align_seconds"] = round(time.time() - t0, 2)
    stats["paired_positions"] = n_pairs
    stats["pivot_loss_positions"] = n_targets
    stats["coverage"] = round(n_pairs / max(1, n_targets), 4)
    return _Source(sid, run_path, path, weight, align, enc, cache, pairs, table, same_tok, stats)


# ----------------------------------------------------------------------------- batches
def _first_of_duplicates(mapped: torch.Tensor) -> torch.Tensor:
    """[..., k] pivot ids (teacher order, decreasing probability): later repeats of an id -> -1 (FuseLLM keeps the first)."""
    out = mapped.clone()
    for j in range(1, mapped.shape[-1]):
        dup = (mapped[..., j:j + 1] == mapped[..., :j]).any(-1) & (mapped[..., j] >= 0)
        out[..., j] = torch.where(dup, torch.full_like(out[..., j], -1), out[..., j])
    return out


class _Collate:
    def __init__(self, piv_enc: list[Encoded], sources: list[_Source], pad_id: int, vocab_merge: str = "sum"):
        self.piv, self.sources, self.pad, self.merge = piv_enc, sources, pad_id, vocab_merge

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        rows = [self.piv[i] for i in idx]
        b, t = len(rows), max(len(r) for r in rows)
        ids = torch.full((b, t), self.pad, dtype=torch.long)
        att = torch.zeros(b, t, dtype=torch.long)
        labels = torch.full((b, t), -100, dtype=torch.long)
        pos = torch.zeros(b, t, dtype=torch.bool)
        for r, e in enumerate(rows):
            n = len(e)
            ids[r, :n] = torch.tensor(e.ids)
            att[r, :n] = 1
            tgt = torch.tensor(e.target)
            labels[r, :n] = torch.where(tgt, ids[r, :n], torch.full_like(ids[r, :n], -100))
            pos[r, :n] = torch.tensor(e.position_mask)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": att, "labels": labels, "pos_mask": pos,
                               "index": torch.tensor(idx), "sources": []}
        for s in self.sources:
            items = [s.cache.get(i) for i in idx]
            k = items[0][0].shape[-1]
            lt = max(x[0].shape[0] for x in items)
            lg = torch.zeros(b, lt, k)
            tid = torch.zeros(b, lt, k, dtype=torch.long)
            lse = torch.zeros(b, lt)
            tmask = torch.zeros(b, lt, dtype=torch.bool)
            pairs = []
            for r, (i, (a, c, d)) in enumerate(zip(idx, items)):
                n = a.shape[0]
                lg[r, :n], tid[r, :n], lse[r, :n] = a, c, d
                pm = s.encoded[i].position_mask
                tmask[r, :n] = torch.tensor(pm[:n])
                p = s.pairs[i]
                pairs.append(torch.cat([torch.full((p.shape[0], 1), r, dtype=torch.long), p], 1))
            mapped = s.vocab_table[tid]
            if self.merge == "first" and not s.identity:
                mapped = _first_of_duplicates(mapped)
            out["sources"].append({"logits": lg, "ids": tid, "mapped": mapped, "lse": lse, "mask": tmask,
                                   "pairs": torch.cat(pairs) if pairs else torch.zeros(0, 3, dtype=torch.long)})
        return out


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "sources"}
    out["sources"] = [{k: v.to(device) for k, v in s.items()} for s in batch["sources"]]
    return out


# ----------------------------------------------------------------------------- data order
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch (the same for every process and every rerun)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


def _examples_reached(n: int, seed: int, total_steps: int, batch_size: int, grad_accum: int, processes: int) -> list[int]:
    """Every example index the training loop will read in ``total_steps`` optimizer steps.

    Each process takes every ``processes``-th batch of the epoch order; an optimizer
    step consumes ``grad_accum`` batches per process, and the last (partial)
    accumulation of an epoch also ends in a step; the loader reads one batch ahead.
    Uneven ends are padded by accelerate from the start of the same epoch, which
    is already counted.
    """
    batches = math.ceil(n / batch_size)
    per_proc = math.ceil(batches / processes)
    steps_per_epoch = max(1, math.ceil(per_proc / grad_accum))
    seen: set[int] = set()
    left, epoch = total_steps, 0
    while left > 0 and len(seen) < n:
        s = min(left, steps_per_epoch)
        # + 1: accelerate's loader reads one batch ahead (to know where the epoch ends)
        used = min(per_proc, s * grad_accum + 1) * processes * batch_size
        seen.update(_epoch_order(n, seed, epoch)[:used])
        left -= s
        epoch += 1
    return sorted(seen)


# ----------------------------------------------------------------------------- schedule and plot
def _lr_factor(step: int, total: int, schedule: str, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - prog)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


LOG_FIELDS = ["step", "epoch", "lr", "loss", "sft", "tokenwise", "gld", "tokens", "seconds", "tokens_per_s", "eval_bpb"]


def _plot(rows: list[dict[str, Any]], title: str, curve: Optional[list[dict[str, Any]]] = None) -> Optional[bytes]:
    """The loss curves (and, with ``curve``, the held-out bits per byte on a second panel) as PNG bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    if curve:
        fig, (ax, axe) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        axe.plot([c["step"] for c in curve], [c["eval_bpb"] for c in curve], "o-", color="tab:green", ms=3)
        axe.set_ylabel("held-out bits/byte")
        axe.set_xlabel("optimizer step")
        axe.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    handles = []
    for key, style in (("loss", "-"), ("sft", "--"), ("tokenwise", ":")):
        vals = [r.get(key) for r in rows]
        if any(v not in (None, 0.0) for v in vals):
            handles += ax.plot(steps, vals, style, label=key)
    gld = [r.get("gld") for r in rows]
    if any(v not in (None, 0.0) for v in gld):
        ax2 = ax.twinx()  # GLD lives on another scale (bounded by 2 with the defaults)
        handles += ax2.plot(steps, gld, "-.", color="tab:red", label="gld (right axis)")
        ax2.set_ylabel("GLD")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


# ----------------------------------------------------------------------------- fuse
def fuse(pivot_dir: str | Path, sources: Sequence[dict[str, Any]], dataset_path: str | Path, out_dir: str | Path, *,
         max_length: int = 256, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-4,
         schedule: str = "cosine", warmup_steps: int = 0, epochs: float = 1.0, steps: Optional[int] = None,
         seed: int = 0, lambda_: float = 0.5, tokenwise_weight: float = 1.0, gld_weight: float = 1.0,
         top_k: int = 16, mixed_precision: str = "no", device: str = "cpu", overwrite: bool = False,
         progress: bool = True, options: Optional[dict[str, Any]] = None,
         context: Optional[StepContext] = None,
         callback: Optional[Callable[[int, dict[str, Any]], None]] = None, **extra: Any) -> dict[str, Any]:
    """Distil ``sources`` into the pivot on ``dataset_path``; write ``out_dir``; return a report.

    ``sources``: ``[{"path", "weight" (1.0), "align" ("dp" | "transplant"), "id"}]``.
    Common settings are keyword arguments; the rest (:class:`FuseOptions`) come in
    ``options`` or as extra keyword arguments. ``context`` (the recipe engine's):
    the output writer comes from ``context.open_writer`` (shard size, resume key)
    and ``context.finish`` writes config, tokenizer and card and commits. ``callback(step, log_row)`` is called after every
    optimizer step on the main process. The loss is described in the module
    docstring; the report has the loss log, timings, alignment statistics and, with
    ``eval_path``, held-out perplexity before and after.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from ..io.hf_load import load_causal_lm, load_config, load_tokenizer, refuse_remote_code

    t_start = time.time()
    opts = FuseOptions.from_dict({**(options or {}), **extra})
    pivot_dir, dataset_path, out_dir = Path(pivot_dir), Path(dataset_path), Path(out_dir)
    _validate(pivot_dir, sources, out_dir, overwrite, lambda_, tokenwise_weight, gld_weight, schedule, opts,
              mixed_precision, epochs, steps, batch_size, grad_accum, top_k, context)
    if device not in ("cpu", "auto") and not str(device).startswith("cuda"):
        raise InvalidInputError(f"fuse: device must be 'cpu', 'cuda[:N]' or 'auto', got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("fuse: device 'cuda' requested but no GPU is available")
    for folder in [pivot_dir, *(Path(src["path"]) for src in sources if isinstance(src, dict) and src.get("path"))]:
        if folder.is_dir():
            refuse_remote_code(folder)  # before any training: surgeon never runs a model folder's code
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum)
    main = accelerator.is_main_process
    show = progress and accelerator.is_local_main_process
    import sys

    bar_ok = show and sys.stderr.isatty()  # bars only on a terminal; progress lines (say) always

    def say(msg: str) -> None:
        if show:
            from tqdm.auto import tqdm

            tqdm.write(f"fuse: {msg}")

    set_seed(seed)
    work = Path(opts.work_dir) if opts.work_dir else out_dir.parent / f".{out_dir.name}.fuse-work"
    if main:
        work.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        pivot_tok = load_tokenizer(pivot_dir)
    except Exception as exc:
        raise InvalidInputError(f"pivot {pivot_dir}: cannot load its tokenizer ({exc})") from None
    pcfg = load_config(pivot_dir)
    p_bos = bos_id(pivot_tok, pcfg)
    limit = _max_positions(pcfg)
    if limit and max_length > limit:
        max_length = limit
    examples = load_examples(dataset_path, pivot_tok, max_length, add_bos=p_bos is not None, limit=opts.max_examples)
    piv_enc = [encode(pivot_tok, ex, max_length, p_bos) for ex in examples]
    keep = [i for i, e in enumerate(piv_enc) if any(e.position_mask)]
    examples, piv_enc = [examples[i] for i in keep], [piv_enc[i] for i in keep]
    if not piv_enc:
        raise InvalidInputError(f"{dataset_path}: no example has a token to train on")
    say(f"{len(piv_enc)} sequences, {sum(len(e) for e in piv_enc)} pivot tokens")

    n = len(piv_enc)
    batches_per_epoch = math.ceil(math.ceil(n / batch_size) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / grad_accum))
    total_steps = int(steps) if steps else max(1, math.ceil(steps_per_epoch * epochs))
    # only the examples the steps will read are cached and aligned (a 10-step smoke run reads a few batches)
    needed = _examples_reached(n, seed, total_steps, batch_size, grad_accum, accelerator.num_processes)

    # the main process builds the caches and alignments; the others then read them
    dev_name = "cpu" if device == "cpu" else str(accelerator.device)
    srcs: list[_Source] = []
    distil = lambda_ > 0 and (tokenwise_weight > 0 and opts.tokenwise != "none" or gld_weight > 0)
    if not distil:
        say("lambda, or both distillation weights, are 0: plain SFT, the sources are not run")
    with accelerator.main_process_first():
        for i, spec in enumerate(sources if distil else []):
            srcs.append(_prepare_source(i, dict(spec), pivot_dir, pivot_tok, examples, piv_enc, work, top_k, opts,
                                        dev_name, bar_ok, say, needed))
    wsum = sum(s.weight for s in srcs)
    weights = [s.weight / wsum if wsum > 0 else 0.0 for s in srcs]

    try:
        model = load_causal_lm(pivot_dir, dtype=torch.float32)
    except Exception as exc:
        raise InvalidInputError(f"pivot {pivot_dir}: cannot load the model ({exc})") from None
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad = pivot_tok.pad_token_id if pivot_tok.pad_token_id is not None else (p_bos or 0)
    collate = _Collate(piv_enc, srcs, pad, opts.vocab_merge)
    warmup = warmup_steps or int(round(opts.warmup_ratio * total_steps))
    # the state is the model plus two optimizer moments (~12 bytes a parameter): save it about ten times a run,
    # but not more often than every 10 steps (a 10-step smoke run of a 135M model saved 1.6 GB each step)
    save_every = opts.save_every or max(10, total_steps // 10)
    gld_opts = dict(opts.gld or {})
    gld_k = min(opts.gld_top_k or top_k, top_k)  # the caches hold top_k entries per position

    # resumable state: keyed by everything that changes the trajectory
    run_key = hashlib.sha256(json.dumps({
        "pivot": model_fingerprint(pivot_dir), "data": fingerprint(piv_enc),
        "sources": [(s.id, s.cache.manifest["teacher_fingerprint"], s.weight, s.align) for s in srcs],
        "args": [max_length, batch_size, grad_accum, lr, schedule, warmup, total_steps, seed, lambda_, tokenwise_weight,
                 gld_weight, top_k, mixed_precision, accelerator.num_processes],
        "opts": {k: v for k, v in opts.__dict__.items() if k not in ("work_dir", "keep_state", "eval_path", "log_every",
                                                                      "eval_window", "eval_max_chars", "num_workers", "eval_every",
                                                                      "save_every", "dtype")},
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    state_dir = work / f"state-{run_key}"
    # resumable state: safetensors + JSON only, never pickle (surgeon/fusion/train_state.py, docs/fusion.md)
    unwrapped_model = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    scaler = getattr(accelerator, "scaler", None)
    step, epoch, batch_in_epoch, rows, resumed_from = 0, 0, 0, [], None
    if main:
        train_state.recover(state_dir)
    accelerator.wait_for_everyone()
    if os.path.lexists(state_dir):
        loaded, why = None, ""
        try:
            loaded = train_state.read_train_state(state_dir, model=unwrapped_model, optimizer=optimizer, scaler=scaler,
                                                  rank=rank, world=world)
        except train_state.StateRefused as exc:  # a foreign, old-format or corrupt state: start over
            why = str(exc)
        if world > 1:  # every process resumes, or none does
            ok = torch.tensor([0.0 if loaded is None else 1.0], device=accelerator.device)
            if float(accelerator.reduce(ok, reduction="sum")) != world and loaded is not None:
                loaded, why = None, "another process could not read its part"
        if loaded is not None:
            train_state.apply_train_state(loaded, model=unwrapped_model, optimizer=optimizer, scaler=scaler)
            accelerator.step = loaded.accelerator_step
            prog = loaded.progress
            step, epoch, batch_in_epoch, rows = prog["step"], prog["epoch"], prog["batch_in_epoch"], prog["log"]
            resumed_from = step
            say(f"resuming from step {step}/{total_steps} ({state_dir.name})")
        else:
            say(f"cannot resume from {state_dir}: {why}; starting over")

    def save_state() -> None:
        train_state.save_train_state(
            state_dir, model=unwrapped_model, optimizer=optimizer, scaler=scaler, accelerator_step=accelerator.step,
            progress={"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "log": rows},
            rank=rank, world=world, barrier=accelerator.wait_for_everyone)

    bar = None
    if bar_ok:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="fuse", unit="step", dynamic_ncols=True)
    line_every = max(1, total_steps // 10)

    def heldout() -> dict[str, float]:
        """Held-out bits per byte of the model being trained (main process; eval mode, no grad)."""
        from ..eval.perplexity import evaluate_text

        unwrapped_model.eval()
        try:
            r = evaluate_text(pivot_dir, Path(opts.eval_path), device=dev_name, window=opts.eval_window,  # type: ignore[arg-type]
                              max_chars=opts.eval_max_chars, progress=False, model=unwrapped_model, tokenizer=pivot_tok)
        finally:
            unwrapped_model.train()
        return {"eval_bpb": r["bits_per_byte"], "eval_ppl": r["perplexity"]}

    if opts.eval_every and main and step == 0:
        say("eval: held-out text before training")
        rows_eval0 = {"step": 0, **heldout()}
        say(f"eval: step 0 held-out {rows_eval0['eval_bpb']:.4f} bits/byte")
    else:
        rows_eval0 = None
    say(f"train: {total_steps - step} steps of {batch_size} x {grad_accum} sequences x {accelerator.num_processes} "
        f"process(es), {steps_per_epoch} steps per epoch")
    t_train = time.time()
    t_eval = 0.0  # seconds spent scoring held-out text: not training, kept out of tokens/s
    tokens_run = 0
    tokens_seen = sum(r.get("tokens_step", 0) for r in rows)
    acc = {"loss": 0.0, "sft": 0.0, "tokenwise": 0.0, "gld": 0.0, "n": 0, "tokens": 0}
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for g, b in zip(optimizer.param_groups, base_lrs):
        g["lr"] = lr * _lr_factor(step, total_steps, schedule, warmup, opts.min_lr_ratio)
    while step < total_steps:
        order = _epoch_order(n, seed, epoch)
        loader = torch.utils.data.DataLoader(order, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                             num_workers=opts.num_workers)
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
        if batch_in_epoch:
            loader = accelerator.skip_first_batches(loader, batch_in_epoch)
        for batch in loader:
            batch = _to(batch, accelerator.device)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                parts = _losses(logits.float(), batch, srcs, weights, opts, tokenwise_weight, gld_weight, gld_k, gld_opts,
                                lambda_)
                accelerator.backward(parts["loss"])
                if accelerator.sync_gradients and opts.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            for k in ("loss", "sft", "tokenwise", "gld"):
                acc[k] += float(parts[k].detach())
            acc["n"] += 1
            acc["tokens"] += int(batch["attention_mask"].sum())
            if accelerator.sync_gradients:
                vals = torch.tensor([acc["loss"], acc["sft"], acc["tokenwise"], acc["gld"], acc["n"], acc["tokens"]],
                                    device=accelerator.device, dtype=torch.float64)
                vals = accelerator.reduce(vals, reduction="sum")
                cnt = max(1.0, float(vals[4]))
                tokens_seen += int(vals[5])
                tokens_run += int(vals[5])
                row = {"step": step + 1, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "loss": float(vals[0]) / cnt, "sft": float(vals[1]) / cnt, "tokenwise": float(vals[2]) / cnt,
                       "gld": float(vals[3]) / cnt, "tokens": tokens_seen, "tokens_step": int(vals[5]),
                       "seconds": round(time.time() - t_train, 3),
                       "tokens_per_s": round(tokens_run / max(1e-9, time.time() - t_train - t_eval), 1)}
                rows.append(row)
                acc = {"loss": 0.0, "sft": 0.0, "tokenwise": 0.0, "gld": 0.0, "n": 0, "tokens": 0}
                step += 1
                for g in optimizer.param_groups:
                    g["lr"] = lr * _lr_factor(step, total_steps, schedule, warmup, opts.min_lr_ratio)
                if opts.eval_every and (step % opts.eval_every == 0 or step == total_steps):
                    if main:
                        t0 = time.time()
                        row.update(heldout())
                        t_eval += time.time() - t0
                    accelerator.wait_for_everyone()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", sft=f"{row['sft']:.3f}", tok=f"{row['tokenwise']:.3f}",
                                    gld=f"{row['gld']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                elif step % line_every == 0 or step == total_steps or "eval_bpb" in row:
                    say(f"train: step {step}/{total_steps} loss {row['loss']:.4f} (sft {row['sft']:.4f}, token-wise "
                        f"{row['tokenwise']:.4f}, gld {row['gld']:.4f}), {row['tokens_per_s']:.0f} tokens/s"
                        + (f", held-out {row['eval_bpb']:.4f} bits/byte" if "eval_bpb" in row else ""))
                if main and callback is not None:
                    callback(step, row)
                if step % save_every == 0 and step < total_steps:
                    save_state()
                if step >= total_steps:
                    break
        else:
            epoch += 1
            batch_in_epoch = 0
            continue
        break
    if bar is not None:
        bar.close()
    eval_curve = ([rows_eval0] if rows_eval0 is not None else []) + [
        {"step": r["step"], "eval_bpb": r["eval_bpb"], "eval_ppl": r["eval_ppl"]} for r in rows if "eval_bpb" in r]
    train_seconds = time.time() - t_train
    accelerator.wait_for_everyone()

    report: dict[str, Any] = {
        "output": str(out_dir), "pivot": str(pivot_dir), "data": str(dataset_path),
        "sources": [{"id": s.id, "path": str(s.original), "run": str(s.path), "weight": w, "align": s.align, **s.stats}
                    for s, w in zip(srcs, weights)],
        "examples": len(piv_enc), "pivot_tokens": sum(len(e) for e in piv_enc),
        "steps": total_steps, "resumed_from": resumed_from, "epochs_run": round(step / steps_per_epoch, 3),
        "processes": accelerator.num_processes, "device": str(accelerator.device), "mixed_precision": mixed_precision,
        "settings": {"max_length": max_length, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                     "schedule": schedule, "warmup_steps": warmup, "seed": seed, "lambda": lambda_,
                     "tokenwise_weight": tokenwise_weight, "gld_weight": gld_weight, "top_k": top_k,
                     "options": {k: v for k, v in opts.__dict__.items()}},
        "final": {k: rows[-1][k] for k in ("loss", "sft", "tokenwise", "gld")} if rows else {},
        "train_seconds": round(train_seconds, 2),
        "log": rows,
        "eval_curve": eval_curve,
    }
    if main:
        unwrapped = accelerator.unwrap_model(model)
        _write_output(unwrapped, pivot_dir, out_dir, report, overwrite, opts, context, say)
    accelerator.wait_for_everyone()
    if main and not opts.keep_state:
        train_state.remove_state(state_dir)
    if opts.eval_path and main:
        say(f"eval: held-out {Path(opts.eval_path).name}, pivot and output")
        t_eval = time.time()
        report["eval"] = _evaluate(pivot_dir, out_dir, Path(opts.eval_path), opts, dev_name)
        e = report["eval"]
        say(f"eval: bits/byte {e['pivot']['bits_per_byte']:.4f} -> {e['output']['bits_per_byte']:.4f} "
            f"({time.time() - t_eval:.1f} s)")
        _rewrite_report(out_dir, report)
    report["seconds"] = round(time.time() - t_start, 2)
    accelerator.wait_for_everyone()
    return report


def _validate(pivot_dir: Path, sources: Sequence[dict[str, Any]], out_dir: Path, overwrite: bool, lambda_: float,
              tokenwise_weight: float, gld_weight: float, schedule: str, opts: FuseOptions, mixed_precision: str,
              epochs: float, steps: Optional[int], batch_size: int, grad_accum: int, top_k: int,
              context: Optional[StepContext]) -> None:
    if not pivot_dir.is_dir():
        raise InvalidInputError(f"pivot {pivot_dir}: no such model folder")
    if not sources:
        raise InvalidInputError("fuse: at least one source model is needed")
    for s in sources:
        if not isinstance(s, dict) or "path" not in s:
            raise InvalidInputError(f"fuse: each source must be a dict with 'path', got {s!r}")
        if Path(s["path"]).resolve() == out_dir.resolve():
            raise InvalidInputError(f"{out_dir}: the output folder is a source model")
    if out_dir.resolve() == pivot_dir.resolve():
        raise InvalidInputError(f"{out_dir}: the output folder is the pivot model")
    if context is None and out_dir.exists() and not overwrite:
        raise InvalidInputError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not 0.0 <= lambda_ <= 1.0:
        raise InvalidInputError(f"fuse: lambda must be in [0, 1], got {lambda_}")
    if tokenwise_weight < 0 or gld_weight < 0:
        raise InvalidInputError("fuse: loss weights must be >= 0")
    if schedule not in ("constant", "linear", "cosine"):
        raise InvalidInputError(f"fuse: schedule must be constant, linear or cosine, got {schedule!r}")
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise InvalidInputError(f"fuse: mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
    if opts.tokenwise not in TOKENWISE:
        raise InvalidInputError(f"fuse: tokenwise must be one of {', '.join(TOKENWISE)}, got {opts.tokenwise!r}")
    if opts.vocab_merge not in ("sum", "first"):
        raise InvalidInputError(f"fuse: vocab_merge must be sum or first, got {opts.vocab_merge!r}")
    if opts.kl_sparse not in ("rest", "topk", "fusellm"):
        raise InvalidInputError(f"fuse: kl_sparse must be rest, topk or fusellm, got {opts.kl_sparse!r}")
    if not opts.temperature > 0:
        raise InvalidInputError(f"fuse: temperature must be positive, got {opts.temperature}")
    if opts.pairing not in PAIRING:
        raise InvalidInputError(f"fuse: pairing must be one of {', '.join(PAIRING)}, got {opts.pairing!r}")
    if steps is None and not epochs > 0:
        raise InvalidInputError("fuse: give steps or a positive number of epochs")
    if steps is not None and steps < 1:
        raise InvalidInputError(f"fuse: steps must be >= 1, got {steps}")
    if batch_size < 1 or grad_accum < 1 or top_k < 1:
        raise InvalidInputError("fuse: batch_size, grad_accum and top_k must be >= 1")
    if opts.gld:
        bad = set(opts.gld) - {"values", "temperature", "normalize", "nodes", "feature", "p", "aggregate",
                               "node_reduction", "scale"}
        if bad:
            raise InvalidInputError(f"fuse: unknown gld option(s) {', '.join(sorted(bad))}")
    if opts.cache_dtype not in ("float16", "bfloat16", "float32"):
        raise InvalidInputError(f"fuse: cache_dtype must be float16, bfloat16 or float32, got {opts.cache_dtype!r}")
    if opts.eval_every is not None and opts.eval_every < 1:
        raise InvalidInputError(f"fuse: eval_every must be >= 1, got {opts.eval_every}")
    if opts.eval_every and not opts.eval_path:
        raise InvalidInputError("fuse: eval_every needs eval_path (the held-out text)")
    if opts.eval_path and not Path(opts.eval_path).is_file():
        raise InvalidInputError(f"fuse: eval_path {opts.eval_path}: no such file")


def _losses(logits: torch.Tensor, batch: dict[str, Any], srcs: list[_Source], weights: list[float], opts: FuseOptions,
            tokenwise_weight: float, gld_weight: float, gld_k: int, gld_opts: dict, lambda_: float) -> dict[str, torch.Tensor]:
    v = logits.shape[-1]
    labels = batch["labels"][:, 1:]
    sft = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    zero = logits.new_zeros(())
    tok_total, gld_total = zero, zero
    if lambda_ > 0:
        for s, w, sb in zip(srcs, weights, batch["sources"]):
            if w == 0:
                continue
            if tokenwise_weight > 0 and opts.tokenwise != "none" and sb["pairs"].shape[0]:
                b, u, t = sb["pairs"][:, 0], sb["pairs"][:, 1], sb["pairs"][:, 2]
                rows = logits[b, u]
                term = zero
                if opts.tokenwise in ("kl", "kl+uld"):
                    # the teacher's top-k with its ids mapped into the pivot's vocabulary (-1: none)
                    mapped = TopK(sb["logits"][b, t], sb["mapped"][b, t], sb["lse"][b, t], logits.shape[-1],
                                  s.cache.temperature)
                    term = term + kl_loss(rows, mapped, temperature=opts.temperature, sparse=opts.kl_sparse)
                if opts.tokenwise in ("uld", "kl+uld"):
                    teacher = TopK(sb["logits"][b, t], sb["ids"][b, t], sb["lse"][b, t], s.cache.vocab_size,
                                   s.cache.temperature)
                    term = term + uld_loss(rows, teacher, temperature=opts.temperature)
                tok_total = tok_total + w * term
            if gld_weight > 0:
                teacher = TopK(sb["logits"], sb["ids"], sb["lse"], s.cache.vocab_size, s.cache.temperature)
                g = gld_loss(logits, teacher, top_k=gld_k, student_mask=batch["pos_mask"], teacher_mask=sb["mask"],
                             **gld_opts)
                gld_total = gld_total + w * g
    loss = (1 - lambda_) * sft + lambda_ * (tokenwise_weight * tok_total + gld_weight * gld_total)
    return {"loss": loss, "sft": sft.detach(), "tokenwise": tok_total.detach(), "gld": gld_total.detach()}


# ----------------------------------------------------------------------------- output
def output_rounding(pivot: Any, state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, Any] | None:
    """What storing the trained weights in a narrower dtype does to the training's changes.

    ``pivot`` is the pivot checkpoint (the weights before training), ``state`` the trained
    tensors, ``dtypes`` the dtype each is stored in. Over the tensors stored narrower than
    they were trained: ``changed`` entries (trained != pivot), the share of them whose change
    the cast erases (``erased_share``: stored == pivot although trained != pivot), and the
    rounding error's norm relative to the change's norm (``rounding_vs_update``: 0 keeps the
    training exactly, 1 is as large as the training's change). None when nothing is narrowed.
    """
    changed = erased = 0
    err_sq = upd_sq = 0.0
    narrowed: set[str] = set()
    for name, to in dtypes.items():
        trained = state[name]
        if not (trained.is_floating_point() and to.is_floating_point) or \
                torch.finfo(to).bits >= torch.finfo(trained.dtype).bits:
            continue
        narrowed.add(str(to).replace("torch.", ""))
        before = pivot.get(name).to(trained.dtype)
        after = trained.detach().to("cpu")
        stored = after.to(to).to(trained.dtype)
        moved = after != before
        changed += int(moved.sum())
        erased += int((moved & (stored == before)).sum())
        finite = torch.isfinite(stored)  # beyond the dtype's range: the writer's non-finite check speaks
        upd = torch.where(finite, after - before, 0).double()
        err = torch.where(finite, stored - after, 0).double()
        upd_sq += float(upd.pow(2).sum())
        err_sq += float(err.pow(2).sum())
    if not narrowed:
        return None
    return {"dtype": ", ".join(sorted(narrowed)), "changed": changed,
            "erased_share": erased / changed if changed else 0.0,
            "rounding_vs_update": (err_sq ** 0.5) / (upd_sq ** 0.5) if upd_sq > 0 else 0.0}


#: above this rounding error (relative to the training's change) the output notes the loss
ROUNDING_NOTE = 0.1


def rounding_note(rounding: dict[str, Any] | None) -> str | None:
    """The sentence a run prints (and its card carries) when the output dtype's cast loses
    more than :data:`ROUNDING_NOTE` of the training's change; None otherwise."""
    if not rounding or rounding["rounding_vs_update"] <= ROUNDING_NOTE:
        return None
    return (f"storing the output in {rounding['dtype']} erases {rounding['erased_share']:.0%} of the changed "
            f"entries' updates (rounding error {rounding['rounding_vs_update']:.2f} x the training's change): the "
            "saved model is not the trained one (its held-out score differs from the curve's last point); "
            "options.dtype: float32 keeps the trained weights (twice the size)")


def _write_output(model: Any, pivot_dir: Path, out_dir: Path, report: dict[str, Any], overwrite: bool,
                  opts: FuseOptions, context: Optional[StepContext], say: Any = None) -> None:
    from ..io import Checkpoint, CheckpointWriter, TensorSpec
    from ..io.checkpoint import AUX_FILES

    state = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = getattr(torch, opts.dtype) if opts.dtype else None
    with Checkpoint.open(pivot_dir) as ck:
        infos = list(ck.infos())
        tok_files = ck.tokenizer_files
        config = dict(ck.config or {})
        specs = []
        for info in infos:
            if info.name not in state:
                raise StepError(f"fuse: the trained model has no tensor {info.name!r} of the pivot checkpoint")
            specs.append(TensorSpec(info.name, info.shape, dtype or info.dtype))
        rounding = output_rounding(ck, state, {spec.name: spec.dtype for spec in specs})
    report["output_rounding"] = rounding
    notes_extra = []
    msg = rounding_note(rounding)
    if msg:
        notes_extra.append(msg)
        if say is not None:
            say(msg)
    if dtype is not None:
        config["dtype"] = opts.dtype
        config.pop("torch_dtype", None)
    rows = report["log"]
    names = ", ".join(s["id"] for s in report["sources"]) or "no source (plain SFT)"
    notes = [f"fused {names} into the pivot "
             f"({report['steps']} steps, lambda {report['settings']['lambda']}, "
             f"token-wise {report['settings']['options']['tokenwise']} x{report['settings']['tokenwise_weight']}, "
             f"GLD x{report['settings']['gld_weight']})"] + notes_extra
    meta = {"surgeon.step": "fuse"}
    with (context.open_writer(out_dir, specs, metadata=meta) if context is not None else
          CheckpointWriter(out_dir, specs, overwrite=overwrite, metadata=meta)) as w:
        for spec in specs:
            w.write(spec.name, state[spec.name].to("cpu", spec.dtype).contiguous())
        w.write_text("fuse_log.csv", _csv(rows))
        w.write_json("fuse_report.json", {k: v for k, v in report.items()})
        png = _plot(rows, f"fuse: {names} -> {pivot_dir.name}", report.get("eval_curve"))
        if png is not None:
            w.write_bytes("fuse_loss.png", png)
        if context is not None and context.finish is not None:
            context.finish(w, config, notes)
            return
        w.write_json("config.json", config)
        for f in tok_files:
            w.copy_file(f)
        for name in AUX_FILES:
            if (pivot_dir / name).is_file():
                w.copy_file(pivot_dir / name)
        w.write_text("README.md", _card(pivot_dir, out_dir, report))
        w.commit()


def _card(pivot_dir: Path, out_dir: Path, report: dict[str, Any]) -> str:
    from ..io.card import CardInfo, CardInput, render_card

    s = report["settings"]
    inputs = [CardInput("pivot", str(pivot_dir))] + [CardInput(x["id"], x["path"]) for x in report["sources"]]
    step = {"id": "fuse", "kind": "fuse", "sources": [x["id"] for x in report["sources"]], "pivot": "pivot"}
    rows = ["| source | weight | align | coverage of loss positions | vocab map |", "|---|---|---|---|---|"]
    for x in report["sources"]:
        rows.append(f"| {x['id']} | {x['weight']:.3g} | {x['align']}{' (identity)' if x.get('identity') else ''} | "
                    f"{x.get('coverage', 0):.1%} | {x.get('vocab_map')} |")
    final = report.get("final", {})
    note = rounding_note(report.get("output_rounding"))
    body = "\n".join([
        f"Loss: (1 - {s['lambda']}) * SFT + {s['lambda']} * sum_s w_s * ({s['tokenwise_weight']} * "
        f"{s['options']['tokenwise']} + {s['gld_weight']} * GLD), top-k {s['top_k']}.",
        "",
        f"Data: `{report['data']}` ({report['examples']} sequences, {report['pivot_tokens']} pivot tokens, "
        f"max length {s['max_length']}); {report['steps']} optimizer steps of batch {s['batch_size']} x "
        f"{s['grad_accum']} accumulation x {report['processes']} process(es), lr {s['lr']} ({s['schedule']}), "
        f"seed {s['seed']}, mixed precision {report['mixed_precision']}.",
        "",
        *rows,
        "",
        "Final losses: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        "",
        "The loss log is in `fuse_log.csv`, the plot in `fuse_loss.png`, the full report in `fuse_report.json`.",
        *(["", f"Note: {note}."] if note else []),
    ])
    info = CardInfo(name=out_dir.name, operations=["fusion"], inputs=inputs, steps=[step],
                    extra_sections={"Fusion": body})
    return render_card(info)


def _evaluate(pivot_dir: Path, out_dir: Path, text: Path, opts: FuseOptions, device: str) -> dict[str, Any]:
    from ..eval.perplexity import evaluate_text

    res = {}
    for label, path in (("pivot", pivot_dir), ("output", out_dir)):
        r = evaluate_text(path, text, device=device, window=opts.eval_window, max_chars=opts.eval_max_chars,
                          progress=False)
        res[label] = {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}
    return res


def _rewrite_report(out_dir: Path, report: dict[str, Any]) -> None:
    f = out_dir / "fuse_report.json"
    if out_dir.is_dir():
        tmp = f.with_name(".fuse_report.json.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, f)
