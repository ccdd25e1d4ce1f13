"""Coverage-guided fuzzing of surgeon's untrusted-input parsers with atheris (libFuzzer).

    pip install atheris
    python scripts/fuzz_atheris.py header -atheris_runs=100000
    python scripts/fuzz_atheris.py recipe -atheris_runs=100000 [CORPUS_DIR ...]

Targets:

- ``header``: ``surgeon.io.header.parse_header_bytes`` on the input bytes (the first 8 bytes are the
  header length, as in a file; the claimed file size is derived from the input). Only
  ``CheckpointError`` may escape, and an accepted header must describe a consistent layout.
- ``recipe``: ``surgeon.recipe.load.load_recipe_text`` on the input decoded as UTF-8 (invalid bytes
  replaced). Only ``RecipeError`` may escape.

Any other exception is a finding: atheris prints it with the input and writes ``crash-*`` files.
Seeds: with no corpus folder given, a few valid headers and recipes are used (written to a temporary
folder), so mutation starts from real structure. The remaining arguments go to libFuzzer
(``-max_total_time=600``, ``-jobs=2``, ...). ``tests/test_fuzz.py`` runs the same properties with
hypothesis at a small fixed budget in the normal test suite.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # noqa: F401  (imported first so that only surgeon and PyYAML get instrumented, not torch)

with atheris.instrument_imports(include=["surgeon", "yaml"]):
    import yaml  # noqa: F401  (the recipe loader spends its time in PyYAML)

    from surgeon.errors import CheckpointError, RecipeError
    from surgeon.io.header import dtype_size, parse_header_bytes
    from surgeon.recipe.load import load_recipe_text

SEED_RECIPES = [
    """name: seed
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
    transplant: {model: m1, donor: c, method: omp, k: 64}
output: {from: m2, path: ./out, max_shard_size: 2GB, push: {repo: org/x, private: true}}
eval: {texts: {prose: ./t.txt}}
""",
    """merge_method: dare_ties
base_model: org/base
models:
  - model: org/math
    parameters: {weight: 0.5, density: 0.7}
parameters: {int8_mask: true}
dtype: bfloat16
tokenizer: {source: base}
""",
    "a: &a [1, 2]\nb: [*a, *a]\nc: {<<: {x: 1}}\nd: !!binary aGk=\ne: 2020-01-01\n",
]


def _seed_headers() -> list[bytes]:
    from surgeon.io.writer import TensorSpec, _header_bytes

    out = []
    for specs in (
        [TensorSpec("w", (2, 3), torch.float32)],
        [TensorSpec("model.embed_tokens.weight", (4, 2), torch.bfloat16), TensorSpec("b", (3,), torch.int64),
         TensorSpec("empty", (0, 5), torch.float16)],
    ):
        header, _ = _header_bytes(specs, {"format": "pt"})
        out.append(header + b"\0" * sum(s.nbytes for s in specs))
    return out


def fuzz_header(data: bytes) -> None:
    try:
        header = parse_header_bytes(data, len(data), "f.safetensors")
    except CheckpointError:
        return
    data_len = len(data) - header.data_start
    spans = []
    for e in header.entries.values():
        assert 0 <= e.start <= e.end <= data_len, e
        assert e.nbytes == math.prod(e.shape) * dtype_size(e.dtype), e
        if e.nbytes:
            spans.append((e.start, e.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def fuzz_recipe(data: bytes) -> None:
    try:
        load_recipe_text(data.decode("utf-8", errors="replace"), "r.yaml", base_dir="/nonexistent")
    except RecipeError:
        return


TARGETS = {"header": (fuzz_header, _seed_headers), "recipe": (fuzz_recipe, lambda: [s.encode() for s in SEED_RECIPES])}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {'|'.join(TARGETS)} [libFuzzer options] [CORPUS_DIR ...]")
    fn, seeds = TARGETS[argv[1]]
    args = [argv[0], *argv[2:]]
    if not any(not a.startswith("-") for a in argv[2:]):  # no corpus folder: start from seeds
        corpus = Path(tempfile.mkdtemp(prefix=f"surgeon-fuzz-{argv[1]}-"))
        for i, s in enumerate(seeds()):
            (corpus / f"seed{i}").write_bytes(s)
        args.append(str(corpus))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    atheris.Setup(args, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
