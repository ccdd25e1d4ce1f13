"""Bad inputs get one clear line naming the file (and the tensor), a non-zero exit code, never a traceback.

Everything goes through the command line (``surgeon.cli.main``), as a user would meet it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.cli import main
from test_reliability import build_family

TENSOR = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("fam"))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err, err
    if code:
        assert err.startswith("error: ") and err.count("\n") >= 1, err
    return code, err


def merge_recipe(folder: Path, models: dict[str, Path], extra_step: str = "") -> Path:
    ids = list(models)
    p = folder / "recipe.yaml"
    lines = ["name: bad-input", "models:"] + [f"  {k}: {v}" for k, v in models.items()]
    lines += ["steps:", "  - id: merged", "    merge:", "      method: task_arithmetic", f"      base: {ids[0]}",
              "      models:"] + [f"        - {{model: {k}, weight: 0.5}}" for k in ids[1:]]
    lines += [extra_step, "output: {path: ./out}", ""]
    p.write_text("\n".join(lines))
    return p


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _raw(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def _entry(name: str, dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}}


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


CORRUPT: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated file": (_truncate, r"tensor '[^']+': data_offsets \[\d+, \d+\] run past the end of the file .*truncated"),
    "shorter than 8 bytes": (lambda f: f.write_bytes(b"\x01\x02"), "not a safetensors file"),
    "header length past the end": (lambda f: f.write_bytes((1000).to_bytes(8, "little") + b"{}"),
                                   "runs past the end of the file"),
    "hostile header length": (lambda f: f.write_bytes((2**62).to_bytes(8, "little") + b"{}"),
                              r"header length \d+ exceeds the \d+-byte limit"),
    "header not JSON": (lambda f: f.write_bytes(_raw(b"{oops")), "header is not valid JSON"),
    "header not UTF-8": (lambda f: f.write_bytes(_raw(b'{"\xff": 1}')), "header is not valid JSON"),
    "header nested too deeply": (lambda f: f.write_bytes(_raw(b"[" * 100_000 + b"]" * 100_000)), "nested too deeply"),
    "header a list": (lambda f: f.write_bytes(_raw(b"[1, 2]")), "header is not a JSON object"),
    "offsets past the end": (lambda f: f.write_bytes(_raw(json.dumps(_entry(TENSOR, "F32", [4], 0, 16)).encode(), b"\0" * 8)),
                             f"tensor '{TENSOR}': data_offsets \\[0, 16\\] run past the end"),
    "overlapping tensors": (lambda f: f.write_bytes(_raw(json.dumps({**_entry("a", "F32", [2], 0, 8),
                                                                     **_entry(TENSOR, "F32", [2], 4, 12)}).encode(),
                                                         b"\0" * 12)),
                            f"tensors 'a' and '{TENSOR}' overlap"),
    "unknown dtype": (lambda f: f.write_bytes(_raw(json.dumps(_entry(TENSOR, "F7", [1], 0, 1)).encode(), b"\0")),
                      f"tensor '{TENSOR}': unknown or unsupported dtype 'F7'"),
    "size does not match shape": (lambda f: f.write_bytes(_raw(json.dumps(_entry(TENSOR, "F32", [3], 0, 8)).encode(),
                                                               b"\0" * 8)),
                                  f"tensor '{TENSOR}': 8 bytes stored but shape \\[3\\] of F32 needs 12"),
    "huge integer in header": (lambda f: f.write_bytes(_raw(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}")),
                               "header is not valid JSON .*digits"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_safetensors(case: str, tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    corrupt, pattern = CORRUPT[case]
    bad = copy_model(fam["ft1"], tmp_path / "bad")
    corrupt(bad / "model.safetensors")
    recipe = merge_recipe(tmp_path, {"base": fam["base"], "bad": bad})
    code, err = cli(capsys, "run", str(recipe), "-q")
    assert code == 2
    # file:line of the recipe, the model id, the file, and what is wrong (with the tensor where there is one)
    assert f"recipe.yaml:4: model 'bad': {bad / 'model.safetensors'}: " in err, err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()
    code, err = cli(capsys, "inspect", str(bad))
    assert code == 2 and str(bad / "model.safetensors") in err


BAD_INDEX = {
    "not JSON": ("{", "not a valid safetensors index"),
    "no weight_map": ('{"metadata": {}}', "not a valid safetensors index"),
    "weight_map a list": ('{"weight_map": [1]}', "not a valid safetensors index"),
    "shard name not a string": ('{"weight_map": {"w": ["x"]}}', "shard name must be a string"),
    "shard outside (relative)": ('{"weight_map": {"w": "../../etc/passwd"}}', "points outside the checkpoint folder"),
    "shard outside (absolute)": ('{"weight_map": {"w": "/etc/passwd"}}', "points outside the checkpoint folder"),
    "missing shard": ('{"weight_map": {"w": "model-00009-of-00009.safetensors"}}', "which does not exist"),
    "tensor not in shard": ('{"weight_map": {"nope": "model.safetensors"}}', "tensor 'nope' is not in shard"),
}


@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_bad_index(case: str, tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    text, message = BAD_INDEX[case]
    bad = copy_model(fam["ft1"], tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(text)
    code, err = cli(capsys, "inspect", str(bad))
    assert code == 2 and message in err and str(bad / "model.safetensors.index.json") in err, err


@pytest.mark.parametrize("text,message", [("{oops", "not valid JSON"), ("[1]", "expected a JSON object"),
                                          ("[" * 100_000, "not valid JSON"), ('{"a": ' + "9" * 5000 + "}", "not valid JSON")])
def test_config_that_is_not_json(text: str, message: str, tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    bad = copy_model(fam["ft1"], tmp_path / "bad")
    (bad / "config.json").write_text(text)
    code, err = cli(capsys, "run", str(merge_recipe(tmp_path, {"base": fam["base"], "bad": bad})), "-q")
    assert code == 2 and f"model 'bad': {bad / 'config.json'}: {message}" in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_input_is_named_and_refused(value: str, tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    bad = copy_model(fam["ft1"], tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    sd[TENSOR][1, 2] = float(value)
    save_file(sd, bad / "model.safetensors")
    recipe = merge_recipe(tmp_path, {"base": fam["base"], "bad": bad})
    code, err = cli(capsys, "run", str(recipe), "-q")
    assert code == 3
    assert f"input model 'bad' ({bad}): tensor '{TENSOR}' has 1 NaN/Inf values" in err, err
    assert "--allow-nonfinite" in err and not (tmp_path / "out").exists()
    assert cli(capsys, "run", str(recipe), "-q", "--allow-nonfinite")[0] == 0


def _edit(src: Path, dst: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    copy_model(src, dst)
    sd = load_file(dst / "model.safetensors")
    fn(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


MISMATCH: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "shape": (lambda sd: sd.__setitem__(TENSOR, torch.zeros(16, 32, dtype=torch.bfloat16)),
              f"tensor '{TENSOR}' has shape [16, 32] in model 'bad'"),
    "missing tensor": (lambda sd: sd.pop(TENSOR), "model 'bad' (/"),  # named once: id, then its path
    "integer vs float": (lambda sd: sd.__setitem__(TENSOR, torch.zeros(32, 32, dtype=torch.int32)),
                         f"tensor '{TENSOR}' is int32 in model 'bad'"),
    "float8": (lambda sd: sd.__setitem__(TENSOR, torch.zeros(32, 32).to(torch.float8_e4m3fn)),
               f"tensor '{TENSOR}' is float8_e4m3fn in model 'bad'"),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_models_that_do_not_match(case: str, tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    edit, message = MISMATCH[case]
    bad = _edit(fam["ft1"], tmp_path / "bad", edit)
    code, err = cli(capsys, "run", str(merge_recipe(tmp_path, {"base": fam["base"], "bad": bad})), "-q")
    assert code == 2 and message in err and TENSOR in err and "recipe.yaml:" in err, err
    assert cli(capsys, "validate", str(tmp_path / "recipe.yaml"))[0] == 2  # found from headers alone


def test_float16_and_bfloat16_models_merge(tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    """Different float dtypes are not a mismatch: everything is read as float32."""
    half = _edit(fam["ft1"], tmp_path / "half", lambda sd: sd.update({k: v.half() for k, v in sd.items()}))
    assert cli(capsys, "run", str(merge_recipe(tmp_path, {"base": fam["base"], "half": half})), "-q")[0] == 0


def test_missing_tokenizer_where_a_step_needs_one(tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    notok = copy_model(fam["ft1"], tmp_path / "notok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / f).unlink()
    data = tmp_path / "data.txt"
    data.write_text("some text\n" * 10)
    fuse = tmp_path / "fuse.yaml"
    fuse.write_text(f"models: {{pivot: {fam['base']}, src: {notok}}}\n"
                    "steps:\n  - id: fused\n    fuse: {pivot: pivot, sources: [src], data: data.txt}\n"
                    "output: {path: ./out}\n")
    code, err = cli(capsys, "run", str(fuse), "-q")
    assert code == 2 and "fuse.yaml:4: 'src' has no tokenizer files" in err, err
    transplant = tmp_path / "transplant.yaml"
    transplant.write_text(f"models: {{base: {fam['base']}, donor: {notok}}}\n"
                          "steps:\n  - id: retok\n    transplant: {model: base, donor: donor}\n"
                          "output: {path: ./out}\n")
    code, err = cli(capsys, "run", str(transplant), "-q")
    assert code == 2 and f"donor {notok}: no tokenizer files" in err and "transplant.yaml:" in err, err


RECIPES = {
    "not YAML": ("models: [unclosed\nsteps: x\n", r"recipe\.yaml:\d+: not valid YAML"),
    "duplicate key": ("models: {a: ./a}\nsteps: []\nmodels: {b: ./b}\n",
                      r"recipe\.yaml:3: duplicate key 'models' \(first at line 1\)"),
    "duplicate nested key": ("models:\n  a: ./a\n  a: ./b\n", r"recipe\.yaml:3: duplicate key 'a' \(first at line 2\)"),
    "empty": ("", r"recipe\.yaml: the file is empty"),
    "not a mapping": ("- a\n- b\n", r"recipe\.yaml:1: a recipe must be a mapping"),
    "bad date": ("name: 2020-13-45\n", r"recipe\.yaml:1: not valid YAML \('2020-13-45' is not a valid timestamp: month must be in 1\.\.12\)"),
    "empty typed scalar": ("seed: !!int\n", r"recipe\.yaml:1: not valid YAML \('' is not a valid int"),
    "python tag": ("name: !!python/object/apply:os.system [echo hi]\n", r"recipe\.yaml:1: not valid YAML"),
    "recursive alias": ("models: &a {x: *a}\n", r"recipe\.yaml:1: an alias refers to a value that contains it"),
    "alias bomb": ("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)),
        r"recipe\.yaml:\d+: the document expands to more than \d+ values"),
    "deep nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"recipe\.yaml(:\d+)?: (not valid YAML \(nested too deeply\)|nested more than)"),
    "step id escapes": ("models: {a: ./a}\nsteps:\n  - id: ../../x\n    merge: {method: linear, models: [a]}\n"
                        "output: {path: ./o}\n", r"recipe\.yaml:3: steps\.0\.id: String should match pattern"),
    "model id with newline": ('models: {"a\\n": ./a}\nsteps: [{id: s, merge: {method: linear, models: [a]}}]\n'
                              "output: {path: ./o}\n", r"recipe\.yaml:1: models: Value error, model id 'a\\n'"),
    "NaN parameter": ("models: {a: ./a}\nsteps:\n  - id: s\n    merge: {method: linear, models: [{model: a, weight: .nan}]}\n"
                      "output: {path: ./o}\n", r"recipe\.yaml:4: parameter 'weight' must be a finite number, got nan"),
    "path with NUL": ('models: {a: "./a\\0b"}\nsteps: [{id: s, merge: {method: linear, models: [a]}}]\n'
                      "output: {path: ./o}\n", r"recipe\.yaml: path './a\\x00b' cannot be used \(embedded null byte\)"),
    "unknown user's home": ("models: {a: ~nosuchuser_zz/m}\nsteps: [{id: s, merge: {method: linear, models: [a]}}]\n"
                            "output: {path: ./o}\n", r"recipe\.yaml: path '~nosuchuser_zz/m' cannot be used"),
    "mergekit models not a list": ("merge_method: linear\nmodels: 3\n", r"recipe\.yaml:2: mergekit 'models' must be a list"),
    "mergekit tokenizer not a mapping": ("merge_method: linear\nmodels: [a]\ntokenizer: x\n",
                                         r"recipe\.yaml:3: mergekit 'tokenizer' must be a mapping"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipes(case: str, tmp_path: Path, capsys) -> None:
    import re

    text, pattern = RECIPES[case]
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    for cmd in ("run", "validate"):
        code, err = cli(capsys, cmd, str(p))
        assert code == 2 and re.search(pattern, err), err
    assert not (tmp_path / "hi").exists()


def test_recipe_file_problems(tmp_path: Path, capsys) -> None:
    code, err = cli(capsys, "run", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: no such recipe file" in err
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\n")
    code, err = cli(capsys, "run", str(tmp_path / "bin.yaml"))
    assert code == 2 and "bin.yaml: cannot read" in err


def test_bad_options(tmp_path: Path, fam: dict[str, Path], capsys) -> None:
    recipe = merge_recipe(tmp_path, {"base": fam["base"], "ft1": fam["ft1"]})
    code, err = cli(capsys, "run", str(recipe), "--max-shard-size", "lots", "-q")
    assert code == 2 and "cannot read size 'lots'" in err
    code, err = cli(capsys, "run", str(recipe), "--device", "cuda:7", "-q") if not torch.cuda.is_available() else (2, "")
    assert code == 2
    (tmp_path / "afile").write_text("x")
    code, err = cli(capsys, "run", str(recipe), "-o", str(tmp_path / "afile" / "out"), "-q")
    assert code in (2, 3) and "afile" in err
