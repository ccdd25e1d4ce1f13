"""Lazy reader and atomic sharded writer: round trips, transformers compatibility, atomicity."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.errors import CheckpointError, InvalidInputError, StepError
from surgeon.io import Checkpoint, CheckpointWriter, TensorSpec, parse_size
from surgeon.io.header import DTYPES

ALL_DTYPES = sorted({d for d in DTYPES.values()}, key=str)


def _rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -100), min(info.max, 100), shape, generator=g).to(dtype)


def _write(dest: Path, tensors: dict[str, torch.Tensor], **kw: object) -> Path:
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with CheckpointWriter(dest, specs, **kw) as w:  # type: ignore[arg-type]
        for k in reversed(list(tensors)):  # any order
            w.write(k, tensors[k])
        w.commit()
    return dest


@pytest.mark.parametrize("shard", [None, 200])
def test_round_trip_every_dtype(tmp_path: Path, shard: int | None) -> None:
    tensors = {f"t.{i}.{str(d)[6:]}": _rand((3, 5), d, i) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    out = _write(tmp_path / "out", tensors, **({"max_shard_size": shard} if shard else {}))
    ck = Checkpoint.open(out)
    assert set(ck.names) == set(tensors)
    for k, v in tensors.items():
        got = ck.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.view(torch.uint8) if v.dtype.itemsize == 1 and v.dtype.is_floating_point else got,
                           v.view(torch.uint8) if v.dtype.itemsize == 1 and v.dtype.is_floating_point else v), k
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard:
        assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
        assert set(index["weight_map"]) == set(tensors)
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    else:
        assert files == ["model.safetensors"]
    # the safetensors library reads our files too
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    assert set(merged) == set(tensors)


def test_reads_are_lazy_and_cast(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2, 2, dtype=torch.bfloat16), "b": torch.arange(4.0)}, tmp_path / "model.safetensors")
    ck = Checkpoint.open(tmp_path)
    assert ck.info("a").shape == (2, 2) and ck.info("a").dtype == torch.bfloat16
    t = ck.get("a", dtype=torch.float32)
    assert t.dtype == torch.float32 and torch.equal(t, torch.ones(2, 2))
    t.add_(1)  # a private copy: the file is untouched
    assert torch.equal(ck.get("a", dtype=torch.float32), torch.ones(2, 2))
    with pytest.raises(CheckpointError, match="no tensor 'zz'"):
        ck.get("zz")


def test_sharded_transformers_checkpoint_is_read(tmp_path: Path, make_tiny_llama) -> None:
    folder = make_tiny_llama("sharded", max_shard_size="20KB", tied=False)
    assert (folder / "model.safetensors.index.json").exists()
    ck = Checkpoint.open(folder)
    assert "lm_head.weight" in ck and not ck.tied_embeddings
    assert ck.num_layers == 2 and ck.has_tokenizer


def test_pickle_refused_by_default(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint.open(tmp_path)
    ck = Checkpoint.open(tmp_path, allow_pickle=True)
    assert torch.equal(ck.get("w"), torch.ones(2))


def test_existing_destination_refused_without_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(InvalidInputError, match="already exists"):
        _write(dest, {"a": torch.ones(2)})
    assert (dest / "keep.txt").read_text() == "old"
    with pytest.raises(InvalidInputError, match="was not written by surgeon"):  # --overwrite: only surgeon's own
        _write(dest, {"a": torch.ones(2)}, overwrite=True)
    assert (dest / "keep.txt").read_text() == "old"
    (dest / ".surgeon-output.json").write_text("{}")
    _write(dest, {"a": torch.ones(2)}, overwrite=True)
    assert not (dest / "keep.txt").exists() and Checkpoint.open(dest).names == ["a"]


def test_exception_mid_write_leaves_no_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(dest, specs) as w:
            w.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert not dest.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "staging folder left behind"


def test_exception_mid_write_keeps_previous_version(tmp_path: Path) -> None:
    dest = _write(tmp_path / "out", {"a": torch.zeros(4)})
    with pytest.raises(RuntimeError):
        with CheckpointWriter(dest, [TensorSpec("a", (4,), torch.float32)], overwrite=True) as w:
            w.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert torch.equal(Checkpoint.open(dest).get("a"), torch.zeros(4))


def test_commit_refuses_incomplete_checkpoint(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]
    with pytest.raises(StepError, match="never written: b"):
        with CheckpointWriter(tmp_path / "out", specs) as w:
            w.write("a", torch.ones(4))
            w.commit()
    assert not (tmp_path / "out").exists()


def test_wrong_shape_or_dtype_rejected(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "o", [TensorSpec("a", (4,), torch.float32)]) as w:
        with pytest.raises(StepError, match="planned"):
            w.write("a", torch.ones(5))
        with pytest.raises(StepError, match="planned"):
            w.write("a", torch.ones(4, dtype=torch.float16))
        w.write("a", torch.ones(4))
        w.commit()


def test_interrupted_write_resumes_from_journal(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    specs = [TensorSpec(n, (8,), torch.float32) for n in "abc"]
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(dest, specs) as w:
            w.write("a", torch.full((8,), 1.0))
            w.write("b", torch.full((8,), 2.0))
            raise KeyboardInterrupt
    assert not dest.exists()
    with CheckpointWriter(dest, specs) as w:
        assert w.pending == ["c"] and w.resumed_tensors == 2
        w.write("c", torch.full((8,), 3.0))
        w.commit()
    ck = Checkpoint.open(dest)
    assert [float(ck.get(n)[0]) for n in "abc"] == [1.0, 2.0, 3.0]
    # byte-identical to an uninterrupted write
    ref = _write(tmp_path / "ref", {n: torch.full((8,), float(i + 1)) for i, n in enumerate("abc")})
    assert (ref / "model.safetensors").read_bytes() == (dest / "model.safetensors").read_bytes()


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5KB", 1500), (1024, 1024)])
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(InvalidInputError, match="cannot read size"):
        parse_size("lots")


def _raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize(
    "header,data,message",
    [
        (b"{not json", b"", "not valid JSON"),
        (b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "unknown or unsupported dtype"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4, "past the end"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 12, "overlap"),
        (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8, "needs 12"),
    ],
)
def test_corrupt_headers_name_file_and_tensor(tmp_path: Path, header: bytes, data: bytes, message: str) -> None:
    _raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as err:
        Checkpoint.open(tmp_path)
    assert "model.safetensors" in str(err.value)


def test_hostile_header_length_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(tmp_path)


def test_config_that_is_not_json(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Checkpoint.open(tmp_path)


# ---------------------------------------------------------------------------
# Shard digests hashed while writing (surgeon.io.stream_hash)

def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("order", ["plan", "reversed", "rows_shuffled"])
def test_streamed_shard_digests_equal_hashing_the_files(tmp_path: Path, order: str) -> None:
    from surgeon.engine.pipeline import shard_hashes

    tensors = {f"t{i}": _rand((37 + i, 19), torch.bfloat16, i) for i in range(6)}
    tensors["empty"] = torch.zeros((0, 19), dtype=torch.bfloat16)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    dest = tmp_path / "out"
    with CheckpointWriter(dest, specs, max_shard_size=2000) as w:
        names = list(tensors)
        if order == "reversed":
            names.reverse()
        for n in names:
            t = tensors[n]
            if order == "rows_shuffled" and t.shape[0] > 4:
                for a, b in ((10, t.shape[0]), (0, 3), (3, 10)):  # pieces out of order
                    w.write_rows(n, a, t[a:b])
            else:
                w.write(n, t)
        w.commit()
    files = sorted(dest.glob("*.safetensors"))
    assert len(files) > 1
    assert sorted(w.digests) == [f.name for f in files]  # the writer keeps its digests (no global state)
    for f in files:
        assert w.digests[f.name].current() == _sha(f)
    assert {k: v["sha256"] for k, v in shard_hashes(dest, w.digests).items()} == {f.name: _sha(f) for f in files}
    # a changed file is hashed again, not reported from the writer's digest
    with open(files[0], "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x01")
    assert w.digests[files[0].name].current() is None
    assert shard_hashes(dest, w.digests)[files[0].name]["sha256"] == _sha(files[0])


def test_hash_stream_gives_up_on_bytes_placed_twice(tmp_path: Path) -> None:
    from surgeon.io.stream_hash import ShardHashStream

    path = tmp_path / "f"
    path.write_bytes(b"h" + bytes(9))
    fd = os.open(path, os.O_RDWR)
    try:
        s = ShardHashStream(fd, 10, b"h")
        os.pwrite(fd, b"world", 5)
        assert s.placed(5, memoryview(b"world")) == 1     # waits: bytes 1-4 are missing
        os.pwrite(fd, b"ello", 1)
        assert s.placed(1, memoryview(b"ello")) == 10     # the waiting range is read back
        assert s.hexdigest() == _sha(path)
        s.placed(3, memoryview(b"xx"))
        assert s.hexdigest() is None
    finally:
        os.close(fd)


def test_resumed_write_digests_are_read_back(tmp_path: Path) -> None:
    from surgeon.engine.pipeline import shard_hashes

    tensors = {f"t{i}": _rand((8, 8), torch.float32, i) for i in range(3)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(dest, specs) as w:
            w.write("t0", tensors["t0"])
            raise KeyboardInterrupt
    with CheckpointWriter(dest, specs) as w:
        assert w.resumed_tensors == 1
        for n in w.pending:
            w.write(n, tensors[n])
        w.commit()
    f = dest / "model.safetensors"
    assert w.digests == {}  # a resumed shard is not hashed as a stream
    assert shard_hashes(dest, w.digests)["model.safetensors"]["sha256"] == _sha(f)
    assert load_file(str(f))["t2"].equal(tensors["t2"])
