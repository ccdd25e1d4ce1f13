"""Writing a checkpoint's shard files past the page cache (``O_DIRECT``).

Why. A buffered ``pwrite`` copies every output byte into freshly allocated
page-cache pages that the kernel then writes back and (with
:class:`surgeon.io.writer.DropBehind`) drops: on the 2-core development VM
the writer thread spent ~1.5 CPU-s of kernel time (``copy_folio_from_iter``,
ext4's delayed allocation) on a 1.1B model's 2.2 GB, a fifth of a linear
merge's CPU. With ``O_DIRECT`` the device reads the bytes from our buffer:
2.2 GB written and synced in 1.2-1.5 s of wall time and 0.13-0.3 CPU-s (the
copy into the aligned buffer included), against 3.5-6.2 s and 2.7-5.3 CPU-s
buffered in 8 MB writes (``write`` + ``fsync``, same file system,
alternating runs; the merge bench's best-of-two floor: 1.5 s against 1.7-1.8
for 2.5 GB).

The rule ``O_DIRECT`` imposes. File offsets, lengths and memory addresses
must be multiples of the device's block (:data:`BLOCK` covers 512- and
4096-byte devices). A tensor's bytes start and end anywhere, so each write
is split into whole blocks inside it, written directly from the caller's
memory where that sits on block boundaries too (the merge engine places its
output pieces so: ``RowSink.file_offset``), else copied through one
page-aligned buffer first (a memcpy: ~0.1 s a GB), and at most two *edge* blocks
it shares with its neighbours: those are read (from :attr:`DirectFile._edges`,
the blocks this file touched last, or from the file), patched with the
write's bytes and written back whole. Every byte therefore goes through
``O_DIRECT`` and the file's pages never enter the page cache from here,
which is what keeps this safe: mixing buffered and direct writes in one file
can leave the page cache holding stale bytes of a directly written block.

Contract. Writes must not overlap (a block a write fully covers is then
never an edge of another write, so the edge cache never goes stale) and must
come from one process (two processes patching the same edge block would race:
distributed writers write buffered). Blocks past the file's planned size are
padded with zeros while it is written; :meth:`DirectFile.close` truncates the
file back and syncs it. Where the file system refuses ``O_DIRECT`` (at open,
or at the first write), :func:`open_direct` returns None or the file falls
back to the buffered descriptor for every later write: blocks written
directly before are on the device, so later buffered writes read them back
correctly. Only local block-device file systems (:data:`DIRECT_FILE_SYSTEMS`) are
written directly; on NFS, FUSE or overlay a direct write can cost a round trip per call.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import threading

import numpy as np

#: the unit of every direct write: offsets, lengths and the buffer's address are multiples of it
BLOCK = 4096
#: bytes of a write copied into the aligned buffer and written per system call
CHUNK = 4 << 20
#: most bytes one direct write sends from the caller's memory (the kernel pins them meanwhile)
DIRECT_MAX = 64 << 20
#: edge blocks kept in memory (a piece's last block is the next piece's first)
EDGES = 64

_O_DIRECT = getattr(os, "O_DIRECT", 0)

#: file systems on local block devices, where a direct write goes to the disk as fast as writeback
#: would. Elsewhere (NFS, SMB, FUSE, overlay, tmpfs, cluster file systems) the output is written
#: buffered: a direct write there can be a synchronous round trip per call
DIRECT_FILE_SYSTEMS = frozenset({"ext4", "ext3", "xfs", "btrfs", "f2fs", "bcachefs"})


def supported() -> bool:
    """Whether this platform has ``O_DIRECT`` at all (Linux does; macOS does not)."""
    return _O_DIRECT != 0


def file_system(path: os.PathLike[str] | str, mountinfo: str | None = None) -> str | None:
    """The type of the file system holding ``path`` (the deepest mount point above it in
    Linux's ``/proc/self/mountinfo``, or in ``mountinfo``), or None where that cannot be read."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                mountinfo = fh.read()
        except OSError:
            return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not sep or len(fields) < 5 or not after:
            continue
        mount = fields[4]
        for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            mount = mount.replace(code, char)
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):  # the deepest mount point; of equal ones, the last mounted
            best, kind = mount, after[0]
    return kind


class AlignedBuffer:
    """The page-aligned copy buffer of :data:`CHUNK` bytes that direct writes go through,
    and the lock that lets one write at a time use it: the files of one checkpoint share
    one (its memory does not grow with the number of shards)."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, CHUNK)  # page-aligned: anonymous mappings start on a page
        export = ctypes.c_char.from_buffer(self.buf)
        self.addr = ctypes.addressof(export)  # valid while the buffer is open
        del export  # an export alive would keep the buffer from closing
        self.lock = threading.Lock()


def open_direct(path: os.PathLike[str] | str, size: int, fallback_fd: int,
                buffer: AlignedBuffer | None = None) -> DirectFile | None:
    """A :class:`DirectFile` writing into the existing file ``path`` of planned ``size``
    bytes, or None where the platform has no ``O_DIRECT``, the file system is not one of
    :data:`DIRECT_FILE_SYSTEMS`, or it refuses the flag. ``fallback_fd``: an open,
    buffered, writable descriptor of the same file, used if a direct write is refused;
    ``buffer``: shared with the checkpoint's other files (default: its own)."""
    if not supported() or file_system(path) not in DIRECT_FILE_SYSTEMS:
        return None
    try:
        fd = os.open(path, os.O_RDWR | _O_DIRECT)
    except OSError:
        return None
    return DirectFile(fd, size, fallback_fd, buffer or AlignedBuffer())


class DirectFile:
    """One file written through ``O_DIRECT`` (module docstring); thread-safe."""

    def __init__(self, fd: int, size: int, fallback_fd: int, buffer: AlignedBuffer) -> None:
        self.fd = fd
        self.size = size
        self._fallback = fallback_fd
        self.direct = True
        self._buf = buffer.buf
        self._buf_addr = buffer.addr
        self._edges: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self._lock = buffer.lock

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` (raises OSError as ``os.pwrite`` would)."""
        n = len(data)
        if n == 0:
            return
        with self._lock:
            if self.direct:
                try:
                    self._write(data, offset)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    self.direct = False  # refused: buffered from here on (see the module docstring)
                    self._edges.clear()
            done = 0
            while done < n:
                done += os.pwrite(self._fallback, data[done:], offset + done)

    def _write(self, data: memoryview, offset: int) -> None:
        end = offset + len(data)
        first = -(-offset // BLOCK) * BLOCK  # the whole blocks inside [offset, end)
        last = end // BLOCK * BLOCK
        if first >= last:  # no whole block: one edge, or two that meet at a block boundary
            if (end - 1) // BLOCK == offset // BLOCK:
                self._patch(offset // BLOCK, offset % BLOCK, data)
            else:
                cut = first - offset
                self._patch(offset // BLOCK, offset % BLOCK, data[:cut])
                self._patch(first // BLOCK, 0, data[cut:])
            return
        if offset < first:
            self._patch(offset // BLOCK, offset % BLOCK, data[:first - offset])
        addr = np.frombuffer(data, dtype=np.uint8).ctypes.data
        at = first
        if (addr + first - offset) % BLOCK == 0:  # the whole blocks sit on block boundaries in memory too: no copy
            while at < last:
                k = min(DIRECT_MAX, last - at)
                self._write_from(data[at - offset:at - offset + k], at)
                at += k
        else:
            while at < last:
                k = min(CHUNK, last - at)
                ctypes.memmove(self._buf_addr, addr + (at - offset), k)  # ctypes lets go of the GIL
                with memoryview(self._buf) as view:
                    self._write_from(view[:k], at)
                at += k
        if end > last:
            self._patch(last // BLOCK, 0, data[last - offset:])

    def _write_from(self, view: memoryview, at: int) -> None:
        """Write the block-aligned ``view`` (address and length) at the block offset ``at``."""
        done, k = 0, len(view)
        while done < k:  # a short direct write ends on a block: the rest follows aligned
            w = os.pwrite(self.fd, view[done:], at + done)
            if w <= 0:
                raise OSError(errno.EIO, f"direct write of {k} bytes at {at} wrote nothing")
            done += w

    def _patch(self, block: int, start: int, part: memoryview) -> None:
        """Put ``part`` at ``start`` of edge block ``block`` and write the block whole."""
        edge = self._edges.pop(block, None)
        if edge is None:
            edge = self._read_block(block)
        edge[start:start + len(part)] = part
        self._edges[block] = edge
        while len(self._edges) > EDGES:
            self._edges.popitem(last=False)
        self._buf[:BLOCK] = edge
        with memoryview(self._buf) as view:
            self._write_from(view[:BLOCK], block * BLOCK)

    def _read_block(self, block: int) -> bytearray:
        """Block ``block`` as it is in the file (zeros past its end: a direct read is short only there)."""
        with memoryview(self._buf) as view:
            got = max(0, os.preadv(self.fd, [view[:BLOCK]], block * BLOCK))
            edge = bytearray(BLOCK)
            edge[:got] = view[:got]
        return edge

    def close(self) -> None:
        """Truncate the file to its planned size (edge blocks may have padded it), sync it and
        close the direct descriptor (the fallback descriptor is the caller's)."""
        with self._lock:
            try:
                os.ftruncate(self.fd, self.size)
                os.fsync(self.fd)
            finally:
                os.close(self.fd)

    def abandon(self) -> None:
        """Close the direct descriptor without syncing (the write is being given up)."""
        with self._lock:
            try:
                os.close(self.fd)
            except OSError:
                pass
