"""Teacher caches: each source model's top-k per position, computed once and reused.

A cache folder holds safetensors shards, each with the examples it covers::

    manifest.json                 what was cached, from what, and which shards hold which examples
    shard-00000.safetensors       index [n] int64 (example numbers), lengths [n] int32,
                                  logp [n, L, k] (top-k log-probabilities at T = 1, decreasing,
                                  float16 by default), ids [n, L, k] (uint16 stored as int16 when
                                  the vocabulary has <= 65536 ids, else int32),
                                  lse [n, L] float32 (logsumexp of the full logits at T = 1),
                                  lse_t [n, L] float32 (logsumexp of logits / T; only when T != 1)

Storing log-probabilities rather than raw logits keeps float16 precise where it
matters (the largest probabilities are near 0 in log space); the logits are
``logp + lse``. At k = 16 a position costs 16 * 2 + 16 * 2 + 4 (+ 4) = 68 bytes with
a vocabulary of <= 65536 ids and 100 bytes above (float32 logits and int32 ids: 132).

Only the examples a run needs are computed (``indices``); a later run that needs
others adds shards to the same cache, so runs with more steps or other seeds reuse
what is there. Shards are written to a temporary name and renamed, and the
manifest is rewritten atomically after each one, so an interrupted build resumes.
The manifest records fingerprints of the teacher (config, tokenizer, safetensors
headers and a content sample), of the tokenised data and the settings (top-k,
temperature, storage dtype); a cache built from anything else is not reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..errors import InvalidInputError, StepError
from .data import Encoded, fingerprint
from .gld import TopK

__all__ = ["TeacherCache", "build_teacher_cache", "model_fingerprint"]

FORMAT = "surgeon-teacher-cache/2"
MANIFEST = "manifest.json"


def model_fingerprint(model_dir: str | Path, samples: int = 64, chunk: int = 1 << 16) -> str:
    """Digest of a model folder: config, tokenizer, safetensors headers and a content sample.

    The sample (``samples`` chunks of ``chunk`` bytes spread evenly over each weight
    file) tells retrained weights of the same shapes apart without reading whole
    checkpoints; a copied folder keeps its fingerprint.
    """
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        f = d / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100_000_000)))
            if size <= samples * chunk:
                fh.seek(0)
                h.update(fh.read())
            else:
                step = (size - chunk) // (samples - 1)
                for i in range(samples):
                    fh.seek(i * step)
                    h.update(fh.read(chunk))
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class TeacherCache:
    """Read access to a cache: ``cache.get(i)`` -> (logits [L_i, k], ids [L_i, k], lse [L_i]).

    ``lse`` is the logsumexp of the full logits divided by :attr:`temperature`
    (the temperature the cache was built for), so :meth:`topk` gives exact
    probabilities at that temperature. ``has(i)`` says whether example i is cached
    (a cache may hold only the examples the runs so far needed).
    """

    def __init__(self, folder: str | Path, max_shards_in_memory: int = 8):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{self.folder}: not a teacher cache ({exc})") from None
        if self.manifest.get("format") != FORMAT or "vocab_size" not in self.manifest:
            raise InvalidInputError(f"{self.folder}: teacher cache is empty or of another format")
        self.vocab_size = int(self.manifest["vocab_size"])
        self.top_k = int(self.manifest["top_k"])
        self.temperature = float(self.manifest.get("temperature", 1.0))  # of the stored logsumexp
        self._where: dict[int, tuple[int, int]] = {}
        for s, info in enumerate(self.manifest["shards"]):
            for r, i in enumerate(info["indices"]):
                self._where[int(i)] = (s, r)
        self._loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._max = max_shards_in_memory

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def cached(self) -> int:
        """How many examples are cached."""
        return len(self._where)

    def has(self, i: int) -> bool:
        return int(i) in self._where

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s in self._loaded:
            self._loaded.move_to_end(s)
            return self._loaded[s]
        from safetensors.torch import load_file

        info = self.manifest["shards"][s]
        data = load_file(str(self.folder / info["file"]))
        self._loaded[s] = data
        while len(self._loaded) > self._max:
            self._loaded.popitem(last=False)
        return data

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [L, k] float32, ids [L, k] long, lse [L] float32 at :attr:`temperature`) of example ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i not in self._where:
            raise StepError(f"{self.folder}: example {i} is not in the teacher cache")
        s, r = self._where[i]
        d = self._shard(s)
        n = int(d["lengths"][r])
        lse1 = d["lse"][r, :n].float()
        logits = d["logp"][r, :n].float() + lse1.unsqueeze(-1)
        ids = _unpack_ids(d["ids"][r, :n], self.manifest["ids_dtype"])
        lse = d["lse_t"][r, :n].float() if "lse_t" in d else lse1
        return logits, ids, lse

    def topk(self, i: int) -> TopK:
        lg, ids, lse = self.get(i)
        return TopK(lg, ids, lse, self.vocab_size, self.temperature)

    def used_ids(self, indices: Optional[Iterable[int]] = None) -> torch.Tensor:
        """Every teacher id in the cache (or in the given examples), sorted and unique."""
        seen = torch.zeros(self.vocab_size, dtype=torch.bool)
        want = None if indices is None else {int(i) for i in indices}
        for i in sorted(self._where if want is None else want & set(self._where)):
            seen[self.get(i)[1].reshape(-1)] = True
        return torch.nonzero(seen).flatten()

    def bytes_per_token(self) -> float:
        """Stored bytes per cached position (shard files over positions)."""
        toks = sum(int(x.get("tokens", 0)) for x in self.manifest["shards"])
        return sum(int(x["bytes"]) for x in self.manifest["shards"]) / max(1, toks)


def _pack_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 ids -> int16 holding the uint16 bit pattern when every id fits in 16 bits, else int32."""
    if vocab_size > 1 << 16:
        return ids.to(torch.int32)
    return torch.where(ids >= 1 << 15, ids - (1 << 16), ids).to(torch.int16)


def _unpack_ids(stored: torch.Tensor, how: str) -> torch.Tensor:
    """Inverse of :func:`_pack_ids` (``how``: the manifest's ``ids_dtype``) -> int64 ids."""
    ids = stored.long()
    return ids & 0xFFFF if how == "uint16" else ids


STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.inference_mode()
def build_teacher_cache(teacher_dir: str | Path, encoded: Sequence[Encoded], out_dir: str | Path, *, top_k: int,
                        indices: Optional[Iterable[int]] = None, temperature: float = 1.0,
                        shard_size: int = 256, batch_size: int = 8, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, store_dtype: torch.dtype = torch.float16,
                        progress: bool = False, model: Any = None,
                        on_shard: Optional[Callable[[int, int], None]] = None,
                        say: Optional[Callable[[str], None]] = None) -> TeacherCache:
    """Run the teacher over the examples ``indices`` of ``encoded`` (default: all) and store their top-k.

    Examples already in the cache are skipped (an interrupted or shorter earlier
    run is extended); a cache whose fingerprints or settings differ is rebuilt from
    scratch. ``model`` may be a loaded model (otherwise it is loaded from
    ``teacher_dir`` only when something is missing). ``say`` receives one line per
    finished shard (progress that also shows when output is not a terminal).
    """
    from safetensors.torch import save_file

    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    if top_k < 1:
        raise InvalidInputError(f"top_k must be positive, got {top_k}")
    if not temperature > 0:
        raise InvalidInputError(f"temperature must be positive, got {temperature}")
    sname = str(store_dtype).replace("torch.", "")
    if sname not in STORE_DTYPES:
        raise InvalidInputError(f"cache store dtype must be one of {', '.join(STORE_DTYPES)}, got {sname}")
    out.mkdir(parents=True, exist_ok=True)
    want = {
        "format": FORMAT,
        "teacher_fingerprint": model_fingerprint(teacher_dir),
        "data_fingerprint": fingerprint(encoded),
        "top_k": int(top_k),
        "temperature": float(temperature),
        "num_examples": len(encoded),
        "store_dtype": sname,
    }
    manifest: dict[str, Any] = {}
    mpath = out / MANIFEST
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
    if any(manifest.get(k) != v for k, v in want.items()):
        for f in out.glob("shard-*.safetensors"):
            f.unlink()
        manifest = {**want, "teacher": str(teacher_dir), "shards": [], "build_seconds": 0.0,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    shards = [x for x in manifest.get("shards", [])
              if (out / x["file"]).is_file() and (out / x["file"]).stat().st_size == x["bytes"]]
    manifest["shards"] = shards
    have = {int(i) for x in shards for i in x["indices"]}
    wanted = range(len(encoded)) if indices is None else sorted({int(i) for i in indices})
    bad = [i for i in wanted if not 0 <= i < len(encoded)]
    if bad:
        raise InvalidInputError(f"teacher cache: example index {bad[0]} out of range (0..{len(encoded) - 1})")
    todo = [i for i in wanted if i not in have]
    manifest["resumed_examples"] = len(wanted) - len(todo)
    if todo:
        t0 = time.time()
        if model is None:
            from ..io.hf_load import RemoteCodeError, load_causal_lm

            try:
                model = load_causal_lm(teacher_dir, dtype=dtype)
            except RemoteCodeError:
                raise
            except Exception as exc:  # transformers raises many kinds
                raise InvalidInputError(f"{teacher_dir}: cannot load the teacher model ({exc})") from None
            model.to(device).eval()
        dev = next(model.parameters()).device
        pad = getattr(model.config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) and pad >= 0 else 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"cache {teacher_dir.name}", unit="seq", leave=False)
        next_no = 1 + max((int(x["file"][6:11]) for x in shards), default=-1)
        chunks = [todo[c:c + shard_size] for c in range(0, len(todo), shard_size)]
        for ci, chunk in enumerate(chunks):
            rows = [encoded[i] for i in chunk]
            width = max(len(e) for e in rows)
            logp = torch.zeros(len(rows), width, top_k, dtype=store_dtype)
            ids = torch.zeros(len(rows), width, top_k, dtype=torch.int32)
            lse = torch.zeros(len(rows), width, dtype=torch.float32)
            lse_t = torch.zeros(len(rows), width, dtype=torch.float32) if temperature != 1.0 else None
            lengths = torch.tensor([len(e) for e in rows], dtype=torch.int32)
            vocab = 0
            for b0 in range(0, len(rows), batch_size):
                group = rows[b0:b0 + batch_size]
                w = max(len(e) for e in group)
                x = torch.full((len(group), w), pad, dtype=torch.long)
                m = torch.zeros(len(group), w, dtype=torch.long)
                for r, e in enumerate(group):
                    x[r, : len(e)] = torch.tensor(e.ids)
                    m[r, : len(e)] = 1
                full = model(input_ids=x.to(dev), attention_mask=m.to(dev)).logits.float()
                vocab = int(full.shape[-1])
                kk = min(top_k, vocab)
                v, i = torch.topk(full, kk, dim=-1)
                l1 = torch.logsumexp(full, dim=-1)
                logp[b0:b0 + len(group), :w, :kk] = (v - l1.unsqueeze(-1)).cpu().to(store_dtype)
                ids[b0:b0 + len(group), :w, :kk] = i.cpu().to(torch.int32)
                lse[b0:b0 + len(group), :w] = l1.cpu()
                if lse_t is not None:
                    lse_t[b0:b0 + len(group), :w] = torch.logsumexp(full / temperature, dim=-1).cpu()
                del full
                if bar is not None:
                    bar.update(len(group))
            manifest["vocab_size"] = vocab
            small = vocab <= 1 << 16
            manifest["ids_dtype"] = "uint16" if small else "int32"
            tensors = {"index": torch.tensor(chunk, dtype=torch.int64), "lengths": lengths, "logp": logp,
                       "ids": _pack_ids(ids, vocab), "lse": lse}
            if lse_t is not None:
                tensors["lse_t"] = lse_t
            fname = f"shard-{next_no + ci:05d}.safetensors"
            tmp = out / (fname + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, out / fname)
            manifest["shards"].append({"file": fname, "indices": chunk, "tokens": int(lengths.sum()),
                                       "bytes": (out / fname).stat().st_size})
            manifest["build_seconds"] = round(float(manifest.get("build_seconds", 0.0)) + time.time() - t0, 2)
            t0 = time.time()
            _write_json_atomic(mpath, manifest)
            if on_shard is not None:
                on_shard(ci, len(chunks))
            if say is not None:
                done = sum(len(c) for c in chunks[:ci + 1])
                say(f"cache {teacher_dir.name}: {done}/{len(todo)} examples ({manifest['build_seconds']:.1f} s)")
        if bar is not None:
            bar.close()
    if "vocab_size" not in manifest:
        raise StepError(f"{out}: cache has no shards")
    manifest["complete"] = len(have) + len(todo) == len(encoded)
    _write_json_atomic(mpath, manifest)
    return TeacherCache(out)
