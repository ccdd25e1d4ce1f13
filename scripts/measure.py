"""Run a command and measure its wall time and peak RSS honestly.

Linux keeps a process's peak-RSS mark across fork and exec, so a child
forked from a benchmark that has imported torch reports at least the parent's
peak. We therefore launch through GNU time (``/usr/bin/time -f %M``), a small
process, and read the child's own peak from it; without GNU time we fall back
to ``wait4`` and say so.
"""
from __future__ import annotations

import os
import platform
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


def host() -> dict[str, object]:
    """What the numbers were measured on: CPU model, its widest x86 vector extension
    (compiled loops run ~2x slower on an AVX2-only host than on an AVX-512 one),
    logical CPUs and the OS. Linux reads /proc/cpuinfo; elsewhere the model is
    platform's guess and the vector extension unknown."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    simd = next((name for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sse4.2", "sse4_2"))
                 if flag in flags), "unknown")
    return {"cpu": model, "simd": simd, "cpus": os.cpu_count(), "os": f"{platform.system()} {platform.release()}"}
