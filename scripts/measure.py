"""Run a command and measure its wall time and peak RSS honestly.

Linux keeps a process's peak-RSS mark across fork and exec, so a child
forked from a benchmark that has imported torch reports at least the parent's
peak. We therefore launch through GNU time (``/usr/bin/time -f %M``), a small
process, and read the child's own peak from it; without GNU time we fall back
to ``wait4`` and say so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Measured:
    wall_s: float
    peak_rss_bytes: int
    exit_code: int
    stderr_tail: str
    method: str
    cpu_s: float = 0.0  # user + system time of the command and its children (wait4)


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Measured:
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        if gnu_time:
            full = [gnu_time, "-q", "-f", "%M", "-o", rss_file.name, *cmd]
        else:
            full = cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        code = os.waitstatus_to_exitcode(status)
        if gnu_time:
            text = rss_file.read().strip().splitlines()
            kib = int(text[-1]) if text and text[-1].isdigit() else 0
            return Measured(wall, kib * 1024, code, err[-2000:], "GNU time %M", usage.ru_utime + usage.ru_stime)
    print("warning: /usr/bin/time not found; peak RSS from wait4 includes this process's own peak", file=sys.stderr)
    return Measured(wall, usage.ru_maxrss * 1024, code, err[-2000:], "wait4", usage.ru_utime + usage.ru_stime)
