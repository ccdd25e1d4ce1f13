"""Property tests (fixed budgets) on the two parsers that take untrusted input.

- ``surgeon.io.header.parse_header_bytes``: random bytes, random JSON headers and mutated valid
  headers may only raise :class:`CheckpointError`; whatever it accepts is a consistent layout.
- ``surgeon.recipe.load.load_recipe_text``: random YAML-ish text, random structures and mutated
  valid recipes may only raise :class:`SurgeonError` (``RecipeError`` in practice).

Longer runs: ``python scripts/fuzz_atheris.py header|recipe -atheris_runs=100000``.
"""
from __future__ import annotations

import json
import math
import os

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from surgeon.errors import CheckpointError, RecipeError, SurgeonError
from surgeon.io.header import DTYPES, dtype_size, parse_header_bytes
from surgeon.io.writer import TensorSpec, _header_bytes
from surgeon.recipe.load import load_recipe_text

# a fixed budget per property (SURGEON_FUZZ_EXAMPLES=20000 for a longer soak)
FUZZ = settings(max_examples=int(os.environ.get("SURGEON_FUZZ_EXAMPLES", 200)), deadline=None,
                suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------- safetensors headers
def _parse(raw: bytes, file_size: int) -> None:
    try:
        header = parse_header_bytes(raw, file_size, "f.safetensors")
    except CheckpointError as exc:
        assert str(exc).startswith("f.safetensors: ")
        return
    # accepted: every tensor lies inside the data section, has the bytes its shape needs, none overlap
    data_len = file_size - header.data_start
    spans = []
    for e in header.entries.values():
        assert 0 <= e.start <= e.end <= data_len
        assert e.nbytes == math.prod(e.shape) * dtype_size(e.dtype)
        if e.nbytes:
            spans.append((e.start, e.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 1 << 40))
@example(b"", 0)
@example((2**64 - 1).to_bytes(8, "little"), 2**64)
@example((10).to_bytes(8, "little") + b"[" * 10, 18)
def test_header_random_bytes(raw: bytes, file_size: int) -> None:
    _parse(raw, file_size)


def _with_length(body: bytes) -> bytes:
    return len(body).to_bytes(8, "little") + body


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(DTYPES) + ["F7", "", "f32"]) | _json,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | _json,
    },
)


@FUZZ
@given(st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), _entry | _json, max_size=5),
       st.integers(-8, 96))
def test_header_random_json(header: dict, extra: int) -> None:
    raw = _with_length(json.dumps(header).encode())
    _parse(raw, max(0, len(raw) + extra))


_specs = st.lists(
    st.builds(TensorSpec, st.text(min_size=1, max_size=6),
              st.lists(st.integers(0, 5), max_size=3).map(tuple), st.sampled_from(sorted(set(DTYPES.values()), key=str))),
    min_size=1, max_size=5, unique_by=lambda s: s.name,
)


@FUZZ
@given(_specs, st.data())
def test_header_mutated_valid(specs: list[TensorSpec], data: st.DataObject) -> None:
    header, _ = _header_bytes(specs, {"format": "pt"})
    size = len(header) + sum(s.nbytes for s in specs)
    parsed = parse_header_bytes(header, size, "f.safetensors")  # the writer's own headers parse
    assert {n: (e.shape, e.dtype) for n, e in parsed.entries.items()} == {s.name: (s.shape, s.dtype) for s in specs}
    raw = bytearray(header)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate", "length"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete" and raw:
            del raw[i]
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "truncate":
            del raw[i:]
        elif op == "length":
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    _parse(bytes(raw), data.draw(st.integers(0, size + 64)))


# --------------------------------------------------------------------------- recipes
def _load(text: str) -> None:
    try:
        load_recipe_text(text, "r.yaml", base_dir="/nonexistent")
    except SurgeonError as exc:
        assert isinstance(exc, RecipeError), exc
        assert str(exc).startswith("r.yaml"), exc


_pieces = st.sampled_from(
    list("ab:- \n\t[]{},&*!?|>'\"#%@`01.~<=\\") + [
        "models", "steps", "output", "merge", "id", "method", "linear", "ties", "base", "weight", "merge_method",
        "!!int ", "!!float ", "!!binary ", "!!set ", "!!python/object/apply:os.system ", "2020-13-45", "<<: ", "&a ",
        "*a", "---\n", "...\n", ".nan", ".inf", "9" * 5000, "\u2028", "\x00", "\ud800"[:0] + "\x85",
    ]
)


@FUZZ
@given(st.lists(_pieces, max_size=60).map("".join))
@example("a: &a [*a]")
@example("!!int ")
@example("name: !!python/object/apply:os.system [echo hi]")
def test_recipe_random_text(text: str) -> None:
    _load(text)


_keys = st.sampled_from([
    "name", "seed", "models", "steps", "output", "eval", "id", "merge", "transplant", "fuse", "method", "base", "model",
    "weight", "density", "parameters", "dtype", "tokenizer_source", "vocab", "path", "from", "max_shard_size", "push",
    "repo", "texts", "merge_method", "base_model", "tokenizer", "source", "lambda", "k", "donor", "pivot", "sources",
    "data", "filter", "value", "slices", "out_dtype",
])
_scalars = (st.none() | st.booleans() | st.integers(-3, 10**30) | st.floats() | st.text(max_size=6)
            | st.sampled_from(["linear", "ties", "task_arithmetic", "a", "b", "s", "base", "float32", "align", "../x",
                               "hf://a/b", "..", "org/name@rev", "5GB"]))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(_keys | st.text(max_size=3), c,
                                                                                     max_size=4), max_leaves=25)


@FUZZ
@given(st.dictionaries(_keys, _values, max_size=6))
@example({"models": {"\r": None}, "name": None})  # a key that does not print: one error line, escaped
def test_recipe_random_structures(data: dict) -> None:
    _load(yaml.safe_dump(data, allow_unicode=True))


VALID = """\
name: fuzz
seed: 1
models: {base: ./b, a: ./a, c: org/c@main}
steps:
  - id: m1
    merge:
      method: ties
      base: base
      models:
        - {model: a, weight: [0.2, 1.0], density: 0.5}
        - model: c
          density:
            - {filter: self_attn, value: 0.3}
            - {value: 0.6}
      parameters: {lambda: 1.0}
      dtype: bfloat16
  - id: m2
    merge: {method: linear, models: [m1, a]}
output: {from: m2, path: ./out, max_shard_size: 2GB}
"""


@FUZZ
@given(st.data())
def test_recipe_mutated_valid(data: st.DataObject) -> None:
    load_recipe_text(VALID, "r.yaml", base_dir="/nonexistent")
    text = VALID
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        piece = data.draw(_pieces | st.text(max_size=3))
        n = data.draw(st.integers(1, 8))
        text = text[:i] + (piece if op != "delete" else "") + text[i + (n if op != "insert" else 0):]
    _load(text)
