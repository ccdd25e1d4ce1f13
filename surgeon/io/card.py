"""Model cards (README.md with YAML front matter) for surgeon outputs.

The front matter is what the hub indexes: ``base_model`` lists every input
(hub ids where the input came from the hub, so the model tree links them),
``tags`` says what was done, ``library_name: transformers``. The body records
the recipe, the inputs at their resolved revisions and any evaluation, so a
reader can reproduce the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class CardInput:
    id: str
    ref: str  # what the recipe said
    hub_id: str | None = None
    revision: str | None = None  # resolved commit hash


@dataclass
class CardInfo:
    name: str
    operations: list[str]  # "merge", "transplant", "fusion"
    inputs: list[CardInput]
    steps: list[dict[str, Any]]
    recipe_text: str | None = None
    evaluation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    extra_sections: dict[str, str] = field(default_factory=dict)
    from_mergekit: bool = False  # the run read a mergekit config (the card says so and tags it)
    evaluation_notes: list[str] = field(default_factory=list)  # how to read the evaluation table


def render_card(info: CardInfo) -> str:
    base_models = list(dict.fromkeys(i.hub_id for i in info.inputs if i.hub_id)) or None
    front: dict[str, Any] = {"library_name": "transformers"}
    if base_models:
        front["base_model"] = base_models
        if set(info.operations) == {"merge"}:
            front["base_model_relation"] = "merge"  # the hub's model tree shows it as a merge of its bases
    # "mergekit" only when a mergekit config was run: the hub lists that tag as "made with mergekit"
    front["tags"] = ["surgeon", *sorted(set(info.operations))] + (["mergekit"] if info.from_mergekit else [])
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {info.name}", ""]
    lines.append(f"This checkpoint was made with {_surgeon_link()} by "
                 f"{', '.join(_describe_step(s) for s in info.steps)}.")
    if info.from_mergekit:
        lines += ["", "The recipe was a mergekit configuration, run by surgeon (not by mergekit itself); "
                  "surgeon's methods follow mergekit's definitions (see the surgeon documentation's "
                  "docs/merging.md for where they differ)."]
    lines += ["", "## Inputs", "", "| id | reference | revision |", "|---|---|---|"]
    for i in info.inputs:
        lines.append(f"| {i.id} | {i.ref} | {i.revision or 'local'} |")  # as the recipe wrote it
    lines += ["", "## Steps", ""]
    for s in info.steps:
        lines.append(f"- **{s['id']}** ({s['kind']}): {_describe_step(s)}")
    for note in info.notes:
        lines.append(f"  - {note}")
    if info.evaluation:
        lines += ["", "## Evaluation", "", _eval_table(info.evaluation)]
        if info.evaluation_notes:
            for n in info.evaluation_notes:  # sentences are paragraphs, indented lines list items
                lines += [f"- {n.strip()}"] if n.startswith("  ") else ["", n.strip(), ""]
    for title, body in info.extra_sections.items():
        lines += ["", f"## {title}", "", body.rstrip()]
    if info.recipe_text:
        lines += ["", "## Recipe", "", "```yaml", info.recipe_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _surgeon_link() -> str:
    """``[surgeon](URL) VERSION`` when the installed package declares a project URL, else plain
    ``surgeon VERSION``: never a placeholder link."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        meta = metadata("surgeon")
    except (ImportError, PackageNotFoundError):
        return "surgeon"
    version = meta.get("Version") or ""
    urls = [u.partition(",")[2].strip() for u in (meta.get_all("Project-URL") or [])] + [meta.get("Home-page") or ""]
    url = next((u for u in urls if u.startswith("https://") and u.rstrip("/").count("/") >= 3), None)
    name = f"[surgeon]({url})" if url else "surgeon"
    return f"{name} {version}".strip()


def _describe_step(s: dict[str, Any]) -> str:
    kind = s.get("kind")
    if kind == "merge":
        return f"merging {', '.join(s.get('models', []))} with `{s.get('method')}`" + (
            f" onto {s['base']}" if s.get("base") else "")
    if kind == "transplant":
        return f"transplanting {s.get('donor')}'s tokenizer onto {s.get('model')} ({s.get('method')})"
    if kind == "fuse":
        return f"fusing {', '.join(s.get('sources', []))} into {s.get('pivot')} by distillation"
    return str(kind)


def _eval_table(evaluation: dict[str, Any]) -> str:
    """``{model: {text: {perplexity, bits_per_byte}}}`` as a markdown table."""
    texts = sorted({t for per in evaluation.values() for t in per})
    head = "| model | " + " | ".join(f"{t} ppl | {t} bpb" for t in texts) + " |"
    sep = "|---|" + "---|---|" * len(texts)
    rows = [head, sep]
    for model, per in evaluation.items():
        cells = []
        for t in texts:
            r = per.get(t) or {}
            cells += [f"{r.get('perplexity', float('nan')):.2f}", f"{r.get('bits_per_byte', float('nan')):.3f}"]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
