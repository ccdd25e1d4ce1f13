"""surgeon/arch.py: one answer to 'which tensor is the embedding' for every part of surgeon."""
from __future__ import annotations

import pytest
import torch

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
    ("transformer.word_embeddings_layernorm.weight", "other"),  # BLOOM: a norm, not one row per token
    ("transformer.word_embeddings_layernorm.bias", "other"),
    ("transformer.wpe.weight", "other"),                       # positions, not tokens
    ("model.lm_head_norm.weight", "other"),
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


@pytest.mark.parametrize("name,kind", [
    ("model.embed_tokens.weight", "embed"),
    ("gpt_neox.embed_in.weight", "embed"),
    ("lm_head.weight", "head"),
    ("embed_out.weight", "head"),                   # GPT-NeoX's head (the change map called it embed)
    ("output.weight", "head"),
    ("model.layers.3.self_attn.q_proj.weight", "q"),
    ("model.layers.3.self_attn.qkv_proj.weight", "qkv"),  # Phi-3: holds "v_proj" (the change map said v)
    ("model.layers.3.mlp.gate_up_proj.weight", "gate_up"),
    ("model.layers.3.mlp.up_proj.weight", "up"),
    ("transformer.h.0.attn.c_attn.weight", "qkv"),
    ("transformer.h.0.mlp.c_proj.weight", "o"),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "down"),
    ("model.layers.0.block_sparse_moe.experts.0.w2.weight", "down"),
    ("model.layers.3.input_layernorm.weight", "norm"),
    ("transformer.h.0.ln_1.weight", "norm"),
    ("model.layers.3.self_attn.rotary_emb.inv_freq", "other"),
])
def test_kinds(name: str, kind: str) -> None:
    assert arch.tensor_kind(name) == kind
    assert kind in arch.KINDS


def test_change_maps_and_the_writers_tokenizer_check_ask_arch() -> None:
    from surgeon.eval import changemap
    from surgeon.io import vocab_check

    assert changemap.tensor_kind is arch.tensor_kind and changemap.layer_index is arch.layer_index
    assert changemap.KIND_ORDER is arch.KINDS
    assert vocab_check.is_vocab_tensor is arch.is_vocab_tensor


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "gpt_neox.embed_in.weight", "embed_out.weight",
                                  "output.weight", "transformer.output_layer.weight"])
def test_the_writer_checks_every_vocabulary_tensor_against_the_tokenizer(tmp_path, name: str) -> None:
    import json

    from surgeon.errors import StepError
    from surgeon.io.vocab_check import check_tokenizer_fits
    from surgeon.io.writer import TensorSpec

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(10)}}}))
    check_tokenizer_fits(tmp_path, [TensorSpec(name, (10, 4), torch.float32)], tmp_path)
    check_tokenizer_fits(tmp_path, [TensorSpec("model.layers.0.mlp.up_proj.weight", (8, 4), torch.float32)], tmp_path)
    with pytest.raises(StepError, match=name.replace(".", r"\.")):
        check_tokenizer_fits(tmp_path, [TensorSpec(name, (8, 4), torch.float32)], tmp_path)
