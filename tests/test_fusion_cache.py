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
        torch.testing.assert_close(lg, v, rtol=1e-4, atol=1e-4)
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
    assert seen == [2] and cache.manifest["resumed_shards"] == 3
    for f in out.glob("shard-*.safetensors"):
        if f.name != "shard-00002.safetensors":
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
    with pytest.raises(InvalidInputError, match="incomplete"):
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
