"""Shard files written past the page cache (surgeon.io.direct_write) hold exactly the bytes a
buffered ``pwrite`` would, whatever the pieces' order, sizes and alignment."""
from __future__ import annotations

import errno
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from surgeon.io import CheckpointWriter, TensorSpec
from surgeon.io import direct_write
from surgeon.io.direct_write import BLOCK, file_system, open_direct


def _open(path: Path, size: int, head: bytes) -> tuple[int, direct_write.DirectFile]:
    """The file ``path`` of ``size`` bytes starting with ``head``, and a DirectFile on it (made here, not
    through open_direct's list of file systems, so that any file system taking O_DIRECT runs these)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.pwrite(fd, head, 0)
    os.ftruncate(fd, size)
    try:
        direct_fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0)) if direct_write.supported() else -1
    except OSError:
        direct_fd = -1
    if direct_fd < 0:
        os.close(fd)
        pytest.skip(f"{path.parent}: this file system has no O_DIRECT")
    return fd, direct_write.DirectFile(direct_fd, size, fd, direct_write.AlignedBuffer())


def _pieces(rng: random.Random, start: int, stop: int, cuts: int) -> list[tuple[int, int]]:
    points = sorted({start, stop, *(rng.randrange(start, stop + 1) for _ in range(cuts))})
    pieces = list(zip(points[:-1], points[1:]))
    rng.shuffle(pieces)
    return pieces


# sizes around block boundaries, a piece inside one block, and one bigger than the copy buffer
@pytest.mark.parametrize("size, head", [(1, 0), (100, 7), (BLOCK - 1, 10), (BLOCK, 0), (BLOCK + 1, BLOCK),
                                        (3 * BLOCK + 17, 5000), (50_000, 123), (direct_write.CHUNK * 2 + 4099, 321)])
def test_pieces_in_any_order_give_the_planned_bytes(tmp_path: Path, size: int, head: int) -> None:
    rng = random.Random(size)
    path = tmp_path / "shard"
    want = bytearray(size)
    want[:head] = b"H" * head
    fd, f = _open(path, size, bytes(want[:head]))
    try:
        for a, b in _pieces(rng, head, size, 9):
            data = np.frombuffer(rng.randbytes(b - a), np.uint8)
            want[a:b] = data.tobytes()
            f.pwrite(memoryview(data), a)
        assert f.direct  # nothing fell back: every byte went past the cache
        f.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(want)  # and the padding of the last block is truncated away


def test_a_refused_direct_write_falls_back_to_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shard"
    size = 5 * BLOCK + 77
    fd, f = _open(path, size, b"")
    want = bytearray(size)
    real = os.pwrite
    calls = {"direct": 0}

    def pwrite(fd_: int, data: object, offset: int) -> int:
        if fd_ == f.fd:
            calls["direct"] += 1
            if calls["direct"] > 2:  # the file system refuses after a few direct writes
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    rng = random.Random(1)
    try:
        for a, b in _pieces(rng, 0, size, 6):
            data = np.frombuffer(rng.randbytes(b - a), np.uint8)
            want[a:b] = data.tobytes()
            f.pwrite(memoryview(data), a)
        assert not f.direct and calls["direct"] == 3
        f.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(want)


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shard"
    fd, f = _open(path, 3 * BLOCK, b"")
    real = os.pwrite

    def pwrite(fd_: int, data: object, offset: int) -> int:
        if fd_ == f.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd_, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        with pytest.raises(OSError, match="No space"):
            f.pwrite(memoryview(bytes(2 * BLOCK)), 0)
    finally:
        f.abandon()
        os.close(fd)


def _checkpoint(dest: Path, tensors: dict[str, torch.Tensor], seed: int) -> CheckpointWriter:
    """Write ``tensors`` in two shards, whole and in row pieces, in a shuffled order."""
    rng = random.Random(seed)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    jobs: list[tuple[str, int, int]] = []
    for n, t in tensors.items():
        rows = t.shape[0]
        jobs += [(n, a, b) for a, b in sorted(_pieces(rng, 0, rows, 3))] if rows > 4 else [(n, 0, rows)]
    rng.shuffle(jobs)
    with CheckpointWriter(dest, specs, max_shard_size=100_000) as w:
        for n, a, b in jobs:
            w.write_rows(n, a, tensors[n][a:b])
        w.commit()
    return w


def test_checkpoint_written_directly_equals_the_buffered_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(131 + 7 * i, 113 + i, generator=g).to(dt)
               for i, dt in enumerate([torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float32])}
    tensors["bias"] = torch.randn(3, generator=g)
    used: list[int] = []
    real = direct_write.DirectFile.pwrite

    def counting(self: direct_write.DirectFile, data: memoryview, offset: int) -> None:
        used.append(len(data))
        real(self, data, offset)

    monkeypatch.setattr(direct_write.DirectFile, "pwrite", counting)
    direct = _checkpoint(tmp_path / "direct", tensors, seed=3)
    if not used:
        pytest.skip(f"{tmp_path}: this file system has no O_DIRECT")
    assert sum(used) == sum(t.numel() * t.element_size() for t in tensors.values())
    monkeypatch.setenv("SURGEON_KEEP_WRITE_CACHE", "1")
    used.clear()
    _checkpoint(tmp_path / "buffered", tensors, seed=3)
    assert used == []
    files = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert len(files) > 1
    for name in files:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes()
        # hashed as written, the pieces that came early read back from the device
        assert direct.digests[name].current() == hashlib.sha256((tmp_path / "direct" / name).read_bytes()).hexdigest()
    loaded = {k: v for name in files for k, v in load_file(str(tmp_path / "direct" / name)).items()}
    assert all(loaded[n].equal(t) for n, t in tensors.items())


@pytest.mark.parametrize("congruent", [True, False])
def test_blocks_go_from_the_callers_memory_when_it_sits_on_block_boundaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, congruent: bool) -> None:
    import mmap

    path = tmp_path / "shard"
    size, at = 12 * BLOCK + 300, BLOCK + 100  # the write starts 100 bytes into a block
    fd, f = _open(path, size, b"")
    memory = mmap.mmap(-1, 16 * BLOCK)  # page-aligned
    lead = 100 if congruent else 101    # the same place within a block as the file offset, or not
    n = 9 * BLOCK + 50
    payload = random.Random(2).randbytes(n)
    memory[lead:lead + n] = payload
    copies: list[int] = []
    real = direct_write.ctypes.memmove
    monkeypatch.setattr(direct_write.ctypes, "memmove", lambda d, s, k: (copies.append(k), real(d, s, k))[1])
    try:
        with memoryview(memory) as view:
            f.pwrite(view[lead:lead + n], at)
        assert f.direct
        f.close()
    finally:
        os.close(fd)
    assert copies == ([] if congruent else [8 * BLOCK])  # the whole blocks inside the write: copied or not
    want = bytearray(size)
    want[at:at + n] = payload
    assert path.read_bytes() == bytes(want)


def test_a_merge_writes_its_output_pieces_without_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine places each pooled output piece at its file offset modulo a block (RowSink.file_offset)."""
    import surgeon
    from safetensors.torch import save_file

    from surgeon.io import Checkpoint

    g = torch.Generator().manual_seed(0)
    inputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sd = {"model.layers.0.mlp.up_proj.weight": torch.randn(1031, 701, generator=g).bfloat16(),  # 1.4 MB
              "model.layers.0.mlp.down_proj.weight": torch.randn(701, 1031, generator=g).bfloat16(),
              "model.norm.weight": torch.randn(701, generator=g).bfloat16()}
        save_file(sd, tmp_path / name / "model.safetensors")
        inputs.append(sd)
    copies: list[int] = []
    direct: list[int] = []
    real_copy, real_write = direct_write.ctypes.memmove, direct_write.DirectFile.pwrite
    monkeypatch.setattr(direct_write.ctypes, "memmove", lambda d, s, k: (copies.append(k), real_copy(d, s, k))[1])

    def spy(self: direct_write.DirectFile, data: memoryview, offset: int) -> None:
        direct.append(len(data))
        real_write(self, data, offset)

    monkeypatch.setattr(direct_write.DirectFile, "pwrite", spy)
    out = tmp_path / "out"
    surgeon.merge_models("linear", [str(tmp_path / "a"), str(tmp_path / "b")], str(out), quiet=True)
    if not direct:
        pytest.skip(f"{tmp_path}: this file system has no O_DIRECT")
    assert max(direct) >= 1031 * 701 * 2 // 2 and copies == []
    ck = Checkpoint.open(out)
    for name, a in inputs[0].items():
        want = ((a.float() + inputs[1][name].float()) / 2).bfloat16()
        assert torch.allclose(ck.get(name).float(), want.float(), rtol=1e-2, atol=1e-2)


MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:26 / /tmp rw shared:2 - tmpfs tmpfs rw
31 22 0:40 / /mnt/my\\040models rw shared:3 - nfs4 server:/export rw
32 31 252:2 / /mnt/my\\040models/local rw shared:4 - xfs /dev/vdb rw
33 22 0:50 / /work rw shared:5 - ext4 /dev/vdc rw
34 22 0:51 / /work rw shared:6 - fuse.sshfs host:/ rw
"""


@pytest.mark.parametrize("path, kind", [("/home/u/out", "ext4"), ("/tmp/x", "tmpfs"), ("/mnt/my models/out", "nfs4"),
                                        ("/mnt/my models/local/out", "xfs"), ("/mnt/my", "ext4"),
                                        ("/work/out", "fuse.sshfs")])  # mounted over: the last one counts
def test_file_system_is_the_deepest_mount_above_the_path(path: str, kind: str) -> None:
    assert file_system(path, MOUNTINFO) == kind


def test_outputs_on_other_file_systems_are_written_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_write, "file_system", lambda path, mountinfo=None: "nfs4")
    path = tmp_path / "f"
    path.write_bytes(bytes(BLOCK))
    fd = os.open(path, os.O_RDWR)
    try:
        assert open_direct(path, BLOCK, fd) is None  # NFS: a direct write can be a round trip per call
    finally:
        os.close(fd)
    used: list[int] = []
    real = direct_write.DirectFile.pwrite
    monkeypatch.setattr(direct_write.DirectFile, "pwrite", lambda self, d, o: (used.append(len(d)), real(self, d, o))[1])
    t = torch.arange(10_000, dtype=torch.float32).reshape(100, 100)
    with CheckpointWriter(tmp_path / "out", [TensorSpec("t", (100, 100), torch.float32)]) as w:
        w.write_rows("t", 50, t[50:])
        w.write_rows("t", 0, t[:50])
        w.commit()
    assert used == [] and load_file(str(tmp_path / "out" / "model.safetensors"))["t"].equal(t)
