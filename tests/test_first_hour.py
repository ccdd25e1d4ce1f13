"""The first hour of a new user (issue 18): errors that point at the right thing,
help that teaches, output that agrees with itself."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.cli import main

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


# -- diff ---------------------------------------------------------------------
def _copy_with(src: Path, dst: Path, change: dict[str, torch.Tensor]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    sd.update(change)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_diff_identical_tensors_are_exact_and_shapes_are_named(tiny_family, tmp_path, capsys):
    from surgeon.eval.diff import diff_checkpoints

    base = tiny_family["base"]
    sd = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    other = _copy_with(base, tmp_path / "b", {
        name: (sd[name].float() + 0.01 * torch.randn(sd[name].shape)).to(sd[name].dtype),
        "model.norm.weight": torch.ones(7, dtype=sd["model.norm.weight"].dtype)})
    r = diff_checkpoints(base, other)
    same = r["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert same["cosine"] == 1.0 and same["rel_norm"] == 0.0 and same["max_abs_diff"] == 0.0
    assert r["tensors"][name]["cosine"] < 1.0 and r["tensors"][name]["rel_norm"] > 0
    assert r["tensors"]["model.norm.weight"]["status"] == "shape mismatch"
    assert r["shape_mismatch"] == ["model.norm.weight"] and not r["identical"]
    assert math.isfinite(r["max_abs_diff"])
    assert main(["diff", str(base), str(other), "--atol", "1"]) == 1  # a shape mismatch never passes the gate
    out = capsys.readouterr().out
    assert "shape mismatch" in out and "inf" not in out and "nan" not in out
    assert main(["diff", str(base), str(base), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["identical"] and all(t["cosine"] == 1.0 for t in whole["tensors"].values())


def test_diff_statistics_match_float64(tmp_path):
    from surgeon.eval.diff import tensor_stats

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 70, generator=g), torch.randn(300, 70, generator=g)
    s = tensor_stats(a, b)
    a64, b64 = a.double().flatten(), b.double().flatten()
    assert s["cosine"] == pytest.approx(float(a64 @ b64 / a64.norm() / b64.norm()), abs=1e-12)
    assert s["rel_norm"] == pytest.approx(float((a64 - b64).norm() / a64.norm()), abs=1e-12)
    assert s["max_abs_diff"] == float((a64 - b64).abs().max())


def test_json_output_into_a_closed_pipe_exits_quietly(tiny_family):
    base = str(tiny_family["base"])
    proc = subprocess.Popen([sys.executable, "-m", "surgeon", "diff", base, base, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "error" not in err, err


# -- help ---------------------------------------------------------------------
def test_every_subcommand_and_option_teaches(capsys):
    import argparse

    from surgeon.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"run", "validate", "plan", "merge", "transplant", "fuse", "eval", "inspect",
                                "diff", "push", "convert"}
    for name, sp in sub.choices.items():
        text = sp.format_help()
        assert "example:\n  surgeon " + name in text, name
        assert "docs/" in text, name  # the epilogue names where the docs are
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            d = action.default
            if action.option_strings and d not in (None, False, argparse.SUPPRESS) and d != []:
                assert "default" in sp._get_formatter()._get_help_string(action), (name, action.dest)
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    from surgeon.merge import all_methods

    for mname, method in all_methods().items():
        assert f"\n  {mname} " in out, mname
        for p in method.params:
            assert p.name in out, (mname, p.name)
    assert "density=" in out or "density" in out


# -- eval ---------------------------------------------------------------------
def test_eval_scores_every_text_with_the_cap_printed(capsys):
    texts = [str(ZOO / "data" / d / "heldout.txt") for d in ("prose", "python")]
    args = ["eval", str(ZOO / "bpe-base"), "--text", texts[0], "--text", texts[1], "--max-tokens", "64", "-q"]
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == texts
    assert all(r["tokens"] == 64 and r["max_tokens"] == 64 for r in rows)  # bpe-base has a bos: 64 scored
    assert rows[0]["bits_per_byte"] != rows[1]["bits_per_byte"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert texts[0] in table and texts[1] in table and table.count("first 64 tokens") == 2


def test_eval_default_cap_is_the_documented_one():
    import argparse

    from surgeon.cli import build_parser
    from surgeon.eval.protocol import DEFAULT_MAX_TOKENS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["eval"].parse_args(["m", "--text", "t"]).max_tokens == DEFAULT_MAX_TOKENS


def test_eval_of_a_folder_of_models_says_so(capsys):
    assert main(["eval", str(ZOO), "--text", str(ZOO / "data" / "prose" / "heldout.txt")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and "bpe-base" in err
    assert "sentencepiece" not in err.lower() and "tiktoken" not in err.lower()


# -- transplant ---------------------------------------------------------------
def test_transplant_cli_shows_its_advice_and_counts(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["transplant", str(ZOO / "bpe-base"), str(ZOO / "sp-base"), str(tmp_path / "t"), "--k", "64"]) == 0
    assert not [w for w in caught if "surgeon" in str(w.filename)], [str(w.message) for w in caught]
    cap = capsys.readouterr()
    assert "note: k=64 is large for the donor's embedding width 96" in cap.err
    assert "note: digit splitting differs" in cap.err
    card = (tmp_path / "t" / "README.md").read_text()
    assert "k=64 is large" in card
    assert "2437 shared" in cap.out and "563 new" in cap.out and f"output: {tmp_path / 't'}" in cap.out


# -- errors that point at the right thing ---------------------------------------
def test_typo_in_a_local_path_is_named_with_its_line(tmp_path, capsys):
    (tmp_path / "zoo").symlink_to(ZOO)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodels:\n  base: zoo/bpe-bse\n  coder: zoo/bpe-python\nsteps:\n  - id: m\n"
                      "    merge: {method: ties, base: base, models: [{model: coder}]}\noutput: {path: out}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:3: no local folder 'zoo/bpe-bse' (did you mean 'zoo/bpe-base'?), and no hub repo of that name" \
        in err, err


def test_merge_cli_errors_name_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = str(tmp_path / "m")
    assert main(["merge", "ties", out, "--base", "zoo/bpe-base", "--model", "zoo/bpe-pythn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model zoo/bpe-pythn: no local folder 'zoo/bpe-pythn' "
                          "(did you mean 'zoo/bpe-python'?), and no hub repo of that name"), err
    assert main(["merge", "tie", out, "--base", "zoo/bpe-base", "--model", "zoo/bpe-python"]) == 2
    err = capsys.readouterr().err
    assert "surgeon merge tie: unknown merge method 'tie' (did you mean 'ties'?)" in err and "<surgeon" not in err
    assert main(["merge", "slerp", out, "--base", "zoo/bpe-base", "--model", "zoo/bpe-python",
                 "--model", "zoo/bpe-shakespeare", "--set", "t=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--model: method 'slerp' takes 1 model besides the base, got 2" in err, err
    assert main(["merge", "ties", out, "--base", "zoo/bpe-base", "--model", "zoo/bpe-python:densty=0.5",
                 "--set", "lamda=1"]) == 2
    err = capsys.readouterr().err
    assert "--set lamda: method 'ties' has no parameter 'lamda' (did you mean 'lambda'?)" in err, err
    assert "--model zoo/bpe-python: method 'ties' has no per-model parameter 'densty'" in err, err


def test_a_missing_tensor_names_the_model_once(tiny_family, tmp_path, capsys):
    base = tiny_family["base"]
    short = tmp_path / "short"
    short.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (short / f.name).write_bytes(f.read_bytes())
    sd = load_file(base / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, short / "model.safetensors", metadata={"format": "pt"})
    assert main(["merge", "ties", str(tmp_path / "o"), "--base", str(base), "--model", str(short)]) == 2
    err = capsys.readouterr().err
    assert "has no tensor 'model.norm.weight'" in err and "(model_0 (" not in err, err


def test_validation_reports_every_problem_in_file_order(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    zoo = ZOO.as_posix()
    recipe.write_text(f"name: t\nmodels:\n  base: {zoo}/bpe-base\n  poet: {zoo}/bpe-shakespeare\n"
                      f"  coder: {zoo}/bpe-python\nsteps:\n"
                      "  - id: a\n    merge:\n      method: tie\n      base: base\n      models: [{model: poet}]\n"
                      "  - id: b\n    merge:\n      method: ties\n      base: base\n"
                      "      models:\n        - {model: coder, densty: 0.5}\n        - {model: poett}\n"
                      "      parameters: {lamda: 1.0}\noutput: {from: b, path: out}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    import re

    lines = [int(m.group(1)) for e in err for m in [re.search(r"r\.yaml:(\d+): ", e)] if m]
    assert len(lines) == 4 and lines == sorted(lines), err
    joined = "\n".join(err)
    for needle in ("'tie'", "'densty'", "'poett'", "'lamda'"):
        assert needle in joined, (needle, joined)
    assert "(4 problems)" in joined


def test_problem_list_is_capped():
    from surgeon.recipe.load import MAX_PROBLEMS, report_problems

    text = report_problems([f"r.yaml:{n}: p{n}" for n in range(50, 0, -1)])
    shown = text.splitlines()
    assert shown[0] == "r.yaml:1: p1" and len(shown) == MAX_PROBLEMS + 1 and "30 more problems" in shown[-1]


# -- pictures -----------------------------------------------------------------
def _cell_by_hand(base: dict, out: dict, inputs: list[dict], layer: int, kind: str) -> tuple[float, float]:
    from surgeon.arch import layer_index, tensor_kind

    names = [n for n in out if layer_index(n) == layer and tensor_kind(n) == kind]
    assert names
    d2 = sum(float(((out[n].double() - base[n].double()) ** 2).sum()) for n in names)
    b2 = sum(float((base[n].double() ** 2).sum()) for n in names)
    conflicts = entries = 0
    for n in names:
        deltas = torch.stack([i[n].float() - base[n].float() for i in inputs])
        conflicts += int(((deltas > 0).any(0) & (deltas < 0).any(0)).sum())
        entries += base[n].numel()
    return math.sqrt(d2 / b2), conflicts / entries


def test_every_merge_output_gets_its_change_picture(tiny_family, tmp_path, capsys):
    out, report = tmp_path / "m", tmp_path / "rep" / "report.json"
    fam = tiny_family
    assert main(["merge", "ties", str(out), "--base", str(fam["base"]), "--model", str(fam["ft1"]),
                 "--model", str(fam["ft2"]), "--set", "density=0.5", "--report", str(report), "-q"]) == 0
    assert (out / "changemap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report.parent / "report.changemap.png").is_file()
    card = (out / "README.md").read_text()
    assert "![per-layer change](changemap.png)" in card and "## What changed where" in card
    cm = json.loads((out / "changemap.json").read_text())
    assert cm["sign_electing"] and cm["layers"] == [0, 1]
    sds = {k: load_file(v / "model.safetensors") for k, v in fam.items()}
    merged = load_file(out / "model.safetensors")
    for cell in cm["cells"]:
        if cell["layer"] is None:
            continue
        rel, conflict = _cell_by_hand(sds["base"], merged, [sds["ft1"], sds["ft2"]], cell["layer"], cell["kind"])
        assert cell["rel_change"] == pytest.approx(rel, rel=1e-9), cell
        assert cell["sign_conflict"] == pytest.approx(conflict, abs=1e-12), cell
    assert json.loads(report.read_text())["changemap"]["png"] == str(out / "changemap.png")
    assert main(["merge", "ties", str(out), "--base", str(fam["base"]), "--model", str(fam["ft1"]),
                 "--model", str(fam["ft2"]), "--overwrite"]) == 0
    assert f"what changed where: {out / 'changemap.png'}" in capsys.readouterr().out


def test_the_change_map_is_gathered_while_the_merge_writes(tiny_family, tmp_path, monkeypatch):
    """Every span is compared on the writer's thread as the merge writes it, also when tensors are
    written in row pieces (spans split between writes); none is read back from the output after;
    the numbers are still the hand-computed ones."""
    import threading

    import surgeon.eval.changemap as cmod

    threads: list[str] = []
    real_compare = cmod.ChangeMapSampler._compare

    def compare(self, *a, **k):
        threads.append(threading.current_thread().name)
        return real_compare(self, *a, **k)

    monkeypatch.setattr(cmod.ChangeMapSampler, "_compare", compare)
    fam, out = tiny_family, tmp_path / "m"
    assert main(["merge", "ties", str(out), "--base", str(fam["base"]), "--model", str(fam["ft1"]),
                 "--model", str(fam["ft2"]), "--set", "density=0.5", "--piece-size", "2KB", "-q"]) == 0
    assert threads and all(t.startswith("surgeon-write") for t in threads), set(threads)
    cm = json.loads((out / "changemap.json").read_text())
    sds = {k: load_file(v / "model.safetensors") for k, v in fam.items()}
    merged = load_file(out / "model.safetensors")
    for cell in cm["cells"]:
        if cell["layer"] is not None:
            rel, conflict = _cell_by_hand(sds["base"], merged, [sds["ft1"], sds["ft2"]], cell["layer"], cell["kind"])
            assert cell["rel_change"] == pytest.approx(rel, rel=1e-9), cell
            assert cell["sign_conflict"] == pytest.approx(conflict, abs=1e-12), cell


def test_the_picture_is_drawn_beside_the_final_sync_from_the_planned_output(tiny_family, tmp_path, monkeypatch):
    """Once the merge has written every span, the picture is drawn on a thread of its own while
    the output is synced (not after the commit, on the main thread); it is the picture of the
    numbers written (the same bytes as drawing changemap.json), drawn once."""
    pytest.importorskip("matplotlib")
    import threading

    import surgeon.eval.changemap as cmod
    from surgeon.io import plot
    from surgeon.io.writer import CheckpointWriter

    events: list[str] = []
    real_render, real_commit = plot.render_changemap, CheckpointWriter.commit

    def render(cm, title=None):
        events.append(f"draw on {threading.current_thread().name}")
        return real_render(cm, title)

    def commit(self):
        events.append("commit")
        return real_commit(self)

    monkeypatch.setattr(plot, "render_changemap", render)
    monkeypatch.setattr(CheckpointWriter, "commit", commit)
    fam, out = tiny_family, tmp_path / "m"
    assert main(["merge", "ties", str(out), "--base", str(fam["base"]), "--model", str(fam["ft1"]),
                 "--model", str(fam["ft2"]), "--set", "density=0.5", "--piece-size", "2KB", "-q"]) == 0
    assert events.count("commit") == 1
    draws = [e for e in events if e.startswith("draw")]
    assert draws == ["draw on surgeon-changemap"], events
    cm = json.loads((out / "changemap.json").read_text())
    assert (out / "changemap.png").read_bytes() == real_render(cm, cmod.changemap_title("ties"))


def test_an_early_picture_is_used_only_for_the_numbers_it_shows(tiny_family):
    pytest.importorskip("matplotlib")
    import surgeon.eval.changemap as cmod
    from surgeon.io.checkpoint import Checkpoint

    base, ft1, ft2 = (Checkpoint.open(tiny_family[k]) for k in ("base", "ft1", "ft2"))
    sampler = cmod.ChangeMapSampler(base, [ft1], "linear")
    assert sampler.picture({}, "t") is False  # nothing planned, nothing drawn
    sampler.expect(ft2, "t")
    names = list(ft2.names)
    for name in names[:-1]:
        sampler.rows_written(name, tuple(ft2.info(name).shape), 0, ft2.get(name))
    assert sampler.picture({}, "t") is False  # one tensor still unwritten: no early drawing
    last = names[-1]
    sampler.rows_written(last, tuple(ft2.info(last).shape), 0, ft2.get(last))
    cm = sampler.result(ft2)
    png = sampler.picture(cm, "t")
    assert isinstance(png, bytes) and png[:4] == b"\x89PNG"
    assert sampler.picture(cm, "another title") is False
    assert sampler.picture({**cm, "sampled": not cm["sampled"]}, "t") is False  # the output is not its plan


def _same_changemap(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "cells"} == {k: v for k, v in b.items() if k != "cells"}
    assert len(a["cells"]) == len(b["cells"])
    for x, y in zip(a["cells"], b["cells"]):
        assert {k: v for k, v in x.items() if k != "rel_change"} == {k: v for k, v in y.items() if k != "rel_change"}
        assert x["rel_change"] == y["rel_change"]  # the same sums in the same order: equal, not close


def test_the_sampler_takes_rows_in_any_split_and_order_and_reads_only_what_it_missed(tiny_family):
    import random

    import surgeon.eval.changemap as cmod
    from surgeon.io.checkpoint import Checkpoint

    base, ft1, ft2, ft3 = (Checkpoint.open(tiny_family[k]) for k in ("base", "ft1", "ft2", "ft3"))
    from_files = cmod.compute_changemap(base, ft3, [ft1, ft2], "ties")
    rng = random.Random(0)
    sampler = cmod.ChangeMapSampler(base, [ft1, ft2], "ties")
    pieces = []
    for name in ft3.names:
        shape = tuple(ft3.info(name).shape)
        rows = shape[0] if shape else 1
        cuts = sorted({0, rows, *(rng.randrange(rows + 1) for _ in range(3))})
        pieces += [(name, shape, a, b) for a, b in zip(cuts, cuts[1:])]
    rng.shuffle(pieces)
    for name, shape, a, b in pieces[: len(pieces) * 2 // 3]:  # a third never shown: read from the output
        sampler.rows_written(name, shape, a, ft3.get_rows(name, a, b) if shape else ft3.get(name))
    assert sampler.failure is None
    _same_changemap(sampler.result(ft3), from_files)


def test_the_change_map_reads_each_span_with_one_pread_and_maps_nothing(tiny_family, monkeypatch):
    """Each span of each checkpoint is one ``read_row_bytes`` (a pread of its rows: no page-cache
    view to fault in and tear down), and gives the same numbers, bit for bit, as reading every
    span with get_rows."""
    import surgeon.eval.changemap as cmod
    from surgeon.io.checkpoint import Checkpoint

    base, ft1, ft2, ft3 = (Checkpoint.open(tiny_family[k]) for k in ("base", "ft1", "ft2", "ft3"))

    class Plain:  # a checkpoint without raw reads: every span goes through get_rows
        def __init__(self, ck):
            self.names, self.info, self.get, self.get_rows = ck.names, ck.info, ck.get, ck.get_rows

    by_rows = cmod.compute_changemap(Plain(base), Plain(ft3), [Plain(ft1), Plain(ft2)], "ties")
    reads = []
    real = Checkpoint.read_row_bytes

    def read_row_bytes(self, name, start, stop):
        got = real(self, name, start, stop)
        assert got is not None and len(got) == (stop - start) * self.info(name).nbytes // self.info(name).shape[0]
        reads.append((name, start, stop))
        return got

    def map_rows(self, *a):
        raise AssertionError("the change map maps no pages")

    monkeypatch.setattr(Checkpoint, "read_row_bytes", read_row_bytes)
    monkeypatch.setattr(Checkpoint, "map_rows", map_rows)
    by_reads = cmod.compute_changemap(base, ft3, [ft1, ft2], "ties")
    _same_changemap(by_reads, by_rows)
    spans = {(n, s, e) for n in ft3.names if ft3.info(n).shape
             for s, e in cmod._tensor_spans(tuple(ft3.info(n).shape))}
    assert sorted(reads) == sorted([sp for sp in spans for _ in range(4)])


def test_a_failure_while_watching_is_kept_and_the_files_answer(tiny_family):
    import surgeon.eval.changemap as cmod
    from surgeon.io.checkpoint import Checkpoint

    base, ft1, ft2 = (Checkpoint.open(tiny_family[k]) for k in ("base", "ft1", "ft2"))

    class Broken:
        names, info, get = base.names, base.info, base.get

        def get_rows(self, *a, **k):
            raise OSError("gone")

    sampler = cmod.ChangeMapSampler(Broken(), [ft1], "linear")
    name = next(n for n in ft2.names if ft2.info(n).shape)
    sampler.rows_written(name, tuple(ft2.info(name).shape), 0, ft2.get(name))  # must not raise
    assert isinstance(sampler.failure, OSError)
    sampler.reference = base
    _same_changemap(sampler.result(ft2), cmod.compute_changemap(base, ft2, [ft1], "linear"))


def test_without_matplotlib_the_card_says_how_to_get_the_picture(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_NO_PLOT", "1")
    out = tmp_path / "m"
    assert main(["merge", "linear", str(out), "--model", str(tiny_family["ft1"]), "--model",
                 str(tiny_family["ft2"]), "-q"]) == 0
    card = (out / "README.md").read_text()
    assert not (out / "changemap.png").exists() and "pip install 'surgeon[plot]'" in card
    cm = json.loads((out / "changemap.json").read_text())
    assert cm["reference"] == "first input" and not cm["sign_electing"]


def test_a_merge_draws_its_picture_without_importing_matplotlib(tiny_family, tmp_path):
    """The change map is drawn with Pillow (surgeon.io.heatmap): matplotlib's imports and first
    figure cost ~0.8 CPU-s that a merge keeping both cores busy paid on every run."""
    pytest.importorskip("PIL")
    out = tmp_path / "m"
    code = ("import sys; from surgeon.cli import main; "
            f"rc = main(['merge', 'ties', {str(out)!r}, '--base', {str(tiny_family['base'])!r}, "
            f"'--model', {str(tiny_family['ft1'])!r}, '--model', {str(tiny_family['ft2'])!r}, "
            "'--set', 'density=0.5', '-q']); "
            "print(rc, 'matplotlib' in sys.modules, 'PIL.Image' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-3:] == ["0", "False", "True"], done.stdout + done.stderr
    assert (out / "changemap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_exit_waits_for_the_drawing_thread(tiny_family, tmp_path):
    """The early drawing thread is a daemon the process's exit joins (atexit, before the
    teardown): a daemon thread still inside a drawing library's C code while the interpreter
    tore down aborted the process (SIGABRT / SIGSEGV instead of 130)."""
    pytest.importorskip("PIL")
    from surgeon.io import plot

    out, fam = tmp_path / "m", tiny_family
    assert main(["merge", "linear", str(out), "--model", str(fam["ft1"]), "--model", str(fam["ft2"]), "-q"]) == 0
    assert any(t.name == "surgeon-changemap" and t.daemon for t in plot._exiting)


def test_diff_plot(tiny_family, tmp_path, capsys):
    png = tmp_path / "d.png"
    assert main(["diff", str(tiny_family["base"]), str(tiny_family["ft1"]), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and f"plot: {png}" in capsys.readouterr().out
    cm = json.loads(png.with_suffix(".json").read_text())
    base, ft = (load_file(tiny_family[k] / "model.safetensors") for k in ("base", "ft1"))
    cell = next(c for c in cm["cells"] if c["layer"] == 1 and c["kind"] == "down")
    assert cell["rel_change"] == pytest.approx(_cell_by_hand(base, ft, [ft], 1, "down")[0], rel=1e-9)


def test_large_tensors_are_sampled_with_bounded_reads(monkeypatch):
    import surgeon.eval.changemap as cmod

    monkeypatch.setattr(cmod, "SAMPLE_ELEMENTS", 1000)
    monkeypatch.setattr(cmod, "BLOCK_ELEMENTS", 200)
    spans = cmod._spans(500, 40)  # 20,000 entries: sampled
    read = sum(e - s for s, e in spans) * 40
    assert read <= 1000 + 16 * 40 and spans[0][0] == 0 and spans[-1][1] == 500
    assert all(0 <= s < e <= 500 for s, e in spans)
    full = cmod._spans(20, 40)  # 800 entries: every row, in blocks of 5 rows
    assert full == [(0, 5), (5, 10), (10, 15), (15, 20)]


# -- cards --------------------------------------------------------------------
def test_cards_have_no_placeholder_link_and_say_when_mergekit_was_used(tiny_family, tmp_path):
    fam = tiny_family
    out = tmp_path / "m"
    assert main(["merge", "linear", str(out), "--model", str(fam["ft1"]), "--model", str(fam["ft2"]), "-q"]) == 0
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "https://github.com/)" not in card and "mergekit" not in front
    cfg = tmp_path / "mk.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {fam['ft1']}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {fam['ft2']}\n    parameters: {{weight: 1.0}}\ndtype: bfloat16\n")
    assert main(["run", str(cfg), str(tmp_path / "mk"), "-q"]) == 0
    card = (tmp_path / "mk" / "README.md").read_text()
    assert "- mergekit" in card.split("---")[1] and "mergekit configuration, run by surgeon" in card


# -- reading an evaluation ------------------------------------------------------
def test_gain_kept_is_the_share_of_each_fine_tunes_gain():
    from surgeon.eval.report import gains_kept, reading_lines

    def row(p, s):
        return {"prose": {"bits_per_byte": p, "max_tokens": 4096, "tokens": 4096},
                "poetry": {"bits_per_byte": s, "max_tokens": 4096, "tokens": 4096}}

    ev = {"base": row(2.5, 5.0), "poet": row(3.0, 3.0), "flat": row(2.6, 5.1), "output": row(2.8, 3.5)}
    rows = gains_kept(ev, "base", ["poet", "flat"])
    assert len(rows) == 1 and rows[0]["text"] == "poetry"
    assert rows[0]["kept"] == pytest.approx((5.0 - 3.5) / (5.0 - 3.0))  # 75 %
    lines = reading_lines(ev, {"kind": "merge", "base": "base", "models": ["poet", "flat"]})
    assert lines[0].startswith("each text scored on its first 4096 tokens")
    assert lines[-1].strip() == "poet on poetry: base 5.000 -> poet 3.000, merge 3.500: keeps 75%"


# -- plan -----------------------------------------------------------------------
def test_plan_estimates_fuse_memory(capsys):
    assert main(["plan", str(REPO / "recipes" / "fusechat.yaml"), "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    fuse = [s for s in steps if s["kind"] == "fuse"]
    assert fuse
    cfg = json.loads((ZOO / "bpe-base" / "config.json").read_text())
    from surgeon.io.checkpoint import Checkpoint

    params = Checkpoint.open(ZOO / "bpe-base").num_parameters
    h, n, v, i, heads = (cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                                          "num_attention_heads"))
    b, t = 8, 128  # fusechat.yaml's batch_size and max_length
    train = 16 * params + 4 * b * t * n * (6 * h + 3 * i + heads * t) + 12 * b * t * v
    for s in fuse:
        assert s["peak_bytes_estimate"] >= train > 16 * params, s
        assert any("AdamW" in note for note in s["notes"])
    assert main(["plan", str(REPO / "recipes" / "fusechat.yaml")]) == 0
    table = capsys.readouterr().out
    assert " 0 B " not in table


def test_plan_says_na_when_it_cannot_estimate(tmp_path):
    from types import SimpleNamespace

    from surgeon.engine.steps import fuse_peak_estimate

    ck = SimpleNamespace(config={"model_type": "x"}, num_parameters=10)
    peak, notes = fuse_peak_estimate(ck, [ck], SimpleNamespace(batch_size=2, max_length=8))
    assert peak == 0 and notes[0].startswith("peak memory: n/a (")


def test_report_compute_time_is_wall_time(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_COMPUTE_WORKERS", "4")  # four compute threads: their summed time can pass the wall
    rep = tmp_path / "r.json"
    fam = tiny_family
    assert main(["merge", "ties", str(tmp_path / "m"), "--base", str(fam["base"]), "--model", str(fam["ft1"]),
                 "--model", str(fam["ft2"]), "--threads", "4", "--report", str(rep), "-q"]) == 0
    step = json.loads(rep.read_text())["steps"][0]
    assert step["compute_s"] <= step["seconds"] and step["compute_s"] <= step["compute_thread_s"]


def test_one_evaluation_default_everywhere():
    """zoo/README.md's table, the quickstart recipe and `surgeon eval` score the same tokens."""
    import re

    from surgeon.eval.protocol import DEFAULT_MAX_TOKENS
    from surgeon.eval.report import evaluate_texts
    from surgeon.recipe import load_recipe

    qs = load_recipe(REPO / "recipes" / "quickstart.yaml").recipe.eval
    assert qs.max_tokens in (None, DEFAULT_MAX_TOKENS)
    readme = (ZOO / "README.md").read_text()
    assert f"first {DEFAULT_MAX_TOKENS:,} tokens" in readme
    row = re.search(r"\| `bpe-base` \| ([\d.]+) \|.*\| ([\d.]+) \| [\d.]+ \| [\d.]+ \|", readme)
    r = evaluate_texts(ZOO / "bpe-base", [ZOO / "data" / "prose" / "heldout.txt"])[0]
    assert r["max_tokens"] == DEFAULT_MAX_TOKENS
    assert f"{r['perplexity']:.2f}" == row.group(1) and f"{r['bits_per_byte']:.3f}" == row.group(2)


def test_quiet_silences_loading_bars():
    proc = subprocess.run([sys.executable, "-m", "surgeon", "eval", str(ZOO / "bpe-base"), "--text",
                           str(ZOO / "data" / "prose" / "heldout.txt"), "--max-tokens", "32", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no "Loading weights" bar, no advisory warnings
    assert "first 32 tokens" in proc.stdout


@pytest.mark.parametrize("args", [
    ["inspect", "zoo/bpe-bse"],
    ["eval", "zoo/bpe-bse", "--text", "zoo/data/prose/heldout.txt"],
    ["eval", "zoo/bpe-base", "--text", "zoo/data/prose/heldot.txt"],
    ["diff", "zoo/bpe-base", "zoo/bpe-pythn"],
])
def test_a_misspelt_path_gets_the_closest_one(args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(args) == 2
    err = capsys.readouterr().err
    want = {"bpe-bse": "zoo/bpe-base", "heldot.txt": "zoo/data/prose/heldout.txt", "bpe-pythn": "zoo/bpe-python"}
    typo = next(k for k in want if any(k in a for a in args))
    assert f"(did you mean '{want[typo]}'?)" in err, err


def test_a_resumed_run_keeps_the_picture_in_the_card(tiny_family, tmp_path):
    fam = tiny_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{base: {fam['base']}, a: {fam['ft1']}, b: {fam['ft2']}}}\n"
                      "steps:\n  - id: m\n    merge: {method: ties, base: base, models: [{model: a}, {model: b}]}\n"
                      f"output: {{path: {tmp_path / 'out'}}}\n"
                      f"eval: {{texts: {{t: {ZOO / 'data' / 'prose' / 'heldout.txt'}}}, max_tokens: 16, inputs: false}}\n")
    assert main(["run", str(recipe), "-q", "--no-eval"]) == 0
    assert main(["run", str(recipe), "-q"]) == 0  # the merge is skipped, the card rewritten with the evaluation
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation" in card and "![per-layer change](changemap.png)" in card


def test_header_problems_of_every_step_in_one_pass(tiny_family, tmp_path, capsys):
    """Problems found from headers (a missing tensor, a missing tokenizer) in two independent
    steps come out together, in file order; a step reading a failed step is not re-reported."""
    fam = tiny_family
    short = tmp_path / "short"
    short.mkdir()
    for f in fam["ft1"].iterdir():
        if f.name != "model.safetensors":
            (short / f.name).write_bytes(f.read_bytes())
    sd = load_file(fam["ft1"] / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, short / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{base: {fam['base']}, a: {short}, b: {fam['ft2']}, c: {fam['ft3']}}}\n"
                      "steps:\n"
                      "  - id: one\n    merge: {method: ties, base: base, models: [{model: a}]}\n"
                      "  - id: two\n    merge: {method: slerp, base: base, models: [{model: b}]}\n"
                      "  - id: three\n    merge: {method: linear, models: [{model: one}, {model: c}]}\n"
                      "output: {from: three, path: out}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "has no tensor 'model.norm.weight'" in err and "'t'" in err, err  # slerp's missing t, too
    assert err.index("no tensor") < err.index("'t'")


def test_a_recipe_transplant_prints_advice_as_notes(tmp_path):
    recipe = tmp_path / "t.yaml"
    recipe.write_text(f"models: {{base: {ZOO / 'bpe-base'}, donor: {ZOO / 'sp-base'}}}\n"
                      "steps:\n  - id: t\n    transplant: {model: base, donor: donor, k: 8}\n"
                      f"output: {{path: {tmp_path / 'out'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "surgeon", "run", str(recipe)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "note: digit splitting differs" in proc.stderr, proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr
