"""Every command-line value checked before any work starts (called by :mod:`surgeon.cli`).

Each problem is one :class:`~surgeon.errors.InvalidInputError` naming the flag
(exit 2): a thread count the machine cannot run, a device that is not there or
cannot compute, a ``--set``/``--model`` value YAML cannot build or that is not a
plain number, string, list or mapping. See docs/reliability.md (bad options).
"""
from __future__ import annotations

import math
import os
from typing import Any

from .errors import InvalidInputError

#: the most arithmetic/reader threads accepted per CPU core (more only thrash; 100 000 crashed the process)
THREADS_PER_CORE = 8
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map")}


def max_threads() -> int:
    """The largest ``--threads`` accepted: :data:`THREADS_PER_CORE` per usable core, at least 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(64, THREADS_PER_CORE * cores)


def check_threads(value: int | None, flag: str = "--threads") -> None:
    if value is None:
        return
    top = max_threads()
    if value < 1 or value > top:
        raise InvalidInputError(f"{flag} {value}: must be between 1 and {top} on this machine "
                                f"({THREADS_PER_CORE} per CPU core, at least 64)")


def check_device(value: str | None, flag: str = "--device", allow_auto: bool = False) -> None:
    """Refuse a device torch cannot parse, cannot compute on (``meta``), or that this machine lacks."""
    if value is None or (allow_auto and value == "auto"):
        return
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{flag} {value}: not a device ({str(exc).splitlines()[0]}); use cpu, cuda or "
                                "cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"{flag} {value}: no CUDA device is available to torch on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                    f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidInputError(f"{flag} {value}: no Apple MPS device is available to torch on this machine")
        return
    if dev.type == "meta":
        raise InvalidInputError(f"{flag} meta: the meta device holds no values, so nothing can be computed on it; "
                                "use cpu or cuda")
    raise InvalidInputError(f"{flag} {value}: surgeon runs on cpu, cuda or mps, not {dev.type}")


def parse_option_value(text: str, option: str) -> Any:
    """A ``--set KEY=VALUE`` (or ``--model PATH:key=value``) value read as YAML: a number, string, bool,
    null, list or mapping. Anything else (a date, a tag, broken YAML) is refused naming ``option``."""
    import yaml

    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(f"{option}: cannot read the value {text!r} ({why})")

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise bad(f"not valid YAML: {problem}") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    if node is None:
        return None
    stack, seen = [node], 0
    while stack:
        n = stack.pop()
        seen += 1
        if seen > 10_000:
            raise bad("more than 10000 values")
        if n.tag not in _PLAIN_TAGS:
            kind = "a date" if n.tag.endswith(":timestamp") else f"tag {n.tag!r}"
            raise bad(f"{kind} is not a number, string, list or mapping")
        if isinstance(n, yaml.SequenceNode):
            stack += n.value
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack += [k, v]
    try:
        value = yaml.load(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise bad(str(exc).splitlines()[0]) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise bad("not a finite number")
    return value


def _positive(args: Any, name: str, flag: str, minimum: float = 1) -> None:
    v = getattr(args, name, None)
    if isinstance(v, str):  # a word the option's own parser accepted ('auto')
        return
    if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= minimum):
        raise InvalidInputError(f"{flag} {v}: must be at least {minimum:g}")


def check_args(args: Any) -> None:
    """Check every value of a parsed command line before the command does any work."""
    check_threads(getattr(args, "threads", None))
    check_report_path(getattr(args, "report", None))
    max_bytes = getattr(args, "max_bytes", None)
    if isinstance(max_bytes, str):
        from .io.writer import parse_size

        try:
            args.max_bytes = parse_size(max_bytes)
        except InvalidInputError as exc:
            raise InvalidInputError(f"--max-bytes {max_bytes}: {exc}") from None
    if hasattr(args, "device"):
        check_device(args.device, allow_auto=getattr(args, "command", "") == "fuse")
    for name in ("k", "batch_size", "steps", "max_length", "top_k", "screen", "top"):
        _positive(args, name, "--" + name.replace("_", "-"))
    _positive(args, "max_tokens", "--max-tokens", minimum=0)  # 0: the whole text
    for name in ("epochs", "lr"):
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise InvalidInputError(f"--{name} {v}: must be a positive number")
    lam = getattr(args, "lambda_", None)
    if lam is not None and not (math.isfinite(lam) and 0 <= lam <= 1):
        raise InvalidInputError(f"--lambda {lam}: must be between 0 and 1")


def check_report_path(path: str | None) -> None:
    """``--report FILE`` must be a file path whose folder can be written (checked before the run)."""
    if not path:
        return
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise InvalidInputError(f"--report {path}: is a folder; give a file name such as {os.path.join(path, 'report.json')}")
    parent = os.path.dirname(p)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InvalidInputError(f"--report {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"--report {path}: the folder {parent} is not writable")


def write_report_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``.tmp`` then rename); on any failure remove the ``.tmp``
    and raise one error naming the file (the run itself is complete by then: exit 3)."""
    from pathlib import Path

    from .errors import StepError

    check_report_path(path)
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise StepError(f"--report {path}: cannot write the report ({exc.strerror or exc}); the run itself "
                        "finished") from None
