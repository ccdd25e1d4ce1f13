"""Transplant with real tokenizers and models: the pico zoo (fast) and Gemma/SmolLM2 (slow)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from surgeon.transplant import load_tokenizer_info, match_vocabularies, transplant

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "zoo"
HELDOUT = ZOO / "data" / "prose" / "heldout.txt"
pytestmark = pytest.mark.filterwarnings("ignore:digit splitting differs")


def _real(name: str) -> Path:
    env = os.environ.get("SURGEON_REAL_MODELS")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "surgeon" / "real-models"
    path = root / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} missing: run `python scripts/get_real_models.py` to fetch and convert the real models")
    return path


def _zoo(name: str) -> Path:
    path = ZOO / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} missing: the pico zoo is built by scripts/build_zoo.py")
    return path


# ----------------------------------------------------------------------------- pico zoo (fast)
def test_zoo_matching_counts():
    bpe, sp = load_tokenizer_info(_zoo("bpe-base")), load_tokenizer_info(_zoo("sp-base"))
    assert (bpe.family, sp.family, bpe.splits_digits, sp.splits_digits) == ("byte_level", "sentencepiece", False, True)
    m = match_vocabularies(bpe, sp)
    assert m.counts["by_role"] == 4  # <s> </s> <unk> <pad> by role
    assert 0.6 * sp.size < m.counts["shared"] < sp.size
    assert any("digit splitting" in w for w in m.warnings)
    back = match_vocabularies(sp, bpe)
    assert back.counts["shared"] > 0.5 * bpe.size


@pytest.mark.parametrize("base,donor", [("sp-base", "bpe-base"), ("bpe-base", "sp-base")])
def test_zoo_omp_beats_mean(tmp_path, base, donor):
    from surgeon.eval import evaluate_text

    b, d = _zoo(base), _zoo(donor)
    scores = {}
    for method in ("omp", "mean"):
        out = tmp_path / method
        transplant(b, d, out, method=method, k=8, progress=False)
        scores[method] = evaluate_text(out, HELDOUT, max_chars=6000, window=127, progress=False)["bits_per_byte"]
    base_bpb = evaluate_text(b, HELDOUT, max_chars=6000, window=127, progress=False)["bits_per_byte"]
    assert base_bpb < scores["omp"] < scores["mean"] - 0.01, scores


# ----------------------------------------------------------------------------- real models (slow)
@pytest.mark.slow
def test_real_tokenizers_match_by_bytes_and_roles():
    gemma = load_tokenizer_info(_real("gemma-3-270m"))
    smol = load_tokenizer_info(_real("smollm2-135m-instruct"))
    assert (gemma.family, smol.family) == ("sentencepiece", "byte_level")
    m = match_vocabularies(gemma, smol)  # Gemma gets SmolLM2's tokenizer
    g_ids = {t: i for i, t in gemma.tokens.items()}
    s_ids = {t: i for i, t in smol.tokens.items()}
    assert m.base_for_donor[s_ids["Ġthe"]] == g_ids["▁the"]
    assert m.base_for_donor[s_ids["Ċ"]] == g_ids["\n"]  # Gemma's newline is an added (literal) token
    assert m.base_for_donor[s_ids["Ã©"]] == g_ids["é"]  # non-ASCII: compared as bytes, not as strings
    assert m.base_for_donor[s_ids["<|im_start|>"]] == gemma.roles["bos"]  # SmolLM2's bos is <|im_start|>
    assert m.base_for_donor[s_ids["<|im_end|>"]] == gemma.roles["eos"]
    assert m.counts["by_role"] >= 3
    assert m.counts["shared"] > 0.9 * smol.size and m.counts["new"] < 0.1 * smol.size
    assert not m.warnings  # both split digits one per token
    # and the other way: most of Gemma's 262k tokens are new to SmolLM2
    back = match_vocabularies(smol, gemma)
    assert back.counts["shared"] == pytest.approx(m.counts["shared"], rel=0.05)
    assert back.counts["new"] > 200_000


@pytest.mark.slow
def test_real_gemma_onto_smollm2_tokenizer(tmp_path):
    from surgeon.eval import evaluate_text

    g, s = _real("gemma-3-270m"), _real("smollm2-135m-instruct")
    text = tmp_path / "text.txt"
    src = HELDOUT if HELDOUT.is_file() else ROOT.parent / "shared" / "data" / "wikitext2-test.raw"
    text.write_text(src.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    scores = {}
    for method, kw in (("omp", {"screen": 128}), ("mean", {})):
        out = tmp_path / method
        rep = transplant(g, s, out, method=method, progress=False, **kw)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["vocab_size"] == 49152 and cfg["model_type"] == "gemma3_text"
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
        scores[method] = evaluate_text(out, text, window=512, progress=False)["bits_per_byte"]
    assert rep["tensors"]["tied"]
    assert scores["omp"] < scores["mean"] - 0.02, scores

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "omp", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "omp")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.tensor([[model.config.bos_token_id]]), ids], 1)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


# ----------------------------------------------------------------------------- the real-model fetcher
def test_get_real_models_fetches_the_bench_only_model_on_request(monkeypatch):
    """The tests' fetch (no arguments, run by scripts/test.sh) takes SmolLM2 and Gemma only; Qwen2.5-Coder
    (491 MB, the transplant bench's second pair) comes only with --only qwen-coder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("get_real_models", ROOT / "scripts" / "get_real_models.py")
    grm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grm)
    fetched: list[str] = []
    monkeypatch.setattr(grm, "fetch", lambda key, *a, **kw: fetched.append(key))
    assert grm.main([]) == 0 and fetched == ["smollm2", "gemma3"]
    fetched.clear()
    assert grm.main(["--only", "qwen-coder"]) == 0 and fetched == ["qwen-coder"]
    spec_q = grm.MODELS["qwen-coder"]
    assert len(spec_q["wheels"]) == len(spec_q["parts"]) == 6
