"""The fuse training loop's resumable state, without pickle: safetensors and JSON only.

A state folder holds exactly these files (``world`` = number of processes)::

    model.safetensors        the model's state_dict, tied tensors stored once (under their first name)
    optimizer.safetensors    AdamW's per-parameter tensors, keyed ``<parameter name>#<key>``
                             (``exp_avg``, ``exp_avg_sq``, ``step``, ``max_exp_avg_sq`` with amsgrad)
    state.json               format tag, tied-tensor aliases, optimizer param_groups (hyperparameters,
                             parameters by name) and non-tensor per-parameter values, GradScaler state
    progress.json            step, epoch, batch in the epoch, loss log (the data order is a function of
                             the seed and the epoch, docs/fusion.md)
    rank-<r>.safetensors     process r's torch CPU generator state, CUDA generators (when CUDA is
                             available), numpy's MT19937 key
    rank-<r>.json            process r's Python ``random`` state, numpy's scalars, accelerate's
                             gradient-accumulation counter

:func:`save_train_state` writes them into ``<state>.saving`` (every rank its own
``rank-<r>.*``, the main process the rest), fsyncs files and folder, then swaps the
folder in with two renames (``<state>`` -> ``<state>.old``, ``.saving`` ->
``<state>``) and removes ``.old``; a kill at any point leaves the previous state
readable (:func:`recover` puts ``.old`` back if the kill fell between the renames).

:func:`read_train_state` never calls ``torch.load`` or ``pickle``: it refuses
(:class:`StateRefused`, one line naming the file) any folder that is not exactly
the expected files, any file that is not a regular file, a truncated or corrupt
safetensors file, and any key, dtype or shape that does not match the live model
and optimizer. Everything is checked before anything is applied, so a refused
state leaves the model, optimizer and generators untouched and the caller can
start over. See docs/fusion.md (Resuming).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..io.writer import sync_dir

__all__ = ["StateRefused", "LoadedState", "save_train_state", "read_train_state", "apply_train_state",
           "recover", "remove_state", "expected_files", "FORMAT"]

FORMAT = "surgeon-fuse-state/1"
_OPT_TENSOR_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_LOG_KEYS = {"step", "loss", "sft", "tokenwise", "gld"}  # what the loop reads back from a row; other fields: numbers
_JSON_LIMIT = 1 << 30  # the loss log grows with the steps; a state.json/progress.json over 1 GiB is not ours


class StateRefused(Exception):
    """A state folder that is not exactly what :func:`save_train_state` writes (message: one line, names the file)."""


@dataclass
class LoadedState:
    """A validated state, ready for :func:`apply_train_state` (which cannot fail on it)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]        # a torch ``optimizer.state_dict()``, indices as in the live optimizer
    scaler: Optional[dict[str, Any]]
    rng: dict[str, Any]              # this rank's generators
    accelerator_step: int
    progress: dict[str, Any]


def expected_files(world: int) -> set[str]:
    """The exact file names of a state folder written by ``world`` processes."""
    names = {"model.safetensors", "optimizer.safetensors", "state.json", "progress.json"}
    for r in range(world):
        names |= {f"rank-{r}.safetensors", f"rank-{r}.json"}
    return names


# ----------------------------------------------------------------------------- model
def _model_layout(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors to store, aliases)``: a state_dict entry that is the same view of the same storage
    as an earlier one (tied embeddings) is stored once, under the earlier name; ``aliases[later] = earlier``."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, aliases


# ----------------------------------------------------------------------------- optimizer
def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Each param group's parameters by name (tied parameters appear once under their first name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in opt.param_groups:
        row = []
        for p in g["params"]:
            if id(p) not in names:
                raise RuntimeError("fuse state: an optimizer parameter is not a parameter of the model")
            row.append(names[id(p)])
        out.append(row)
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise RuntimeError(f"fuse state: optimizer hyperparameter value {v!r} is not a plain number")


def _optimizer_parts(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    opt = _inner(optimizer)
    sd = opt.state_dict()
    groups = _param_names(model, opt)
    index_name = {}
    for g, names in zip(sd["param_groups"], groups):
        index_name.update(zip(g["params"], names))
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        name = index_name[idx]
        values[name] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                if k not in _OPT_TENSOR_KEYS:
                    raise RuntimeError(f"fuse state: unexpected optimizer state {k!r} (only AdamW/Adam are saved)")
                tensors[f"{name}#{k}"] = v.detach().to("cpu").contiguous()
            else:
                values[name][k] = _json_value(v)
    param_groups = [{**{k: _json_value(v) for k, v in g.items() if k != "params"}, "params": names}
                    for g, names in zip(sd["param_groups"], groups)]
    return tensors, {"param_groups": param_groups, "values": values}


# ----------------------------------------------------------------------------- RNG
def _rng_parts(accelerator_step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s.cpu()
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    meta = {"python_random": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "accelerator_step": int(accelerator_step)}
    return tensors, meta


# ----------------------------------------------------------------------------- writing
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT})
    _fsync_file(path)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _siblings(state_dir: Path) -> tuple[Path, Path]:
    return state_dir.with_name(state_dir.name + ".saving"), state_dir.with_name(state_dir.name + ".old")


def recover(state_dir: Path) -> None:
    """Finish or undo an interrupted swap (main process, before reading): a missing ``state_dir`` next to
    ``.old`` means the kill fell between the two renames, so ``.old`` (complete) is put back; a leftover
    ``.old`` next to ``state_dir`` is removed. ``.saving`` is never trusted."""
    saving, old = _siblings(state_dir)
    if old.is_dir() and not os.path.lexists(state_dir):
        os.rename(old, state_dir)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    if saving.is_dir():
        shutil.rmtree(saving, ignore_errors=True)


def remove_state(state_dir: Path) -> None:
    """Remove a state folder and any ``.saving``/``.old`` sibling."""
    for p in (state_dir, *_siblings(state_dir)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)


def save_train_state(state_dir: Path, *, model: torch.nn.Module, optimizer: Any, progress: dict[str, Any],
                     scaler: Any = None, accelerator_step: int = 0, rank: int = 0, world: int = 1,
                     barrier: Callable[[], None] = lambda: None) -> None:
    """Write the state atomically (see the module docstring); every process calls it.

    ``model``: the unwrapped model (``accelerator.unwrap_model``); ``optimizer``: the (possibly
    accelerate-wrapped) AdamW; ``scaler``: a GradScaler or None; ``barrier``: waits for every process.
    Only rank 0 writes the model, optimizer and progress (they are replicated under DDP); every rank
    writes its own generators."""
    state_dir = Path(state_dir)
    saving, old = _siblings(state_dir)
    barrier()
    if rank == 0:
        if os.path.lexists(saving):
            remove_state(saving)
        saving.mkdir(parents=True)
    barrier()
    rng_t, rng_j = _rng_parts(accelerator_step)
    _write_tensors(saving / f"rank-{rank}.safetensors", rng_t)
    _write_json(saving / f"rank-{rank}.json", rng_j)
    barrier()
    if rank == 0:
        kept, aliases = _model_layout(model)
        _write_tensors(saving / "model.safetensors", kept)
        opt_t, opt_j = _optimizer_parts(model, optimizer)
        _write_tensors(saving / "optimizer.safetensors", opt_t)
        _write_json(saving / "state.json", {"format": FORMAT, "world": world, "model_aliases": aliases,
                                            "optimizer": opt_j, "scaler": _scaler_state(scaler)})
        _write_json(saving / "progress.json", progress)
        sync_dir(saving)
        if os.path.lexists(old):
            remove_state(old)
        if os.path.lexists(state_dir):
            os.rename(state_dir, old)
        os.rename(saving, state_dir)
        sync_dir(state_dir.parent)
        if os.path.lexists(old):
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _scaler_state(scaler: Any) -> Optional[dict[str, Any]]:
    if scaler is None:
        return None
    sd = scaler.state_dict()
    for k, v in sd.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RuntimeError(f"fuse state: GradScaler state {k!r} is not a number")
    return dict(sd)


# ----------------------------------------------------------------------------- reading
def _json(path: Path) -> Any:
    from ..io.safe_files import read_regular

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise StateRefused(f"{path.name}: a key appears twice")
        return out

    try:
        return json.loads(read_regular(path, limit=_JSON_LIMIT).decode("utf-8"), object_pairs_hook=no_dupes)
    except StateRefused:
        raise
    except Exception as exc:
        raise StateRefused(f"{path.name}: not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                           ) from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, in memory of their own (one sequential read, one buffer).

    The header is checked by surgeon's parser (:mod:`surgeon.io.header`: bounds, gaps,
    duplicates); the tensors are views of the file's bytes (copies where a tensor's
    offset is not aligned to its element size). Not ``safetensors.load_file``: its
    tensors are copy-on-write views of a memory map that keep following the file, and
    copying them out page by page was 5x slower (6.7 s for SmolLM2-135M's state)."""
    from ..io.header import parse_header_bytes
    from ..io.safe_files import open_regular

    try:
        fd = open_regular(path)
        try:
            size = os.fstat(fd).st_size
            buf = torch.empty(size, dtype=torch.uint8)
            view, got = memoryview(buf.numpy()), 0
            while got < size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        if got != size:
            raise StateRefused(f"{path.name}: changed size while being read")
        n = int.from_bytes(bytes(buf[:8].numpy()), "little") if size >= 8 else 0
        header = parse_header_bytes(bytes(buf[: 8 + n].numpy()) if 8 + n <= size else bytes(buf.numpy()), size,
                                    path.name)
        out = {}
        for name, e in header.entries.items():
            raw = buf[header.data_start + e.start: header.data_start + e.end]
            item = torch.empty((), dtype=e.dtype).element_size()
            if (header.data_start + e.start) % item:
                raw = raw.clone()
            out[name] = raw.view(e.dtype).reshape(e.shape)
        return out
    except StateRefused:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg.startswith(path.name + ": "):
            msg = msg[len(path.name) + 2:]
        raise StateRefused(f"{path.name}: not a readable safetensors file ({msg})") from None


def _keys(where: str, got: Any, want: set[str]) -> None:
    if not isinstance(got, dict):
        raise StateRefused(f"{where}: expected an object")
    if set(got) != want:
        extra, missing = sorted(set(got) - want), sorted(want - set(got))
        raise StateRefused(f"{where}: unexpected keys {extra[:3]}" if extra else f"{where}: missing keys {missing[:3]}")


def _tensor_like(where: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise StateRefused(f"{where}: {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same_kind(where: str, live: Any, saved: Any) -> Any:
    """``saved`` (from JSON) as the Python type of ``live`` (tuples come back as tuples); refuses a mismatch."""
    if isinstance(live, tuple):
        if not isinstance(saved, list) or len(saved) != len(live):
            raise StateRefused(f"{where}: expected a list of {len(live)}")
        return tuple(_same_kind(where, a, b) for a, b in zip(live, saved))
    if live is None or isinstance(live, (bool, str)):
        if type(saved) is not type(live):
            raise StateRefused(f"{where}: expected {type(live).__name__}, got {saved!r}")
        return saved
    if _is_int(live):
        if not _is_int(saved):
            raise StateRefused(f"{where}: expected an integer, got {saved!r}")
        return saved
    if isinstance(live, float):
        if not isinstance(saved, float):
            raise StateRefused(f"{where}: expected a number, got {saved!r}")
        return saved
    raise StateRefused(f"{where}: the live optimizer's value {live!r} cannot be restored")


def _read_optimizer(folder: Path, meta: Any, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    opt = _inner(optimizer)
    live = opt.state_dict()
    groups = _param_names(model, opt)
    _keys("state.json optimizer", meta, {"param_groups", "values"})
    saved_groups = meta["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(live["param_groups"]):
        raise StateRefused(f"state.json optimizer.param_groups: expected {len(live['param_groups'])} groups")
    shapes = {n: (p.dtype, tuple(p.shape)) for n, p in model.named_parameters()}
    param_groups, name_index = [], {}
    for gi, (lg, sg, names) in enumerate(zip(live["param_groups"], saved_groups, groups)):
        where = f"state.json optimizer.param_groups[{gi}]"
        _keys(where, sg, set(lg))
        if sg["params"] != names:
            raise StateRefused(f"{where}.params: not the model's parameters in the optimizer's order")
        g = {k: _same_kind(f"{where}.{k}", v, sg[k]) for k, v in lg.items() if k != "params"}
        g["params"] = list(lg["params"])
        param_groups.append(g)
        name_index.update(zip(names, lg["params"]))
    values = meta["values"]
    if not isinstance(values, dict) or not set(values) <= set(name_index):
        raise StateRefused("state.json optimizer.values: names a tensor that is not an optimized parameter")
    tensors = _tensors(folder / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    amsgrad = any(g.get("amsgrad") for g in param_groups)
    for key, t in tensors.items():
        name, _, k = key.rpartition("#")
        if name not in values or k not in _OPT_TENSOR_KEYS or (k == "max_exp_avg_sq" and not amsgrad):
            raise StateRefused(f"optimizer.safetensors: unexpected tensor {key!r}")
        dtype, shape = shapes[name]
        if k == "step":
            _tensor_like(f"optimizer.safetensors {key}", t, torch.float32, ())
        else:
            _tensor_like(f"optimizer.safetensors {key}", t, dtype, shape)
        state.setdefault(name_index[name], {})[k] = t
    for name, vals in values.items():
        st = state.setdefault(name_index[name], {})
        want = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
        if not isinstance(vals, dict) or vals or set(st) != want:
            raise StateRefused(f"optimizer.safetensors: parameter {name!r} lacks {sorted(want - set(st))[:3]} "
                               "or has non-tensor values")
    return {"state": state, "param_groups": param_groups}


def _read_rng(folder: Path, rank: int) -> tuple[dict[str, Any], int]:
    tensors = _tensors(folder / f"rank-{rank}.safetensors")
    meta = _json(folder / f"rank-{rank}.json")
    name = f"rank-{rank}"
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _keys(f"{name}.safetensors", tensors, {"torch_cpu", "numpy_keys", *(f"cuda_{i}" for i in range(cuda))})
    _tensor_like(f"{name}.safetensors torch_cpu", tensors["torch_cpu"], torch.uint8, tuple(torch.get_rng_state().shape))
    for i in range(cuda):
        _tensor_like(f"{name}.safetensors cuda_{i}", tensors[f"cuda_{i}"], torch.uint8,
                     tuple(torch.cuda.get_rng_state(i).shape))
    keys = tensors["numpy_keys"]
    _tensor_like(f"{name}.safetensors numpy_keys", keys, torch.int64, (624,))
    if bool(((keys < 0) | (keys >= 1 << 32)).any()):
        raise StateRefused(f"{name}.safetensors numpy_keys: values outside uint32")
    _keys(f"{name}.json", meta, {"python_random", "numpy", "accelerator_step"})
    py, npm = meta["python_random"], meta["numpy"]
    _keys(f"{name}.json python_random", py, {"version", "internal", "gauss_next"})
    internal = py["internal"]
    if (py["version"] != 3 or not isinstance(internal, list) or len(internal) != 625
            or not all(_is_int(x) and 0 <= x < 1 << 32 for x in internal)
            or not (py["gauss_next"] is None or isinstance(py["gauss_next"], float))):
        raise StateRefused(f"{name}.json python_random: not a Mersenne Twister state")
    _keys(f"{name}.json numpy", npm, {"kind", "pos", "has_gauss", "cached_gaussian"})
    if (npm["kind"] != "MT19937" or not _is_int(npm["pos"]) or not 0 <= npm["pos"] <= 624
            or npm["has_gauss"] not in (0, 1) or not isinstance(npm["cached_gaussian"], float)):
        raise StateRefused(f"{name}.json numpy: not an MT19937 state")
    step = meta["accelerator_step"]
    if not _is_int(step) or step < 0:
        raise StateRefused(f"{name}.json accelerator_step: expected a non-negative integer")
    # own storage (torch.set_rng_state misreads a view into a larger buffer), each state tried on a
    # throwaway generator first so that applying it cannot fail half-way
    rng = {"torch_cpu": tensors["torch_cpu"].clone(), "cuda": [tensors[f"cuda_{i}"].clone() for i in range(cuda)],
           "python": (3, tuple(internal), py["gauss_next"]),
           "numpy": ("MT19937", keys.numpy().astype("uint32"), npm["pos"], npm["has_gauss"], npm["cached_gaussian"])}
    import numpy as np

    for what, trial in (("torch_cpu", lambda: torch.Generator().set_state(rng["torch_cpu"])),
                        *((f"cuda_{i}", lambda i=i: torch.Generator(device=f"cuda:{i}").set_state(rng["cuda"][i]))
                          for i in range(cuda)),
                        ("python_random", lambda: random.Random().setstate(rng["python"])),
                        ("numpy", lambda: np.random.RandomState().set_state(rng["numpy"]))):
        try:
            trial()
        except Exception as exc:
            raise StateRefused(f"{name}: {what} is not a valid generator state ({str(exc)[:80]})") from None
    return rng, step


def _read_progress(folder: Path) -> dict[str, Any]:
    prog = _json(folder / "progress.json")
    _keys("progress.json", prog, {"step", "epoch", "batch_in_epoch", "log"})
    for k in ("step", "epoch", "batch_in_epoch"):
        if not _is_int(prog[k]) or prog[k] < 0:
            raise StateRefused(f"progress.json {k}: expected a non-negative integer")
    log = prog["log"]
    if not isinstance(log, list) or len(log) != prog["step"]:
        raise StateRefused("progress.json log: expected one row per step done")
    for i, row in enumerate(log):
        if (not isinstance(row, dict) or not _LOG_KEYS <= set(row) or len(row) > 64
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values())):
            raise StateRefused(f"progress.json log[{i}]: not a row of the loss log")
    return prog


def read_train_state(state_dir: Path, *, model: torch.nn.Module, optimizer: Any, scaler: Any = None, rank: int = 0,
                     world: int = 1) -> LoadedState:
    """Read and check a state folder against the live (unwrapped) model, optimizer and scaler; apply nothing.

    Raises :class:`StateRefused` (one line, naming the file) for anything but exactly what
    :func:`save_train_state` writes for ``world`` processes."""
    folder = Path(state_dir)
    try:
        entries = {e.name: e for e in os.scandir(folder)}
    except OSError as exc:
        raise StateRefused(f"{folder.name}: cannot list ({exc.strerror or exc})") from None
    want = expected_files(world)
    extra = sorted(set(entries) - want)
    if extra:
        raise StateRefused(f"{extra[0]}: not a file of surgeon's state (state files are safetensors and JSON only)")
    missing = sorted(want - set(entries))
    if missing:
        raise StateRefused(f"{missing[0]}: missing")
    for name, e in entries.items():
        if not stat.S_ISREG(e.stat(follow_symlinks=False).st_mode):
            raise StateRefused(f"{name}: not a regular file")
    meta = _json(folder / "state.json")
    _keys("state.json", meta, {"format", "world", "model_aliases", "optimizer", "scaler"})
    if meta["format"] != FORMAT:
        raise StateRefused(f"state.json format: {meta['format']!r}, expected {FORMAT!r}")
    if meta["world"] != world:
        raise StateRefused(f"state.json world: {meta['world']!r} processes, this run has {world}")
    kept, aliases = _model_layout(model)
    if meta["model_aliases"] != aliases:
        raise StateRefused("state.json model_aliases: the tied tensors differ from the model's")
    tensors = _tensors(folder / "model.safetensors")
    _keys("model.safetensors", tensors, set(kept))
    for name, live in kept.items():
        _tensor_like(f"model.safetensors {name}", tensors[name], live.dtype, tuple(live.shape))
    opt_sd = _read_optimizer(folder, meta["optimizer"], model, optimizer)
    scaler_sd = None
    if scaler is None:
        if meta["scaler"] is not None:
            raise StateRefused("state.json scaler: saved with a gradient scaler, this run has none")
    else:
        live = scaler.state_dict()
        _keys("state.json scaler", meta["scaler"], set(live))
        scaler_sd = {k: _same_kind(f"state.json scaler.{k}", v, meta["scaler"][k]) for k, v in live.items()}
    rng, acc_step = _read_rng(folder, rank)
    return LoadedState(model=tensors, optimizer=opt_sd, scaler=scaler_sd, rng=rng, accelerator_step=acc_step,
                       progress=_read_progress(folder))


def apply_train_state(state: LoadedState, *, model: torch.nn.Module, optimizer: Any, scaler: Any = None) -> None:
    """Copy a :func:`read_train_state` result into the live objects (in place: parameter identities, ties and
    the optimizer's references stay) and set this process's generators."""
    import numpy as np

    kept, _ = _model_layout(model)
    with torch.no_grad():
        for name, live in kept.items():
            live.copy_(state.model[name])
    _inner(optimizer).load_state_dict(state.optimizer)
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)
    torch.set_rng_state(state.rng["torch_cpu"])
    if state.rng["cuda"]:
        torch.cuda.set_rng_state_all(state.rng["cuda"])
    random.setstate(state.rng["python"])
    np.random.set_state(state.rng["numpy"])
