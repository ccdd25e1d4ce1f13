"""The header parser accepts exactly what the safetensors library accepts (issue 15, item 9).

The generator is scripts/fuzz_crosscheck.py's (structured headers, perturbed offsets, shapes, dtypes,
names and metadata, byte mutations); hypothesis drives its random choices. Surgeon may only be
stricter where docs/reliability.md says so (dtypes it does not merge, duplicate names, dimensions
torch cannot index, more than MAX_TENSORS tensors).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location(
    "fuzz_crosscheck", Path(__file__).resolve().parents[1] / "scripts" / "fuzz_crosscheck.py")
assert _spec is not None and _spec.loader is not None
crosscheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crosscheck)


@settings(max_examples=int(os.environ.get("SURGEON_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_header_parser_agrees_with_the_safetensors_library(rnd) -> None:
    raw = crosscheck.case(rnd)
    verdict = crosscheck.classify(raw)
    assert not verdict.startswith("MISMATCH"), f"{verdict}: {raw[:300]!r}"


def test_the_crosscheck_tells_a_gap_apart() -> None:
    """The check can fail: a file with a gap the library rejects is rejected by surgeon too."""
    body = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    raw = len(body).to_bytes(8, "little") + body + b"\0" * 8
    assert not crosscheck.library_accepts(raw) and crosscheck.classify(raw) == "both reject"
