"""Token matching across tokenizer families, by the bytes each token stands for.

Two tokenizers rarely spell the same token the same way: byte-level BPE
(GPT-2, Llama 3, Qwen, SmolLM) writes a word-start space as ``Ġ`` and every
non-ASCII byte as some other printable character; SentencePiece-style
tokenizers (Llama 2, Gemma, Mistral) write the space as ``▁`` and fall back to
``<0x41>``-style byte tokens; WordPiece marks continuations with ``##``.
Comparing the raw strings therefore misses most of the overlap (``Ġthe`` vs
``▁the``) and silently mismatches non-ASCII text.

This module decodes every token to the exact byte string it inserts into the
text and matches tokens by those bytes. Special tokens live in their own
namespace: ``bos``/``eos``/``unk``/``pad`` are matched by role (the donor's
``<|im_start|>``-as-bos gets the base's ``<bos>``), other special tokens by their
exact text. The result, :class:`VocabMatch`, says for every donor id which base
id (if any) has the same meaning, with counts and warnings (for example when
one tokenizer splits numbers into single digits and the other does not).

Everything here reads ``tokenizer.json`` with the ``tokenizers`` library (fast,
no transformers import); a folder with only ``tokenizer.model`` or
``vocab.json`` is converted through transformers' ``AutoTokenizer``.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidInputError

ROLES = ("bos", "eos", "unk", "pad")  # priority when one token has several roles
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_DIGIT_PROBE = "In 1984 there were 12345 people, 67890 cows and 3.14159 pies; call 0800-555-2020 by 2024."


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table, inverted (``Ġ`` -> 0x20)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_to_bytes(token: str, family: str) -> bytes | None:
    """The bytes a vocabulary entry inserts into the text, or None if it cannot be decoded.

    ``family`` is ``byte_level``, ``sentencepiece``, ``wordpiece`` or ``plain``.
    """
    if family == "byte_level":
        table = byte_decoder()
        try:
            return bytes(table[c] for c in token)
        except KeyError:
            return None
    if family == "sentencepiece":
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    if family == "wordpiece":
        if token.startswith("##"):
            return token[2:].encode("utf-8")
        return (" " + token).encode("utf-8")
    return token.encode("utf-8")


@dataclass
class TokenizerInfo:
    """What matching needs to know about one tokenizer."""

    path: Path
    family: str
    size: int  # max id + 1
    tokens: dict[int, str]  # id -> vocabulary string (added tokens included)
    special: set[int]  # ids of special (control) tokens
    added: set[int]  # ids of added tokens (their text is literal, not byte-mapped)
    roles: dict[str, int]  # bos/eos/unk/pad -> id
    byte_fallback: set[int] = field(default_factory=set)  # ids of <0xHH> pieces
    splits_digits: bool | None = None
    backend: Any = None  # tokenizers.Tokenizer
    fingerprint: str = ""

    def key(self, tid: int) -> tuple | None:
        """Matching key of one id: ('role', r), ('special', text) or ('bytes', b)."""
        tok = self.tokens.get(tid)
        if tok is None:
            return None
        if tid in self.special:
            return ("special", tok)
        if tid in self.added:
            return ("bytes", tok.encode("utf-8"))
        b = token_to_bytes(tok, self.family)
        return ("bytes", b) if b is not None else ("raw", tok)

    def token_roles(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for r in ROLES:
            if r in self.roles:
                out.setdefault(self.roles[r], []).append(r)
        return out

    def bytes_of(self, tid: int) -> bytes | None:
        k = self.key(tid)
        return k[1] if k and k[0] == "bytes" else None

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)


def _special_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read tokenizer file ({exc})") from None
    return data if isinstance(data, dict) else {}


def _components(node: Any) -> Iterable[dict[str, Any]]:
    """Every typed component in a (possibly nested Sequence) tokenizer.json section."""
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for v in node.values():
            if isinstance(v, (dict, list)):
                yield from _components(v)
    elif isinstance(node, list):
        for v in node:
            yield from _components(v)


def detect_family(spec: dict[str, Any], vocab_sample: Iterable[str] = ()) -> str:
    """Guess how a tokenizer spells its tokens (see :func:`token_to_bytes`).

    ``spec`` holds the tokenizer.json sections ``pre_tokenizer``, ``decoder``,
    ``normalizer`` and a ``model`` dict with at least ``type`` (and
    ``byte_fallback`` for BPE); ``vocab_sample`` a few vocabulary strings.
    """
    model = spec.get("model") or {}
    parts = [c for key in ("pre_tokenizer", "decoder", "normalizer") for c in _components(spec.get(key))]
    types = {c.get("type") for c in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if model.get("type") == "WordPiece" or "WordPiece" in types:
        return "wordpiece"
    if "Metaspace" in types or model.get("byte_fallback"):
        return "sentencepiece"
    for c in parts:
        if c.get("type") == "Replace" and "▁" in json.dumps(c, ensure_ascii=False):
            return "sentencepiece"
    sample = list(vocab_sample)
    if sum(t.startswith("Ġ") for t in sample) > len(sample) // 50:
        return "byte_level"
    if sum(t.startswith("▁") for t in sample) > len(sample) // 50:
        return "sentencepiece"
    return "plain"


def _component_spec(component: Any) -> Any:
    """A tokenizers component (normalizer, pre-tokenizer, decoder) as its JSON dict, or None."""
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except Exception:
        return None


def load_tokenizer_info(folder: str | Path) -> TokenizerInfo:
    """Read the tokenizer files of a model folder.

    Only the small sections of ``tokenizer.json`` are turned into Python
    objects (the vocabulary stays in the tokenizers library until asked for),
    which keeps a 262k-token tokenizer to a few seconds and little memory.
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            backend = Tokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise InvalidInputError(f"{tj}: cannot load tokenizer ({exc})") from None
        fingerprint = _file_digest(tj)
    elif any((folder / f).is_file() for f in ("tokenizer.model", "vocab.json", "vocab.txt")):
        try:
            from ..io.hf_load import RemoteCodeError, load_tokenizer

            hf = load_tokenizer(folder)
            backend = hf.backend_tokenizer
        except RemoteCodeError:
            raise
        except Exception as exc:
            raise InvalidInputError(f"{folder}: cannot load tokenizer ({exc})") from None
        fingerprint = _digest(backend.to_str().encode())
    else:
        raise InvalidInputError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")

    vocab = backend.get_vocab(with_added_tokens=True)
    spec = {
        "pre_tokenizer": _component_spec(backend.pre_tokenizer),
        "decoder": _component_spec(backend.decoder),
        "normalizer": _component_spec(backend.normalizer),
        "model": {"type": type(backend.model).__name__, "byte_fallback": bool(getattr(backend.model, "byte_fallback", False))},
    }
    family = detect_family(spec, (t for _, t in zip(range(5000), vocab)))
    tokens = {i: t for t, i in vocab.items()}
    del vocab
    special: set[int] = set()
    added: set[int] = set()
    for tid, tok in backend.get_added_tokens_decoder().items():
        added.add(tid)
        tokens[tid] = tok.content
        if tok.special:
            special.add(tid)
    by_text = {tokens[i]: i for i in special | added}

    # roles: tokenizer_config / special_tokens_map, then config.json ids
    roles: dict[str, int] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / fname
        if not f.is_file():
            continue
        cfg = _read_json(f)
        for r in ROLES:
            text = _special_text(cfg.get(f"{r}_token"))
            if text is not None and r not in roles:
                tid = by_text.get(text, backend.token_to_id(text))
                if tid is not None:
                    roles[r] = tid
        for extra in cfg.get("additional_special_tokens") or []:
            text = _special_text(extra)
            tid = by_text.get(text) if text is not None else None
            if tid is not None:
                special.add(tid)
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        cfg = _read_json(cfg_file)
        for r in ROLES:
            tid = cfg.get(f"{r}_token_id")
            if r not in roles and isinstance(tid, int) and tid in tokens:
                roles[r] = tid
    special |= set(roles.values())

    byte_fallback = set()
    if family == "sentencepiece":
        byte_fallback = {i for i, t in tokens.items() if i not in added and _BYTE_TOKEN.match(t)}

    info = TokenizerInfo(
        path=folder, family=family, size=max(tokens) + 1 if tokens else 0, tokens=tokens, special=special,
        added=added, roles=roles, byte_fallback=byte_fallback, backend=backend, fingerprint=fingerprint,
    )
    info.splits_digits = _splits_digits(info)
    return info


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _splits_digits(info: TokenizerInfo) -> bool | None:
    """True if numbers come out one digit per token, False if digits are grouped."""
    try:
        ids = info.encode(_DIGIT_PROBE)
    except Exception:
        return None
    multi = single = 0
    for tid in ids:
        b = info.bytes_of(tid) or b""
        n = sum(48 <= c <= 57 for c in b)
        if n >= 2:
            multi += 1
        elif n == 1:
            single += 1
    if multi == 0 and single == 0:
        return None
    return multi == 0


@dataclass
class VocabMatch:
    """For each donor id: the base id with the same meaning, or -1 (a new token)."""

    base_for_donor: list[int]  # len == donor.size
    counts: dict[str, int]
    warnings: list[str]
    donor_family: str
    base_family: str

    @property
    def shared(self) -> list[tuple[int, int]]:
        """(donor id, base id) pairs."""
        return [(d, b) for d, b in enumerate(self.base_for_donor) if b >= 0]

    @property
    def new(self) -> list[int]:
        return [d for d, b in enumerate(self.base_for_donor) if b < 0]


def _base_index(base: TokenizerInfo) -> dict[tuple, int]:
    """Key -> preferred base id (regular pieces before byte-fallback pieces, then lowest id)."""
    index: dict[tuple, int] = {}
    rank: dict[tuple, tuple[int, int]] = {}
    for tid in base.tokens:
        k = base.key(tid)
        if k is None:
            continue
        r = (1 if tid in base.byte_fallback else 0, tid)
        if k not in index or r < rank[k]:
            index[k], rank[k] = tid, r
    return index


def match_vocabularies(base: TokenizerInfo, donor: TokenizerInfo) -> VocabMatch:
    """Match every donor token to a base token with the same meaning."""
    index = _base_index(base)
    base_roles = base.roles
    donor_roles = donor.token_roles()
    out = [-1] * donor.size
    counts = {"by_bytes": 0, "by_role": 0, "by_special_text": 0}
    for tid in range(donor.size):
        if tid not in donor.tokens:
            continue
        hit = -1
        for r in donor_roles.get(tid, []):
            if r in base_roles:
                hit = base_roles[r]
                counts["by_role"] += 1
                break
        if hit < 0:
            k = donor.key(tid)
            if k is not None and k in index:
                hit = index[k]
                counts["by_special_text" if k[0] == "special" else "by_bytes"] += 1
        out[tid] = hit
    used = {b for b in out if b >= 0}
    # base tokens whose key appears in the donor count as matched even if another base id won the key
    donor_keys = {donor.key(t) for t in donor.tokens}
    unmatched = sum(1 for t in base.tokens if t not in used and base.key(t) not in donor_keys)
    shared = sum(1 for b in out if b >= 0)
    counts.update({
        "donor_vocab": donor.size,
        "base_vocab": base.size,
        "shared": shared,
        "new": donor.size - shared,
        "unmatched_base": unmatched,
        "donor_special_new": sum(1 for t in donor.special if 0 <= t < donor.size and out[t] < 0),
    })
    warns: list[str] = []
    if base.splits_digits is not None and donor.splits_digits is not None and base.splits_digits != donor.splits_digits:
        how = {True: "one digit per token", False: "grouped digits"}
        warns.append(
            f"digit splitting differs: the base tokenizer writes numbers as {how[base.splits_digits]}, the donor as "
            f"{how[donor.splits_digits]}; the transplanted model will see numbers split in a way it was not trained on "
            "(expect worse arithmetic and number copying until it is fine-tuned)"
        )
    if shared < max(16, donor.size // 20):
        warns.append(f"only {shared} of {donor.size} donor tokens are shared with the base; the approximation will be poor")
    for w in warns:
        warnings.warn(w, stacklevel=2)
    return VocabMatch(out, counts, warns, donor.family, base.family)


def same_tokenizer(a: TokenizerInfo, b: TokenizerInfo) -> bool:
    """Identical files, or identical id -> token tables with identical roles."""
    if a.fingerprint == b.fingerprint:
        return True
    return a.family == b.family and a.tokens == b.tokens and a.roles == b.roles


def subword_pieces(text: bytes, base: TokenizerInfo, index: dict[tuple, int] | None = None,
                   max_len: int = 64) -> list[int]:
    """Base-tokenizer pieces of a byte string.

    Uses the base tokenizer itself when the text is valid UTF-8 and its pieces
    spell exactly these bytes; otherwise (partial UTF-8, word-start handling
    that adds a space) a greedy longest match over the base vocabulary's byte
    strings. Bytes the base cannot spell are skipped.
    """
    if index is None:
        index = _base_index(base)
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        s = None
    if s:
        try:
            ids = base.encode(s)
        except Exception:
            ids = []
        if ids and b"".join(base.bytes_of(i) or b"\0" for i in ids) == text and all(i not in base.special for i in ids):
            return ids
    out: list[int] = []
    i = 0
    while i < len(text):
        for j in range(min(len(text), i + max_len), i, -1):
            tid = index.get(("bytes", text[i:j]))
            if tid is not None and tid not in base.special:
                out.append(tid)
                i = j
                break
        else:
            i += 1
    return out
