"""chat_template: by name, auto, or a literal Jinja template (mergekit's tests/test_chat_template.py
configs and checks on surgeon's outputs), loaded back with transformers' AutoTokenizer and applied."""
from __future__ import annotations

from pathlib import Path

import pytest
from mk_tiny import assert_same_checkpoint, make_model, run_mergekit, run_surgeon

CONV = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "how are you"}]
EXPECTED = {  # the published formats, rendered by transformers with add_generation_prompt=True
    "chatml": "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello!<|im_end|>\n"
              "<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nhello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nhow are you<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] hi there [/INST] hello!</s> [INST] how are you [/INST]",
    "alpaca": "\n\n### Instruction:\nhi there\n\n### Response:\nhello!\n\n### Instruction:\nhow are you"
              "\n\n### Response:\n",
    "exaone": "[|system|][|endofturn|]\n[|user|]hi there\n[|assistant|]hello![|endofturn|]\n"
              "[|user|]how are you\n[|assistant|]",
}
LITERAL = "{{messages[0]['content']}}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chatmodels")
    return {
        "base": make_model(root / "model_base", 64, [], seed=0),
        "b": make_model(root / "model_b", 64, seed=5, tokenizer=False),  # mergekit's model_b has no tokenizer
    }


def _config(models: dict[str, Path], template: str, extra: str = "") -> str:
    return (f"merge_method: linear\nbase_model: {models['base']}\ndtype: float32\nchat_template: {template}\n{extra}"
            f"models:\n  - {{model: {models['base']}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {models['b']}, parameters: {{weight: 0.5}}}}\n")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_template_is_written_and_applies(name, models, tmp_path):
    rc, out = run_surgeon(_config(models, name), tmp_path / "out")
    assert rc == 0
    tok = _tokenizer(out)
    assert tok.chat_template
    text = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED[name]


def test_literal_template(models, tmp_path):
    rc, out = run_surgeon(_config(models, f'"{LITERAL}"'), tmp_path / "out")
    assert rc == 0
    tok = _tokenizer(out)
    assert tok.chat_template == LITERAL
    assert tok.apply_chat_template(CONV, tokenize=False) == "hi there"


def test_auto_picks_the_most_common_template(tmp_path):
    chatml_like = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    a = make_model(tmp_path / "a", seed=1, chat_template=other)
    b = make_model(tmp_path / "b", seed=2, chat_template=chatml_like)
    c = make_model(tmp_path / "c", seed=3, chat_template=chatml_like)
    text = (f"merge_method: linear\nbase_model: {a}\ndtype: float32\nchat_template: auto\n"
            f"models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\n")
    rc, out = run_surgeon(text, tmp_path / "out")
    assert rc == 0
    assert _tokenizer(out).chat_template == chatml_like


def test_auto_without_templates_writes_none_and_says_so(models, tmp_path, capsys):
    rc, out = run_surgeon(_config(models, "auto"), tmp_path / "out")
    assert rc == 0
    assert not _tokenizer(out).chat_template
    assert "auto found no chat template" in capsys.readouterr().err  # the note survives -q


def test_unknown_name_refused(models, tmp_path, capsys):
    rc, out = run_surgeon(_config(models, "chatmlx"), tmp_path / "out")
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chatmlx" in err[0] and "chatml" in err[0]


def test_template_with_a_new_vocabulary(tmp_path):
    base = make_model(tmp_path / "base", seed=0)
    chatml = make_model(tmp_path / "chatml", 66, ["<|im_start|>", "<|im_end|>"], seed=1)
    text = (f"merge_method: linear\nbase_model: {base}\ndtype: float32\ntokenizer_source: union\n"
            f"chat_template: chatml\nmodels: [{{model: {base}}}, {{model: {chatml}}}]\n")
    rc, out = run_surgeon(text, tmp_path / "out")
    assert rc == 0
    tok = _tokenizer(out)
    assert len(tok.get_vocab()) == 66
    ids = tok.apply_chat_template(CONV[:1], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids


@pytest.mark.mergekit
@pytest.mark.parametrize("template,needle", [("chatml", "<|im_start|>"), (f'"{LITERAL}"', LITERAL)])
def test_same_as_mergekit(template, needle, models, tmp_path):
    """mergekit's own two configs: same tensors, and both outputs carry the template."""
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    text = _config(models, template)
    rc, ours = run_surgeon(text, tmp_path / "ours")
    assert rc == 0
    theirs = run_mergekit(text, tmp_path / "theirs")
    assert_same_checkpoint(ours, theirs)
    for folder in (ours, theirs):
        assert needle in _tokenizer(folder).chat_template


@pytest.mark.mergekit
@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_renders_like_mergekits_template(name):
    """Where mergekit's shipped text renders the published format, ours renders the same string.
    (Its llama3 adds a newline after each <|eot_id|>, its exaone indentation and its alpaca drops the
    blank line before the generation prompt: surgeon follows the published formats there.)"""
    import importlib.resources

    chat_templates = pytest.importorskip("mergekit._data.chat_templates")
    from transformers.utils.chat_template_utils import render_jinja_template

    from surgeon.merge.chat_template import TEMPLATES

    theirs = importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()
    kw = {"bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": True}
    a = render_jinja_template([CONV], chat_template=TEMPLATES[name], **kw)[0][0]
    b = render_jinja_template([CONV], chat_template=theirs, **kw)[0][0]
    assert a == b == EXPECTED[name]
