"""FuseLLM-style alignment with the pico zoo's two real tokenizer families.

zoo/tokenizers/bpe: byte-level BPE (GPT-2 alphabet, ``Ġ`` word starts), vocab 4096;
zoo/tokenizers/sp: SentencePiece-style (``▁`` word starts, byte fallback ``<0xNN>``,
digits split), vocab 3000.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from surgeon.fusion.align import (TokenSurfaces, VocabMap, align_tokens, edit_distance, edit_distance_matrix,
                                  edit_distance_pairs, nearest_by_edit_distance, pair_positions)
from surgeon.fusion.data import Example, encode, load_examples, render_chat, text_windows

REPO = Path(__file__).resolve().parents[1]
TOK = REPO / "zoo" / "tokenizers"
DATA = REPO / "zoo" / "data"

pytestmark = [
    pytest.mark.skipif(not (TOK / "bpe" / "tokenizer.json").is_file() or not (TOK / "sp" / "tokenizer.json").is_file(),
                       reason="zoo tokenizers not built (scripts/build_zoo.py)"),
    pytest.mark.usefixtures("one_torch_thread"),
]

SAMPLE = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
          "def area(r):\n    return 3.14159 * r ** 2  # café, naïve — 12345\n"
          "The 2005 season was the club's best; it won 17 of 24 games.\n")


@pytest.fixture(scope="module")
def toks():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOK / "bpe")), AutoTokenizer.from_pretrained(str(TOK / "sp"))


def _text(domain: str, n: int) -> str:
    f = DATA / domain / "heldout.txt"
    return f.read_text(encoding="utf-8")[:n] if f.is_file() else SAMPLE * (n // len(SAMPLE) + 1)


# ----------------------------------------------------------------------------- edit distance
def test_edit_distance_vectorised_matches_reference():
    rng = random.Random(0)
    a = [bytes(rng.choices(b"ab c\xc3", k=rng.randint(0, 21))) for _ in range(70)]
    b = [bytes(rng.choices(b"ab c\xc3", k=rng.randint(0, 11))) for _ in range(50)]
    m = edit_distance_matrix(a, b)
    for i in range(len(a)):
        for j in range(len(b)):
            assert m[i, j] == edit_distance(a[i], b[j])
    p = edit_distance_pairs(a[:50], b)
    assert p.tolist() == [edit_distance(x, y) for x, y in zip(a[:50], b)]
    assert edit_distance(b"kitten", b"sitting") == 3 and edit_distance(b"", b"abc") == 3


def test_nearest_by_edit_distance_is_exact_with_first_tie():
    rng = random.Random(1)
    cands = [bytes(rng.choices(b"abcd ", k=rng.randint(1, 8))) for _ in range(300)]
    queries = [bytes(rng.choices(b"abcde ", k=rng.randint(0, 12))) for _ in range(80)]
    idx, dist = nearest_by_edit_distance(queries, cands)
    for q, i, d in zip(queries, idx.tolist(), dist.tolist()):
        ds = [edit_distance(q, c) for c in cands]
        assert d == min(ds) and i == ds.index(min(ds))


# ----------------------------------------------------------------------------- surfaces
def test_surfaces_reassemble_the_text(toks):
    bpe, sp = toks
    text = SAMPLE
    sb = TokenSurfaces(bpe)
    ss = TokenSurfaces(sp)
    assert sb.byte_level and not ss.byte_level
    ids_b = bpe(text, add_special_tokens=False)["input_ids"]
    ids_s = sp(text, add_special_tokens=False)["input_ids"]
    assert b"".join(sb.surfaces(ids_b, stripped=False)) == text.encode()
    # SentencePiece ("prepend first") adds one leading space; byte fallback pieces become bytes
    assert b"".join(ss.surfaces(ids_s, stripped=False)) == b" " + text.encode()
    assert sb.stripped[bpe.convert_tokens_to_ids("Ġthe")] == b"the"
    assert ss.stripped[sp.convert_tokens_to_ids("▁the")] == b"the"
    assert ss.surface[sp.convert_tokens_to_ids("<0x0A>")] == b"\n"


# ----------------------------------------------------------------------------- sequence alignment
def _reference_dtw(cost: np.ndarray) -> float:
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    return float(acc[n, m])


def test_dtw_cost_and_path_properties():
    rng = random.Random(2)
    for _ in range(10):
        a = [bytes(rng.choices(b"abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 25))]
        b = [bytes(rng.choices(b"abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 25))]
        cost, path = align_tokens(a, b)
        ref = np.array([[edit_distance(x, y) for y in b] for x in a], dtype=float)
        assert cost == _reference_dtw(ref)
        assert path[0] == (0, 0) and path[-1] == (len(a) - 1, len(b) - 1)
        assert sum(ref[i, j] for i, j in path) == cost
        for (i0, j0), (i1, j1) in zip(path, path[1:]):
            assert (i1 - i0, j1 - j0) in ((1, 1), (1, 0), (0, 1))


def test_identical_tokenisations_align_on_the_diagonal(toks):
    bpe, _ = toks
    sb = TokenSurfaces(bpe)
    ids = bpe(SAMPLE, add_special_tokens=False)["input_ids"]
    cost, path = align_tokens(sb.surfaces(ids), sb.surfaces(ids))
    assert cost == 0 and path == [(i, i) for i in range(len(ids))]
    assert pair_positions(path, len(ids), len(ids)) == [(i, i) for i in range(len(ids) - 1)]


@pytest.mark.parametrize("domain", ["prose", "shakespeare", "python"])
def test_real_tokenisations_pair_positions(toks, domain):
    """DP pairs between the two families: most start at the same character; the offset
    check removes the rest; the result covers most of the positions offsets can pair."""
    from surgeon.fusion.distill import _pairs_for

    bpe, sp = toks
    text = _text(domain, 1500)
    ex = Example(text)
    eb = encode(bpe, ex, None, bpe.bos_token_id)
    es = encode(sp, ex, None, sp.bos_token_id)
    sb, ss = TokenSurfaces(bpe), TokenSurfaces(sp)
    raw = _pairs_for(eb, es, sb, ss, "dp")
    checked = _pairs_for(eb, es, sb, ss, "dp_checked")
    truth = _pairs_for(eb, es, sb, ss, "offsets")
    ok = [(u, v) for u, v in raw.tolist() if eb.starts[u + 1] == es.starts[v + 1]]
    assert len(ok) / len(raw) > 0.75, f"{domain}: only {len(ok)}/{len(raw)} DP pairs start together"
    assert set(map(tuple, checked.tolist())) <= set(map(tuple, truth.tolist()))
    assert len(checked) / len(truth) > 0.75
    # a checked pair really pairs the same text position: both next tokens start at the same char
    for u, v in checked.tolist():
        assert eb.starts[u + 1] == es.starts[v + 1]


# ----------------------------------------------------------------------------- vocabulary mapping
def test_vocab_map_exact_special_and_edit(toks):
    bpe, sp = toks
    vm = VocabMap.build(sp, bpe, ids=[sp.convert_tokens_to_ids(t) for t in
                                       ["▁the", "<s>", "</s>", "<pad>", "<unk>", "<0x0A>", "▁thee", "e"]])
    table = vm.table
    conv = bpe.convert_tokens_to_ids
    assert table[sp.convert_tokens_to_ids("▁the")] == conv("Ġthe")
    assert table[sp.convert_tokens_to_ids("e")] == conv("e")
    assert table[sp.convert_tokens_to_ids("<0x0A>")] == conv("Ċ")  # the newline byte
    assert table[sp.bos_token_id] == bpe.bos_token_id
    assert table[sp.eos_token_id] == bpe.eos_token_id
    assert table[sp.pad_token_id] == bpe.pad_token_id
    assert vm.how["special"] == 4
    # a piece the pivot lacks maps to a pivot token at minimum edit distance, lowest id on ties
    sp_vocab = sp.get_vocab()
    missing = [t for t in sp_vocab if t.replace("▁", "Ġ") not in bpe.get_vocab() and not t.startswith("<")][:25]
    assert missing, "expected some SentencePiece pieces without an exact byte-level twin"
    vm.resolve([sp_vocab[t] for t in missing])
    surf_p = TokenSurfaces(bpe)
    cands = [i for i, s in enumerate(surf_p.surface) if s and i not in surf_p.special_ids]
    for t in missing[:8]:
        q = vm.teacher.surface[sp_vocab[t]]
        ds = [edit_distance(q, surf_p.surface[i]) for i in cands]
        best = cands[ds.index(min(ds))]
        assert int(vm.table[sp_vocab[t]]) == best


def test_vocab_map_is_lazy_and_callable(toks):
    bpe, sp = toks
    vm = VocabMap(TokenSurfaces(sp), TokenSurfaces(bpe))
    ids = torch.tensor([[sp.convert_tokens_to_ids("▁the"), sp.bos_token_id]])
    out = vm(ids)
    assert out.shape == ids.shape and out[0, 0] == bpe.convert_tokens_to_ids("Ġthe")
    assert int(vm._resolved.sum()) == 2


# ----------------------------------------------------------------------------- data
def test_text_windows_cover_the_text(toks):
    bpe, _ = toks
    text = _text("python", 3000)
    wins = text_windows(text, bpe, 64)
    assert "".join(w.text for w in wins) == text.lstrip() or "".join(w.text for w in wins) in text
    for w in wins:
        e = encode(bpe, w, None, bpe.bos_token_id)
        assert len(e) <= 64 + 1  # re-tokenising a window may merge differently at its edges


def test_chat_rendering_masks_assistant_turns(toks, tmp_path):
    bpe, sp = toks
    msgs = [{"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A humble servant."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Nothing more."}]
    text, spans = render_chat(bpe, msgs)
    assert [text[a:b] for a, b in spans] == ["A humble servant.<|im_end|>\n", "Nothing more.<|im_end|>\n"]
    e = encode(bpe, Example(text, spans), None, bpe.bos_token_id)
    trained = bpe.decode([i for i, t in zip(e.ids, e.target) if t])
    assert "servant" in trained and "Nothing" in trained and "Who" not in trained and "then" not in trained
    # the same string through the other tokenizer trains on the same characters
    e2 = encode(sp, Example(text, spans), None, sp.bos_token_id)
    assert "servant" in sp.decode([i for i, t in zip(e2.ids, e2.target) if t])
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"text": "plain record " * 20}) + "\n")
    exs = load_examples(f, bpe, 32)
    assert exs[0].spans == spans and exs[1].spans is None and len(exs) >= 3


@pytest.mark.parametrize("domain", ["prose", "shakespeare"])
def test_exact_token_pairing_is_fusellms_rule(toks, domain):
    """pairing='exact': the DP's pairs whose next tokens are the same string (FuseLLM)."""
    from surgeon.fusion.distill import _pairs_for

    bpe, sp = toks
    ex = Example(_text(domain, 1500))
    eb = encode(bpe, ex, None, bpe.bos_token_id)
    es = encode(sp, ex, None, sp.bos_token_id)
    sb, ss = TokenSurfaces(bpe), TokenSurfaces(sp)
    raw = set(map(tuple, _pairs_for(eb, es, sb, ss, "dp").tolist()))
    exact = _pairs_for(eb, es, sb, ss, "exact").tolist()
    assert exact and set(map(tuple, exact)) <= raw
    for u, v in exact:
        assert sb.surfaces([eb.ids[u + 1]]) == ss.surfaces([es.ids[v + 1]])
    missing = [(u, v) for u, v in raw if (u, v) not in set(map(tuple, exact))]
    assert all(sb.surfaces([eb.ids[u + 1]]) != ss.surfaces([es.ids[v + 1]]) for u, v in missing)


def test_vocab_merge_first_keeps_the_first_of_each_pivot_id():
    from surgeon.fusion.distill import _first_of_duplicates

    mapped = torch.tensor([[[5, 3, 5, -1, 3, 7]]])
    assert _first_of_duplicates(mapped).tolist() == [[[5, 3, -1, -1, -1, 7]]]
    # with "sum" the KL target adds the duplicates' mass; with "first" only the first counts
    from surgeon.fusion import TopK
    from surgeon.fusion.tokenwise import kl_loss

    logits = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    lse = torch.logsumexp(torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64), -1)
    ids = torch.tensor([[1, 1, 2]])
    s = torch.zeros(1, 4, dtype=torch.float64)
    q = (logits - lse.unsqueeze(-1)).exp()[0]
    p = torch.full((4,), 0.25, dtype=torch.float64)
    summed = kl_loss(s, TopK(logits, ids, lse, 4), reduction="none").item()
    first = kl_loss(s, TopK(logits, _first_of_duplicates(ids), lse, 4), reduction="none").item()
    qs = torch.stack([q[0] + q[1], q[2], 1 - q.sum()])
    qf = torch.stack([q[0], q[2], 1 - q[0] - q[2]])
    ps = torch.stack([p[1], p[2], 1 - p[1] - p[2]])
    assert summed == pytest.approx((qs * (qs / ps).log()).sum().item(), rel=1e-9)
    assert first == pytest.approx((qf * (qf / ps).log()).sum().item(), rel=1e-9)
