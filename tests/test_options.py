"""One definition per option set: recipe schema, CLI flags, API keywords and library functions agree.

The transplant and fuse option sets live in surgeon/recipe/options.py; the run
options in surgeon.engine.pipeline.RunOptions. Where a signature repeats a
default (so IDEs and help() show it), these tests check it against the model.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

import surgeon
from surgeon.engine.pipeline import RunOptions
from surgeon.errors import InvalidInputError
from surgeon.fusion.distill import fuse
from surgeon.recipe.options import FuseOptions, TransplantOptions
from surgeon.recipe.schema import FuseSpec
from surgeon.transplant import transplant


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_transplant_defaults_agree_everywhere() -> None:
    model = {n: f.default for n, f in TransplantOptions.model_fields.items()}
    lib, api = _defaults(transplant), _defaults(surgeon.transplant_tokenizer)
    for name, value in model.items():
        assert lib[name] == value, f"transplant({name}=...) {lib[name]!r} != recipe {value!r}"
        assert api[name] == value, f"transplant_tokenizer({name}=...) {api[name]!r} != recipe {value!r}"
    from surgeon.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["transplant"]
    cli = {a.dest: a.default for a in sub._actions}
    for name, value in model.items():
        assert cli[name] == value, f"surgeon transplant --{name.replace('_', '-')} default {cli[name]!r} != {value!r}"


def test_run_keywords_are_the_run_options() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    api = _defaults(surgeon.run)
    assert set(api) == set(fields), set(api) ^ set(fields)
    assert all(api[n] == fields[n] for n in fields), {n: (api[n], fields[n]) for n in fields if api[n] != fields[n]}
    with pytest.raises(InvalidInputError, match="did you mean 'allow_pickle'"):
        surgeon.api._run_options({"allow_pikle": True})  # what validate() and plan() pass their keywords through


def test_fuse_keywords_agree_with_fuse_and_the_recipe() -> None:
    lib, api = _defaults(fuse), _defaults(surgeon.fuse_models)
    for name, value in api.items():
        if name in lib:
            assert lib[name] == value, f"fuse_models({name}=...) {value!r} != fuse() {lib[name]!r}"
    spec = {n: f.default for n, f in FuseSpec.model_fields.items() if n not in ("pivot", "sources", "data", "options")}
    for name, value in spec.items():
        assert lib[name] == value, f"fuse({name}=...) {lib[name]!r} != recipe {value!r}"


def test_fuse_options_refuse_unknown_keys_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="did you mean 'tokenwise'"):
        FuseOptions.from_dict({"tokenwize": "kl"})
    with pytest.raises(InvalidInputError, match="must be one of"):
        FuseOptions.from_dict({"tokenwise": "kll"})
    zoo = Path(__file__).resolve().parents[1] / "zoo"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  pivot: {zoo / 'bpe-base'}\n  src: {zoo / 'bpe-python'}\nsteps:\n  - id: f\n"
                      f"    fuse:\n      pivot: pivot\n      sources: [src]\n      data: {zoo}/data/python/train.txt\n"
                      "      options: {tokenwize: kl}\noutput: {path: ./out}\n")
    with pytest.raises(InvalidInputError, match=r"r\.yaml:10: unknown key 'steps\.0\.fuse\.options\.tokenwize' "
                                                r"\(did you mean 'tokenwise'\?\)"):
        surgeon.validate(recipe)
