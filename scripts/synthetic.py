"""Synthetic Llama-shaped bf16 checkpoints for benchmarks (base + fine-tunes).

Written tensor by tensor, so building a multi-GB model needs little memory.
Fine-tunes are the base plus small seeded noise, like real task vectors.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from surgeon.io import CheckpointWriter, TensorSpec


def llama_specs(layers: int, hidden: int, intermediate: int, vocab: int) -> list[TensorSpec]:
    bf = torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), bf)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (hidden,), bf),
            TensorSpec(p + "post_attention_layernorm.weight", (hidden,), bf),
            TensorSpec(p + "self_attn.q_proj.weight", (hidden, hidden), bf),
            TensorSpec(p + "self_attn.k_proj.weight", (hidden, hidden), bf),
            TensorSpec(p + "self_attn.v_proj.weight", (hidden, hidden), bf),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, hidden), bf),
            TensorSpec(p + "mlp.gate_proj.weight", (intermediate, hidden), bf),
            TensorSpec(p + "mlp.up_proj.weight", (intermediate, hidden), bf),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, intermediate), bf),
        ]
    specs += [TensorSpec("model.norm.weight", (hidden,), bf), TensorSpec("lm_head.weight", (vocab, hidden), bf)]
    return specs


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 64), "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def build(folder: Path, specs: list[TensorSpec], config: dict, seed: int, noise: float, base_seed: int = 0,
          max_shard_size: str = "2GB") -> Path:
    """One checkpoint: the base tensors (seeded by name) plus ``noise`` * seeded noise."""
    if (folder / "config.json").exists():
        return folder
    with CheckpointWriter(folder, specs, max_shard_size=max_shard_size, overwrite=True) as w:
        for i, s in enumerate(specs):
            g = torch.Generator().manual_seed(base_seed * 100_003 + i)
            t = torch.randn(s.shape, generator=g) * 0.02
            if "norm" in s.name:
                t = t + 1.0
            if noise:
                g2 = torch.Generator().manual_seed(seed * 1_000_003 + i)
                t.add_(torch.randn(s.shape, generator=g2), alpha=noise)
            w.write(s.name, t.to(s.dtype))
        w.write_json("config.json", config)
        w.commit()
    return folder


def build_family(root: Path, layers: int, hidden: int, intermediate: int, vocab: int, finetunes: int = 3,
                 noise: float = 0.002) -> dict[str, Path]:
    specs = llama_specs(layers, hidden, intermediate, vocab)
    cfg = llama_config(layers, hidden, intermediate, vocab)
    out = {"base": build(root / "base", specs, cfg, seed=0, noise=0.0)}
    for k in range(1, finetunes + 1):
        out[f"ft{k}"] = build(root / f"ft{k}", specs, cfg, seed=k, noise=noise)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--finetunes", type=int, default=3)
    a = ap.parse_args()
    fam = build_family(a.root, a.layers, a.hidden, a.intermediate, a.vocab, a.finetunes)
    print(json.dumps({k: str(v) for k, v in fam.items()}, indent=2))


if __name__ == "__main__":
    main()
