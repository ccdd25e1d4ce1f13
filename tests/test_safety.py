"""Safety (issue 15): nothing outside the run is touched. Inputs, user folders, secrets and code stay safe.

One test per finding; each failed on the code before the fix. docs/reliability.md lists them (test `S`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


def tiny(folder: Path, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, scale: float = 0.02,
         extra: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    """A Llama-named checkpoint of a few tensors, written with safetensors directly (milliseconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g) * scale,
               "model.layers.0.mlp.up_proj.weight": torch.randn(8, 8, generator=g) * scale,
               "model.norm.weight": torch.ones(8)}
    tensors = {k: v.to(dtype) for k, v in tensors.items()} | (extra or {})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
           "num_hidden_layers": 1, "vocab_size": 16, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(cfg | (config or {})))
    return folder


def cli(*args: str, cwd: Path | None = None, stdin: str | None = None, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``surgeon ARGS`` in a subprocess (a real process: signals, stdin, exit codes)."""
    e = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "surgeon", *args], check=False, cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=e)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- 1. foreign code
def evil_model(root: Path, marker: Path) -> Path:
    """A zoo model whose config asks for its own code; importing that code would create ``marker``."""
    folder = root / "evil"
    shutil.copytree(ZOO / "bpe-base", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil_llama"
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tc["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    payload = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(payload)
    return folder


def test_eval_never_runs_a_model_folders_code_even_with_stdin_answering_yes(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = evil_model(tmp_path, marker)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    r = cli("eval", str(folder), "--text", str(text), stdin="y\ny\ny\n")
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)  # no prompt, nothing printed twice
    assert str(folder) in line and "auto_map" in line and "modeling_evil.EvilForCausalLM" in line
    assert "Do you wish" not in r.stdout + r.stderr
    assert not marker.exists()


def test_every_loader_refuses_remote_code(tmp_path: Path) -> None:
    """The library paths (tokenizer for transplant, fusion's pivot) refuse it too, and no code runs."""
    from surgeon import api
    from surgeon.errors import InvalidInputError
    from surgeon.io.hf_load import load_causal_lm, load_config, load_tokenizer
    from surgeon.transplant.vocab import load_tokenizer_info

    marker = tmp_path / "PWNED"
    folder = evil_model(tmp_path, marker)
    for load in (load_tokenizer, load_config, load_causal_lm):
        with pytest.raises(InvalidInputError, match="auto_map"):
            load(folder)
    (folder / "tokenizer.json").rename(folder / "vocab.json")  # transplant's AutoTokenizer path
    with pytest.raises(InvalidInputError, match="auto_map"):
        load_tokenizer_info(folder)
    data = tmp_path / "d.txt"
    data.write_text("hello world\n" * 8)
    with pytest.raises(InvalidInputError, match="auto_map"):
        api.fuse_models(str(folder), [str(ZOO / "bpe-base")], str(data), str(tmp_path / "out"), steps=1)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_no_module_calls_from_pretrained_outside_the_safe_loader() -> None:
    offenders = []
    for f in sorted((REPO / "surgeon").rglob("*.py")):
        if f.name == "hf_load.py":
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if ".from_pretrained(" in line:
                offenders.append(f"{f.relative_to(REPO)}:{i}")
    assert offenders == []


def test_outputs_carry_no_auto_map(tmp_path: Path) -> None:
    from surgeon import api

    amap = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    for name, seed in (("a", 0), ("b", 1)):
        f = tiny(tmp_path / name, seed, config={"auto_map": amap})
        (f / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]},
                                                             "tokenizer_class": "PreTrainedTokenizerFast"}))
        (f / "modeling_x.py").write_text("raise SystemExit('never imported')\n")
    out = tmp_path / "out"
    api.merge_models("linear", [str(tmp_path / "a"), str(tmp_path / "b")], str(out), quiet=True)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.py"))


# --------------------------------------------------------------------------- 2. symlinks
@pytest.mark.parametrize("name", ["special_tokens_map.json", "merges.txt", "chat_template.jinja",
                                  "generation_config.json", "config.json", "model.safetensors"])
def test_a_symlink_out_of_the_model_folder_is_refused(tmp_path: Path, name: str) -> None:
    from surgeon import api
    from surgeon.errors import InvalidInputError

    secret = tmp_path / "secrets" / "token.json"
    secret.parent.mkdir()
    tiny(tmp_path / "elsewhere")
    if name == "model.safetensors":
        secret = tmp_path / "elsewhere" / "model.safetensors"
    else:
        secret.write_text(json.dumps({"hf_token": "hf_SECRETSECRET"}))
    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    (a / name).unlink(missing_ok=True)
    (a / name).symlink_to(secret)
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError) as exc:
        api.merge_models("linear", [str(a), str(b)], str(out), quiet=True)
    msg = str(exc.value)
    assert name in msg and "outside its model folder" in msg
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_hub_cache_links_into_the_same_repos_blobs_are_fine(tmp_path: Path) -> None:
    from surgeon import api

    src = tiny(tmp_path / "src", 0)
    (src / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    repo = tmp_path / "hub" / "models--org--m"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    out = tmp_path / "out"
    api.merge_models("linear", [str(snap), str(tiny(tmp_path / "b", 1))], str(out), quiet=True)
    assert (out / "special_tokens_map.json").read_text() == '{"bos_token": "<s>"}'


# --------------------------------------------------------------------------- 3. destinations
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def project(root: Path) -> Path:
    """A user's project folder: two models, training data, notes."""
    proj = root / "proj"
    shutil.copytree(ZOO / "bpe-base", proj / "models" / "a")
    shutil.copytree(ZOO / "bpe-python", proj / "models" / "b")
    (proj / "data.txt").write_text("def f(x):\n    return x\n" * 20)
    (proj / "notes.md").write_text("my notes")
    return proj


def test_transplant_overwrite_never_replaces_the_folder_holding_its_inputs(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    proj = project(tmp_path)
    before = snapshot(proj)
    assert main(["transplant", str(proj / "models/a"), str(proj / "models/b"), str(proj), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "is inside the destination" in err and "base model" in err
    assert snapshot(proj) == before


def test_fuse_overwrite_never_replaces_the_folder_holding_its_inputs(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    proj = project(tmp_path)
    before = snapshot(proj)
    assert main(["fuse", str(proj / "models/a"), str(proj), "--source", str(proj / "models/b"),
                 "--data", str(proj / "data.txt"), "--steps", "1", "--overwrite", "-q"]) == 2
    assert "is inside the destination" in capsys.readouterr().err
    assert snapshot(proj) == before


def test_output_path_dot_never_replaces_the_recipe_folder(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "models" / "a", 0), tiny(tmp_path / "models" / "b", 1)
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    (rdir / "eval.txt").write_text("hello")
    recipe = rdir / "r.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nsteps:\n  - id: m\n    merge: {{method: linear, models: [a, b]}}\n"
                      "output: {path: .}\n")
    before = snapshot(rdir)
    assert main(["run", str(recipe), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "the recipe file" in err and "is inside the destination" in err
    assert snapshot(rdir) == before


def test_overwrite_replaces_only_folders_surgeon_wrote(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    args = ["merge", "linear", "--model", str(a), "--model", str(b), "-q", "--overwrite"]
    assert main([*args[:2], str(thesis), *args[2:]]) == 2
    assert "was not written by surgeon" in capsys.readouterr().err
    assert snapshot(thesis) == {"thesis.tex": b"\\documentclass{article}"}
    out = tmp_path / "out"
    assert main([*args[:2], str(out), *args[2:]]) == 0  # a new output, then replacing surgeon's own: fine
    assert main([*args[:2], str(out), *args[2:]]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out", "thesis"]  # no lock, staging or old


def test_a_second_writer_to_the_same_output_fails_at_once(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from surgeon.io.destination import destination_lock\n"
        "with destination_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"), str(out), str(REPO)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["merge", "linear", str(out), "--model", str(a), "--model", str(b), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "another surgeon run is writing this output" in err
        assert not out.exists() and not (tmp_path / ".out.surgeon-partial").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["merge", "linear", str(out), "--model", str(a), "--model", str(b), "-q"]) == 0


def test_output_that_is_a_regular_file_is_refused_up_front(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    f = tmp_path / "out.txt"
    f.write_text("keep")
    assert main(["merge", "linear", str(f), "--model", str(a), "--model", str(b), "-q", "--overwrite"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out.txt"]


def test_output_name_too_long_for_the_staging_name_fails_before_work(tmp_path: Path, capsys, monkeypatch) -> None:
    from surgeon.cli import main
    from surgeon.engine import pipeline

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    monkeypatch.setattr(pipeline.Pipeline, "plan", lambda *a, **k: pytest.fail("planned before the check"))
    out = tmp_path / ("x" * 245)
    assert main(["merge", "linear", str(out), "--model", str(a), "--model", str(b), "-q"]) == 2
    assert "exceeds this file system's 255-byte limit" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_push_refuses_a_symlink_leading_out_of_the_folder(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    folder = tiny(tmp_path / "out", 0)
    secret = tmp_path / "token"
    secret.write_text("hf_SECRETSECRET")
    (folder / "tokenizer_config.json").symlink_to(secret)
    assert main(["push", str(folder), "org/name"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer_config.json is a symlink" in err and "SECRET" not in err


# --------------------------------------------------------------------------- 4. final cast
def test_overflow_on_the_final_cast_to_float16_is_refused_by_name(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    big = {"model.layers.0.mlp.down_proj.weight": (torch.rand(64, 8) * 2e4 + 6e4).to(torch.bfloat16)}
    a = tiny(tmp_path / "a", 0, extra=big)
    b = tiny(tmp_path / "b", 1, extra={k: v * 1.1 for k, v in big.items()})
    out = tmp_path / "out"
    args = ["merge", "linear", str(out), "--model", str(a), "--model", str(b), "--dtype", "float16", "-q"]
    assert main(args) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "model.layers.0.mlp.down_proj.weight" in line and "float16" in line and "dtype: bfloat16" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing half-written
    assert main([*args, "--allow-nonfinite"]) == 0
    from surgeon.io import Checkpoint

    with Checkpoint.open(out) as ck:
        assert torch.isinf(ck.get("model.layers.0.mlp.down_proj.weight")).any()


# --------------------------------------------------------------------------- 5. FIFOs, interruptions
@pytest.fixture
def no_hang():
    """Turn a read that would block forever into a test failure after 20 s."""
    import signal

    def boom(*_):
        raise TimeoutError("blocked: the command hung")
    previous = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_a_fifo_among_the_inputs_is_refused_by_name_without_blocking(tmp_path: Path, capsys, no_hang, name) -> None:
    from surgeon.cli import main

    folder = tiny(tmp_path / "m")
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    assert main(["inspect", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert name in line and "FIFO" in line


def test_inspect_interrupted_gives_no_resume_advice(tmp_path: Path, capsys, monkeypatch) -> None:
    from surgeon import api
    from surgeon.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "inspect_checkpoint", interrupted)
    monkeypatch.setattr(api, "validate", interrupted)
    for args in (["inspect", str(tmp_path)], ["validate", str(tmp_path / "r.yaml")]):
        assert main(args) == 130
        err = capsys.readouterr().err
        assert err.strip() == "interrupted" and "resume" not in err


def test_repeated_sigterm_still_exits_130(tmp_path: Path) -> None:
    """Three SIGTERMs while a command cleans up: one interruption, exit 130 (the third used to kill with 143)."""
    import signal
    import time

    code = ("import sys, time\nsys.path.insert(0, sys.argv[1])\nimport surgeon.api as api, surgeon.cli as cli\n"
            "def slow(*a, **k):\n    print('ready', flush=True)\n    try:\n        time.sleep(30)\n"
            "    finally:\n        time.sleep(1.0)  # cleanup, like a writer closing its shards\n"
            "api.inspect_checkpoint = slow\nrc = cli.main(['inspect', 'x'])\ntime.sleep(1.5)  # interpreter exit\n"
            "sys.exit(rc)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for gap in (0.0, 0.4, 1.2):
        time.sleep(gap)
        p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 130, p.stderr.read() if p.stderr else ""


# --------------------------------------------------------------------------- 6. every CLI value
def test_absurd_thread_count_is_refused_naming_the_flag(tmp_path: Path) -> None:
    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    r = cli("merge", "linear", str(tmp_path / "out"), "--model", str(a), "--model", str(b), "--threads", "100000")
    assert r.returncode == 2
    assert "--threads 100000" in one_error_line(r.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99", "tpu9"])
def test_a_device_that_cannot_compute_here_is_refused_naming_the_flag(tmp_path: Path, capsys, device) -> None:
    from surgeon.cli import main

    if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    assert main(["merge", "linear", str(tmp_path / "out"), "--model", str(a), "--model", str(b), "-q",
                 "--device", device]) == 2
    assert f"--device {device}" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["2020-13-45", "[1,", "!!python/object/apply:os.system ['true']", "!!set {a}",
                                   "2020-01-01", ".nan"])
def test_set_values_are_parsed_with_a_message_naming_the_option(tmp_path: Path, capsys, value) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    assert main(["merge", "ties", str(tmp_path / "out"), "--base", str(a), "--model", str(b), "-q",
                 "--set", f"density={value}"]) == 2
    assert "--set density: cannot read the value" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 7. eval streams its text
def test_eval_reads_only_the_part_of_a_text_its_token_cap_needs(tmp_path: Path) -> None:
    """A 16 MB text whose tail is not even UTF-8: with --max-tokens 64 only its start is read, and the numbers
    equal those of a file holding just that start (the old code read, decoded and tokenized all of it)."""
    from surgeon.eval.perplexity import evaluate_text

    start = ((ZOO / "data" / "shakespeare" / "heldout.txt").read_bytes() * 5)[:200_000]
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    with open(big, "wb") as fh:
        fh.write(start)
        fh.write(b"\xff\xfe" * (8 * 2**20))  # 16 MB that no UTF-8 decoder accepts
    small.write_bytes(start)
    a = evaluate_text(ZOO / "bpe-base", big, max_tokens=64, progress=False)
    b = evaluate_text(ZOO / "bpe-base", small, max_tokens=64, progress=False)
    assert a["tokens"] == b["tokens"] >= 63 and a["bytes"] == b["bytes"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


# --------------------------------------------------------------------------- 8. headers, journal
def raw_safetensors(path: Path, header: str | bytes, data: bytes) -> Path:
    hb = header if isinstance(header, bytes) else header.encode("utf-8", "surrogatepass")
    hb += b" " * (-len(hb) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + data)
    return path


F32_2 = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'


@pytest.mark.parametrize("case,header,data,message", [
    ("absurd shape", '{"w":{"dtype":"F32","shape":[0,1000000000000000000000000000000],"data_offsets":[0,0]}}', b"",
     "dimension beyond 2^63-1"),
    ("duplicate name", '{"w":{' + F32_2 + '},"w":{' + F32_2 + '}}', b"\0" * 8, "'w' appears twice"),
    ("gap", '{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "belong to no tensor"),
    ("junk after the data", '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8,
     "4 bytes after the last tensor"),
    ("lone surrogate", '{"w\\ud800":{' + F32_2 + '}}', b"\0" * 8, "lone surrogate"),
    ("metadata not strings", '{"__metadata__":{"a":1},"w":{' + F32_2 + '}}', b"\0" * 8, "must map names to strings"),
])
def test_headers_the_safetensors_library_rejects_are_rejected(tmp_path: Path, capsys, case, header, data,
                                                              message) -> None:
    from surgeon.cli import main

    f = raw_safetensors(tmp_path / "m" / "model.safetensors", header, data)
    assert main(["inspect", str(f.parent)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "model.safetensors" in line


def test_a_header_of_millions_of_empty_tensors_is_refused_at_once(tmp_path: Path, capsys) -> None:
    import time

    from surgeon.cli import main
    from surgeon.io.header import MAX_TENSORS

    n = MAX_TENSORS + 1
    body = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    f = raw_safetensors(tmp_path / "m" / "model.safetensors", "{" + body + "}", b"")
    t0 = time.perf_counter()
    assert main(["inspect", str(f.parent)]) == 2
    assert time.perf_counter() - t0 < 5
    assert f"header lists {n} tensors" in one_error_line(capsys.readouterr().err)


def test_tensor_names_with_newlines_survive_the_journal(tmp_path: Path) -> None:
    from surgeon import api
    from surgeon.io import Checkpoint

    extra = {"odd\nname.weight": torch.ones(4, 4)}
    a, b = tiny(tmp_path / "a", 0, extra=extra), tiny(tmp_path / "b", 1, extra=extra)
    api.merge_models("linear", [str(a), str(b)], str(tmp_path / "out"), quiet=True)
    with Checkpoint.open(tmp_path / "out") as ck:
        assert torch.equal(ck.get("odd\nname.weight"), torch.ones(4, 4))


# --------------------------------------------------------------------------- 8. the weaker findings
def test_report_into_a_folder_is_refused_before_the_run(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    (tmp_path / "reports").mkdir()
    assert main(["merge", "linear", str(tmp_path / "out"), "--model", str(a), "--model", str(b), "-q",
                 "--report", str(tmp_path / "reports")]) == 2
    assert "--report" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and list((tmp_path / "reports").iterdir()) == []


def test_a_report_that_cannot_be_written_leaves_no_tmp(tmp_path: Path, monkeypatch) -> None:
    import errno

    from surgeon.cli import _write_report
    from surgeon.errors import StepError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StepError, match="No space left on device"):
        _write_report(str(tmp_path / "r.json"), {"schema": "surgeon.report/1"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_replacing_a_read_only_previous_output_leaves_no_old_copy(tmp_path: Path) -> None:
    from surgeon import api

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    out = tmp_path / "out"
    api.merge_models("linear", [str(a), str(b)], str(out), quiet=True)
    out.chmod(0o555)
    api.merge_models("linear", [str(a), str(b)], str(out), quiet=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_credentials_in_hf_endpoint_are_redacted_from_errors() -> None:
    from surgeon.io.hub import scrub

    msg = scrub("repository not found on https://alice:s3cr3t-pass@hub.example.com (set HF_TOKEN)")
    assert "s3cr3t" not in msg and "alice" not in msg and "https://***@hub.example.com" in msg


def test_float64_beyond_float32_range_is_named_as_such(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    big = {"model.layers.0.mlp.gate_proj.weight": torch.full((4, 4), 1e300, dtype=torch.float64)}
    a, b = tiny(tmp_path / "a", 0, extra=big), tiny(tmp_path / "b", 1, extra=big)
    assert main(["merge", "linear", str(tmp_path / "out"), "--model", str(a), "--model", str(b), "-q"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "float64 with values beyond float32's range" in line and "gate_proj" in line and "NaN" not in line
    assert not (tmp_path / "out").exists()


def test_integer_tensors_that_differ_between_models_are_refused_by_name(tmp_path: Path, capsys) -> None:
    from surgeon.cli import main

    q = torch.randint(-128, 127, (8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    a = tiny(tmp_path / "a", 0, extra={"model.layers.0.mlp.q_int8": q})
    b = tiny(tmp_path / "b", 1, extra={"model.layers.0.mlp.q_int8": q + 1})
    assert main(["merge", "linear", str(tmp_path / "out"), "--model", str(a), "--model", str(b), "-q"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.layers.0.mlp.q_int8" in line and "int8" in line and "differs" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    c = tiny(tmp_path / "c", 2, extra={"model.layers.0.mlp.q_int8": q})  # equal everywhere: copied as before
    assert main(["merge", "linear", str(tmp_path / "out"), "--model", str(a), "--model", str(c), "-q"]) == 0


def test_eval_refuses_a_lone_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    shutil.copytree(ZOO / "bpe-base", folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    r = cli("eval", str(folder), "--text", str(text))
    assert r.returncode == 2
    assert "pickle" in one_error_line(r.stderr) and "pytorch_model.bin" in r.stderr


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    from surgeon.recipe.yamlio import load_yaml_text

    data = load_yaml_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 2\n", "r.yaml").data
    assert data["b"] == {"x": 2, "y": 2}
    from surgeon.errors import RecipeError

    with pytest.raises(RecipeError, match="duplicate key 'x'"):
        load_yaml_text("b:\n  <<: {y: 1}\n  x: 1\n  x: 2\n", "r.yaml")


def test_a_fifo_as_recipe_or_training_data_is_refused_without_blocking(tmp_path: Path, capsys, no_hang) -> None:
    from surgeon.cli import main

    os.mkfifo(tmp_path / "r.yaml")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "r.yaml: not a regular file" in one_error_line(capsys.readouterr().err)
    os.mkfifo(tmp_path / "data.txt")
    assert main(["fuse", str(ZOO / "bpe-base"), str(tmp_path / "out"), "--source", str(ZOO / "bpe-python"),
                 "--data", str(tmp_path / "data.txt"), "--steps", "1", "-q"]) == 2
    assert "data.txt: is a FIFO" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "r.yaml"]


def test_a_fifo_as_a_recipes_eval_text_is_refused_before_the_run(tmp_path: Path, capsys, no_hang) -> None:
    from surgeon.cli import main

    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    os.mkfifo(tmp_path / "held.txt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nsteps:\n  - id: m\n    merge: {{method: linear, models: [a, b]}}\n"
                      f"output: {{path: {tmp_path / 'out'}}}\neval: {{texts: {{held: {tmp_path / 'held.txt'}}}}}\n")
    assert main(["run", str(recipe), "-q"]) == 2
    assert "held.txt: is a FIFO" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_eval_max_bytes_bounds_a_whole_text_evaluation(tmp_path: Path, capsys) -> None:
    """--max-tokens 0 scores the whole text; --max-bytes still bounds what is read (the tail is not UTF-8)."""
    import json as _json

    from surgeon.cli import main

    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.write(((ZOO / "data" / "shakespeare" / "heldout.txt").read_bytes() * 3)[:100_000])
        fh.write(b"\xff\xfe" * (4 * 2**20))
    assert main(["eval", str(ZOO / "bpe-base"), "--text", str(big), "--max-tokens", "0", "--max-bytes", "20KB",
                 "--json", "-q"]) == 0
    (row,) = _json.loads(capsys.readouterr().out)
    assert 0 < row["bytes"] <= 20_000
    assert main(["eval", str(ZOO / "bpe-base"), "--text", str(big), "--max-bytes", "lots"]) == 2
    assert "--max-bytes lots" in one_error_line(capsys.readouterr().err)
