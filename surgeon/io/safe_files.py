"""Opening input files safely: regular files only, and nothing from outside the model folder.

* A FIFO, device or socket named like an input (``config.json``, a shard) would
  block a reader forever or stream without end. :func:`open_regular` checks the
  file type with ``stat`` before opening, opens with ``O_NONBLOCK`` (so even a
  FIFO swapped in between cannot block) and checks the opened descriptor again.
* A symlinked file inside a model folder (``special_tokens_map.json ->
  /etc/passwd``, ``merges.txt -> ~/.cache/huggingface/token``) would carry the
  target's bytes into an output and onto the hub. :func:`check_inside` refuses
  any file whose link target leaves its model folder, except into the same
  hub-cache repository's ``blobs`` (huggingface-hub links every snapshot file
  there). See docs/reliability.md (Safety).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CheckpointError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    for test, what in _KINDS:
        if test(mode):
            return what
    return "not a regular file"


def check_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """``stat`` a path (following links) and refuse anything but a regular file, by name."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of a regular file; never blocks on a FIFO or device."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open for reading ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the stat and the open
            raise CheckpointError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of a regular file (at most ``limit``: a longer file is refused by name)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit}-byte limit for this file")
        chunks = []
        while True:
            try:
                b = os.read(fd, 1 << 20)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
            if not b:
                break
            chunks.append(b)
            if limit is not None and sum(map(len, chunks)) > limit:
                raise CheckpointError(f"{path}: more than the {limit}-byte limit for this file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _hub_blobs(folder: Path) -> Path | None:
    """``…/models--org--name/blobs`` when ``folder`` is a hub-cache snapshot (``…/snapshots/<rev>``)."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        return parent.parent / "blobs"
    return None


def check_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """The resolved ``path``, refused when a symlink takes it outside ``folder``.

    ``folder`` itself may be a link (it is resolved first). A target inside the
    same hub-cache repository's ``blobs`` folder is allowed: that is how the hub
    cache stores every snapshot file.
    """
    p = Path(path)
    base = Path(os.path.abspath(folder))
    real_base = base.resolve()
    real = p.resolve()
    if real == real_base or real_base in real.parents:
        return real
    for blobs in filter(None, (_hub_blobs(base), _hub_blobs(real_base))):
        real_blobs = blobs.resolve()
        if real_blobs in real.parents:
            return real
    raise CheckpointError(f"{p}: is a symlink to {real}, outside its model folder {base}; surgeon does not "
                          "copy files from outside a model folder into an output (copy the file in, if it is meant)")
