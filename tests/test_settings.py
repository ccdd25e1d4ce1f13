"""surgeon/settings.py: SURGEON_* read in one place, no side effects at import, threads restored."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon import settings
from surgeon.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[1]


def test_importing_surgeon_writes_nothing_to_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    code = "import os, surgeon; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_importing_surgeon_and_numba_leaves_the_cycle_collector_as_it_found_it() -> None:
    """The imports run with the collector off (they only create objects that live on), then
    restore it: on when it was on, off when the caller had turned it off, with numba too."""
    code = ("import gc, sys\n"
            "gc.disable() if sys.argv[1] == 'off' else None\n"
            "import surgeon\n"
            "from surgeon.merge.kernels._jit import numba_module\n"
            "numba_module()\n"
            "print(gc.isenabled(), 'numba' in sys.modules)")
    for state, want in (("on", "True True"), ("off", "False True")):
        out = subprocess.run([sys.executable, "-c", code, state], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != "SURGEON_NO_NUMBA"})
        assert out.stdout.strip() == want


def test_every_surgeon_variable_is_read_in_settings_only() -> None:
    """Other modules ask :func:`surgeon.settings.current`; the variables are documented there."""
    pattern = re.compile(r"""environ(?:\.get)?\s*[\[(]\s*["'](SURGEON_\w+)""")
    for path in (REPO / "surgeon").rglob("*.py"):
        if path.name == "settings.py":
            continue
        found = pattern.findall(path.read_text())
        assert not found, f"{path.relative_to(REPO)} reads {found}: use surgeon.settings.current()"
    doc = settings.__doc__ or ""
    for name in settings.VARIABLES:
        assert name in doc, name


def test_settings_follow_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SURGEON_COMPUTE_WORKERS", "3")
    monkeypatch.setenv("SURGEON_NO_NUMBA", "1")
    s = settings.current()
    assert s.compute_workers == 3 and s.no_numba
    monkeypatch.setenv("SURGEON_NO_NUMBA", "0")
    assert not settings.current().no_numba
    monkeypatch.setenv("SURGEON_COMPUTE_WORKERS", "many")
    with pytest.raises(InvalidInputError, match="SURGEON_COMPUTE_WORKERS"):
        settings.current()


def test_a_run_restores_torchs_thread_count(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  a: {tiny_family['ft1']}\n  b: {tiny_family['ft2']}\n"
                      "steps:\n  - id: m\n    merge: {method: linear, models: [a, b]}\n"
                      f"output: {{path: {tmp_path / 'out'}}}\n")
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    surgeon.run(recipe, quiet=True, threads=target)
    assert torch.get_num_threads() == before


def test_configure_process_is_offered_to_library_users() -> None:
    assert surgeon.configure_process is settings.configure_process
    before = torch.get_num_threads()
    try:
        done = settings.configure_process(threads=1, freeze_gc=False, keep_freed_memory=False, quiet_late_blas=False)
        assert done["threads"] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_quiet_late_blas_asks_one_thread_of_blas_loaded_later_unless_the_user_chose(monkeypatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert settings.configure_process(freeze_gc=False, keep_freed_memory=False)["quiet_late_blas"]
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert not settings.configure_process(freeze_gc=False, keep_freed_memory=False)["quiet_late_blas"]
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"


def test_numbas_import_then_loads_scipys_blas_with_one_thread_and_numpys_keeps_its_own() -> None:
    """The thread an OpenBLAS starts beside its caller busy-waits ~0.1 CPU-s after it loads:
    scipy's, loaded with numba's array maths as a merge starts, now starts none; numpy's (loaded with
    torch, before the CLI configures anything) is left as it was."""
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    code = ("import json, numpy; from threadpoolctl import threadpool_info\n"
            "def blas(): return {i['filepath']: i['num_threads'] for i in threadpool_info() if i['internal_api'] == 'openblas'}\n"
            "before = blas()\n"
            "from surgeon.settings import configure_process\n"
            "configure_process(freeze_gc=False, keep_freed_memory=False)\n"
            "import numba.np.arraymath\n"  # what a merge's first compiled loop imports (scipy.linalg with it)
            "after = blas()\n"
            "print(json.dumps({'late': [n for f, n in after.items() if f not in before], "
            "'early_kept': all(after[f] == n for f, n in before.items())}))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["late"] == [1] and got["early_kept"], got


# --------------------------------------------------------------------------- exit_process
_EXIT_PROGRAM = """
import atexit, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from surgeon.settings import exit_process

report = Path(sys.argv[1])
folder = tempfile.TemporaryDirectory()           # removed by weakref.finalize at exit
Path(folder.name, "f").write_text("x")
report.write_text(folder.name + "\\n")
pool = ThreadPoolExecutor(max_workers=1)         # an idle worker never shut down: must not hang the exit
pool.submit(lambda: None).result()

def late():
    time.sleep(0.3)
    with report.open("a") as fh:
        fh.write("thread finished\\n")

threading.Thread(target=late).start()           # non-daemon: waited for, as by sys.exit
atexit.register(lambda: report.open("a").write("atexit ran\\n"))
sys.stdout.write("y" * 200_000)                 # buffered: flushed before leaving
exit_process(int(sys.argv[2]))
"""


@pytest.mark.parametrize("full", ["", "1"])
def test_exit_process_keeps_everything_a_normal_exit_does(tmp_path: Path, full: str) -> None:
    env = {**os.environ, "SURGEON_FULL_EXIT": full}
    report = tmp_path / "report.txt"
    r = subprocess.run([sys.executable, "-c", _EXIT_PROGRAM, str(report), "7"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 7, r.stderr
    assert r.stdout == "y" * 200_000
    lines = report.read_text().splitlines()
    assert lines[1:] == ["thread finished", "atexit ran"]  # threads first, then atexit: CPython's order
    assert not Path(lines[0]).exists()


def test_exit_process_skips_the_interpreters_teardown(tmp_path: Path) -> None:
    """The one difference: objects are not finalised module by module (what costs ~0.5 s with torch loaded)."""
    code = ("import sys\nfrom surgeon.settings import exit_process\n"
            "class Loud:\n    def __del__(self):\n        print('torn down', flush=True)\n"
            "keep = Loud()\nexit_process(0)\n")
    quick = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "SURGEON_FULL_EXIT": ""})
    full = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SURGEON_FULL_EXIT": "1"})
    assert (quick.returncode, quick.stdout) == (0, "")
    assert (full.returncode, full.stdout) == (0, "torn down\n")


def test_the_command_exits_with_mains_code_through_exit_process(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    for argv, code in ((["-m", "surgeon", "inspect", str(missing)], 2), (["-m", "surgeon", "--version"], 0),
                       (["-m", "surgeon", "inspect", "--no-such-flag"], 2)):
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == code, (argv, r.stderr)
    r = subprocess.run([sys.executable, "-m", "surgeon", "--version"], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("surgeon ")


# --------------------------------------------------------------------------- allocator
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trimming_the_heap_starts_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine trims malloc's heaps once a tensor: a lookup of the C library that ran
    ``ldconfig`` in a child (ctypes.util.find_library) forked the whole merge each time."""
    from surgeon import allocator

    if getattr(allocator._libc(), "malloc_trim", None) is None:  # loaded once, before the watch
        pytest.skip("not glibc: no malloc_trim")

    def no_child(*a: object, **k: object) -> None:
        raise AssertionError("the allocator started a process")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    monkeypatch.setattr(os, "fork", no_child)
    for _ in range(3):
        assert allocator.release_free_memory()
    assert allocator._libc() is allocator._libc()


def test_the_heap_is_trimmed_only_once_it_grew_past_the_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trim hands every free page back and the next allocations fault them in again, so the
    engine's per-tensor trim happens only once anonymous memory grew by more than the slack
    since the last trim; each trim moves the mark to the level after it."""
    from surgeon import allocator

    level = [100 << 20]
    trims: list[int] = []
    monkeypatch.setattr(allocator, "anon_bytes", lambda: level[0])

    def trim() -> bool:
        trims.append(level[0])
        level[0] -= 10 << 20  # what the trim handed back
        return True

    monkeypatch.setattr(allocator, "release_free_memory", trim)
    heap = allocator.HeapTrim(slack=64 << 20)
    level[0] += 64 << 20
    assert not heap() and trims == []            # grown by the slack exactly: no trim
    level[0] += 1
    assert heap() and len(trims) == 1            # past it: trimmed
    level[0] += 60 << 20
    assert not heap() and len(trims) == 1        # measured from the level after the trim
    level[0] += 20 << 20
    assert heap() and len(trims) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
def test_anonymous_memory_is_measured() -> None:
    import numpy as np

    from surgeon import allocator

    before = allocator.anon_bytes()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    grown = allocator.anon_bytes()
    assert before is not None and grown is not None and grown - before > 48 << 20
    del block


_NUMBA_SETUP = """
import json, sys
import numpy as np
from surgeon import settings
if sys.argv[1] == "cli":
    settings.configure_process(freeze_gc=False, keep_freed_memory=False)
from surgeon.merge.kernels._jit import numba_module
from surgeon.merge.select.counting import select_patterns_compiled
numba_module()
import numba.np.arraymath
seen = "scipy.linalg" in sys.modules
values = select_patterns_compiled(np.array([5, 1, 4, 1, 3], dtype=np.uint32), [0, 2, 4])
import scipy.linalg.cython_blas  # importable as usual afterwards
print(json.dumps({"blas": numba.np.arraymath._HAVE_BLAS, "scipy_seen": seen, "values": values}))
"""


@pytest.mark.parametrize("configured", [True, False])
def test_the_cli_sets_numba_up_without_scipys_blas_and_library_users_keep_it(configured: bool) -> None:
    """configure_process (the CLI's) lets numba start without importing scipy.linalg (~0.2 s
    before a merge's first piece; surgeon's loops call no BLAS): the loops still run, scipy
    still imports afterwards. Without it (a library user's process) numba is left as it is."""
    pytest.importorskip("scipy")
    done = subprocess.run([sys.executable, "-c", _NUMBA_SETUP, "cli" if configured else "library"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["values"] == [1, 3, 5]
    assert got["blas"] is (not configured) and got["scipy_seen"] is (not configured), got
