"""Teacher caches: each source model's top-k logits per position, computed once.

A cache folder holds safetensors shards of ``shard_size`` examples each::

    manifest.json                 what was cached, from what, and which shards are done
    shard-00000.safetensors       logits [n, L, k] (decreasing), ids [n, L, k] int32,
                                  lse [n, L] float32 (logsumexp of the full logits),
                                  lengths [n] int32

Shards are written to a temporary name and renamed, and the manifest is rewritten
atomically after each one, so an interrupted build resumes: shards the manifest
lists (and whose files exist with the recorded size) are skipped. The manifest
records fingerprints of the teacher (config and safetensors headers) and of the
tokenised data; a cache built from anything else is not reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import InvalidInputError, StepError
from .data import Encoded, fingerprint
from .gld import TopK

__all__ = ["TeacherCache", "build_teacher_cache", "model_fingerprint"]

FORMAT = "surgeon-teacher-cache/1"
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
    """Read access to a finished cache: ``cache[i]`` -> (TopK rows [L_i, k], length)."""

    def __init__(self, folder: str | Path, max_shards_in_memory: int = 8):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{self.folder}: not a teacher cache ({exc})") from None
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise InvalidInputError(f"{self.folder}: teacher cache is incomplete or of another format")
        self.shard_size = int(self.manifest["shard_size"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.top_k = int(self.manifest["top_k"])
        self.temperature = float(self.manifest.get("temperature", 1.0))  # of the stored logsumexp
        self._loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._max = max_shards_in_memory

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

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
        """(logits [L, k] float32, ids [L, k] long, lse [L] float32) of example ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = self._shard(i // self.shard_size)
        r = i % self.shard_size
        n = int(d["lengths"][r])
        return d["logits"][r, :n].float(), d["ids"][r, :n].long(), d["lse"][r, :n].float()

    def topk(self, i: int) -> TopK:
        lg, ids, lse = self.get(i)
        return TopK(lg, ids, lse, self.vocab_size, self.temperature)

    def used_ids(self) -> torch.Tensor:
        """Every teacher id that appears in the cache (sorted, unique)."""
        seen = torch.zeros(self.vocab_size, dtype=torch.bool)
        for s in range(len(self.manifest["shards"])):
            d = self._shard(s)
            for r in range(d["lengths"].shape[0]):
                n = int(d["lengths"][r])
                seen[d["ids"][r, :n].reshape(-1).long()] = True
        return torch.nonzero(seen).flatten()


@torch.inference_mode()
def build_teacher_cache(teacher_dir: str | Path, encoded: Sequence[Encoded], out_dir: str | Path, *, top_k: int,
                        shard_size: int = 256, batch_size: int = 8, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, store_dtype: torch.dtype = torch.float32,
                        progress: bool = False, model: Any = None,
                        on_shard: Optional[Callable[[int, int], None]] = None) -> TeacherCache:
    """Run the teacher over ``encoded`` once and store its top-k per position.

    Resumes a partial cache built from the same teacher, data and settings; a
    cache whose fingerprints differ is rebuilt from scratch. ``model`` may be a
    loaded model (otherwise it is loaded from ``teacher_dir`` only when needed).
    """
    from safetensors.torch import save_file

    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    if top_k < 1:
        raise InvalidInputError(f"top_k must be positive, got {top_k}")
    out.mkdir(parents=True, exist_ok=True)
    want = {
        "format": FORMAT,
        "teacher": str(teacher_dir),
        "teacher_fingerprint": model_fingerprint(teacher_dir),
        "data_fingerprint": fingerprint(encoded),
        "top_k": int(top_k),
        "shard_size": int(shard_size),
        "num_examples": len(encoded),
        "store_dtype": str(store_dtype).replace("torch.", ""),
    }
    keys = list(want)
    manifest: dict[str, Any] = {}
    mpath = out / MANIFEST
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
    if any(manifest.get(k) != want[k] for k in keys):
        for f in out.glob("shard-*.safetensors"):
            f.unlink()
        manifest = {**want, "shards": [], "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    n_shards = (len(encoded) + shard_size - 1) // shard_size
    done = {s["index"]: s for s in manifest.get("shards", [])
            if (out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"]}
    manifest["shards"] = [done[i] for i in sorted(done)]
    todo = [s for s in range(n_shards) if s not in done]
    manifest["resumed_shards"] = len(done)
    if todo:
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

            bar = tqdm(total=len(encoded), initial=len(encoded) - sum(
                min(shard_size, len(encoded) - s * shard_size) for s in todo), desc=f"cache {teacher_dir.name}",
                unit="seq", leave=False)
        for s in todo:
            lo, hi = s * shard_size, min(len(encoded), (s + 1) * shard_size)
            rows = encoded[lo:hi]
            width = max(len(e) for e in rows)
            logits = torch.zeros(len(rows), width, top_k, dtype=store_dtype)
            ids = torch.zeros(len(rows), width, top_k, dtype=torch.int32)
            lse = torch.zeros(len(rows), width, dtype=torch.float32)
            lengths = torch.tensor([len(e) for e in rows], dtype=torch.int32)
            for b0 in range(0, len(rows), batch_size):
                group = rows[b0:b0 + batch_size]
                w = max(len(e) for e in group)
                x = torch.full((len(group), w), pad, dtype=torch.long)
                m = torch.zeros(len(group), w, dtype=torch.long)
                for r, e in enumerate(group):
                    x[r, : len(e)] = torch.tensor(e.ids)
                    m[r, : len(e)] = 1
                out_logits = model(input_ids=x.to(dev), attention_mask=m.to(dev)).logits.float()
                kk = min(top_k, out_logits.shape[-1])
                v, i = torch.topk(out_logits, kk, dim=-1)
                logits[b0:b0 + len(group), :w, :kk] = v.cpu().to(store_dtype)
                ids[b0:b0 + len(group), :w, :kk] = i.cpu().to(torch.int32)
                lse[b0:b0 + len(group), :w] = torch.logsumexp(out_logits, dim=-1).cpu()
                if bar is not None:
                    bar.update(len(group))
            fname = f"shard-{s:05d}.safetensors"
            tmp = out / (fname + ".tmp")
            save_file({"logits": logits, "ids": ids, "lse": lse, "lengths": lengths}, str(tmp),
                      metadata={"start": str(lo), "end": str(hi)})
            os.replace(tmp, out / fname)
            manifest["shards"].append({"index": s, "file": fname, "start": lo, "end": hi,
                                       "bytes": (out / fname).stat().st_size})
            manifest["shards"].sort(key=lambda d: d["index"])
            manifest["vocab_size"] = int(out_logits.shape[-1])
            _write_json_atomic(mpath, manifest)
            if on_shard is not None:
                on_shard(s, n_shards)
        if bar is not None:
            bar.close()
    if "vocab_size" not in manifest:
        raise StepError(f"{out}: cache has no shards")
    manifest["complete"] = True
    _write_json_atomic(mpath, manifest)
    return TeacherCache(out)
