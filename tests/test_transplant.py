"""End-to-end tokenizer transplant on tiny fixture models (offline, seconds)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.errors import InvalidInputError
from surgeon.io import Checkpoint
from surgeon.transplant import load_tokenizer_info, match_vocabularies, plan_transplant, transplant
from surgeon.cli import format_transplant
from surgeon.transplant.init import omp_rows
from surgeon.transplant.products import exact_search
from transplant_fixtures import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:digit splitting differs")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tx")
    return {
        "bpe": make_tiny_model(root / "bpe", "bpe", tied=False, hidden=32, seed=0),
        "sp": make_tiny_model(root / "sp", "sp", tied=True, hidden=48, seed=1, pad_rows=12),
        "root": root,
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_untied_base_onto_tied_donor(models, tmp_path):
    out = tmp_path / "bpe-on-sp"
    rep = transplant(models["bpe"], models["sp"], out, k=8, progress=False)
    base_tok = load_tokenizer_info(models["bpe"])
    donor_tok = load_tokenizer_info(models["sp"])
    match = match_vocabularies(base_tok, donor_tok)

    w_base, w_out = _weights(models["bpe"]), _weights(out)
    rows = donor_tok.size + 12  # the donor's embedding has 12 padding rows
    assert w_out["model.embed_tokens.weight"].shape == (rows, 32)
    assert w_out["lm_head.weight"].shape == (rows, 32)
    for name, t in w_base.items():  # everything else is copied unchanged
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(w_out[name], t), name
    for d, b in match.shared:  # shared tokens keep the base's rows
        assert torch.equal(w_out["model.embed_tokens.weight"][d], w_base["model.embed_tokens.weight"][b])
        assert torch.equal(w_out["lm_head.weight"][d], w_base["lm_head.weight"][b])
    assert rep["counts"]["shared"] == len(match.shared) > 0
    assert rep["counts"]["new"] == rows - len(match.shared)
    assert rep["counts"]["padding_rows"] == 12
    assert set(rep["approximation"]) == {"embed", "lm_head"}  # untied: both rebuilt
    # the donor ties its head to its embeddings: one pursuit serves both base matrices, and its
    # coefficients on the base head's rows are what a pursuit of its own would give
    assert rep["approximation"]["lm_head"]["same_pursuit_as"] == "embed"
    assert "donor_cosine_mean" in rep["approximation"]["embed"]
    # exact here (tiny vocabularies): the search this machine runs, and the summary says which
    assert rep["approximation"]["embed"]["search"] == exact_search("cpu") in ("bfloat16", "float32")
    assert "in the donor space (exact" in format_transplant(rep)
    new_ids = [d for d in range(rows) if d not in {d for d, _ in match.shared}]
    alone, _ = omp_rows(w_base["lm_head.weight"], _weights(models["sp"])["model.embed_tokens.weight"], match.shared,
                        new_ids, 8, progress=False)
    assert torch.allclose(w_out["lm_head.weight"][new_ids], alone, atol=1e-6)
    assert not rep["tensors"]["tied"]

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == rows and cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["unk_token_id"]) == (
        donor_tok.roles["bos"], donor_tok.roles["eos"], donor_tok.roles["pad"], donor_tok.roles["unk"])
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == donor_tok.roles["eos"]
    assert (out / "tokenizer.json").read_bytes() == (models["sp"] / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "shared tokens" in card and str(rep["counts"]["shared"]) in card
    assert "digit splitting differs" in " ".join(rep["warnings"])  # bpe groups digits, sp splits them

    # loads with transformers and generates with the new tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok("The king of the north", return_tensors="pt")
    gen_ids = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen_ids.shape[1] == enc["input_ids"].shape[1] + 4
    assert int(gen_ids.max()) < rows


def test_tied_base_stays_tied_and_omp_rows_are_the_combination(models, tmp_path):
    out = tmp_path / "sp-on-bpe"
    rep = transplant(models["sp"], models["bpe"], out, k=4, progress=False)
    w = _weights(out)
    assert "lm_head.weight" not in w
    assert rep["tensors"]["tied"] and list(rep["approximation"]) == ["embed"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == w["model.embed_tokens.weight"].shape[0]
    # recompute one new row by hand: OMP in the donor space, coefficients on the base's rows
    from surgeon.transplant.omp import batch_omp

    base_tok, donor_tok = load_tokenizer_info(models["sp"]), load_tokenizer_info(models["bpe"])
    match = match_vocabularies(base_tok, donor_tok)
    wb, wd = _weights(models["sp"])["model.embed_tokens.weight"], _weights(models["bpe"])["model.embed_tokens.weight"]
    new = [d for d in range(wd.shape[0]) if d not in {d for d, _ in match.shared}]
    d_ids = torch.tensor([d for d, _ in match.shared])
    b_ids = torch.tensor([b for _, b in match.shared])
    idx, coef = batch_omp(wd[new[:3]], wd[d_ids], 4, progress=False)
    want = torch.einsum("bk,bkd->bd", coef, wb[b_ids][idx])
    torch.testing.assert_close(w["model.embed_tokens.weight"][new[:3]], want, atol=1e-5, rtol=1e-4)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("method", ["mean", "zero", "subword"])
def test_baselines(models, tmp_path, method):
    out = tmp_path / method
    rep = transplant(models["bpe"], models["sp"], out, method=method, progress=False)
    assert rep["method"] == method and rep["k"] is None
    base_tok, donor_tok = load_tokenizer_info(models["bpe"]), load_tokenizer_info(models["sp"])
    match = match_vocabularies(base_tok, donor_tok)
    shared = {d for d, _ in match.shared}
    wb = _weights(models["bpe"])["model.embed_tokens.weight"]
    we = _weights(out)["model.embed_tokens.weight"]
    new = [d for d in range(we.shape[0]) if d not in shared]
    if method == "zero":
        assert torch.count_nonzero(we[new]) == 0
    elif method == "mean":
        torch.testing.assert_close(we[new], wb.mean(0).expand(len(new), -1), atol=1e-6, rtol=1e-5)
    else:
        # a donor byte-fallback piece for a byte the base spells with one token gets exactly that row
        from surgeon.transplant.vocab import subword_pieces

        st = rep["approximation"]["embed"]
        assert st["spelled"] > 0
        checked = 0
        for d in new:
            b = donor_tok.bytes_of(d)
            if b and d not in donor_tok.special:
                pieces = subword_pieces(b, base_tok)
                if pieces:
                    torch.testing.assert_close(we[d], wb[torch.tensor(pieces)].mean(0))
                    checked += 1
        assert checked > 0


def test_matching_by_bytes_and_roles(models):
    bpe, sp = load_tokenizer_info(models["bpe"]), load_tokenizer_info(models["sp"])
    assert (bpe.family, sp.family) == ("byte_level", "sentencepiece")
    assert bpe.splits_digits is False and sp.splits_digits is True
    m = match_vocabularies(bpe, sp)
    by_text = {t: i for i, t in bpe.tokens.items()}
    for d, b in m.shared:
        if d in sp.special:
            continue
        assert sp.bytes_of(d) == bpe.bytes_of(b)
    # ▁the <-> Ġthe ; <s>/</s>/<unk> -> <|endoftext|> by role ; <pad> -> <|pad|>
    sp_ids = {t: i for i, t in sp.tokens.items()}
    assert m.base_for_donor[sp_ids["▁the"]] == by_text["Ġthe"]
    for t in ("<s>", "</s>", "<unk>"):
        assert m.base_for_donor[sp_ids[t]] == by_text["<|endoftext|>"]
    assert m.base_for_donor[sp_ids["<pad>"]] == by_text["<|pad|>"]
    # byte-fallback pieces match single-byte byte-level tokens (0x41 'A' <-> 'A'; 0xC3 <-> 'Ã')
    assert m.base_for_donor[sp_ids["<0x41>"]] == by_text["A"]
    assert m.base_for_donor[sp_ids["<0xC3>"]] == by_text["Ã"]
    assert m.counts["by_role"] == 4 and m.counts["shared"] == len(m.shared)
    assert any("digit splitting" in w for w in m.warnings)


def test_plan_from_headers(models):
    base, donor = Checkpoint.open(models["bpe"]), Checkpoint.open(models["sp"])
    plan = plan_transplant(base, donor)
    rows = donor.info("model.embed_tokens.weight").shape[0]
    assert plan.output.specs["model.embed_tokens.weight"].shape == (rows, 32)
    assert plan.output.specs["lm_head.weight"].shape == (rows, 32)
    assert plan.output.config["vocab_size"] == rows
    assert plan.output.has_tokenizer and plan.output.tokenizer_dir == Path(models["sp"])
    with pytest.raises(InvalidInputError, match="same tokenizer"):
        plan_transplant(base, Checkpoint.open(models["bpe"]))


# ----------------------------------------------------------------------------- bad inputs write nothing
def test_donor_without_tokenizer(models, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(models["sp"], donor)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (donor / f).unlink()
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="donor .*no tokenizer"):
        transplant(models["bpe"], donor, out, progress=False)
    assert _nothing_written(out)


def test_base_without_embeddings(models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["bpe"], base)
    w = load_file(base / "model.safetensors")
    w = {k.replace("embed_tokens", "something_else"): v for k, v in w.items() if k != "lm_head.weight"}
    save_file(w, base / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="no input embedding"):
        transplant(base, models["sp"], out, progress=False)
    assert _nothing_written(out)


def test_same_tokenizer(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="same tokenizer"):
        transplant(models["bpe"], models["bpe"], out, progress=False)
    assert _nothing_written(out)
    # a different model with the identical tokenizer is refused too
    other = tmp_path / "other"
    shutil.copytree(models["bpe"], other)
    with pytest.raises(InvalidInputError, match="same tokenizer"):
        transplant(models["bpe"], other, out, progress=False)
    assert _nothing_written(out)


def test_existing_output_and_bad_arguments(models, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="already exists"):
        transplant(models["bpe"], models["sp"], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    new = tmp_path / "new"
    with pytest.raises(InvalidInputError, match="unknown transplant method"):
        transplant(models["bpe"], models["sp"], new, method="magic", progress=False)
    with pytest.raises(InvalidInputError, match="k must be"):
        transplant(models["bpe"], models["sp"], new, k=0, progress=False)
    with pytest.raises(InvalidInputError, match="output folder is the base"):
        transplant(models["bpe"], models["sp"], models["bpe"], overwrite=True, progress=False)
    with pytest.raises(InvalidInputError):
        transplant(tmp_path / "missing", models["sp"], new, progress=False)
    assert _nothing_written(new)


def test_overwrite_replaces_atomically(models, tmp_path):
    out = tmp_path / "out"
    transplant(models["bpe"], models["sp"], out, method="mean", progress=False)
    rep = transplant(models["bpe"], models["sp"], out, method="omp", k=4, screen=50, overwrite=True, progress=False)
    assert rep["screen"] == 50 and rep["approximation"]["embed"]["screen"] == 50
    assert rep["approximation"]["embed"]["search"] is None  # screened: no whole-dictionary search
    assert not list(tmp_path.glob(".out*"))


def test_finish_callback_keeps_the_donor_generation_config(models, tmp_path):
    """The recipe engine's context writes config/tokenizer/card itself; our generation config survives."""
    out = tmp_path / "out"
    seen = {}

    def finish(writer, config, notes):
        seen["config"], seen["notes"] = config, notes
        writer.write_json("config.json", config)
        writer.copy_file(Path(models["bpe"]) / "generation_config.json")  # the engine copies the base's aux files
        writer.copy_file(Path(models["sp"]) / "tokenizer.json")
        writer.commit()

    from surgeon.step import StepContext

    ctx = StepContext("t", finish=finish)
    transplant(models["bpe"], models["sp"], out, method="mean", progress=False, context=ctx)
    donor_tok = load_tokenizer_info(models["sp"])
    assert seen["config"]["vocab_size"] == json.loads((out / "config.json").read_text())["vocab_size"]
    assert any("new rows by mean" in n for n in seen["notes"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == donor_tok.roles["eos"]
    assert not (out / "README.md").exists()  # the card is the caller's job then
