"""Tensor naming across architectures: layer index, role, kind, embeddings, head, tying.

One place decides which tensor is the input embedding, which the output head,
which rows are tokens, which layer a tensor belongs to and which part of the
layer it is (its kind: q, k, v, o, gate, up, down, norm, ...); merge
(vocabulary alignment, WIDEN's orientation, layer gradients), transplant
(which rows to rebuild), fusion, inspection, the writer's tokenizer check and
the change maps ask here. Imports nothing from surgeon.
See docs/architecture.md ("Layers").
"""
from __future__ import annotations

import re
from typing import Any

#: ``model.layers.7.x`` / ``transformer.h.7.x`` / ``blocks.7`` / ``encoder.layer.7``: the layer index
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

#: full names of input embeddings, most common first (Llama/Qwen/Mistral, multimodal wrappers,
#: GPT-2, GPT-NeoX/Pythia, BLOOM, ChatGLM, OPT, Phi-1, bare modules, Llama-original/InternLM)
EMBED_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.embed_in.weight",
    "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight",
    "model.decoder.embed_tokens.weight",
    "transformer.embd.wte.weight",
    "embed_tokens.weight",
    "tok_embeddings.weight",
    "wte.weight",
)
#: full names of output heads
HEAD_NAMES = (
    "lm_head.weight",
    "language_model.lm_head.weight",
    "model.lm_head.weight",
    "embed_out.weight",
    "output.weight",
    "transformer.output_layer.weight",
)
#: name fragments of input embeddings (one row per token)
EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
#: name fragments of output heads (one row per token)
HEAD_HINTS = ("lm_head", "embed_out", "output_layer")
_EMBED_SUFFIXES = tuple(f"{h}.weight" for h in EMBED_HINTS)

#: (name fragment, kind) of the parts of a layer, first match wins: fused projections come
#: before the names they contain (``qkv_proj`` holds ``v_proj``, ``gate_up_proj`` ``up_proj``).
#: Llama/Mistral/Qwen, Phi-3 (fused), GPT-2 (``c_*``), GPT-NeoX/BLOOM (``query_key_value``,
#: ``dense_*``), OPT/BART (``out_proj``), Mixtral/Llama-original (``w1``-``w3``)
KIND_HINTS: tuple[tuple[str, str], ...] = (
    ("qkv_proj", "qkv"), ("gate_up_proj", "gate_up"),
    ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"), ("c_attn", "qkv"),
    ("query_key_value", "qkv"), ("out_proj", "o"), ("dense_h_to_4h", "up"), ("dense_4h_to_h", "down"),
    ("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"),
    ("c_fc", "up"), ("c_proj", "o"), ("w1", "gate"), ("w3", "up"), ("w2", "down"),
    ("norm", "norm"), ("ln_", "norm"),
)
#: every kind :func:`tensor_kind` returns, in the order of a forward pass
KINDS = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "norm", "head", "other")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.7.x`` -> 7), or None."""
    m = LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def _module_re(hints: tuple[str, ...]) -> re.Pattern[str]:
    """A whole dotted component named by one of ``hints`` (``wte`` in ``transformer.wte.weight``,
    not ``word_embeddings`` in BLOOM's ``word_embeddings_layernorm``)."""
    return re.compile(r"(?:^|\.)(?:" + "|".join(re.escape(h) for h in hints) + r")(?:\.|$)")


_EMBED_RE = _module_re(EMBED_HINTS)
_HEAD_RE = _module_re(HEAD_HINTS)


def tensor_role(name: str) -> str:
    """``"embedding"``, ``"lm_head"`` or ``"other"`` (methods like WIDEN orient by role):
    a dotted component of the name is one of :data:`EMBED_HINTS` / :data:`HEAD_HINTS`."""
    if _EMBED_RE.search(name):
        return "embedding"
    if _HEAD_RE.search(name) or name == "output.weight":
        return "lm_head"
    return "other"


def tensor_kind(name: str) -> str:
    """The part of the model a tensor is, from its name: ``"embed"`` and ``"head"``
    (its :func:`tensor_role`), else the first :data:`KIND_HINTS` match
    (``model.layers.3.self_attn.q_proj.weight`` -> ``"q"``), else ``"other"``."""
    role = tensor_role(name)
    if role != "other":
        return "embed" if role == "embedding" else "head"
    low = name.lower()
    return next((kind for hint, kind in KIND_HINTS if hint in low), "other")


def is_vocab_tensor(name: str) -> bool:
    """Whether the tensor has one row per token (an input embedding or an output head)."""
    return tensor_role(name) != "other"


def tied_embeddings(config: dict[str, Any] | None, names: Any) -> bool:
    """Whether the output head is the input embedding: the config's
    ``tie_word_embeddings`` (or its ``text_config``'s); without one, whether
    no ``lm_head.weight`` is stored."""
    cfg = config or {}
    tied = cfg.get("tie_word_embeddings")
    if tied is None and isinstance(cfg.get("text_config"), dict):
        tied = cfg["text_config"].get("tie_word_embeddings")
    if tied is None:
        tied = "lm_head.weight" not in names
    return bool(tied)


def find_embeddings(ck: Any) -> tuple[str | None, str | None, bool]:
    """(input embedding name, output head name or None, tied) of a checkpoint,
    from its tensor names (a unique 2-D ``*embed*.weight`` when no known name
    matches) and its config."""
    names = set(ck.names)
    embed = next((n for n in EMBED_NAMES if n in names), None)
    if embed is None:
        cands = [n for n in ck.names if n.endswith(_EMBED_SUFFIXES) and len(ck.info(n).shape) == 2]
        embed = cands[0] if len(cands) == 1 else None
    head = next((n for n in HEAD_NAMES if n in names), None)
    tied = bool(ck.tied_embeddings) if head is not None else True
    return embed, head, tied
