"""fuse's resumable state is safetensors + JSON only: never written or read with pickle (surgeon/fusion/train_state.py)."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from surgeon.fusion import fuse
from surgeon.fusion import train_state as ts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(max_length=32, batch_size=4, steps=4, lr=1e-3, top_k=4)


@pytest.fixture
def tiny(make_tiny_llama, tmp_path):
    pivot = make_tiny_llama("pivot", seed=0, dtype=torch.float32)  # tied embeddings (the default)
    same = make_tiny_llama("same", seed=1, dtype=torch.float32, tokenizer_from=pivot)
    data = tmp_path / "train.txt"
    data.write_text(("the quick brown fox jumps over the lazy dog. shall i compare thee to a summer's day?\n"
                     "def add(a, b):\n    return a + b\n") * 12)
    return {"pivot": pivot, "same": same, "data": data}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _run(tiny, out: Path, work: Path, *, stop_at: int | None = None, progress: bool = False) -> dict:
    def stop(step, row):
        if step == stop_at:
            raise KeyboardInterrupt

    opts = {"work_dir": str(work), "save_every": 2}
    if stop_at is None:
        return fuse(tiny["pivot"], [{"path": str(tiny["same"])}], tiny["data"], out, options=opts, progress=progress,
                    **COMMON)
    with pytest.raises(KeyboardInterrupt):
        fuse(tiny["pivot"], [{"path": str(tiny["same"])}], tiny["data"], out, options=opts, callback=stop,
             progress=progress, **COMMON)
    return {}


def _state_dir(work: Path) -> Path:
    (d,) = [p for p in work.iterdir() if p.name.startswith("state-")]
    return d


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-exact


# ----------------------------------------------------------------------------- unit: exact round trip
def _model_and_optimizer(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    return model, opt


def _train(model, opt, steps: int) -> None:
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _prog(step: int) -> dict:
    row = {"epoch": 0, "lr": 1e-3, "loss": 1.5, "sft": 1.5, "tokenwise": 0.0, "gld": 0.0, "tokens": 16,
           "tokens_step": 16, "seconds": 0.1, "tokens_per_s": 160.0}
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "log": [{**row, "step": i + 1} for i in range(step)]}


def _assert_equal_state_dicts(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_state_dicts(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_state_dicts(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


def test_round_trip_rebuilds_model_optimizer_and_generators_exactly(tmp_path):
    import copy

    model, opt = _model_and_optimizer()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _train(model, opt, 3)
    random.random(), np.random.rand()  # move every generator off its seed
    state = tmp_path / "state-x"
    log = _prog(3)["log"]
    ts.save_train_state(state, model=model, optimizer=opt, accelerator_step=3, progress=_prog(3))
    assert {p.name for p in state.iterdir()} == ts.expected_files(1)
    with (state / "model.safetensors").open("rb") as f:  # the tied head is stored once
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header
    snap_opt, snap_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    snap_rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    _train(model, opt, 2)  # the uninterrupted run goes on

    fresh, fresh_opt = _model_and_optimizer(seed=5)
    torch.manual_seed(123), random.seed(1), np.random.seed(2)
    loaded = ts.read_train_state(state, model=fresh, optimizer=fresh_opt)
    ts.apply_train_state(loaded, model=fresh, optimizer=fresh_opt)
    _assert_equal_state_dicts(snap_opt, fresh_opt.state_dict(), "optimizer")  # every tensor and scalar
    _assert_equal_state_dicts(snap_model, fresh.state_dict(), "model")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    assert [id(p) for g in fresh_opt.param_groups for p in g["params"]] == [id(p) for p in fresh.parameters()]
    assert torch.equal(torch.get_rng_state(), snap_rng[0]) and random.getstate() == snap_rng[1]
    np_now = np.random.get_state()
    assert np_now[0] == snap_rng[2][0] and np.array_equal(np_now[1], snap_rng[2][1]) and np_now[2:] == snap_rng[2][2:]
    assert loaded.accelerator_step == 3 and loaded.progress["log"] == log
    _train(fresh, fresh_opt, 2)  # the resumed run ends bit-identical
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n


def test_a_kill_during_a_save_leaves_the_previous_state(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    _train(model, opt, 1)
    state = tmp_path / "state-x"
    ts.save_train_state(state, model=model, optimizer=opt, progress=_prog(1))
    _train(model, opt, 1)
    real = ts._write_json

    def dies_on_progress(path, obj):
        if path.name == "progress.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(ts, "_write_json", dies_on_progress)
    with pytest.raises(KeyboardInterrupt):
        ts.save_train_state(state, model=model, optimizer=opt,
                            progress=_prog(2))
    monkeypatch.undo()
    ts.recover(state)
    assert not state.with_name("state-x.saving").exists()
    fresh, fresh_opt = _model_and_optimizer(seed=3)
    assert ts.read_train_state(state, model=fresh, optimizer=fresh_opt).progress["step"] == 1
    # a kill between the two renames of the swap: the previous folder is put back
    state.rename(state.with_name("state-x.old"))
    ts.recover(state)
    assert ts.read_train_state(state, model=fresh, optimizer=fresh_opt).progress["step"] == 1


def test_mismatched_states_are_refused_by_name(tmp_path):
    model, opt = _model_and_optimizer()
    _train(model, opt, 1)
    state = tmp_path / "state-x"
    prog = _prog(1)
    ts.save_train_state(state, model=model, optimizer=opt, progress=prog)
    with pytest.raises(ts.StateRefused, match="rank-1.json: missing"):
        ts.read_train_state(state, model=model, optimizer=opt, world=2)
    from safetensors.torch import load_file, save_file

    path = state / "optimizer.safetensors"
    good = path.read_bytes()
    t = load_file(str(path))
    t[next(k for k in t if k.endswith("#exp_avg"))] = torch.zeros(3, dtype=torch.float64)
    save_file(t, str(path))
    with pytest.raises(ts.StateRefused, match=r"optimizer.safetensors .*#exp_avg: torch.float64 \[3\], expected"):
        ts.read_train_state(state, model=model, optimizer=opt)
    path.write_bytes(good)
    meta = json.loads((state / "state.json").read_text())
    meta["optimizer"]["param_groups"][0]["betas"] = "0.9"
    (state / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ts.StateRefused, match=r"state.json optimizer.param_groups\[0\].betas"):
        ts.read_train_state(state, model=model, optimizer=opt)
    bad = {**prog, "log": [{"step": 1, "loss": "x"}]}
    ts.save_train_state(state, model=model, optimizer=opt, progress=bad)
    with pytest.raises(ts.StateRefused, match=r"progress.json log\[0\]: not a row"):
        ts.read_train_state(state, model=model, optimizer=opt)
    ts.save_train_state(state, model=model, optimizer=opt, progress=prog)
    rng = load_file(str(state / "rank-0.safetensors"))
    rng["torch_cpu"] = torch.full_like(rng["torch_cpu"], 7)  # right size and dtype, not a Mersenne Twister state
    save_file(rng, str(state / "rank-0.safetensors"))
    before = torch.get_rng_state()
    with pytest.raises(ts.StateRefused, match="rank-0: torch_cpu is not a valid generator state"):
        ts.read_train_state(state, model=model, optimizer=opt)
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- the fuse loop
def test_saved_state_is_only_safetensors_and_json_and_resume_is_bit_exact(tiny, tmp_path):
    _run(tiny, tmp_path / "a", tmp_path / "wa", stop_at=3)
    state = _state_dir(tmp_path / "wa")
    names = {p.name for p in state.iterdir()}
    assert names == ts.expected_files(1)
    assert not any(n.endswith((".pkl", ".bin", ".pt", ".pth")) for n in names)
    from safetensors import safe_open

    for p in state.iterdir():
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys())
        else:
            assert p.suffix == ".json"
            json.loads(p.read_text())
    assert json.loads((state / "progress.json").read_text())["step"] == 2
    rep = _run(tiny, tmp_path / "a", tmp_path / "wa")
    assert rep["resumed_from"] == 2 and [r["step"] for r in rep["log"]] == [1, 2, 3, 4]
    assert not any(p.name.startswith("state-") for p in (tmp_path / "wa").iterdir())
    ref = _run(tiny, tmp_path / "b", tmp_path / "wb")
    assert ref["resumed_from"] is None
    _assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert [r["loss"] for r in rep["log"]] == [r["loss"] for r in ref["log"]]


class _Plant:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_never_unpickled_and_the_run_starts_over(tiny, tmp_path, capsys, monkeypatch):
    _run(tiny, tmp_path / "a", tmp_path / "wa", stop_at=3)
    state = _state_dir(tmp_path / "wa")
    marker = tmp_path / "PWNED"
    (state / "random_states_0.pkl").write_bytes(pickle.dumps(_Plant(marker)))
    pickle.loads((state / "random_states_0.pkl").read_bytes())  # the plant works when unpickled...
    assert marker.exists()
    marker.unlink()

    def no_unpickling(*a, **k):
        raise AssertionError("unpickling during resume")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    capsys.readouterr()
    rep = _run(tiny, tmp_path / "a", tmp_path / "wa", progress=True)
    out = capsys.readouterr()
    assert not marker.exists()  # ...and resuming never unpickled it
    assert "cannot resume" in out.out + out.err and "random_states_0.pkl" in out.out + out.err
    assert rep["resumed_from"] is None and [r["step"] for r in rep["log"]] == [1, 2, 3, 4]
    monkeypatch.undo()
    _run(tiny, tmp_path / "b", tmp_path / "wb")
    _assert_same_weights(tmp_path / "a", tmp_path / "b")  # starting over is a clean run


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_safetensors_state_is_refused_by_name_and_the_run_starts_over(tiny, tmp_path, capsys, damage):
    _run(tiny, tmp_path / "a", tmp_path / "wa", stop_at=3)
    path = _state_dir(tmp_path / "wa") / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100] if damage == "truncate" else raw[:8] + b"{not json" + raw[17:])
    capsys.readouterr()
    rep = _run(tiny, tmp_path / "a", tmp_path / "wa", progress=True)
    text = "".join(capsys.readouterr())
    line = next(x for x in text.splitlines() if "cannot resume" in x)
    assert "model.safetensors" in line and "starting over" in line
    assert rep["resumed_from"] is None and [r["step"] for r in rep["log"]] == [1, 2, 3, 4]


def test_a_gradient_scaler_state_round_trips(tmp_path):
    model, opt = _model_and_optimizer()
    _train(model, opt, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=7)
    scaler.scale(torch.tensor(1.0))  # initialises the scale tensor
    scaler.update(new_scale=96.0)
    state = tmp_path / "state-x"
    ts.save_train_state(state, model=model, optimizer=opt, scaler=scaler,
                        progress=_prog(1))
    fresh = torch.amp.GradScaler("cpu", growth_interval=7)
    ts.apply_train_state(ts.read_train_state(state, model=model, optimizer=opt, scaler=fresh), model=model,
                         optimizer=opt, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 96.0
    with pytest.raises(ts.StateRefused, match="state.json scaler"):
        ts.read_train_state(state, model=model, optimizer=opt)  # a run without a scaler does not take this state


def test_the_fuse_loop_has_no_pickling_path():
    """accelerate's save_state/load_state pickle; the loop must not call them, and the state module never unpickles."""
    import ast

    root = Path(__file__).resolve().parents[1] / "surgeon" / "fusion"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("save_state", "load_state", "load_custom_state"), f"{path.name}: {node.attr}"
                if path.name == "train_state.py":
                    assert not (node.attr in ("load", "loads", "Unpickler")
                                and isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle")), path
            if isinstance(node, (ast.Import, ast.ImportFrom)) and path.name == "train_state.py":
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), path
