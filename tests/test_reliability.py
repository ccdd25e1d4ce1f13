"""Reliability: interrupted runs resume to byte-identical output, failures leave nothing half-written,
merges compute in float32, and nothing unsafe (pickle, remote code, tokens, paths) gets through.

The kill tests drive a real ``surgeon run`` in a subprocess. A small harness (``_HARNESS``) wraps
``CheckpointWriter.write``/``write_rows`` to log each written tensor and sleep a little after it, so a signal lands
mid-step at a known point (after N tensors are journaled) on any machine, however loaded.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgeon.merge.registry as registry
from conftest import models_section
from surgeon.cli import main
from surgeon.io import Checkpoint, CheckpointWriter

REPO = Path(__file__).resolve().parents[1]


def build_family(root: Path, *, vocab: int = 256, hidden: int = 32, layers: int = 2,
                 dtype: torch.dtype = torch.bfloat16, names: tuple[str, ...] = ("base", "ft1", "ft2", "ft3"),
                 tokenizer: bool = True) -> dict[str, Path]:
    """Llama-shaped checkpoints written with safetensors directly (no transformers: milliseconds).

    ``base`` is seeded noise; each other model is the base plus small seeded noise, like a fine-tune.
    """
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (2 * hidden, hidden), p + "mlp.up_proj.weight": (2 * hidden, hidden),
                   p + "mlp.down_proj.weight": (hidden, 2 * hidden)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": True}
    out = {}
    for k, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for j, (t, shape) in enumerate(shapes.items()):
            v = torch.randn(shape, generator=torch.Generator().manual_seed(j)) * 0.02
            if k:
                v += 0.002 * torch.randn(shape, generator=torch.Generator().manual_seed(1000 * k + j))
            tensors[t] = v.to(dtype)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        if tokenizer:
            (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}')
            (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("family"))

TWO_STEPS = """\
name: two-step
seed: 3
{models_section}steps:
  - id: ta
    merge:
      method: task_arithmetic
      base: base
      models:
        - {{model: ft1, weight: {w1}}}
        - {{model: ft2, weight: 0.4}}
      dtype: {dt1}
  - id: lin
    merge:
      method: linear
      models:
        - {{model: ta, weight: 0.7}}
        - {{model: ft3, weight: 0.3}}
      dtype: {dt2}
output:
  path: ./out
  max_shard_size: 20KB
"""


def _two_step_recipe(folder: Path, fam: dict[str, Path], w1: float = 0.6, name: str = "recipe.yaml",
                     dt1: str = "float32", dt2: str = "bfloat16") -> Path:
    p = folder / name
    p.write_text(TWO_STEPS.format(w1=w1, dt1=dt1, dt2=dt2, models_section=models_section(fam)))
    return p


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a checkpoint folder (the bytes a user would ship)."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "surgeon-partial" in p.name or "surgeon-old" in p.name)


# --------------------------------------------------------------------------- interrupted runs
_HARNESS = r"""
import os, signal, sys, time
# Ctrl-C as at a terminal, however the suite was started: a shell that runs a job in the
# background without job control (``( ... & )``) starts it with SIGINT ignored, and the
# children inherit that (the interrupted run below then finished and exited 0)
signal.signal(signal.SIGINT, signal.default_int_handler)
from surgeon.io import writer as W
_write = W.CheckpointWriter.write
def write(self, name, tensor):
    _write(self, name, tensor)
    with open(os.environ["SURGEON_TEST_LOG"], "a") as f:
        f.write(f"{self.dest.name} {name}\n")
    time.sleep(float(os.environ["SURGEON_TEST_DELAY"]))
W.CheckpointWriter.write = write
_write_rows = W.CheckpointWriter.write_rows
def write_rows(self, name, start, rows):
    _write_rows(self, name, start, rows)
    with open(os.environ["SURGEON_TEST_LOG"], "a") as f:
        f.write(f"{self.dest.name} {name}\n")
    time.sleep(float(os.environ["SURGEON_TEST_DELAY"]))
W.CheckpointWriter.write_rows = write_rows
from surgeon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _logged(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines() if " " in line]  # type: ignore[misc]


def _start(args: list[str], log: Path, delay: float = 0.1) -> subprocess.Popen:
    env = {**os.environ, "SURGEON_TEST_LOG": str(log), "SURGEON_TEST_DELAY": str(delay), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _HARNESS, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_after(proc: subprocess.Popen, log: Path, dest: str, n: int, sig: int, timeout: float = 120) -> str:
    """Send ``sig`` once the log shows ``n`` more tensors of ``dest`` than now; return the process's stderr."""
    start = sum(1 for d, _ in _logged(log) if d == dest)
    deadline = time.monotonic() + timeout
    while sum(1 for d, _ in _logged(log) if d == dest) < start + n:
        if proc.poll() is not None:
            raise AssertionError(f"surgeon exited ({proc.returncode}) before the kill point:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return err


def test_killed_and_interrupted_runs_resume_to_identical_output(tmp_path: Path, family: dict[str, Path],
                                                                monkeypatch, capsys) -> None:
    recipe = _two_step_recipe(tmp_path, family)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(ref), "-q"]) == 0
    n_tensors = len(Checkpoint.open(ref))
    log = tmp_path / "writes.log"
    args = ["run", str(recipe), "-o", str(out)]

    # 1. SIGKILL in the middle of step 1 (after 6 tensors): nothing final appears
    _signal_after(_start(args, log), log, "ta", 6, signal.SIGKILL)
    assert not out.exists()
    work = tmp_path / ".out.surgeon-work"
    journal = work / ".ta.surgeon-partial" / CheckpointWriter.JOURNAL
    assert len(journal.read_text().splitlines()) >= 6

    # 2. SIGKILL again, this time in step 2: step 1 resumed from its journal and finished
    _signal_after(_start(args, log), log, "out", 4, signal.SIGKILL)
    assert (work / "ta" / ".surgeon-step.json").exists() and not out.exists()
    assert (tmp_path / ".out.surgeon-partial").is_dir()

    # 3. Ctrl-C (SIGINT) in step 2: exit 130 and ONE line saying what is kept
    proc = _start(args, log)
    err = _signal_after(proc, log, "out", 3, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1]
    assert re.search(r"kept \d+ of \d+ tensors of out \(.*\.out\.surgeon-partial\); finished steps ta \(", lines[0])
    assert "step ta: already done" in err

    # 4. the same command again finishes; the result is byte-identical to the uninterrupted run
    original = CheckpointWriter.write

    def logged(self: CheckpointWriter, name: str, tensor: torch.Tensor) -> None:
        original(self, name, tensor)
        with open(log, "a") as f:
            f.write(f"{self.dest.name} {name}\n")

    original_rows = CheckpointWriter.write_rows

    def logged_rows(self: CheckpointWriter, name: str, start: int, rows: torch.Tensor) -> None:
        original_rows(self, name, start, rows)
        with open(log, "a") as f:
            f.write(f"{self.dest.name} {name}\n")

    monkeypatch.setattr(CheckpointWriter, "write", logged)
    monkeypatch.setattr(CheckpointWriter, "write_rows", logged_rows)
    assert main(["run", *args[1:], "-q"]) == 0
    assert _files(out) == _files(ref)
    assert _files(work / "ta") == _files(tmp_path / ".ref.surgeon-work" / "ta")
    assert _leftovers(tmp_path) == []
    # every tensor was computed about once over the four processes: resuming skipped the journaled ones
    writes = _logged(log)
    for dest in ("ta", "out"):
        names = [n for d, n in writes if d == dest]
        assert set(names) == {i.name for i in Checkpoint.open(ref).infos()}
        assert len(names) <= n_tensors + 2, f"{dest}: {len(names)} writes for {n_tensors} tensors"


def _interrupt_after(monkeypatch, method: str, calls: int, exc: BaseException) -> None:
    """Make merge method ``method`` raise ``exc`` on its ``calls``-th tensor."""
    m = registry.get_method(method)
    count = {"n": 0}

    def fn(t):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] == calls:
            raise exc
        return m.fn(t)

    # without its compiled kernel, so that every tensor goes through ``fn``
    monkeypatch.setitem(registry._METHODS, method, dataclasses.replace(m, fn=fn, kernel=None))


def test_changed_recipe_after_interruption_does_not_reuse_stale_tensors(tmp_path: Path, family: dict[str, Path],
                                                                       monkeypatch, capsys) -> None:
    recipe = _two_step_recipe(tmp_path, family, w1=0.6)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, "task_arithmetic", 8, KeyboardInterrupt())
        assert main(["run", str(recipe), "-q"]) == 130
    assert (tmp_path / ".out.surgeon-work" / ".ta.surgeon-partial").is_dir()
    # the user changes a weight (same tensors, same layout) and reruns: the 7 tensors merged with the old
    # weight must not be kept
    recipe.write_text(recipe.read_text().replace("weight: 0.6", "weight: 0.9"))
    assert main(["run", str(recipe), "-q"]) == 0
    fresh = _two_step_recipe(tmp_path, family, w1=0.9, name="fresh.yaml")
    assert main(["run", str(fresh), "-o", str(tmp_path / "fresh"), "-q"]) == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")


# --------------------------------------------------------------------------- nothing half-written
def _limit_file_size(limit: int):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writing past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("numba_cache", ["warm", "cold"])
def test_disk_full_fails_cleanly_naming_the_file(tmp_path: Path, family: dict[str, Path], numba_cache: str) -> None:
    """Also when the compiled loops are not cached yet: numba's cache files then fail to save under
    the same limit, which must cost only the cache (surgeon.merge.kernels._jit.best_effort_cache)."""
    # step 1 stores bfloat16 (shards fit under the limit); step 2 stores float32 and its embedding shard does not
    recipe = _two_step_recipe(tmp_path, family, dt1="bfloat16", dt2="float32")
    out = tmp_path / "out"
    code = REPO
    if numba_cache == "cold":  # a copy of the package: numba's in-tree cache starts empty
        code = tmp_path / "code"
        shutil.copytree(REPO / "surgeon", code / "surgeon", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    # run from tmp_path: ``-m`` puts the working directory first on sys.path, so from the repository the
    # "cold" run imported the repository's package (and its numba cache) instead of the copy
    proc = subprocess.run([sys.executable, "-m", "surgeon", "run", str(recipe), "-o", str(out), "-q"], env=env,
                          capture_output=True, text=True, preexec_fn=_limit_file_size(24_000), timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    msg = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: .*\.out\.surgeon-partial/model-0000\d-of-0000\d\.safetensors: .*File too large", msg), msg
    assert not out.exists() and _leftovers(tmp_path) == []
    # the finished first step is kept (a rerun with more room resumes from it), its staging folder is gone
    work = tmp_path / ".out.surgeon-work"
    assert (work / "ta" / ".surgeon-step.json").exists() and _leftovers(work) == []


def test_no_space_mid_write_keeps_previous_output(tmp_path: Path, family: dict[str, Path], monkeypatch,
                                                  capsys) -> None:
    import surgeon.io.writer as writer_module

    recipe = _two_step_recipe(tmp_path, family)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-q"]) == 0
    before = _files(out)
    recipe.write_text(recipe.read_text().replace("weight: 0.6", "weight: 0.5"))
    calls = {"n": 0}
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if offset and ".out.surgeon-partial" in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 3:  # step 1 is done; the disk fills up at the third tensor of step 2
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    assert main(["run", str(recipe), "-q", "--overwrite"]) == 3
    err = capsys.readouterr().err
    assert re.search(r"error: .*\.out\.surgeon-partial/model\S*\.safetensors: writing tensor '[^']+' failed "
                     r"\(No space left on device\)", err), err
    assert _files(out) == before, "the previous output was touched"
    assert _leftovers(tmp_path) == []


def test_permission_error_names_the_folder_and_leaves_nothing(tmp_path: Path, family: dict[str, Path], monkeypatch,
                                                              capsys) -> None:
    import surgeon.io.writer as writer_module

    recipe = _two_step_recipe(tmp_path, family)
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        if self.name == ".out.surgeon-partial":  # as root chmod cannot forbid it; fake the EACCES
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *a, **kw)

    monkeypatch.setattr(writer_module.Path, "mkdir", mkdir)
    assert main(["run", str(recipe), "-q"]) == 3
    err = capsys.readouterr().err
    assert re.search(r"error: .*\.out\.surgeon-partial: cannot prepare output \(Permission denied\)", err), err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(tmp_path: Path, family: dict[str, Path], capsys) -> None:
    recipe = _two_step_recipe(tmp_path, family)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", str(recipe), "-o", str(ro / "out"), "--work-dir", str(tmp_path / "w"), "-q"]) == 3
        assert "Permission denied" in capsys.readouterr().err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------- numerics
def test_bf16_inputs_are_merged_in_float32(tmp_path: Path) -> None:
    fam = build_family(tmp_path, names=("a", "b", "c"), hidden=64)
    weights = [0.3, 0.3, 0.4]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
models: {{a: {fam['a']}, b: {fam['b']}, c: {fam['c']}}}
steps:
  - id: avg
    merge:
      method: linear
      models: [{{model: a, weight: 0.3}}, {{model: b, weight: 0.3}}, {{model: c, weight: 0.4}}]
output: {{path: ./out}}
""")
    assert main(["run", str(recipe), "-q"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    ins = [load_file(fam[m] / "model.safetensors") for m in "abc"]
    differs = 0
    for name, got in out.items():
        assert got.dtype == torch.bfloat16  # stored in the input dtype ...
        f32 = torch.zeros(got.shape)
        bf16 = torch.zeros(got.shape, dtype=torch.bfloat16)
        for sd, w in zip(ins, weights):
            f32.add_(sd[name].float(), alpha=w)
            bf16.add_(sd[name], alpha=w)
        assert torch.equal(got, (f32 / sum(weights)).to(torch.bfloat16)), name  # ... computed in float32
        differs += int((bf16 / sum(weights) != got).sum())
    assert differs > 100, "the test inputs do not tell bf16 arithmetic from float32"


def test_overflowing_result_is_refused_before_it_is_written(tmp_path: Path, capsys) -> None:
    fam = build_family(tmp_path, names=("base", "big"), dtype=torch.float32)
    sd = load_file(fam["big"] / "model.safetensors")
    sd["model.norm.weight"].fill_(3e38)  # finite, but base + 2 * (big - base) overflows float32
    save_file(sd, fam["big"] / "model.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
models: {{base: {fam['base']}, big: {fam['big']}}}
steps:
  - id: ta
    merge: {{method: task_arithmetic, base: base, models: [{{model: big, weight: 2.0}}]}}
output: {{path: ./out}}
""")
    assert main(["run", str(recipe), "-q"]) == 3
    err = capsys.readouterr().err
    assert "tensor 'model.norm.weight' has" in err and "NaN/Inf values after merging" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert main(["run", str(recipe), "-q", "--allow-nonfinite"]) == 0
    assert torch.isinf(load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"]).all()


# --------------------------------------------------------------------------- safety
def test_trust_remote_code_is_never_enabled() -> None:
    """`trust_remote_code=True` may appear only behind an explicit user option (none exists today)."""
    offenders = []
    for f in sorted((REPO / "surgeon").rglob("*.py")):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"trust_remote_code\s*=\s*True", line):
                offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
            m = re.search(r"trust_remote_code\s*=\s*(?!False\b)([A-Za-z_][\w.]*)", line)
            if m and not re.search(r"\b(allow|opt|user|args?|options?)\w*", m.group(1)):
                offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()} (not an explicit user option)")
    assert offenders == []


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch PWNED",))


def test_pickles_are_refused_and_never_executed(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "pickle files can run code" in err and "--allow-pickle" in err and "Traceback" not in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {folder}}}\nsteps: [{{id: s, merge: {{method: linear, models: [a]}}}}]\n"
                      "output: {path: ./out}\n")
    assert main(["run", str(recipe), "-q"]) == 2
    assert "model 'a'" in capsys.readouterr().err
    # opting in loads tensors with weights_only=True: a pickle that runs code is still refused
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"w": _Evil()}, evil / "pytorch_model.bin")
    assert main(["inspect", str(evil), "--allow-pickle"]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


def test_recipe_paths_cannot_escape_the_output_and_work_folders(tmp_path: Path, family: dict[str, Path],
                                                               capsys) -> None:
    recipe = _two_step_recipe(tmp_path, family)
    recipe.write_text(recipe.read_text().replace("id: ta", "id: ../../x").replace("model: ta,", "model: ../../x,"))
    assert main(["run", str(recipe), "-q"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"recipe\.yaml:\d+: steps\.0\.id: String should match pattern", err), err
    assert not (tmp_path.parent / "x").exists()
    # an index whose shard names leave the folder
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    assert main(["inspect", str(bad)]) == 2
    assert "points outside the checkpoint folder ('../outside.safetensors')" in capsys.readouterr().err


def test_hub_token_never_reaches_reports_cards_or_errors(tmp_path: Path, family: dict[str, Path], monkeypatch,
                                                         capsys) -> None:
    from hub_server import FakeHub, point_hf_at  # the fake hub echoes bad tokens in its 401 bodies

    secret, wrong = "hf_secretXYZ0123456789abcdef", "hf_wrongABC9876543210fedcba"
    recipe = _two_step_recipe(tmp_path, family)
    text = recipe.read_text().replace(str(family["ft3"]), "org/private-ft") + "  push: {repo: org/merged, private: true}\n"
    recipe.write_text(text)
    with FakeHub(token=secret) as hub:
        hub.add_folder("org/private-ft", family["ft3"], private=True)
        point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home", token=secret)
        report = tmp_path / "report.json"
        assert main(["run", str(recipe), "--report", str(report)]) == 0  # a private input and a push
        seen = capsys.readouterr()
        texts = [seen.out, seen.err, report.read_text()]
        texts += [f.read_text(errors="replace") for f in (tmp_path / "out").iterdir() if f.is_file()
                  and f.suffix != ".safetensors"]
        texts += [v.decode(errors="replace") for v in hub.files("org/merged").values()]
        # a wrong token: the hub refuses it (and quotes it back); surgeon's errors must not repeat it
        monkeypatch.setenv("HF_TOKEN", wrong)
        hub.reset_counters()
        assert main(["run", str(recipe), "-o", str(tmp_path / "o2"), "--no-push", "-q"]) == 2
        err = capsys.readouterr().err
        assert "org/private-ft" in err
        texts.append(err)
        assert main(["push", str(tmp_path / "out"), "org/other"]) != 0
        err = capsys.readouterr().err
        assert "org/other" in err and "Traceback" not in err
        texts.append(err)
    assert not any(secret in t or wrong in t for t in texts)


def test_a_run_never_replaces_its_inputs_or_foreign_folders(tmp_path: Path, family: dict[str, Path], capsys) -> None:
    models = tmp_path / "models"
    fam = build_family(models, names=("base", "ft1", "ft2", "ft3"))
    before = {k: _files(v) for k, v in fam.items()}
    recipe = _two_step_recipe(tmp_path, fam)
    # the output is an input model, or a folder holding them: refused even with --overwrite
    for out in (fam["ft1"], models):
        assert main(["run", str(recipe), "-o", str(out), "--overwrite", "-q"]) == 2
        err = capsys.readouterr().err
        assert re.search(r"recipe\.yaml:\d+: model '\w+' \(.*\) is inside the destination .*which the run would "
                         r"replace", err), err
    # a --work-dir where a step's folder would land on something surgeon did not write
    (tmp_path / "mine" / "ta").mkdir(parents=True)
    (tmp_path / "mine" / "ta" / "notes.txt").write_text("keep me")
    assert main(["run", str(recipe), "--work-dir", str(tmp_path / "mine"), "-q"]) == 2
    assert "was not written by surgeon" in capsys.readouterr().err
    assert (tmp_path / "mine" / "ta" / "notes.txt").read_text() == "keep me"
    assert {k: _files(v) for k, v in fam.items()} == before
