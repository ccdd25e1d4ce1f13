"""Training data for fusion: examples, chat rendering, tokenisation with loss masks.

An :class:`Example` is a piece of text plus the character spans the loss applies
to. Every model (pivot and each source) tokenises the *same* string, so their
token sequences can be aligned; loss masks follow from the spans through each
tokenizer's offsets.

Accepted datasets (:func:`load_examples`):

* a plain text file: tokenised with the pivot tokenizer and cut into consecutive
  windows of ``max_length`` tokens (bos included); every token is trained on;
* JSONL (``.jsonl``/``.json`` with one object per line) with ``text``: each
  record is cut into windows the same way;
* JSONL with chat ``messages`` (``[{"role", "content"}, ...]``): rendered with the
  pivot's chat template; the loss covers each assistant turn's content and the
  template text that closes the turn (e.g. ``<|im_end|>``); one window per
  conversation, truncated to ``max_length``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InvalidInputError

__all__ = ["Example", "Encoded", "load_examples", "render_chat", "encode", "text_windows", "fingerprint"]


@dataclass
class Example:
    """A text and the character spans the loss covers (``None``: all of it)."""

    text: str
    spans: Optional[list[tuple[int, int]]] = None
    source: str = ""


@dataclass
class Encoded:
    """One tokenisation of an example: ids (bos first when added), char starts, loss mask.

    ``starts[t]``/``ends[t]`` are the character offsets of token t (-1 for the added
    bos); ``target[t]`` says token t is a loss target (it is predicted at position t-1).
    """

    ids: list[int]
    starts: list[int]
    ends: list[int]
    target: list[bool]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def position_mask(self) -> list[bool]:
        """Positions whose *next* token is a loss target (length len(ids), last is False)."""
        return self.target[1:] + [False]


def bos_id(tokenizer: Any, config: Any = None) -> Optional[int]:
    bos = getattr(config, "bos_token_id", None) if config is not None else None
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None)
    return bos if isinstance(bos, int) and bos >= 0 else None


def encode(tokenizer: Any, ex: Example, max_length: Optional[int] = None, add_bos: Optional[int] = None) -> Encoded:
    """Tokenise ``ex.text`` without special tokens, prepend ``add_bos`` (an id) unless the
    text already starts with it, mark loss targets from ``ex.spans``, truncate."""
    enc = tokenizer(ex.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    offs = [tuple(o) for o in enc["offset_mapping"]]
    starts = [o[0] for o in offs]
    ends = [o[1] for o in offs]
    if add_bos is not None and not (ids and ids[0] == add_bos):
        ids = [add_bos] + ids
        starts = [-1] + starts
        ends = [-1] + ends
    if ex.spans is None:
        target = [s >= 0 for s in starts]
    else:
        target = [s >= 0 and any(s < b and e > a for a, b in ex.spans) for s, e in zip(starts, ends)]
    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, starts, ends, target = ids[:max_length], starts[:max_length], ends[:max_length], target[:max_length]
        truncated = True
    return Encoded(ids, starts, ends, target, truncated)


def text_windows(text: str, tokenizer: Any, max_length: int, add_bos: bool = True, source: str = "") -> list[Example]:
    """Cut ``text`` into consecutive windows of ``max_length`` pivot tokens (bos included)."""
    body = max_length - (1 if add_bos else 0)
    if body < 1:
        raise InvalidInputError(f"max_length {max_length} leaves no room for text")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offs = enc["offset_mapping"]
    out: list[Example] = []
    i = 0
    n = len(offs)
    while i < n:
        j = min(n, i + body)
        # never cut between two tokens of one character (byte-level BPE splits some)
        while j < n and offs[j][0] < offs[j - 1][1]:
            j -= 1
            if j <= i:
                j = min(n, i + body)
                break
        start = offs[i][0]
        end = offs[j][0] if j < n else len(text)
        piece = text[start:end]
        if piece.strip():
            out.append(Example(piece, None, source))
        i = j
    return out


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template; return (text, assistant spans).

    Each assistant span starts at the message content and ends where the rendering
    of the conversation up to and including that message ends (so the template's
    end-of-turn text is trained on too).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("the pivot tokenizer has no chat template; chat data needs one")
    msgs = [dict(m) for m in messages]
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidInputError(f"chat message {m!r} needs 'role' and 'content'")
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        prev = tokenizer.apply_chat_template(msgs[:i], tokenize=False) if i else ""
        if text.startswith(upto) and upto.startswith(prev):
            start = upto.find(m["content"], len(prev)) if m["content"] else len(prev)
            start = len(prev) if start < 0 else start
            spans.append((start, len(upto)))
            cursor = len(upto)
        else:  # the template is not prefix-stable: fall back to finding the content
            start = text.find(m["content"], cursor)
            if start < 0:
                raise InvalidInputError(f"assistant message {i} is not found in the rendered chat")
            spans.append((start, start + len(m["content"])))
            cursor = start + len(m["content"])
    return text, spans


def load_examples(path: str | Path, tokenizer: Any, max_length: int, add_bos: bool = True,
                  limit: Optional[int] = None) -> list[Example]:
    """Read a text file or JSONL (``text`` or chat ``messages``) into examples."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"{p}: no such dataset file")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{p}: cannot read as UTF-8 text ({exc})") from None
    examples: list[Example] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            where = f"{p.name}:{lineno}"
            if isinstance(rec, dict) and "messages" in rec:
                if not isinstance(rec["messages"], list):
                    raise InvalidInputError(f"{p}:{lineno}: 'messages' must be a list")
                text, spans = render_chat(tokenizer, rec["messages"])
                if spans:
                    examples.append(Example(text, spans, where))
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                examples.extend(text_windows(rec["text"], tokenizer, max_length, add_bos, where))
            else:
                raise InvalidInputError(f"{p}:{lineno}: expected an object with 'text' or 'messages'")
            if limit and len(examples) >= limit:
                break
    else:
        examples = text_windows(raw, tokenizer, max_length, add_bos, p.name)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise InvalidInputError(f"{p}: no training examples")
    return examples


def fingerprint(encoded: Sequence[Encoded], *extra: Any) -> str:
    """A digest of token ids and loss masks (identifies a tokenised dataset)."""
    h = hashlib.sha256()
    for x in extra:
        h.update(json.dumps(x, sort_keys=True, default=str).encode())
    for e in encoded:
        h.update(len(e.ids).to_bytes(4, "little"))
        h.update(b"".join(int(i).to_bytes(4, "little", signed=True) for i in e.ids))
        h.update(bytes(int(t) for t in e.target))
    return h.hexdigest()
