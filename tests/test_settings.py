"""surgeon/settings.py: SURGEON_* read in one place, no side effects at import, threads restored."""
from __future__ import annotations

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
        done = settings.configure_process(threads=1, freeze_gc=False, keep_freed_memory=False)
        assert done["threads"] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
