"""The transplant step: give a base model a donor's tokenizer, without training.

The output keeps every weight of the base except the vocabulary-sized
matrices (input embeddings and, when untied, the output head), which are
rebuilt in the donor's token order:

* a donor token the base also has (same bytes, or same special role) gets the
  base's row for it;
* every other donor row is made by ``method`` (default ``omp``; see
  :mod:`surgeon.transplant.init`), separately for the input embeddings (with
  the donor's input embeddings as dictionary) and for an untied head (with the
  donor's head). Tied models stay tied.

All checks (tokenizers present, embeddings found, tokenizers differ, output
free) run before anything is computed or written; the output is written
through :class:`surgeon.io.CheckpointWriter` (atomic: absent or complete),
non-embedding tensors copied one at a time, then ``config.json`` (the base's,
with ``vocab_size`` and bos/eos/pad/unk ids from the donor),
``generation_config.json`` likewise, the donor's tokenizer files and a model
card with the match counts.
"""
from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..arch import EMBED_NAMES, find_embeddings
from ..errors import InvalidInputError
from ..io import Checkpoint, CheckpointWriter, TensorSpec
from ..io.virtual import VirtualCheckpoint
from ..step import StepContext, StepPlan
from .error_curve import SECTION, write_error_curve
from .init import METHODS, OmpFit, new_rows, omp_fit
from .omp import DEFAULT_REFRESH
from .vocab import ROLES, TokenizerInfo, load_tokenizer_info, match_vocabularies, same_tokenizer

def _rows(ck: Any, name: str) -> int:
    return int(ck.info(name).shape[0])


# ---------------------------------------------------------------------------- config
def _donor_token_ids(donor_cfg: dict[str, Any] | None, donor_tok: TokenizerInfo | None) -> dict[str, Any]:
    """bos/eos/pad/unk ids in the donor's id space: its config first, then its tokenizer's roles."""
    out: dict[str, Any] = {}
    cfg = donor_cfg or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for r in ROLES:
        key = f"{r}_token_id"
        if cfg.get(key) is not None:
            out[key] = cfg[key]
        elif text.get(key) is not None:
            out[key] = text[key]
        elif donor_tok is not None and r in donor_tok.roles:
            out[key] = donor_tok.roles[r]
        else:
            out[key] = None
    return out


def output_config(base_cfg: dict[str, Any] | None, vocab_rows: int, token_ids: dict[str, Any]) -> dict[str, Any]:
    """The base's config with the donor's vocabulary size and special token ids."""
    cfg = json.loads(json.dumps(base_cfg or {}))
    targets = [cfg]
    if isinstance(cfg.get("text_config"), dict):
        targets.append(cfg["text_config"])
    for c in targets:
        if c is cfg or "vocab_size" in c:
            c["vocab_size"] = vocab_rows
        for key, value in token_ids.items():
            if c is cfg or key in c:
                if value is None:
                    c.pop(key, None)
                else:
                    c[key] = value
    return cfg


def output_generation_config(base_path: Path, donor_path: Path, token_ids: dict[str, Any]) -> dict[str, Any] | None:
    def read(p: Path) -> dict[str, Any] | None:
        f = p / "generation_config.json"
        if not f.is_file():
            return None
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    base, donor = read(base_path), read(donor_path)
    if base is None and donor is None:
        return None
    gen = dict(base or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = (donor or {}).get(key, token_ids.get(key))
        if value is None:
            gen.pop(key, None)
        else:
            gen[key] = value
    if "decoder_start_token_id" in gen:
        gen.pop("decoder_start_token_id")
    return gen


# ---------------------------------------------------------------------------- checks
def _check_inputs(base: Any, donor: Any, method: str, k: int, where: str = "") -> tuple[str, str | None, bool, str, str | None]:
    pre = f"{where}: " if where else ""
    if method not in METHODS:
        raise InvalidInputError(f"{pre}unknown transplant method {method!r} (choose from {', '.join(METHODS)})")
    if not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"{pre}k must be a positive integer, got {k!r}")
    if not donor.has_tokenizer:
        raise InvalidInputError(
            f"{pre}donor {donor.label}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
            "the donor supplies the new tokenizer")
    if not base.has_tokenizer:
        raise InvalidInputError(
            f"{pre}base {base.label}: no tokenizer files; matching tokens needs the base's tokenizer too")
    embed, head, tied = find_embeddings(base)
    if embed is None and head is None:
        raise InvalidInputError(
            f"{pre}base {base.label}: no input embedding tensor found (looked for {', '.join(EMBED_NAMES[:4])}, ...)")
    if embed is None:
        raise InvalidInputError(f"{pre}base {base.label}: has {head} but no input embedding tensor")
    d_embed, d_head, _ = find_embeddings(donor)
    if d_embed is None:
        raise InvalidInputError(
            f"{pre}donor {donor.label}: no input embedding tensor found; OMP needs the donor's embeddings")
    for ck, name in ((base, embed), (base, head), (donor, d_embed), (donor, d_head)):
        if name is not None and len(ck.info(name).shape) != 2:
            raise InvalidInputError(f"{pre}{ck.label}: {name} is not a matrix (shape {list(ck.info(name).shape)})")
    return embed, head, tied, d_embed, d_head


def _tokenizer_digest(ck: Any) -> str | None:
    files = [f for f in ck.tokenizer_files if f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")]
    if not files:
        return None
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- plan (headers only)
def plan_transplant(base: Any, donor: Any, where: Callable[..., str] | None = None, step_id: str = "transplant"):
    """Describe the output of a transplant step from headers alone (for ``surgeon plan/validate``)."""
    w = where or (lambda *p: "")
    embed, head, tied, d_embed, d_head = _check_inputs(base, donor, "omp", 1, w())
    db, dd = _tokenizer_digest(base), _tokenizer_digest(donor)
    if db is not None and db == dd:
        raise InvalidInputError(f"{w('donor')}: donor {donor.label} has the same tokenizer as the base; nothing to transplant")
    rows = _rows(donor, d_embed)
    specs: dict[str, TensorSpec] = {}
    for info in base.infos():
        shape = tuple(info.shape)
        if info.name in (embed, head):
            shape = (rows, shape[1])
        specs[info.name] = TensorSpec(info.name, shape, info.dtype)
    token_ids = _donor_token_ids(donor.config, None)
    cfg = output_config(base.config, rows, token_ids) if base.config is not None else None
    tok_dir = donor.tokenizer_files[0].parent if donor.tokenizer_files else None
    out = VirtualCheckpoint(label=f"step {step_id!r}", specs=specs, config=cfg, tokenizer_dir=tok_dir)
    e_info, d_info = base.info(embed), donor.info(d_embed)
    bytes_in = base.total_bytes + d_info.nbytes + (donor.info(d_head).nbytes if d_head and not tied else 0)
    peak = 4 * (e_info.shape[0] * e_info.shape[1] + d_info.shape[0] * d_info.shape[1] + rows * e_info.shape[1]) + (512 << 20)
    notes = [f"new vocabulary: {rows} rows from {donor.label} (was {e_info.shape[0]})",
             "input embeddings" + ("" if tied or head is None else " and output head") + " rebuilt; "
             + ("tied" if tied else "untied")]
    return StepPlan(out, bytes_in, len(specs), peak, notes)


# ---------------------------------------------------------------------------- the step
def transplant(
    base_dir: str | Path,
    donor_dir: str | Path,
    out_dir: str | Path,
    method: str = "omp",
    k: int = 64,
    device: str = "cpu",
    overwrite: bool = False,
    screen: Optional[int] | str = "auto",
    batch_size: Optional[int] = 512,
    progress: bool = True,
    *,
    refresh: int = DEFAULT_REFRESH,
    max_shard_size: int | str = "5GB",
    context: StepContext | None = None,
) -> dict[str, Any]:
    """Give the model in ``base_dir`` the tokenizer of ``donor_dir``; write it to ``out_dir``.

    ``method``: ``omp`` (default), ``mean``, ``zero`` or ``subword``; ``k``: OMP
    atoms per new token; ``screen``: restrict each new token's OMP dictionary to
    ``screen`` candidates — its nearest shared tokens by |cosine|, re-ranked
    every ``refresh`` steps by correlation with the residual (``refresh=0``:
    never) — several times faster, nearly the same fit; ``"auto"`` (default):
    exact OMP unless its products exceed 1e14 FLOPs, then 128 candidates
    re-ranked every 8 picks (:func:`surgeon.transplant.omp.choose_screen`);
    ``None`` = exact OMP over all shared tokens (what mergekit computes);
    ``batch_size``: new tokens per OMP batch (``None``
    = sized to ~512 MB of working memory). ``context`` (the recipe engine's): the output writer comes from
    ``context.open_writer`` (shard size, resume key) and ``context.finish``
    writes config, tokenizer, card and commits. Returns a report dict.
    """
    t0 = time.time()
    base_dir, donor_dir, out_dir = Path(base_dir), Path(donor_dir), Path(out_dir)
    for p, what in ((base_dir, "base"), (donor_dir, "donor")):
        if out_dir.resolve() == p.resolve():
            raise InvalidInputError(f"{out_dir}: the output folder is the {what} model; choose another output folder")
    if out_dir.exists() and not overwrite:
        raise InvalidInputError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if screen is not None and screen != "auto" and (not isinstance(screen, int) or isinstance(screen, bool) or screen < 1):
        raise InvalidInputError(f"screen must be a positive integer, 'auto' or None (exact OMP), got {screen!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidInputError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"device {device!r}: {exc}") from None
    base = Checkpoint.open(base_dir, label=f"base {base_dir}")
    donor = Checkpoint.open(donor_dir, label=f"donor {donor_dir}")
    try:
        return _transplant(base, donor, out_dir, method, k, device, overwrite, screen, refresh, batch_size, progress,
                           max_shard_size, context, t0)
    finally:
        base.close()
        donor.close()


def _transplant(base: Checkpoint, donor: Checkpoint, out_dir: Path, method: str, k: int, device: str, overwrite: bool,
                screen: Optional[int] | str, refresh: int, batch_size: Optional[int], progress: bool, max_shard_size: int | str,
                context: StepContext | None, t0: float) -> dict[str, Any]:
    embed, head, tied, d_embed, d_head = _check_inputs(base, donor, method, k)
    base_tok = load_tokenizer_info(base.path)
    donor_tok = load_tokenizer_info(donor.path)
    if same_tokenizer(base_tok, donor_tok):
        raise InvalidInputError(
            f"donor {donor.path} has the same tokenizer as the base {base.path}; nothing to transplant")
    match = match_vocabularies(base_tok, donor_tok)
    if method != "subword":  # the tokenizer objects are large (a 262k vocabulary: ~400 MB); done with them
        base_tok.backend = donor_tok.backend = None
        _release_memory()
    rows_out = _rows(donor, d_embed)
    base_rows = _rows(base, embed)
    if donor_tok.size > rows_out:
        match.warnings.append(
            f"the donor tokenizer has {donor_tok.size} ids but its embedding only {rows_out} rows; "
            f"ids >= {rows_out} cannot be used")
    shared = [(d, b) for d, b in match.shared if d < rows_out and b < base_rows]
    shared_ids = {d for d, _ in shared}
    new_ids = [d for d in range(rows_out) if d not in shared_ids]
    padding = sum(1 for d in new_ids if d not in donor_tok.tokens)
    if method == "omp" and not shared:
        raise InvalidInputError(f"base {base.path} and donor {donor.path} share no tokens; OMP needs some")
    d_width = int(donor.info(d_embed).shape[1])
    if method == "omp" and k > d_width // 4:
        match.warnings.append(
            f"k={k} is large for the donor's embedding width {d_width}: OMP then fits the donor space almost "
            f"exactly but the coefficients transfer poorly; k around {max(2, d_width // 16)} usually works better")
    t_match = time.time()

    # -- compute the new matrices (nothing written yet) --------------------------------
    stats: dict[str, Any] = {}
    new_tensors: dict[str, torch.Tensor] = {}
    jobs = [("embed", embed, d_embed)]
    if head is not None and not tied:
        jobs.append(("lm_head", head, d_head or d_embed))
    fits: dict[str, tuple[str, OmpFit]] = {}  # donor tensor -> (job, its pursuit): one pursuit per donor matrix
    for label, b_name, d_name in jobs:
        bw = base.get(b_name)
        out = torch.empty(rows_out, bw.shape[1], dtype=bw.dtype)
        if shared:
            d_idx = torch.tensor([d for d, _ in shared])
            b_idx = torch.tensor([b for _, b in shared])
            out[d_idx] = bw[b_idx]
        if new_ids and method == "omp":
            if d_name in fits:  # a donor whose head is its embedding matrix: the same targets and atoms
                first, fit = fits[d_name]
                st = {"same_pursuit_as": first, "k": fit.stats.get("k"), "targets": fit.stats.get("targets")}
            else:
                fit = omp_fit(donor.get(d_name), shared, new_ids, k, screen=screen, refresh=refresh,
                              batch_size=batch_size, device=device, progress=progress, desc=f"OMP {label}")
                fits[d_name] = (label, fit)
                st = fit.stats
            out[torch.tensor(new_ids)] = fit.rows(bw).to(bw.dtype)
            stats[label] = st
        elif new_ids:
            rows, stats[label] = new_rows(method, bw, bw, shared, new_ids, k=k, base_tok=base_tok, donor_tok=donor_tok)
            out[torch.tensor(new_ids)] = rows.to(bw.dtype)
        new_tensors[b_name] = out
        del bw
    del fits
    if head is not None and tied:
        new_tensors[head] = new_tensors[embed]
    t_compute = time.time()

    # -- write ---------------------------------------------------------------------------
    specs = []
    for info in base.infos():
        shape = tuple(info.shape)
        if info.name in new_tensors:
            shape = tuple(new_tensors[info.name].shape)
        specs.append(TensorSpec(info.name, shape, info.dtype))
    token_ids = _donor_token_ids(donor.config, donor_tok)
    config = output_config(base.config, rows_out, token_ids) if base.config is not None else None
    gen = output_generation_config(base.path, donor.path, token_ids)
    counts = dict(match.counts)
    counts.update({"shared": len(shared), "new": len(new_ids), "padding_rows": padding, "output_rows": rows_out,
                   "base_rows": base_rows})
    report: dict[str, Any] = {
        "base": str(base.path),
        "donor": str(donor.path),
        "output": str(out_dir),
        "method": method,
        "k": k if method == "omp" else None,
        # the candidate count the pursuit used (None: exact), and what was asked for
        "screen": stats.get("embed", {}).get("screen") if method == "omp" else None,
        "screen_requested": screen if method == "omp" else None,
        "refresh": refresh if method == "omp" and stats.get("embed", {}).get("screen") else None,
        "device": str(device),
        "tokenizers": {"base": base_tok.family, "donor": donor_tok.family,
                       "base_splits_digits": base_tok.splits_digits, "donor_splits_digits": donor_tok.splits_digits},
        "counts": counts,
        "tensors": {"embed": embed, "lm_head": head, "tied": tied, "rebuilt": list(new_tensors)},
        "approximation": stats,
        "config_token_ids": token_ids,
        "warnings": list(match.warnings),
    }
    notes = [f"tokenizer transplanted from {donor.path} ({donor_tok.family}) onto {base.path} ({base_tok.family})",
             f"{len(shared)} of {rows_out} rows copied from shared tokens; {len(new_ids)} new rows by {method}"
             + (f" (k={k})" if method == "omp" else "")] + list(match.warnings)

    meta = {"surgeon": "transplant"}
    with (context.open_writer(out_dir, specs, metadata=meta) if context is not None else
          CheckpointWriter(out_dir, specs, max_shard_size=max_shard_size, overwrite=overwrite, metadata=meta)) as writer:
        for spec in specs:
            t = new_tensors.get(spec.name)
            writer.write(spec.name, t if t is not None else base.get(spec.name))
        if gen is not None:
            writer.write_json("generation_config.json", gen)
        curves = {label: st["error_by_k"] for label, st in stats.items() if st.get("error_by_k", {}).get("k")}
        if curves:
            picture = write_error_curve(writer, curves, stats.get("embed", {}).get("k"),
                                        title=f"{Path(donor.path).name} tokens on {Path(base.path).name}")
            report["error_by_k"] = {"json": str(out_dir / picture["json"]),
                                    "png": str(out_dir / picture["png"]) if picture["png"] else None,
                                    "card": picture["card"]}
        report["timings"] = {"match": round(t_match - t0, 3), "compute": round(t_compute - t_match, 3)}
        report["seconds"] = round(time.time() - t0, 3)
        if context is not None and context.finish is not None:
            # the caller writes config, tokenizer and card; our generation config (donor ids) must survive it
            context.finish(_KeepWritten(writer, {"generation_config.json"} if gen is not None else set()), config, notes)
        else:
            if config is not None:
                writer.write_json("config.json", config)
            for f in donor.tokenizer_files:
                writer.copy_file(f)
            writer.write_text("README.md", model_card(report))
            writer.commit()
    report["seconds"] = report["timings"]["total"] = round(time.time() - t0, 3)
    if report.get("error_by_k"):
        report["error_by_k"].pop("card")  # in the card; the report keeps the paths
    return report


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc only; a no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _KeepWritten:
    """A writer whose ``copy_file`` leaves alone the files we already wrote (everything else passes through)."""

    def __init__(self, writer: CheckpointWriter, keep: set[str]):
        self._writer = writer
        self._keep = keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        if (relpath or Path(src).name) in self._keep:
            return
        self._writer.copy_file(src, relpath)


def model_card(report: dict[str, Any]) -> str:
    c = report["counts"]
    method = report["method"] + (f", k = {report['k']}" if report.get("k") else "")
    if report.get("screen"):
        method += f", screened to {report['screen']} candidates" + (
            f" re-ranked every {report['refresh']} steps" if report.get("refresh") else "")
    lines = [
        "---",
        "tags:",
        "- surgeon",
        "- tokenizer-transplant",
        "---",
        "",
        "# Tokenizer transplant",
        "",
        f"This model is `{report['base']}` with the tokenizer of `{report['donor']}`, made by "
        "surgeon without training: rows of tokens both vocabularies share are copied from the "
        f"base; the other rows are initialised by **{method}**"
        + (" (orthogonal matching pursuit over the donor's embeddings of shared tokens, coefficients applied to the "
           "base's embeddings; Goddard & Fernandes 2025, arXiv:2506.06607)" if report["method"] == "omp" else "")
        + ".",
        "",
        "| | count |",
        "|---|---:|",
        f"| donor vocabulary (output rows) | {c['output_rows']} |",
        f"| base vocabulary | {c['base_vocab']} |",
        f"| shared tokens (rows copied) | {c['shared']} |",
        f"| &nbsp;&nbsp;matched by bytes | {c['by_bytes']} |",
        f"| &nbsp;&nbsp;special tokens matched by role (bos/eos/unk/pad) | {c['by_role']} |",
        f"| &nbsp;&nbsp;special tokens matched by text | {c['by_special_text']} |",
        f"| new tokens (rows approximated) | {c['new']} |",
        f"| &nbsp;&nbsp;of which padding rows without a token | {c['padding_rows']} |",
        f"| base tokens with no donor counterpart (dropped) | {c['unmatched_base']} |",
        "",
        f"Tokenizers: base {report['tokenizers']['base']}, donor {report['tokenizers']['donor']}. "
        f"Embeddings {'tied' if report['tensors']['tied'] else 'untied'}; rebuilt: "
        + ", ".join(f"`{n}`" for n in report["tensors"]["rebuilt"]) + ".",
    ]
    for label, st in report.get("approximation", {}).items():
        if "donor_cosine_mean" in st:
            lines.append(f"OMP fit of `{label}` in the donor space: mean cosine {st['donor_cosine_mean']:.3f}, "
                         f"mean relative error {st['donor_rel_error_mean']:.3f} over {st['targets']} tokens.")
        elif st.get("same_pursuit_as"):
            lines.append(f"Rows of `{label}`: the coefficients of the `{st['same_pursuit_as']}` pursuit (the donor's "
                         "head is its embedding matrix) applied to the base's own rows.")
    if report.get("error_by_k"):
        lines += ["", f"## {SECTION}", "", report["error_by_k"]["card"]]
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += ["", "The new rows are an approximation: expect some loss until the model is fine-tuned on text "
              "tokenized the new way.", ""]
    return "\n".join(lines)
