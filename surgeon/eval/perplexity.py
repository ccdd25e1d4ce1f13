"""Perplexity and bits per byte of a model folder on a text file.

Bits per byte (BPB) is the number to compare across tokenizers: the summed
negative log-likelihood of the scored tokens, in bits, divided by the number of
UTF-8 bytes of the text those tokens cover. Perplexity is per token and only
comparable between models sharing a tokenizer.

Protocol (the same for every model, so numbers are comparable):

* the text is tokenized once without special tokens;
* it is cut into consecutive windows of ``window`` tokens; each window is
  preceded by the model's bos token when it has one (``add_bos``; Gemma-style
  models are badly off without it), which is context only, never scored;
* with ``stride < window`` windows overlap and only the tokens not scored by
  the previous window are scored (sliding-window evaluation, more context per
  token, slower);
* every text token is scored exactly once; ``max_tokens`` stops early, and the
  byte count then covers only the text up to the last scored token.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import InvalidInputError

LN2 = math.log(2.0)


def _load(model_dir: Path, device: str, dtype: torch.dtype):
    from ..io.hf_load import RemoteCodeError, load_causal_lm, load_tokenizer, refuse_remote_code

    refuse_remote_code(model_dir)  # before anything is loaded: surgeon never runs a model folder's code
    try:
        tok = load_tokenizer(model_dir)
    except RemoteCodeError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"{model_dir}: cannot load the tokenizer ({exc})") from None
    try:
        model = load_causal_lm(model_dir, dtype=dtype)
    except RemoteCodeError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"{model_dir}: cannot load the model ({exc})") from None
    model.to(device).eval()
    return tok, model


def _bos_id(tok: Any, model: Any) -> Optional[int]:
    bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if bos is None:
        bos = getattr(tok, "bos_token_id", None)
    return bos if isinstance(bos, int) and bos >= 0 else None


def _max_positions(model: Any) -> Optional[int]:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_text(text_path: Path) -> None:
    """A regular, non-empty file (a FIFO or device is refused by name, never opened)."""
    from ..io.safe_files import check_regular

    if not text_path.exists():
        raise InvalidInputError(f"{text_path}: no such text file")
    if check_regular(text_path).st_size == 0:
        raise InvalidInputError(f"{text_path}: empty text")


#: tokens read past ``max_tokens`` before the text is cut, so the first ``max_tokens`` tokens are
#: those of the whole file (a token at the cut could merge with what follows it)
TOKEN_MARGIN = 64
_FIRST_READ = 1 << 16


def read_text(text_path: Path, tokenizer: Any, max_tokens: int | None = None,
              max_chars: int | None = None, max_bytes: int | None = None) -> str:
    """The text to score: the whole file, or only as much of it as ``max_tokens`` / ``max_chars`` need.

    With a cap the file is streamed: a first 64 KiB, then doubling reads, each prefix tokenized
    once to count its tokens, until it holds ``max_tokens + TOKEN_MARGIN`` tokens (or
    ``max_chars`` characters, or the file ends). Memory and time therefore follow the cap, not the
    file: a 1 GB text costs what its first few kilobytes cost. The tokens kept are those the whole
    file would give (the margin absorbs the one token the cut can change). ``max_bytes`` reads at
    most that many bytes whatever the other caps (a character cut in two at the end is dropped).
    """
    import codecs

    from ..io.safe_files import open_regular

    fd = open_regular(text_path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    chars = nbytes = 0
    want = _FIRST_READ if (max_tokens or max_chars or max_bytes) else -1
    saved_max = getattr(tokenizer, "model_max_length", None)
    try:
        with open(fd, "rb") as fh:
            while True:
                if max_bytes is not None:
                    want = max(0, min(want, max_bytes - nbytes))
                chunk = fh.read(want)
                nbytes += len(chunk)
                eof = want < 0 or len(chunk) < want
                if max_bytes is not None and nbytes >= max_bytes and not eof:  # the cap: stop, drop a split character
                    parts.append(decoder.decode(chunk, final=False))
                    break
                parts.append(decoder.decode(chunk, final=eof))
                chars += len(parts[-1])
                if eof:
                    break
                if max_chars is not None and chars >= max_chars:
                    break
                if max_tokens:
                    prefix = "".join(parts)
                    parts = [prefix]
                    tokenizer.model_max_length = int(1e30)  # counting only: no "longer than the model" warning
                    if len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) > max_tokens + TOKEN_MARGIN:
                        break
                want = nbytes  # doubling reads: the prefixes tokenized sum to ~2x the last one
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{text_path}: cannot read as UTF-8 text ({exc})") from None
    except OSError as exc:
        raise InvalidInputError(f"{text_path}: cannot read ({exc.strerror or exc})") from None
    finally:
        if saved_max is not None:
            tokenizer.model_max_length = saved_max
    text = "".join(parts)
    if max_chars is not None:
        text = text[:max_chars]
    if not text:
        raise InvalidInputError(f"{text_path}: empty text")
    return text


def evaluate_text(
    model_dir: str | Path,
    text_path: str | Path,
    max_tokens: Optional[int] = None,
    device: str = "cpu",
    *,
    window: int = 512,
    stride: Optional[int] = None,
    batch_size: Optional[int] = None,
    add_bos: Optional[bool] = None,
    max_chars: Optional[int] = None,
    max_bytes: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Score ``text_path`` with the causal LM in ``model_dir``.

    Returns ``perplexity``, ``bits_per_byte``, ``bits_per_token``, ``nll_nats``
    (sum), ``tokens`` (scored), ``bytes`` (UTF-8 bytes covered), ``chars``,
    ``windows``, ``window``, ``stride``, ``bos`` and ``seconds``.
    ``max_chars`` cuts the text before tokenizing (cheap way to bound the work);
    ``model``/``tokenizer`` may be passed already loaded. ``batch_size`` (windows
    per forward pass) defaults to what keeps the logits near 1 GB.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    model_dir, text_path = Path(model_dir), Path(text_path)
    _check_text(text_path)
    if window < 2:
        raise InvalidInputError(f"window must be at least 2 tokens, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise InvalidInputError(f"stride must be between 1 and window ({window}), got {stride}")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be positive, got {max_tokens}")

    if model is None or tokenizer is None:
        if not model_dir.is_dir():
            raise InvalidInputError(f"{model_dir}: no such model folder")
        tokenizer, model = _load(model_dir, device, dtype)
    dev = next(model.parameters()).device
    text = read_text(text_path, tokenizer, max_tokens=max_tokens, max_chars=max_chars, max_bytes=max_bytes)

    saved_max = getattr(tokenizer, "model_max_length", None)
    try:  # we window the text ourselves: silence the "sequence longer than the model" warning
        tokenizer.model_max_length = int(1e30)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    finally:
        if saved_max is not None:
            tokenizer.model_max_length = saved_max
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        end_char = offsets[max_tokens - 1][1] if offsets else len(tokenizer.decode(ids))
    else:
        end_char = len(text)
    if not ids:
        raise InvalidInputError(f"{text_path}: the tokenizer produced no tokens")

    bos = _bos_id(tokenizer, model) if add_bos is not False else None
    if add_bos and bos is None:
        raise InvalidInputError(f"{model_dir}: add_bos requested but the model has no bos token id")
    limit = _max_positions(model)
    if limit is not None and window + (bos is not None) > limit:
        window = limit - (bos is not None)
        stride = min(stride, window)

    # windows: (start, end, first scored position within the window). Without a bos
    # token the text's first token has no context and is not scored (nor are its
    # bytes counted), and every later window keeps at least one token of context.
    first_scored = 0 if bos is not None else 1
    if first_scored and len(ids) < 2:
        raise InvalidInputError(f"{text_path}: nothing to score (a single token and no bos)")
    start_char = 0 if first_scored == 0 else (offsets[0][1] if offsets else len(tokenizer.decode(ids[:1])))
    n_bytes = len(text[start_char:end_char].encode("utf-8"))
    ctx = max(window - stride, first_scored)
    spans: list[tuple[int, int, int]] = []
    scored_to = first_scored
    while scored_to < len(ids):
        start = max(0, scored_to - ctx)
        end = min(start + window, len(ids))
        spans.append((start, end, scored_to - start))
        scored_to = end
    if batch_size is None:
        vocab = int(getattr(model.config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        batch_size = int(max(1, min(16, 10**9 // max(1, (window + 1) * vocab * 4))))
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    nll = 0.0
    count = 0
    prefix = [bos] if bos is not None else []
    # group equal-length windows into batches
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for sp in spans:
        groups.setdefault(sp[1] - sp[0], []).append(sp)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    bar = tqdm(total=len(ids) - first_scored, desc=f"eval {model_dir.name}", unit="tok", disable=not progress, leave=False)
    with torch.inference_mode():
        for batch in batches:
            inp = torch.tensor([prefix + ids[s:e] for s, e, _ in batch], device=dev)
            logits = model(input_ids=inp).logits.float()
            p = len(prefix)
            # logits at position i predict token i+1
            for row, (s, e, first) in enumerate(batch):
                lo = p + first  # index in inp of the first scored token (>= 1)
                tgt = inp[row, lo:]
                lp = torch.log_softmax(logits[row, lo - 1:-1], dim=-1)
                nll -= float(lp.gather(1, tgt.unsqueeze(1)).sum())
                count += int(tgt.numel())
                bar.update(e - s - first)
            del logits
    bar.close()
    return {
        "model": str(model_dir),
        "text": str(text_path),
        "perplexity": math.exp(nll / count),
        "bits_per_byte": nll / LN2 / n_bytes,
        "bits_per_token": nll / LN2 / count,
        "nll_nats": nll,
        "tokens": count,
        "bytes": n_bytes,
        "chars": end_char - start_char,
        "windows": len(spans),
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "bos": bos,
        "seconds": round(time.time() - t0, 3),
    }
