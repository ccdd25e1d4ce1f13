"""LoRA inputs written ``model+adapter``: a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors, built here from plain tensors) applied while the model's tensors
stream — W + B @ A * scale — without a merged copy anywhere; local and hub adapters;
refusals by name; float32 equality with mergekit 0.1.5 (which merges through peft)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mk_tiny import (
    assert_same_checkpoint,
    make_model,
    run_mergekit,
    run_surgeon,
    state_dict,
)
from safetensors.torch import save_file

R, ALPHA = 4, 8


def make_adapter(folder: Path, model: Path, seed: int = 0, *, rslora: bool = False, extra_cfg: dict | None = None,
                 embed: bool = True) -> Path:
    """A LoRA adapter on every q_proj/v_proj (and the input embeddings) of ``model``, as PEFT saves it."""
    sd = state_dict(model)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in sd.items():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            module = name.removesuffix(".weight")
            out_f, in_f = w.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(R, in_f, generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(out_f, R, generator=g)
    if embed:
        vocab, dim = sd["model.embed_tokens.weight"].shape
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = 0.1 * torch.randn(R, vocab, generator=g)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = 0.1 * torch.randn(dim, R, generator=g)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
           "target_modules": ["q_proj", "v_proj"] + (["embed_tokens"] if embed else []), "bias": "none",
           "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False, "modules_to_save": None,
           "base_model_name_or_path": str(model), "inference_mode": True, **(extra_cfg or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def expected(model: Path, adapter: Path, scale: float) -> dict[str, torch.Tensor]:
    """W + B @ A * scale (embeddings: + (B @ A)^T * scale), written out by hand."""
    sd = state_dict(model)
    from safetensors.torch import load_file

    ad = load_file(adapter / "adapter_model.safetensors")
    for key in ad:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = ad[key.replace("lora_A", "lora_B")]
            sd[module + ".weight"] = sd[module + ".weight"] + b @ ad[key] * scale
        elif key.endswith("lora_embedding_A"):
            b = ad[key.replace("lora_embedding_A", "lora_embedding_B")]
            sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] + (b @ ad[key]).T * scale
    return sd


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_model(root / "base", seed=0)
    other = make_model(root / "other", seed=1)
    return {"root": root, "base": base, "other": other, "adapter": make_adapter(root / "adapter", base, seed=2)}


def test_checkpoint_reads_adapted_tensors(family):
    from surgeon.io import Checkpoint
    from surgeon.io.lora import LoraAdapter, LoraCheckpoint

    ck = LoraCheckpoint(Checkpoint.open(family["base"]), LoraAdapter(family["adapter"]))
    want = expected(family["base"], family["adapter"], ALPHA / R)
    for name, w in want.items():
        assert torch.allclose(ck.get(name), w, atol=1e-6), name
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(ck.get(q), state_dict(family["base"])[q])  # the adapter does change it
    for name in ("model.embed_tokens.weight", q):  # row pieces agree with the whole tensor
        whole = ck.get(name)
        assert torch.allclose(torch.cat([ck.get_rows(name, 0, 5), ck.get_rows(name, 5, whole.shape[0])]), whole,
                              atol=1e-6)


def test_rslora_scale(family, tmp_path):
    from surgeon.io import Checkpoint
    from surgeon.io.lora import LoraAdapter, LoraCheckpoint

    adapter = make_adapter(tmp_path / "rs", family["base"], seed=3, rslora=True)
    ck = LoraCheckpoint(Checkpoint.open(family["base"]), LoraAdapter(adapter))
    want = expected(family["base"], adapter, ALPHA / math.sqrt(R))
    name = "model.layers.0.self_attn.v_proj.weight"
    assert torch.allclose(ck.get(name), want[name], atol=1e-6)


def _config(family: dict[str, Path], first: str) -> str:
    return (f"merge_method: linear\ndtype: float32\nmodels:\n"
            f"  - {{model: {first}, parameters: {{weight: 0.7}}}}\n"
            f"  - {{model: {family['other']}, parameters: {{weight: 0.3}}}}\n")


def test_merge_with_lora_input_streams_without_a_cache(family, tmp_path):
    before = sorted(p.name for p in family["root"].iterdir())
    rc, out = run_surgeon(_config(family, f"{family['base']}+{family['adapter']}"), tmp_path / "out")
    assert rc == 0
    want = expected(family["base"], family["adapter"], ALPHA / R)
    other = state_dict(family["other"])
    got = state_dict(out)
    for name in got:
        assert torch.allclose(got[name], 0.7 * want[name] + 0.3 * other[name], atol=1e-6), name
    assert sorted(p.name for p in family["root"].iterdir()) == before  # no merged copy written beside the inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.yml"]


@pytest.mark.parametrize("change,needle", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"bias": "all"}, "bias"),
])
def test_unsupported_adapters_refused_by_name(family, tmp_path, capsys, change, needle):
    adapter = make_adapter(tmp_path / "bad", family["base"], extra_cfg=change)
    rc, out = run_surgeon(_config(family, f"{family['base']}+{adapter}"), tmp_path / "out")
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "adapter_config.json" in err[0]


def test_adapter_for_another_model_refused(family, tmp_path, capsys):
    small = make_model(tmp_path / "small", 64, seed=4)
    cfg = json.loads((small / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    adapter = make_adapter(tmp_path / "ad", family["base"], embed=False)
    # the adapter targets layers the model lacks
    sd = {k: v for k, v in state_dict(small).items() if ".layers.1." not in k}
    save_file(sd, small / "model.safetensors", metadata={"format": "pt"})
    (small / "config.json").write_text(json.dumps(cfg))
    rc, out = run_surgeon(f"merge_method: linear\ndtype: float32\nmodels: [{{model: {small}+{adapter}}}]\n",
                          tmp_path / "out")
    assert rc == 2 and not out.exists()
    assert "model.layers.1." in capsys.readouterr().err


def test_hub_adapter(family, tmp_path, monkeypatch):
    from hub_server import FakeHub, point_hf_at

    with FakeHub() as hub:
        hub.add_folder("org/tiny-lora", family["adapter"])
        point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home")
        rc, out = run_surgeon(_config(family, f"{family['base']}+org/tiny-lora"), tmp_path / "out")
        assert rc == 0
        assert hub.files_downloaded("org/tiny-lora") == {"adapter_config.json", "adapter_model.safetensors"}
    want = expected(family["base"], family["adapter"], ALPHA / R)
    other = state_dict(family["other"])
    got = state_dict(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[name], 0.7 * want[name] + 0.3 * other[name], atol=1e-6)


@pytest.mark.mergekit
def test_same_as_mergekit(family, tmp_path):
    """mergekit merges the adapter with peft's merge_and_unload into a cache folder first."""
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    pytest.importorskip("peft", reason="mergekit needs peft for LoRA inputs")
    text = _config(family, f"{family['base']}+{family['adapter']}")
    rc, ours = run_surgeon(text, tmp_path / "ours")
    assert rc == 0
    theirs = run_mergekit(text, tmp_path / "theirs", lora_cache=tmp_path / "mk-lora-cache")
    assert_same_checkpoint(ours, theirs)


def test_alpha_pattern_and_fan_in_fan_out(tmp_path):
    """Per-module alpha (alpha_pattern) and Conv1D-style weights stored [in, out] (fan_in_fan_out)."""
    from surgeon.io import Checkpoint
    from surgeon.io.lora import LoraAdapter, LoraCheckpoint

    g = torch.Generator().manual_seed(7)
    model = tmp_path / "m"
    model.mkdir()
    w = {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g), "h.0.mlp.c_fc.weight": torch.randn(8, 16, generator=g)}
    save_file(w, model / "model.safetensors")
    a1, b1 = torch.randn(2, 8, generator=g), torch.randn(24, 2, generator=g)  # in=8, out=24, r=2
    a2, b2 = torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g)
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": a1, "base_model.model.h.0.attn.c_attn.lora_B.weight": b1,
               "base_model.model.h.0.mlp.c_fc.lora_A.weight": a2, "base_model.model.h.0.mlp.c_fc.lora_B.weight": b2},
              ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": True, "bias": "none",
        "alpha_pattern": {"c_fc": 8}}))
    ck = LoraCheckpoint(Checkpoint.open(model), LoraAdapter(ad))
    assert torch.allclose(ck.get("h.0.attn.c_attn.weight"), w["h.0.attn.c_attn.weight"] + (b1 @ a1).T * 2.0, atol=1e-5)
    assert torch.allclose(ck.get("h.0.mlp.c_fc.weight"), w["h.0.mlp.c_fc.weight"] + (b2 @ a2).T * 4.0, atol=1e-5)
    assert torch.allclose(ck.get_rows("h.0.mlp.c_fc.weight", 3, 8), ck.get("h.0.mlp.c_fc.weight")[3:8], atol=1e-5)
