"""Teacher cache: top-k per position in safetensors shards, manifest, resume."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon.fusion.cache import TeacherCache, build_teacher_cache
from surgeon.fusion.data import Example, encode


@pytest.fixture
def teacher(make_tiny_llama):
    return make_tiny_llama("teacher", dtype=torch.float32)


@pytest.fixture
def encoded(teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    texts = [f"the quick brown fox {i} jumps over the lazy dog " * (1 + i % 3) for i in range(7)]
    return [encode(tok, Example(t), 40, 0) for t in texts]


def test_cache_matches_the_model(teacher, encoded, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = build_teacher_cache(teacher, encoded, tmp_path / "c", top_k=5, shard_size=3, batch_size=2)
    assert len(cache) == 7 and len(cache.manifest["shards"]) == 3 and cache.manifest["complete"]
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    for i in (0, 4, 6):
        ids = torch.tensor([encoded[i].ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        lg, tid, lse = cache.get(i)
        v, ix = torch.topk(logits, 5, dim=-1)
        # stored as float16 log-probabilities: |error| <= half a float16 step of |logp| (< 8)
        torch.testing.assert_close(lg, v, rtol=0, atol=4e-3)
        assert torch.equal(tid, ix)
        torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-4, atol=1e-4)
    assert cache.used_ids().numel() > 0
    # reopening the folder gives the same data
    again = TeacherCache(tmp_path / "c")
    assert torch.equal(again.get(5)[1], cache.get(5)[1])


def test_cache_resumes_and_skips_finished_shards(teacher, encoded, tmp_path):
    out = tmp_path / "c"
    seen = []
    build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=2, on_shard=lambda s, n: seen.append(s))
    assert seen == [0, 1, 2, 3]
    stamp = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.safetensors")}
    # lose shard 2 (as if killed before it was written) and mark the manifest incomplete
    (out / "shard-00002.safetensors").unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    seen.clear()
    cache = build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=2, on_shard=lambda s, n: seen.append(s))
    assert seen == [0] and cache.manifest["resumed_examples"] == 5 and cache.cached == 7
    for f in out.glob("shard-*.safetensors"):
        if f.name in stamp and f.name != "shard-00002.safetensors":
            assert f.stat().st_mtime_ns == stamp[f.name]
    # a finished cache is not recomputed
    seen.clear()
    build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=2, on_shard=lambda s, n: seen.append(s))
    assert seen == []


def test_cache_is_rebuilt_when_inputs_change(teacher, encoded, tmp_path):
    out = tmp_path / "c"
    build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=4)
    seen = []
    build_teacher_cache(teacher, encoded, out, top_k=6, shard_size=4, on_shard=lambda s, n: seen.append(s))
    assert seen == [0, 1]
    seen.clear()
    build_teacher_cache(teacher, encoded[:5], out, top_k=6, shard_size=4, on_shard=lambda s, n: seen.append(s))
    assert seen == [0, 1] and len(TeacherCache(out)) == 5


def test_incomplete_cache_is_refused(tmp_path):
    from surgeon.errors import InvalidInputError

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "surgeon-teacher-cache/1", "complete": False}))
    with pytest.raises(InvalidInputError, match="another format"):
        TeacherCache(tmp_path)


def test_cache_notices_retrained_weights_of_the_same_shapes(teacher, encoded, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "c"
    build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=4)
    sd = load_file(str(teacher / "model.safetensors"))
    sd = {k: v + 0.01 for k, v in sd.items()}
    save_file(sd, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    seen = []
    build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=4, on_shard=lambda s, n: seen.append(s))
    assert seen == [0, 1]


def test_cache_builds_only_the_examples_asked_for_and_extends_later(teacher, encoded, tmp_path):
    out = tmp_path / "c"
    seen = []
    cache = build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=4, indices=[5, 1],
                                on_shard=lambda s, n: seen.append(s))
    assert seen == [0] and cache.cached == 2 and not cache.manifest["complete"]
    assert cache.has(1) and cache.has(5) and not cache.has(0)
    with pytest.raises(Exception, match="not in the teacher cache"):
        cache.get(0)
    seen.clear()
    cache = build_teacher_cache(teacher, encoded, out, top_k=4, shard_size=4, indices=[0, 1, 2],
                                on_shard=lambda s, n: seen.append(s))
    assert seen == [0] and cache.cached == 4 and cache.manifest["resumed_examples"] == 1
    full = build_teacher_cache(teacher, encoded, tmp_path / "full", top_k=4, shard_size=4)
    for i in (0, 1, 2, 5):
        for a, b in zip(cache.get(i), full.get(i)):
            assert torch.equal(a, b)


def test_cache_at_a_temperature_gives_exact_tempered_probabilities(teacher, encoded, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = build_teacher_cache(teacher, encoded, tmp_path / "c", top_k=5, temperature=2.0)
    assert cache.temperature == 2.0
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded[3].ids])).logits[0]
    tk = cache.topk(3)
    assert tk.lse_temperature == 2.0
    p = (tk.logits / 2.0 - tk.lse.unsqueeze(-1)).exp()
    ref = torch.topk(torch.softmax(logits / 2.0, -1), 5, dim=-1).values
    torch.testing.assert_close(p, ref, rtol=0, atol=2e-3)


def test_ids_are_packed_in_16_bits_when_they_fit():
    from surgeon.fusion.cache import _pack_ids, _unpack_ids

    ids = torch.tensor([[0, 1, 32767, 32768, 49151, 65535]], dtype=torch.int32)
    packed = _pack_ids(ids, 65536)
    assert packed.dtype == torch.int16
    assert torch.equal(_unpack_ids(packed, "uint16"), ids.long())
    big = torch.tensor([[0, 65536, 262143]], dtype=torch.int32)
    assert _pack_ids(big, 262144).dtype == torch.int32
    assert torch.equal(_unpack_ids(_pack_ids(big, 262144), "int32"), big.long())


def test_cache_bytes_per_token(teacher, encoded, tmp_path):
    # float16 log-probabilities + 16-bit ids + float32 logsumexp: 16 * 2 + 16 * 2 + 4 = 68 bytes at k = 16
    cache = build_teacher_cache(teacher, encoded, tmp_path / "c", top_k=16)
    lengths = [len(e) for e in encoded]
    assert cache.manifest["ids_dtype"] == "uint16"
    payload = 68 * max(lengths) * len(encoded)  # shards are padded to their longest example
    total = sum(x["bytes"] for x in cache.manifest["shards"])
    assert payload <= total <= payload + 4096
    assert 68 <= cache.bytes_per_token() < 68 * max(lengths) / (sum(lengths) / len(lengths)) + 10
