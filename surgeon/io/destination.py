"""The one check every command makes before it writes a folder, and the one-writer lock.

``surgeon run``, ``merge``, ``transplant``, ``fuse`` and ``push`` all call
:func:`check_destination` (through the pipeline, :mod:`surgeon.api` or the
writer) before any work starts:

* the destination is a folder path, never a regular file, and its staging
  name (``.NAME.surgeon-partial``) fits the file system's name limit;
* it never holds an input of the run (a model folder, the recipe file, an eval
  text, the training data, the work folder) and is never inside an input
  folder; ``--overwrite`` does not change that;
* ``--overwrite`` replaces only a folder surgeon wrote: every output carries
  :data:`MARKER` (older outputs ``.surgeon-step.json``); an empty folder counts
  as nothing to lose.

:func:`destination_lock` is an advisory ``flock`` on ``.NAME.surgeon-lock``
beside the destination, held from the check to the end of the run (report and
push included), so a second run to the same place fails at once instead of
interleaving with the first. The lock file is removed when released.
See docs/reliability.md (Safety) and docs/architecture.md (Writer).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InvalidInputError

#: written into every folder the writer commits; how ``--overwrite`` recognises surgeon's own outputs
MARKER = ".surgeon-output.json"
_OLD_MARKERS = (".surgeon-step.json",)
_STAGING_SUFFIXES = (".surgeon-partial", ".surgeon-old", ".surgeon-lock", ".surgeon-work")


class DestinationError(InvalidInputError):
    """The output path cannot be written safely (exit 2, nothing touched)."""


def written_by_surgeon(folder: Path) -> bool:
    """Whether ``folder`` holds surgeon's output marker (or is empty: nothing to lose)."""
    if any((folder / m).is_file() for m in (MARKER, *_OLD_MARKERS)):
        return True
    try:
        return not any(os.scandir(folder))
    except OSError:
        return False


def _name_max(folder: Path) -> int:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return os.pathconf(p, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def check_destination(dest: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (),
                      *, overwrite: bool = False, exists_ok: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse (``DestinationError``, exit 2) a destination the run must not write; returns it resolved.

    ``inputs`` are ``(label, path)`` pairs: model folders, files (recipe, texts,
    data) and the work folder; ``None`` paths (hub models) are skipped.
    ``exists_ok`` lets a caller that resumes finished outputs itself accept an
    existing destination without ``overwrite`` (it must still be surgeon's to
    be replaced).
    """
    d = _abs(dest)
    name_max = _name_max(d.parent)
    longest = max(len(f".{d.name}{s}") for s in _STAGING_SUFFIXES)
    if len(os.fsencode(d.name)) > name_max - (longest - len(d.name)):
        raise DestinationError(f"{d}: the output name is {len(os.fsencode(d.name))} bytes; with surgeon's "
                               f"'.NAME.surgeon-partial' staging name it exceeds this file system's {name_max}-byte "
                               "limit; choose a shorter name")
    try:
        st = os.stat(d)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise DestinationError(f"{d}: cannot use as the output ({exc.strerror or exc})") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"{d}: is a file, not a folder; surgeon writes a checkpoint folder there (choose "
                               "another output path)")
    for parent in d.parents:
        if parent.exists() and not parent.is_dir():
            raise DestinationError(f"{d}: {parent} is a file, not a folder")
    for label, path in inputs:
        if path is None:
            continue
        p = _abs(path)
        if p == d or d in p.parents:
            raise DestinationError(f"{label} ({p}) is inside the destination {d}, which the run would replace; "
                                   "choose another output")
        if not p.is_file() and p in d.parents:  # a folder (or a work folder not made yet)
            raise DestinationError(f"the destination {d} is inside {label} ({p}); write outputs outside the run's "
                                   "inputs")
    if st is not None:
        if not overwrite and not exists_ok:
            raise DestinationError(f"{d}: already exists (pass {flag} to replace it)")
        if overwrite and not written_by_surgeon(d):
            raise DestinationError(f"{d}: exists and was not written by surgeon (no {MARKER}); {flag} replaces only "
                                   "surgeon's own outputs: remove it yourself or choose another output")
    return d


# -- one writer per destination ------------------------------------------------------------------------
_held: dict[Path, list[int]] = {}  # path -> [fd, depth]: re-entrant within this process
_held_lock = threading.Lock()


def lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.surgeon-lock"


def _acquire(path: Path, dest: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise DestinationError(f"{path}: cannot create the output lock ({exc.strerror or exc})") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no fcntl (Windows): no lock, as before
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                owner = ""
                with contextlib.suppress(OSError, ValueError):
                    owner = f" (process {int(path.read_text().strip())})"
                raise DestinationError(f"{dest}: another surgeon run is writing this output{owner}; wait for it "
                                       f"to finish or choose another output (lock: {path})") from None
            raise DestinationError(f"{path}: cannot lock ({exc.strerror or exc})") from None
        try:  # the holder before us may have removed the file after we opened it: lock the one on disk
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def destination_lock(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the advisory lock of ``dest`` (re-entrant in one process); a second process fails at once."""
    d = _abs(dest)
    path = lock_path(d)
    with _held_lock:
        entry = _held.get(d)
        if entry is not None:
            entry[1] += 1
        else:
            d.parent.mkdir(parents=True, exist_ok=True) if not d.parent.exists() else None
            _held[d] = [_acquire(path, d), 1]
    try:
        yield path
    finally:
        with _held_lock:
            entry = _held[d]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[d]
                with contextlib.suppress(OSError):
                    os.unlink(path)  # while still holding it: a waiter re-checks the inode (see _acquire)
                os.close(entry[0])


def check_push_folder(folder: Path) -> None:
    """Refuse to upload a folder holding a link that leads outside it, or a FIFO, device or socket.

    ``upload_folder`` follows links: a ``tokenizer_config.json -> ~/.cache/huggingface/token`` would
    publish the target. Each offender is named.
    """
    if not folder.is_dir():
        return  # hub.push names a missing folder itself
    base = folder.resolve()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            try:
                real = p.resolve()
                st = os.stat(p)
            except (OSError, RuntimeError) as exc:
                raise DestinationError(f"push: {p}: cannot read ({exc})") from None
            if real != base and base not in real.parents:
                raise DestinationError(f"push: {p} is a symlink to {real}, outside {folder}; surgeon does not "
                                       "upload files from outside the folder (replace the link by a copy if it "
                                       "is meant to be published)")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise DestinationError(f"push: {p} is not a regular file (a FIFO, device or socket); refusing to "
                                       "upload it")


def check_input_files(inputs: Iterable[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """Every existing input that is not a folder must be a regular file: a FIFO or device given as an
    eval text or training data would block the run (refused by name; see surgeon.io.safe_files)."""
    from .safe_files import check_regular

    for _label, path in inputs:
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            check_regular(path)
