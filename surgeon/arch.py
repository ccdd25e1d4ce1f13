"""Tensor naming across architectures: layer index, role, embeddings, head, tying.

One place decides which tensor is the input embedding, which the output head,
which rows are tokens and which layer a tensor belongs to; merge (vocabulary
alignment, WIDEN's orientation, layer gradients), transplant (which rows to
rebuild), fusion and inspection ask here. Imports nothing from surgeon.
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


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.7.x`` -> 7), or None."""
    m = LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def tensor_role(name: str) -> str:
    """``"embedding"``, ``"lm_head"`` or ``"other"`` (methods like WIDEN orient by role)."""
    if any(h in name for h in EMBED_HINTS):
        return "embedding"
    if any(h in name for h in HEAD_HINTS) or name == "output.weight":
        return "lm_head"
    return "other"


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
