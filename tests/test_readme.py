"""The README's Python block runs as written, from a folder laid out like the repository."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_block_runs(tmp_path, capsys, monkeypatch):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks, "the README has no python block"
    (tmp_path / "zoo").symlink_to(REPO / "zoo")
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "m" / "changemap.png").is_file() or "pip install" in out
    assert "bits per byte" in out and "on 4096 tokens" in out
    sample = out.split("KING RICHARD II:")[-1]
    words = re.findall(r"[a-z]{3,}", sample.lower())
    vocab = set(re.findall(r"[a-z]{3,}", (REPO / "zoo" / "data" / "shakespeare" / "train.txt").read_text().lower()))
    known = [w for w in words if w in vocab]
    # a person recognises it: mostly real words of the domain, not a run of newlines
    assert len(known) >= 8 and len(known) >= 0.6 * len(words), (sample, known)
    assert os.path.isdir(tmp_path / "out" / "m")
