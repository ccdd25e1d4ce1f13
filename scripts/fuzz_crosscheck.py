"""Cross-check surgeon's safetensors header parser against the safetensors library.

Every generated file is given to both ``surgeon.io.header.parse_header_bytes`` and
``safetensors.deserialize``; the two must agree on accepting it. The only
disagreements allowed are the documented ones where surgeon is stricter on purpose
(docs/reliability.md, Fuzzing): a dtype surgeon does not merge (U16, U32, U64,
F8_E8M0, ...), a tensor name listed twice with the same entry, a dimension torch
cannot index (> 2^63-1), or more than ``MAX_TENSORS`` tensors. Any other
disagreement is printed and makes the exit status 1.

    python scripts/fuzz_crosscheck.py [CASES] [SEED]      # default 20000 cases, seed 0

Cases come from :func:`case`: structured headers (valid tilings, then perturbed
offsets, shapes, dtypes, names, metadata, padding, trailing data) and byte-level
mutations of valid files. tests/test_fuzz_crosscheck.py runs the same generator
under hypothesis.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}
LIBRARY_ONLY = {"U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "C64": 8}  # the library knows them; surgeon refuses
NAMES = ["w", "model.layers.0.mlp.up_proj.weight", "a\nb", "é", "\u2581x", "", " ", "__metadata__", "\ud800",
         "x" * 300, "0", "a.b", "\t"]


def _entries(rnd: random.Random) -> list[tuple[str, dict]]:
    out = []
    pos = 0
    for i in range(rnd.choice([0, 1, 1, 2, 3, 5])):
        dtype = rnd.choice(list(SIZES) * 4 + list(LIBRARY_ONLY) + ["F7", "f32", 3, None])
        size = SIZES.get(dtype, LIBRARY_ONLY.get(dtype, 1)) if isinstance(dtype, str) else 1
        shape = [rnd.choice([0, 1, 2, 3, 4]) for _ in range(rnd.choice([0, 1, 1, 2, 3]))]
        n = size
        for d in shape:
            n *= d
        name = rnd.choice(NAMES) if rnd.random() < 0.3 else f"t{i}"
        out.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}))
        pos += n
    return out


def _perturb(rnd: random.Random, entries: list[tuple[str, dict]]) -> None:
    if not entries:
        return
    name, e = rnd.choice(entries)
    what = rnd.randrange(12)
    if what == 0:
        e["data_offsets"][0] += rnd.choice([-1, 1, 4])
    elif what == 1:
        e["data_offsets"][1] += rnd.choice([-1, 1, 4, 2**64])
    elif what == 2:
        e["shape"].append(rnd.choice([0, 2, 2**63, 2**63 - 1, 2**64, 10**30, -1]))
    elif what == 3:
        e["shape"] = rnd.choice([None, "2", [2.0], [True], {}, [[2]]])
    elif what == 4:
        e["data_offsets"] = rnd.choice([None, [0], [0, 1, 2], ["0", "8"], [8, 0], [-8, 0], [0.0, 8.0]])
    elif what == 5:
        e["dtype"] = rnd.choice(["F7", "", "BF16 ", 1, None, "U16", "F8_E8M0", "U64"])
    elif what == 6:
        e.pop(rnd.choice(["dtype", "shape", "data_offsets"]))
    elif what == 7:
        e["extra"] = rnd.choice([1, "x", None, []])
    elif what == 8:
        entries.append((name, dict(e, data_offsets=list(e["data_offsets"]), shape=list(e["shape"]))))  # duplicate
    elif what == 9:
        entries.append((name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}))  # duplicate, other entry
    elif what == 10:
        e["shape"] = [0, rnd.choice([2**63 - 1, 2**63, 2**64 - 1])]
        e["data_offsets"][1] = e["data_offsets"][0]
    else:
        entries.remove((name, e))


def _dump(rnd: random.Random, entries: list[tuple[str, dict]], metadata: object) -> bytes:
    parts = []
    if metadata is not _MISSING:
        parts.append(json.dumps("__metadata__") + ":" + json.dumps(metadata))
    for name, e in entries:
        parts.append(json.dumps(name) + ":" + json.dumps(e))
    rnd.shuffle(parts)
    text = "{" + ",".join(parts) + "}"
    if rnd.random() < 0.1:
        text = rnd.choice([" ", "\n", "\t"]) + text
    if rnd.random() < 0.2:
        text += rnd.choice([" ", "  ", "\n", "\0", "x", "}"])
    body = text.encode("utf-8", "surrogatepass")
    if rnd.random() < 0.5:
        body += b" " * (-len(body) % 8)
    return body


_MISSING = object()


def case(rnd: random.Random) -> bytes:
    """One file's bytes (8-byte length, header, data)."""
    entries = _entries(rnd)
    data_len = max([e["data_offsets"][1] for _, e in entries], default=0)
    if rnd.random() < 0.5:
        for _ in range(1 + (rnd.random() < 0.3)):
            try:
                _perturb(rnd, entries)
            except (TypeError, AttributeError, KeyError, ValueError, IndexError):
                pass  # an earlier perturbation changed the entry's shape: keep what we have
    metadata = rnd.choice([_MISSING] * 6 + [{"format": "pt"}, {}, None, {"a": 1}, [], "x", {"a": None},
                                            {"\ud800": "x"}, {"format": ["pt"]}])
    body = _dump(rnd, entries, metadata)
    data = bytes(rnd.randrange(256) for _ in range(min(data_len, 64))) + b"\0" * max(0, data_len - 64)
    tail = rnd.choice([b""] * 8 + [b"\0", b"\0" * 4, b"junk"])
    length = len(body)
    if rnd.random() < 0.05:
        length = rnd.choice([0, 1, len(body) - 1, len(body) + 1, 2**62, len(body) + len(data)])
    raw = length.to_bytes(8, "little") + body + data + tail
    if rnd.random() < 0.15:  # byte-level mutations
        b = bytearray(raw)
        for _ in range(rnd.randrange(1, 4)):
            if b:
                b[rnd.randrange(len(b))] = rnd.randrange(256)
        raw = bytes(b)
    if rnd.random() < 0.02:
        raw = raw[: rnd.randrange(len(raw) + 1)]
    return raw


def surgeon_accepts(raw: bytes) -> bool:
    from surgeon.errors import CheckpointError
    from surgeon.io.header import parse_header_bytes

    try:
        parse_header_bytes(raw, len(raw), "fuzz.safetensors")
    except CheckpointError:
        return False
    return True


def library_accepts(raw: bytes) -> bool:
    from safetensors import deserialize

    try:
        deserialize(raw)
    except Exception:  # noqa: BLE001 - SafetensorError, and whatever else the library raises on a bad header
        return False
    return True


def surgeon_stricter_by_design(raw: bytes) -> str | None:
    """Why surgeon may refuse a file the library accepts (None: no documented reason)."""
    from surgeon.io.header import MAX_DIM, MAX_TENSORS

    n = int.from_bytes(raw[:8], "little")
    pairs: list[tuple[str, object]] = []
    try:
        json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=lambda p: pairs.extend(p) or dict(p))
    except (ValueError, RecursionError):
        return None
    top = [k for k, v in pairs if isinstance(v, dict) and "data_offsets" in v]
    if len(top) != len(set(top)):
        return "duplicate name"
    if len(top) > MAX_TENSORS:
        return "too many tensors"
    for _, v in pairs:
        if isinstance(v, dict):
            if v.get("dtype") in LIBRARY_ONLY:
                return f"dtype {v['dtype']}"
            if any(isinstance(d, int) and d > MAX_DIM for d in v.get("shape") or []):
                return "dimension beyond 2^63-1"
    return None


def classify(raw: bytes) -> str:
    """'both accept', 'both reject', 'stricter: <reason>' or 'MISMATCH: <which>'."""
    ours, theirs = surgeon_accepts(raw), library_accepts(raw)
    if ours == theirs:
        return "both accept" if ours else "both reject"
    if theirs and not ours:
        why = surgeon_stricter_by_design(raw)
        if why:
            return f"stricter: {why}"
        return "MISMATCH: only the library accepts"
    return "MISMATCH: only surgeon accepts"


def main(argv: list[str]) -> int:
    cases = int(argv[1]) if len(argv) > 1 else 20000
    seed = int(argv[2]) if len(argv) > 2 else 0
    rnd = random.Random(seed)
    counts: dict[str, int] = {}
    bad = 0
    for i in range(cases):
        raw = case(rnd)
        c = classify(raw)
        counts[c] = counts.get(c, 0) + 1
        if c.startswith("MISMATCH") and bad < 10:
            bad += 1
            print(f"case {i}: {c}: {raw[:300]!r}")
    for c in sorted(counts):
        print(f"{counts[c]:>8}  {c}")
    print(f"{cases} cases, seed {seed}")
    return 1 if any(c.startswith("MISMATCH") for c in counts) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
