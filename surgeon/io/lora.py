"""LoRA adapters applied while a model's tensors stream (``model+adapter`` inputs).

mergekit writes an input as ``<model>+<adapter>`` and merges the PEFT adapter
into the model (saving a merged copy in a cache folder) before it merges
anything. surgeon reads the adapter once (its ``lora_A``/``lora_B`` matrices
are small) and adds each targeted tensor's update when that tensor is read:

    W' = W + (B @ A) * scale          (scale = lora_alpha / r; with use_rslora: lora_alpha / sqrt(r))

computed in float32 and stored back in the tensor's own dtype, so the input a
merge sees is the tensor the merged model would hold — without writing the
merged model anywhere. Embedding adapters (``lora_embedding_A``/``_B``) add
``(B @ A)^T * scale``; ``fan_in_fan_out`` adapters (GPT-2's Conv1D) add the
transpose. ``rank_pattern``/``alpha_pattern`` (per-module rank or alpha) are
applied by module name.

Refused by name (one line, exit 2): adapters that are not LoRA (``peft_type``),
DoRA (``use_dora``), bias training (``bias`` other than ``none``),
``modules_to_save`` (whole replaced modules), ``layer_replication``, pickled
adapter weights, and adapter tensors that name a module the model does not
have or whose shapes do not fit. See docs/merging.md ("LoRA inputs").
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InvalidInputError
from .checkpoint import Checkpoint, cast_to

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?"
                  r"(?P<suffix>\.weight)?$")


def split_adapter_ref(raw: str, exists: Any = None) -> tuple[str, str | None]:
    """``"model+adapter"`` -> ``("model", "adapter")``; a reference without ``+`` (or an existing path
    containing one: ``exists(raw)``, by default os.path.exists) -> ``(raw, None)``. More than one ``+``
    is refused."""
    s = str(raw).strip()
    exists = exists or (lambda p: os.path.exists(os.path.expanduser(p)))
    if "+" not in s or exists(s):
        return s, None
    parts = s.split("+")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise InvalidInputError(f"{s!r}: expected MODEL+ADAPTER (one '+'); paths with '+' must exist as given")
    return parts[0], parts[1]


@dataclass
class _Update:
    a: torch.Tensor     # [r, in]  (embeddings: [r, num_embeddings])
    b: torch.Tensor     # [out, r] (embeddings: [dim, r])
    scale: float
    transpose: bool     # add (B @ A)^T: embeddings, fan_in_fan_out


class LoraAdapter:
    """A PEFT LoRA adapter read into memory: target tensor name -> update."""

    def __init__(self, folder: Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        cfg_path = self.folder / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise InvalidInputError(f"{self.label}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{cfg_path}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise InvalidInputError(f"{cfg_path}: expected a JSON object")
        self.config = cfg
        self._check_config(cfg_path, cfg)
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = [p.name for p in self.folder.glob("adapter_model.bin")]
            what = f"only {pickled[0]} (pickled; convert it to safetensors)" if pickled else "no weights"
            raise InvalidInputError(f"{self.label}: {ADAPTER_WEIGHTS} missing ({what})")
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{weights}: cannot read ({exc})") from None
        self.updates = self._pair(weights, tensors, cfg)

    @staticmethod
    def _check_config(path: Path, cfg: dict[str, Any]) -> None:
        def refuse(key: str, why: str) -> None:
            raise InvalidInputError(f"{path}: {key}: {why}; surgeon applies plain LoRA adapters only")

        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            refuse("peft_type", f"{cfg.get('peft_type')!r} is not LORA")
        if cfg.get("use_dora"):
            refuse("use_dora", "DoRA adapters are not supported")
        if cfg.get("bias", "none") not in (None, "none"):
            refuse("bias", f"{cfg.get('bias')!r} (trained biases) is not supported")
        if cfg.get("modules_to_save"):
            refuse("modules_to_save", f"{cfg['modules_to_save']} (whole replaced modules) is not supported")
        if cfg.get("layer_replication"):
            refuse("layer_replication", "is not supported")
        if cfg.get("trainable_token_indices"):
            refuse("trainable_token_indices", "is not supported")
        for key in ("r", "lora_alpha"):
            v = cfg.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                refuse(key, f"must be a positive number, got {v!r}")

    def _scale(self, module: str) -> float:
        cfg = self.config
        r, alpha = cfg["r"], cfg["lora_alpha"]
        for key, pattern in ((("r", cfg.get("rank_pattern") or {})), ("lora_alpha", cfg.get("alpha_pattern") or {})):
            for pat, value in pattern.items():
                if re.match(rf"(.*\.)?({pat})$", module):
                    if key == "r":
                        r = value
                    else:
                        alpha = value
                    break
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _pair(self, file: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, _Update]:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name = key.removeprefix(_PREFIX)
            m = _KEY.match(name)
            if m is None:
                raise InvalidInputError(f"{file}: tensor {key!r} is not a LoRA matrix (lora_A/lora_B); "
                                        "modules_to_save and other adapter kinds are not supported")
            if m.group("name") not in (None, "default", "weight"):
                raise InvalidInputError(f"{file}: tensor {key!r} belongs to adapter {m.group('name')!r}; "
                                        "only single-adapter files are supported")
            parts.setdefault(m.group("module"), {})[m.group("part")] = t
        fan = bool(cfg.get("fan_in_fan_out"))
        out: dict[str, _Update] = {}
        for module, p in parts.items():
            emb = "lora_embedding_A" in p or "lora_embedding_B" in p
            a = p.get("lora_embedding_A" if emb else "lora_A")
            b = p.get("lora_embedding_B" if emb else "lora_B")
            if a is None or b is None:
                raise InvalidInputError(f"{file}: module {module!r} has only one of its LoRA matrices")
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise InvalidInputError(f"{file}: module {module!r}: LoRA shapes {list(b.shape)} @ {list(a.shape)} "
                                        "do not chain (only linear and embedding layers are supported)")
            out[module + ".weight"] = _Update(a, b, self._scale(module), transpose=emb or fan)
        return out

    def delta(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the float32 update for tensor ``name``."""
        u = self.updates[name]
        a, b = u.a.to(torch.float32), u.b.to(torch.float32)
        if u.transpose:
            if start == 0 and stop is None:  # PEFT's own order of operations
                return (b @ a).t() * u.scale
            return (a.t()[start:stop] @ b.t()) * u.scale  # rows of (B @ A)^T are columns of A
        return (b[start:stop] @ a) * u.scale

    def check_against(self, ck: Checkpoint) -> None:
        """Every update must target a tensor of ``ck`` with a matching 2-D shape."""
        for name, u in self.updates.items():
            if name not in ck:
                raise InvalidInputError(f"{self.label}: adapts {name!r}, which model {ck.label} does not have")
            shape = tuple(ck.info(name).shape)
            want = (u.a.shape[1], u.b.shape[0]) if u.transpose else (u.b.shape[0], u.a.shape[1])
            if shape != want:
                raise InvalidInputError(f"{self.label}: update for {name!r} has shape {list(want)}, the tensor in "
                                        f"{ck.label} has {list(shape)}")


class LoraCheckpoint(Checkpoint):
    """A checkpoint whose adapted tensors read as ``W + update`` (stored dtype; see the module doc)."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        adapter.check_against(base)
        super().__init__(base.path, base._tensors, base.config, pickled=base._pickled,
                         label=f"{base.label}+{adapter.label}")
        self.base, self.adapter = base, adapter

    @property
    def headers_only(self) -> bool:
        """True while the base is known from its headers only (the pipeline reopens it to read)."""
        return bool(getattr(self.base, "headers_only", False))

    @property
    def files(self) -> list[Path]:
        return [*super().files, self.adapter.folder / ADAPTER_CONFIG, self.adapter.folder / ADAPTER_WEIGHTS]

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        t = self.base.get(name)
        if name in self.adapter.updates:
            t = (t.to(torch.float32) + self.adapter.delta(name)).to(t.dtype)
        return cast_to(t, dtype, device)

    def get_rows(self, name: str, start: int, stop: int, pin: bool = False,
                 out: torch.Tensor | None = None, keep: bool = True) -> torch.Tensor:
        t = self.base.get_rows(name, start, stop, pin=pin, out=out, keep=keep)
        if name not in self.adapter.updates:
            return t
        if not t.shape:
            raise CheckpointError(f"{self.label}: tensor {name!r} is a scalar but the adapter updates it")
        return (t.to(torch.float32) + self.adapter.delta(name, start, stop)).to(t.dtype)

    def close(self) -> None:
        base = getattr(self, "base", None)
        if base is not None:
            base.close()
        if hasattr(self, "_fds"):  # absent when __init__ refused the adapter
            super().close()


def open_adapter(raw: str, resolve_path: Any = None, progress: bool = False) -> LoraAdapter:
    """The adapter of a ``model+adapter`` reference: a local folder, or a hub repository (only its
    ``adapter_config.json`` and ``adapter_model.safetensors`` are fetched, through huggingface-hub's cache)."""
    from .refs import parse_ref

    ref = parse_ref(resolve_path(raw) if resolve_path is not None else raw)
    if not ref.is_hub:
        assert ref.local is not None
        if not ref.local.is_dir():
            raise InvalidInputError(f"adapter {raw!r}: no such folder ({ref.local})")
        return LoraAdapter(ref.local, label=raw)
    from . import hub

    what = f"adapter {ref.repo_id}" + (f"@{ref.revision}" if ref.revision else "")
    try:
        with hub._progress_bars(progress):
            api = hub._api()
            sha = hub._resolve_revision(api, ref.repo_id, ref.revision)
            folder = hub._download(ref.repo_id, sha, [ADAPTER_CONFIG, ADAPTER_WEIGHTS], None, hub.is_offline(), what)
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface-hub, httpx/requests and OS errors
        raise InvalidInputError(hub._hub_error(exc, what)) from None
    return LoraAdapter(folder, label=f"{ref.repo_id}@{sha[:12]}")


def with_adapter(ck: Checkpoint, adapter: LoraAdapter) -> Checkpoint:
    """``ck`` whose tensors read with ``adapter`` applied."""
    return LoraCheckpoint(ck, adapter)
