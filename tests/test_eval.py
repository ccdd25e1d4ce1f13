"""Perplexity and bits per byte on a text file."""
from __future__ import annotations

import math

import pytest
import torch

from surgeon.errors import InvalidInputError
from surgeon.eval import evaluate_text
from transplant_fixtures import corpus, make_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    text = root / "text.txt"
    text.write_text(corpus(25, seed=3), encoding="utf-8")
    out = {
        "bpe": make_tiny_model(root / "bpe", "bpe", hidden=32, seed=0),  # no bos added by its tokenizer
        "sp": make_tiny_model(root / "sp", "sp", hidden=32, seed=1, tied=True),
        "text": text,
        "root": root,
    }
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for fam in ("bpe", "sp"):  # loaded once; evaluate_text accepts them preloaded
        out[fam + "_loaded"] = {"model": AutoModelForCausalLM.from_pretrained(out[fam]).eval(),
                                "tokenizer": AutoTokenizer.from_pretrained(out[fam])}
    return out


def _manual(loaded, text: str, window: int, bos: bool):
    """Reference: score every window independently, by hand."""
    tok, model = loaded["tokenizer"], loaded["model"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    pos = 0 if bos else 1
    with torch.no_grad():
        while pos < len(ids):
            ctx_start = pos if bos else pos - 1
            chunk = ids[ctx_start:ctx_start + window]
            inp = ([model.config.bos_token_id] if bos else []) + chunk
            logits = model(torch.tensor([inp])).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1)
            tgt = torch.tensor(inp[1:])
            scored = lp.gather(1, tgt[:, None])[:, 0]
            nll -= float(scored.sum())
            n += len(scored)
            pos = ctx_start + len(chunk)
    return nll, n


@pytest.mark.parametrize("family", ["bpe", "sp"])
def test_matches_manual_computation(setup, family):
    text = setup["text"].read_text(encoding="utf-8")
    loaded = setup[family + "_loaded"] if family == "bpe" else {}  # sp: loaded from disk by evaluate_text
    r = evaluate_text(setup[family], setup["text"], window=64, batch_size=3, progress=False, **loaded)
    nll, n = _manual(setup[family + "_loaded"], text, 64, bos=True)
    assert r["tokens"] == n
    assert r["nll_nats"] == pytest.approx(nll, rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r["bytes"] == len(text.encode("utf-8"))
    for key in ("perplexity", "bits_per_byte", "tokens", "bytes"):
        assert key in r


def test_without_bos_first_token_is_context(setup):
    text = setup["text"].read_text(encoding="utf-8")
    r = evaluate_text(setup["bpe"], setup["text"], window=50, add_bos=False, progress=False, **setup["bpe_loaded"])
    nll, n = _manual(setup["bpe_loaded"], text, 50, bos=False)
    assert r["bos"] is None and r["tokens"] == n
    assert r["nll_nats"] == pytest.approx(nll, rel=1e-4)
    assert r["bytes"] < len(text.encode())  # the unscored first token's bytes are not counted


def test_sliding_window_and_max_tokens(setup):
    kw = dict(progress=False, **setup["sp_loaded"])
    full = evaluate_text(setup["sp"], setup["text"], window=64, **kw)
    slid = evaluate_text(setup["sp"], setup["text"], window=64, stride=16, **kw)
    assert slid["tokens"] == full["tokens"] and slid["windows"] > full["windows"]
    assert slid["nll_nats"] != pytest.approx(full["nll_nats"], rel=1e-9)
    part = evaluate_text(setup["sp"], setup["text"], max_tokens=100, window=64, **kw)
    assert part["tokens"] == 100
    assert 0 < part["bytes"] < full["bytes"]
    cut = evaluate_text(setup["sp"], setup["text"], max_chars=200, window=64, **kw)
    assert cut["chars"] == 200


def test_errors(setup, tmp_path):
    with pytest.raises(InvalidInputError, match="no such text file"):
        evaluate_text(setup["bpe"], tmp_path / "nope.txt", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InvalidInputError, match="empty"):
        evaluate_text(setup["bpe"], empty, progress=False)
    with pytest.raises(InvalidInputError, match="no such model folder"):
        evaluate_text(tmp_path / "nomodel", setup["text"], progress=False)
    with pytest.raises(InvalidInputError, match="stride"):
        evaluate_text(setup["bpe"], setup["text"], window=16, stride=32, progress=False, **setup["bpe_loaded"])
