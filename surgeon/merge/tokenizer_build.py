"""Output tokenizers of a merge and the embedding rows that go with them.

``tokenizer_source: base | union | <model>`` and the ``tokenizer:`` section
(``source``, ``tokens``, ``pad_to_multiple_of``) choose the vocabulary of a
merge's output. Every vocabulary-sized tensor (embeddings, output head) of
every input is first laid out in that output vocabulary — a
:class:`VocabLayout` — and only then merged, exactly as mergekit 0.1.5 does
(docs/merging.md, "Tokenizers"):

- a token an input has keeps that input's row (unless ``force``\\ d);
- a row an input lacks is filled, for every input alike, from:
  the ``tokens:`` rule the user wrote for the token (``source: <model>``: that
  model's row of the token; ``{kind: model_token, model, token | token_id}``:
  the row of another token of that model, by its id in that model's own
  vocabulary; ``{kind: zero}``: zeros); else the only input that has the
  token; else the base, when it has it; else the mean of the inputs that have
  it; a token no input has gets zeros (with a note);
- ``pad_to_multiple_of`` rows beyond the tokenizer's tokens get the mean of
  that input's token rows;
- the output ``config.json`` states the padded row count as ``vocab_size``.

The base's tokenizer is stripped of tokens at or beyond its config's
``vocab_size`` (padding tokens the model has no rows for); ``union`` adds,
after the base's tokens, every other token the inputs really have (plain
tokens first, then the added tokens with their settings, first writer wins).
One deliberate difference: mergekit orders the union's new plain tokens by a
hash map's iteration order (it changes from run to run); surgeon orders them
by input and then by id.

Tokenizers are read with transformers' fast tokenizers from local folders
(never remote code). Planning needs only the tokenizers and the tensor
shapes; :meth:`VocabLayout.assemble` builds one tensor's rows at execution.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from .chat_template import resolve_chat_template


# -- reading tokenizers ----------------------------------------------------------
def config_vocab_size(config: dict[str, Any] | None) -> int | None:
    """``vocab_size`` of a config (or of its ``text_config``), if it states one."""
    cfg = config or {}
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def tokenizer_folder(ck: Any) -> Path | None:
    """The folder holding a checkpoint's tokenizer files, or None."""
    files = list(getattr(ck, "tokenizer_files", []) or [])
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
        return None
    return files[0].parent


def load_tokenizer(folder: Path, label: str) -> Any:
    """A transformers fast tokenizer from a local folder (no remote code)."""
    from transformers.utils import logging as hf_logging

    from ..io.hf_load import RemoteCodeError
    from ..io.hf_load import load_tokenizer as load_without_code

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_without_code(folder, use_fast=True)
    except RemoteCodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        raise InvalidInputError(f"{label}: cannot load its tokenizer from {folder} ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _copy_tokenizer(tok: Any) -> Any:
    """An independent copy of a transformers tokenizer (saved and reloaded)."""
    with tempfile.TemporaryDirectory(prefix="surgeon-tok-") as tmp:
        tok.save_pretrained(tmp)
        return load_tokenizer(Path(tmp), "tokenizer copy")


def strip_tokenizer(tok: Any, vocab_size: int, label: str) -> Any:
    """``tok`` without tokens whose id is ``>= vocab_size`` (rows the model does not have).

    Only byte-pair tokenizers can be stripped (their ``tokenizer.json`` lists
    vocabulary, merges and added tokens explicitly); others are refused.
    """
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    import tokenizers

    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"].get("type") != "BPE":
        raise InvalidInputError(
            f"{label}: its tokenizer has {len(unused)} tokens beyond the config's vocab_size {vocab_size} and is "
            f"of type {data['model'].get('type')}; only BPE tokenizers can be stripped for a tokenizer merge")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    out = _copy_tokenizer(tok)
    out._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return _copy_tokenizer(out)


# -- the layout -------------------------------------------------------------------
@dataclass
class _Rule:
    """Where a token's fill row comes from."""

    kind: str                 # "model" | "model_token" | "zero" | "average"
    model: str | None = None
    row: int | None = None    # model_token: the row in that model's own tensor
    token: str | None = None  # model_token by name (for messages)


@dataclass
class VocabLayout:
    """Rows of the output vocabulary, and where each input's rows go.

    ``perm[m][i]`` is input ``m``'s row for output token ``i`` (-1: it has
    none). Fill rows are listed by rule in ``fills``; ``own[m]`` holds the
    output ids that take ``m``'s own rows.
    """

    models: list[str]
    n_tokens: int
    rows: int
    perm: dict[str, torch.Tensor]
    fills: list[tuple[_Rule, torch.Tensor]]
    own: dict[str, torch.Tensor]
    tokenizer_dir: Path
    notes: list[str] = field(default_factory=list)
    tensors: set[str] = field(default_factory=set)  # the vocabulary-sized tensors it lays out

    def shape_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape of tensor ``name`` (rows = the output vocabulary's, when it is laid out)."""
        return (self.rows, *shape[1:]) if name in self.tensors else tuple(shape)

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every input's ``name`` laid out in the output vocabulary (rows first, float32 in, float32 out).

        Consumes ``tensors``: each input's rows are dropped from the dict once laid out, so at most one
        input is held twice."""
        first = tensors[self.models[0]]
        width = tuple(first.shape[1:])
        for m in self.models:
            t = tensors[m]
            if tuple(t.shape[1:]) != width:
                raise InvalidInputError(f"tensor {name!r}: model {m!r} has shape {list(t.shape)}, "
                                        f"{self.models[0]!r} has {list(first.shape)}")
        dev = first.device
        perm = {m: p.to(dev) for m, p in self.perm.items()}  # index on the tensors' device (--device cuda)
        fill = torch.zeros((self.rows, *width), dtype=torch.float32, device=dev)
        for rule, ids in self.fills:
            ids = ids.to(dev)
            if rule.kind == "zero":
                continue
            if rule.kind == "average":
                acc = torch.zeros((len(ids), *width), dtype=torch.float32, device=first.device)
                count = torch.zeros(len(ids), dtype=torch.float32, device=first.device)
                for m in self.models:
                    src = perm[m][ids]
                    has = src >= 0
                    acc[has] = acc[has] + tensors[m][src[has]].to(torch.float32)
                    count += has.to(torch.float32)
                fill[ids] = acc / count.view(-1, *([1] * len(width)))
            elif rule.kind == "model":
                fill[ids] = tensors[rule.model][perm[rule.model][ids]].to(torch.float32)
            else:  # model_token: one row of the model's own tensor, for one token
                t = tensors[rule.model]
                if not 0 <= int(rule.row) < t.shape[0]:
                    raise InvalidInputError(f"tokenizer.tokens: token id {rule.row} is out of range for tensor "
                                            f"{name!r} of model {rule.model!r} ({t.shape[0]} rows)")
                fill[ids] = t[int(rule.row)].to(torch.float32)
        out = {}
        for m in self.models:
            o = fill.clone()
            ids = self.own[m].to(dev)
            o[ids] = tensors.pop(m)[perm[m][ids]].to(torch.float32)
            if self.rows > self.n_tokens:
                o[self.n_tokens:] = torch.mean(o[: self.n_tokens], dim=0)
            out[m] = o
        return out


_TEMP_DIRS: list[str] = []


def _cleanup() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _temp_dir() -> Path:
    if not _TEMP_DIRS:
        atexit.register(_cleanup)
    d = tempfile.mkdtemp(prefix="surgeon-tokenizer-")
    _TEMP_DIRS.append(d)
    return Path(d)


def save_tokenizer(tok: Any) -> Path:
    """Save ``tok`` (transformers) into a fresh temporary folder that lives until exit."""
    folder = _temp_dir()
    tok.save_pretrained(str(folder))
    return folder


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    return obj.model_dump(by_alias=True) if hasattr(obj, "model_dump") else dict(vars(obj))


@dataclass
class OutputTokenizer:
    """A merge step's output tokenizer, planned once for all the models the step reads.

    ``folder`` holds the tokenizer files to write (None: the template's files
    as they are). ``perm`` (None when the vocabulary is the template's as is,
    i.e. only a chat template changed) maps each model id to its rows for the
    output tokens; :meth:`layout` turns it into the :class:`VocabLayout` of
    one merge over some of those models.
    """

    folder: Path | None
    notes: list[str]
    n: int = 0
    rows: int = 0
    vocab: dict[str, int] = field(default_factory=dict)
    perm: dict[str, torch.Tensor] | None = None
    rules: dict[str, _Rule] = field(default_factory=dict)
    forced: torch.Tensor | None = None

    def layout(self, involved: list[str], base_id: str | None, vocab_tensors: dict[str, dict[str, int]],
               where: Callable[..., str], model_of: dict[str, str] | None = None) -> VocabLayout | None:
        """The layout for a merge of ``involved`` (ids of this merge; ``model_of`` maps them to the step's
        model ids when they differ, e.g. layer-slice views) with fill rules over exactly those inputs."""
        if self.perm is None or self.forced is None:
            return None
        model_of = model_of or {}
        real = {m: model_of.get(m, m) for m in involved}
        perm = {m: self.perm[real[m]] for m in involved}
        n = self.n
        for tname, per_model in vocab_tensors.items():
            for m, r in per_model.items():
                top = int(perm[m].max()) if n else -1
                if top >= r:
                    raise InvalidInputError(f"{where('models')}: model {real[m]!r}: tensor {tname!r} has {r} rows but "
                                            f"its tokenizer uses ids up to {top}")

        def local(model: str, token: str) -> str:
            for m in involved:
                if real[m] == model:
                    return m
            raise InvalidInputError(f"{where('tokenizer', 'tokens', token)}: token {token!r} takes its row from "
                                    f"model {model!r}, which this merge does not read")

        fills_by_rule: dict[tuple, tuple[_Rule, list[int]]] = {}
        missing_everywhere = []
        present = torch.stack([perm[m] >= 0 for m in involved])  # [models, n]
        n_present = present.sum(0)
        token_of = {i: t for t, i in self.vocab.items()}
        need = (self.forced | (n_present < len(involved))).nonzero().flatten().tolist()  # rows needing a fill
        for i in need:
            t = token_of[i]
            force = bool(self.forced[i])
            rule = self.rules.get(t)
            if rule is not None and rule.model is not None:
                rule = _Rule(rule.kind, local(rule.model, t), rule.row, rule.token)
            if rule is None:
                have = [m for k, m in enumerate(involved) if bool(present[k, i])]
                if len(have) == 1:
                    rule = _Rule("model", have[0])
                elif not have:
                    rule = _Rule("zero")
                    missing_everywhere.append(t)
                elif base_id is not None and bool(perm[base_id][i] >= 0):
                    rule = _Rule("model", base_id)
                else:
                    rule = _Rule("average")
            if rule.kind == "missing":
                lacking = [real[m] for k, m in enumerate(involved) if not bool(present[k, i])]
                raise InvalidInputError(f"{where('tokenizer', 'tokens', t)}: token {t!r} "
                                        + ("is forced but has no source" if force else
                                           f"is not in model(s) {lacking}") + "; give it a source "
                                        "(a model id, {kind: model_token, ...} or {kind: zero})")
            if rule.kind == "model" and int(perm[rule.model][i]) < 0:
                raise InvalidInputError(f"{where('tokenizer', 'tokens', t)}: token {t!r} takes its row from model "
                                        f"{real[rule.model]!r}, which does not have that token")
            key = (rule.kind, rule.model, rule.row)
            fills_by_rule.setdefault(key, (rule, []))[1].append(i)
        for rule, _ in fills_by_rule.values():
            if rule.kind == "model_token":
                for tname, per_model in vocab_tensors.items():
                    if rule.model in per_model and rule.row >= per_model[rule.model]:
                        raise InvalidInputError(f"{where('tokenizer', 'tokens')}: token id {rule.row} of model "
                                                f"{real[rule.model]!r} is out of range for {tname!r} "
                                                f"({per_model[rule.model]} rows)")
        notes = []
        if missing_everywhere:
            notes.append(f"warning: {len(missing_everywhere)} output tokens are in no input of a merge "
                         f"(e.g. {missing_everywhere[0]!r}); their rows are zeros")
        own = {m: torch.nonzero((perm[m] >= 0) & ~self.forced).flatten() for m in involved}
        fills = [(rule, torch.tensor(ids, dtype=torch.long)) for rule, ids in fills_by_rule.values()]
        assert self.folder is not None
        return VocabLayout(list(involved), n, self.rows, perm, fills, own, self.folder, notes, set(vocab_tensors))


def build_output_tokenizer(
    *,
    source: str | None,
    tokens: dict[str, Any] | None,
    pad_to_multiple_of: int | None,
    chat_template: str | None,
    base_id: str | None,
    model_ids: list[str],
    inputs: dict[str, Any],
    vocab_rows: dict[str, int],
    where: Callable[..., str],
) -> OutputTokenizer | None:
    """Plan a merge step's output tokenizer over every model it reads (None: nothing to change).

    ``vocab_rows[m]`` is model ``m``'s embedding row count, the fallback when
    its config states no ``vocab_size``.
    """
    notes: list[str] = []
    involved = list(dict.fromkeys(model_ids + ([base_id] if base_id else [])))
    template_id = base_id or model_ids[0]
    if source is None and not tokens and not pad_to_multiple_of:
        if not chat_template:
            return None
        ck = inputs[template_id]
        folder = tokenizer_folder(ck)
        if folder is None:
            notes.append(f"warning: chat_template given but {template_id!r} has no tokenizer; no chat template is written")
            return OutputTokenizer(None, notes)
        tok = load_tokenizer(folder, f"model {template_id!r}")
        template = resolve_chat_template(chat_template, [inputs[m] for m in [template_id] + involved], where, notes)
        if template is None:
            return OutputTokenizer(None, notes)
        tok.chat_template = template
        return OutputTokenizer(save_tokenizer(tok), notes)

    source = source or "union"
    base_ck = inputs[template_id]
    base_folder = tokenizer_folder(base_ck)
    if base_folder is None:
        raise InvalidInputError(f"{where('tokenizer_source')}: {template_id!r} ({getattr(base_ck, 'label', '')}) "
                                "has no tokenizer files; a tokenizer merge needs the base's tokenizer")
    sizes = {m: config_vocab_size(inputs[m].config) or vocab_rows.get(m, 0) for m in involved}
    base_tok = strip_tokenizer(load_tokenizer(base_folder, f"model {template_id!r}"), sizes[template_id],
                               f"model {template_id!r}")
    toks: dict[str, Any] = {template_id: base_tok}
    for m in involved:
        if m == template_id:
            continue
        folder = tokenizer_folder(inputs[m])
        if folder is None:
            notes.append(f"warning: {m!r} has no tokenizer files; its vocabulary is taken to be {template_id!r}'s")
            continue
        toks[m] = load_tokenizer(folder, f"model {m!r}")

    if source == "base":
        out_tok = _copy_tokenizer(base_tok)
    elif source == "union":
        out_tok = _union(base_tok, toks, sizes)
    else:
        ck = inputs.get(source)
        if ck is None:
            raise InvalidInputError(f"{where('tokenizer_source')}: unknown model {source!r}")
        folder = tokenizer_folder(ck)
        if folder is None:
            raise InvalidInputError(f"{where('tokenizer_source')}: model {source!r} has no tokenizer files")
        out_tok = load_tokenizer(folder, f"model {source!r}")
    tokens = {str(k): _as_dict(v) for k, v in (tokens or {}).items()}
    existing = set(out_tok.get_vocab())
    for t in tokens:
        if t not in existing:
            out_tok.add_tokens(t)
            existing.add(t)
    if chat_template:
        template = resolve_chat_template(chat_template, [inputs[m] for m in [template_id] + involved], where, notes)
        if template is not None:
            out_tok.chat_template = template

    vocab = out_tok.get_vocab()
    n = len(vocab)
    rows = n
    if pad_to_multiple_of and n % pad_to_multiple_of:
        rows = (n // pad_to_multiple_of + 1) * pad_to_multiple_of
    if any(i >= n or i < 0 for i in vocab.values()):
        raise InvalidInputError(f"{where('tokenizer_source')}: the output tokenizer's ids are not 0..{n - 1}; "
                                "cannot lay out embedding rows for it")
    perm: dict[str, torch.Tensor] = {}
    for m in involved:
        mv = toks[m].get_vocab() if m in toks else toks[template_id].get_vocab()
        p = torch.full((n,), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = mv.get(t)
            if j is not None and j < sizes[m]:
                p[i] = j
        perm[m] = p
    rules = {t: _user_rule(t, cfg, toks, template_id, involved, where) for t, cfg in tokens.items()}
    forced = torch.zeros(n, dtype=torch.bool)
    for t, cfg in tokens.items():
        if cfg.get("force"):
            forced[vocab[t]] = True
    folder = save_tokenizer(out_tok)
    added = n - len(toks[template_id].get_vocab())
    notes.append(f"output tokenizer ({source}): {n} tokens" + (f", {rows} embedding rows" if rows != n else "")
                 + (f" ({added:+d} vs {template_id!r})" if added else ""))
    return OutputTokenizer(folder, notes, n, rows, vocab, perm, rules, forced)


def _vocab_tensors(inputs: dict[str, Any], involved: list[str], template_id: str,
                   is_vocab_tensor: Callable[[str], bool]) -> dict[str, dict[str, int]]:
    template = inputs[template_id]
    out: dict[str, dict[str, int]] = {}
    for name in template.names:
        if is_vocab_tensor(name) and len(template.info(name).shape) >= 1:
            out[name] = {m: int(inputs[m].info(name).shape[0]) for m in involved if name in inputs[m]}
    return out


def step_tokenizer(spec: Any, inputs: dict[str, Any], base_id: str | None, model_ids: list[str],
                   where: Callable[..., str], is_vocab_tensor: Callable[[str], bool]) -> OutputTokenizer | None:
    """:func:`build_output_tokenizer` for a merge spec (``tokenizer_source``, ``tokenizer``, ``chat_template``)."""
    tok = getattr(spec, "tokenizer", None)
    source = getattr(spec, "tokenizer_source", None)
    tokens, pad = None, None
    if tok is not None:
        source, tokens, pad = tok.source, tok.tokens, tok.pad_to_multiple_of
    involved = list(dict.fromkeys(model_ids + ([base_id] if base_id else [])))
    vocab_rows: dict[str, int] = {}
    for m in involved:
        ck = inputs[m]
        rows = [int(ck.info(n).shape[0]) for n in ck.names if is_vocab_tensor(n) and len(ck.info(n).shape) >= 1]
        if rows:
            vocab_rows[m] = max(rows)
    return build_output_tokenizer(source=source, tokens=tokens, pad_to_multiple_of=pad,
                                  chat_template=getattr(spec, "chat_template", None), base_id=base_id,
                                  model_ids=model_ids, inputs=inputs, vocab_rows=vocab_rows, where=where)


def _check_template_fits(inputs: dict[str, Any], template_id: str, vocab_tensors: dict[str, dict[str, int]],
                         where: Callable[..., str]) -> None:
    """Refuse at planning what the writer would refuse at the end: a tokenizer with ids beyond the rows."""
    from ..io.vocab_check import tokenizer_ids

    folder = tokenizer_folder(inputs[template_id])
    n = tokenizer_ids(folder) if folder is not None else None
    if n is None:
        return
    for name, per_model in vocab_tensors.items():
        rows = per_model.get(template_id)
        if rows is not None and rows < n:
            raise InvalidInputError(
                f"{where('models')}: {template_id!r}'s tokenizer.json has token ids up to {n - 1} but its tensor "
                f"{name!r} has {rows} rows, so the output would not load those tokens; write tokenizer_source: base "
                "(drops tokens beyond the model's vocab_size) or union")


def plan_merge_tokenizer(spec: Any, inputs: dict[str, Any], base_id: str | None, model_ids: list[str],
                         where: Callable[..., str], is_vocab_tensor: Callable[[str], bool],
                         shared: tuple[OutputTokenizer | None, dict[str, str]] | None = None,
                         ) -> tuple[VocabLayout | None, Path | None, list[str]]:
    """The output tokenizer of one merge: ``(layout, tokenizer_dir, notes)``.

    ``layout`` is None when the vocabulary is the template's as is; ``tokenizer_dir`` is None when
    the template's tokenizer files are written unchanged. ``shared``: a step-level
    :class:`OutputTokenizer` and the map from this merge's input ids to the step's model ids (layer
    slices plan one merge per layer over views of the models; the tokenizer is planned once).
    """
    involved = list(dict.fromkeys(model_ids + ([base_id] if base_id else [])))
    if shared is not None:
        out, model_of = shared
    else:
        out, model_of = step_tokenizer(spec, inputs, base_id, model_ids, where, is_vocab_tensor), {}
    vocab_tensors = _vocab_tensors(inputs, involved, base_id or model_ids[0], is_vocab_tensor)
    if out is None or out.perm is None:  # the template's vocabulary as is: it must fit the rows written
        _check_template_fits(inputs, base_id or model_ids[0], vocab_tensors, where)
    if out is None:
        return None, None, []
    layout = out.layout(involved, base_id, vocab_tensors, where, model_of) if vocab_tensors or shared is None else None
    notes = list(out.notes) + (layout.notes if layout is not None else [])
    return layout, out.folder, notes


def _user_rule(token: str, cfg: dict[str, Any], toks: dict[str, Any], template_id: str, involved: list[str],
               where: Callable[..., str]) -> _Rule:
    src = cfg.get("source")
    here = where("tokenizer", "tokens", token)
    if src is None:
        # a token without a source can only take its own rows: refused later if some model lacks it
        return _Rule("missing")
    if isinstance(src, str):
        if src not in involved:
            raise InvalidInputError(f"{here}: source {src!r} is not one of the merged models {involved}")
        return _Rule("model", src)
    src = _as_dict(src)
    kind = src.get("kind")
    if kind == "zero":
        return _Rule("zero")
    if kind != "model_token":
        raise InvalidInputError(f"{here}: source kind {kind!r} is not one of model_token, zero")
    model = src.get("model")
    if model not in involved:
        raise InvalidInputError(f"{here}: source model {model!r} is not one of the merged models {involved}")
    tid, tname = src.get("token_id"), src.get("token")
    if (tid is None) == (tname is None):
        raise InvalidInputError(f"{here}: give exactly one of source.token and source.token_id")
    if tid is None:
        mv = (toks.get(model) or toks[template_id]).get_vocab()
        if tname not in mv:
            raise InvalidInputError(f"{here}: token {tname!r} is not in model {model!r}'s tokenizer")
        tid = mv[tname]
    if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
        raise InvalidInputError(f"{here}: source.token_id must be a non-negative integer, got {tid!r}")
    return _Rule("model_token", model, row=tid, token=tname)


def _union(base_tok: Any, toks: dict[str, Any], sizes: dict[str, int]) -> Any:
    """The base's tokenizer plus every other token the inputs have (see the module doc)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m, tok in toks.items():
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < sizes[m]:
                plain.setdefault(t, None)
        for i, info in sorted(dict(tok.added_tokens_decoder).items()):
            if i < sizes[m] and info.content not in added:
                added[info.content] = info
    out = _copy_tokenizer(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in base_vocab and t not in added:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out

