"""surgeon/arch.py: one answer to 'which tensor is the embedding' for every part of surgeon."""
from __future__ import annotations

import pytest

from surgeon import arch


@pytest.mark.parametrize("name,role", [
    ("model.embed_tokens.weight", "embedding"),
    ("gpt_neox.embed_in.weight", "embedding"),      # Pythia / GPT-NeoX (merge/vocab.py used to miss it)
    ("tok_embeddings.weight", "embedding"),         # Llama-original / InternLM (transplant used to miss it)
    ("transformer.wte.weight", "embedding"),
    ("transformer.word_embeddings.weight", "embedding"),
    ("lm_head.weight", "lm_head"),
    ("embed_out.weight", "lm_head"),
    ("output.weight", "lm_head"),
    ("transformer.output_layer.weight", "lm_head"),
    ("model.layers.3.mlp.up_proj.weight", "other"),
    ("model.norm.weight", "other"),
])
def test_roles(name: str, role: str) -> None:
    assert arch.tensor_role(name) == role
    assert arch.is_vocab_tensor(name) == (role != "other")


def test_every_known_embedding_and_head_name_has_its_role() -> None:
    assert all(arch.tensor_role(n) == "embedding" for n in arch.EMBED_NAMES)
    assert all(arch.tensor_role(n) == "lm_head" for n in arch.HEAD_NAMES)


def test_layer_index_and_tying() -> None:
    assert arch.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert arch.layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert arch.layer_index("model.norm.weight") is None
    assert arch.tied_embeddings({"tie_word_embeddings": False}, ["model.embed_tokens.weight"]) is False
    assert arch.tied_embeddings({"text_config": {"tie_word_embeddings": True}}, ["lm_head.weight"]) is True
    assert arch.tied_embeddings({}, ["model.embed_tokens.weight"]) is True
    assert arch.tied_embeddings(None, ["lm_head.weight"]) is False


def test_merge_transplant_and_io_ask_arch() -> None:
    import importlib

    from surgeon.io import checkpoint
    from surgeon.merge import params, vocab

    transplant = importlib.import_module("surgeon.transplant.transplant")

    assert vocab.tensor_role is arch.tensor_role and vocab.is_vocab_tensor is arch.is_vocab_tensor
    assert params.layer_index is arch.layer_index and checkpoint.layer_index is arch.layer_index
    assert transplant.find_embeddings is arch.find_embeddings
