"""scripts/mergekit_parity.py on a representative subset of mergekit's own test configs.

Each config runs through mergekit 0.1.5 (in process) and surgeon and must MATCH:
float32 relative max diff <= 1e-5 with the same names, shapes, config.json and
tokenizer, and 16-bit outputs equal to mergekit's float32 result rounded (within one
ulp), random methods within the script's statistical bounds. The full table (every
config) is docs/bench/mergekit_parity.md.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit)")
pytestmark = pytest.mark.mergekit

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mergekit_parity.py"
SUBSET = ["linear", "slerp", "dare_ties", "source_union", "pad_to_multiple_of", "orcamini-platy-44layer.yml",
          "ties.yml", "multimerge"]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("mergekit_parity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mergekit_parity"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def models(parity, tmp_path_factory):
    need = {"model_a", "model_b", "model_c", "tok_base", "tok_chatml", "tok_padded", "orca", "platy", "wizard",
            "wizmath", "llama2", "mistral", "bio"}
    return parity.build_models(tmp_path_factory.mktemp("parity-models"), only=need)


@pytest.mark.parametrize("name", SUBSET)
def test_config_matches_mergekit(name: str, parity, models, tmp_path: Path) -> None:
    (suite, _, template), = [c for c in parity.configs() if c[1] == name]
    status, detail = parity.run_one(suite, name, template, models, tmp_path)
    assert status == "MATCH", f"{name}: {status} {detail}"


def test_every_config_has_a_template_the_script_can_fill(parity) -> None:
    names = [c[1] for c in parity.configs()]
    assert len(names) == len(set(names)) and len(names) >= 60
