"""Chat templates for a merge's output tokenizer (``chat_template:``).

Accepted values, as in mergekit 0.1.5:

- a name: ``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral`` (the
  conversation formats those model families publish; the Jinja text below is
  surgeon's own rendering of them);
- ``auto``: the template the most inputs' tokenizers carry (compared after
  stripping surrounding whitespace; among equally common ones, the first in
  the recipe's order: base, then models); no input with a template: nothing is
  written, with a note that ``-q`` keeps;
- a literal Jinja template (any text with ``{``, at least 20 characters).

Anything else is refused. The template is stored on the output tokenizer and
saved by the installed transformers where it reads it back
(``chat_template.jinja`` with transformers 5, ``tokenizer_config.json``'s
``chat_template`` with older versions).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA3 = (
    "{%- for message in messages %}"
    "{%- if loop.first %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim)"
    " ~ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_MISTRAL = (
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{%- set turns = messages[1:] if system is not none else messages %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{- raise_exception('mistral chat template: after an optional system message, roles must alternate "
    "user/assistant') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{- ' [INST] ' ~ system ~ '\\n\\n' ~ message['content'] ~ ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' ~ message['content'] ~ ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' ~ message['content'] ~ eos_token }}"
    "{%- else %}{{- raise_exception('mistral chat template: only system, user and assistant roles') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{%- if systems %}{{- (systems | last)['content'] | trim }}{%- endif %}"
    "{{- '\\n\\n' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '### Instruction:\\n' ~ (message['content'] | trim) }}"
    "{%- elif message['role'] == 'user_context' %}{{- '### Input:\\n' ~ (message['content'] | trim) }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' ~ (message['content'] | trim) }}"
    "{%- endif %}"
    "{%- if message['role'] != 'system' and not loop.last %}{{- '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '\\n\\n### Response:\\n' }}{%- endif %}"
)

_EXAONE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}{{- '[|system|][|endofturn|]\\n' }}{%- endif %}"
    "{{- '[|' ~ message['role'] ~ '|]' ~ message['content'] }}"
    "{%- if message['role'] == 'user' %}{{- '\\n' }}{%- else %}{{- '[|endofturn|]\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}"
)

#: the named templates mergekit 0.1.5 ships, written out here
TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "exaone": _EXAONE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
}


def _template_of(ck: Any) -> str | None:
    """The chat template a checkpoint's tokenizer carries (chat_template.jinja or tokenizer_config.json)."""
    import json

    files = {f.name: f for f in getattr(ck, "tokenizer_files", []) or []}
    if "chat_template.jinja" in files:
        text = Path(files["chat_template.jinja"]).read_text(encoding="utf-8")
        return text.strip() or None
    for name in ("chat_template.json", "tokenizer_config.json"):
        if name not in files:
            continue
        try:
            data = json.loads(Path(files[name]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        t = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(t, list):  # [{name, template}, ...]
            t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
        elif isinstance(t, dict):
            t = t.get("default")
        if isinstance(t, str) and t.strip():
            return t.strip()
    return None


def resolve_chat_template(value: str, inputs: list[Any], where: Callable[..., str], notes: list[str]) -> str | None:
    """The Jinja text for ``chat_template: value`` (None: ``auto`` found no template; a note says so)."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{where('chat_template')}: must be a template name, 'auto' or a Jinja template")
    if value == "auto":
        seen: list[str] = []
        for ck in dict.fromkeys(inputs):
            t = _template_of(ck)
            if t:
                seen.append(t)
        if not seen:
            notes.append("warning: chat_template: auto found no chat template in any input; none is written")
            return None
        best = Counter(seen).most_common(1)[0][0]
        notes.append(f"chat_template: auto chose the template of {seen.count(best)} of {len(seen)} inputs")
        return best
    if value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise InvalidInputError(f"{where('chat_template')}: {value!r} is neither a template name "
                                f"({', '.join(sorted(TEMPLATES))}), 'auto', nor a Jinja template")
    return value
