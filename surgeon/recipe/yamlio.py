"""YAML loading that remembers where every key and value came from.

PyYAML's composer gives each node a start mark; we build plain Python objects
from the node tree ourselves and keep a map from the path of each value
(``("steps", 0, "merge", "method")``) to its line, so that every validation
error can say ``recipe.yaml:12``. Duplicate keys, which PyYAML silently
collapses, are errors here: in a recipe they are always a mistake.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError

Path_ = tuple[Any, ...]


@dataclass
class Located:
    """A parsed YAML document plus the line of every path in it."""

    data: Any
    file: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """Line of ``path`` or of its closest located ancestor."""
        p = tuple(path)
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return None
            p = p[:-1]

    def where(self, path: Path_) -> str:
        line = self.line(path)
        return f"{self.file}:{line}" if line else self.file


class _Loader(yaml.SafeLoader):
    pass


MAX_NODES = 100_000  # a recipe has hundreds; aliases must not expand into millions ("billion laughs")
MAX_DEPTH = 64


def _construct(node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str, loader: _Loader,
               budget: list[int] | None = None, active: frozenset[int] = frozenset()) -> Any:
    budget = budget if budget is not None else [MAX_NODES]
    budget[0] -= 1
    where = f"{file}:{node.start_mark.line + 1}"
    if budget[0] < 0:
        raise RecipeError(f"{where}: the document expands to more than {MAX_NODES} values (aliases used as a bomb?)")
    if len(path) > MAX_DEPTH:
        raise RecipeError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if node.tag not in (yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG):
            raise RecipeError(f"{where}: not valid YAML (tag {node.tag!r} is not allowed in a recipe)")
        if id(node) in active:
            raise RecipeError(f"{where}: an alias refers to a value that contains it (a recursive structure)")
        active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
        loader.flatten_mapping(node)  # keys merged in with `<<: *alias` come first, then the mapping's own
        merged = len(node.value) - explicit
        out: dict[Any, Any] = {}
        own: set[Any] = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = _scalar(key_node, file, loader) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise RecipeError(f"{file}:{key_node.start_mark.line + 1}: mapping keys must be plain scalars")
            if i >= merged:  # a key written here: it may override a merged one, not repeat one written here
                if key in own:
                    raise RecipeError(
                        f"{file}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                        f"(first at line {lines.get(path + (key,), '?')})"
                    )
                own.add(key)
            elif key in out:  # YAML merge keys: a later merged value of the same key is the one that counts
                out.pop(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, path + (key,), lines, file, loader, budget, active)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), lines, file, loader, budget, active) for i, item in enumerate(node.value)]
    return _scalar(node, file, loader)


def _scalar(node: yaml.Node, file: str, loader: _Loader) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise
    except Exception as exc:  # 2020-13-45, `!!int abc`, `!!int ` with no value, 5000-digit integers
        tag = str(node.tag).removeprefix("tag:yaml.org,2002:")
        shown = repr(node.value) if len(str(node.value)) <= 40 else repr(str(node.value)[:40]) + "..."
        raise RecipeError(f"{file}:{node.start_mark.line + 1}: not valid YAML ({shown} is not a valid {tag}: "
                          f"{str(exc)[:200] or type(exc).__name__})") from None


def load_yaml_text(text: str, file: str) -> Located:
    """Parse one YAML document, keeping the line of every path."""
    return _parse(text, file, multi=False)[0]


def load_yaml_documents(text: str, file: str) -> list[Located]:
    """Parse every YAML document of a file (``---`` separated), keeping the line of every path."""
    return _parse(text, file, multi=True)


def _parse(text: str, file: str, multi: bool) -> list[Located]:
    try:
        loader = _Loader(text)  # the reader checks every character here
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise RecipeError(f"{file}:{line}: not valid YAML (character {char}: {exc.reason})") from None
    docs: list[Located] = []
    try:
        nodes = []
        if multi:
            while loader.check_node():
                nodes.append(loader.get_node())
        else:
            node = loader.get_single_node()
            nodes = [node] if node is not None else []
        nodes = [n for n in nodes if n is not None]
        if not nodes:
            raise RecipeError(f"{file}: the file is empty")
        budget = [MAX_NODES]
        for node in nodes:
            lines: dict[Path_, int] = {}
            docs.append(Located(_construct(node, (), lines, file, loader, budget), file, lines))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: not valid YAML ({problem})") from None
    except RecipeError:
        raise
    except RecursionError:
        raise RecipeError(f"{file}: not valid YAML (nested too deeply)") from None
    except Exception as exc:  # scalars PyYAML resolves but cannot build: 2020-13-45, `!!int abc`, `!!int ` (empty)
        raise RecipeError(f"{file}: not valid YAML ({type(exc).__name__}: {exc})") from None
    finally:
        loader.dispose()
    return docs


def load_yaml_file(path: str | Path) -> Located:
    p = Path(path)
    return load_yaml_text(_read(p), str(p))


def load_yaml_file_documents(path: str | Path) -> list[Located]:
    """Every YAML document of a file (a mergekit-multi config has several)."""
    p = Path(path)
    return load_yaml_documents(_read(p), str(p))


def _read(p: Path) -> str:
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO would block the read forever
            raise RecipeError(f"{p}: not a regular file (a folder, FIFO, device or socket); a recipe is a YAML file")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: cannot read ({exc})") from None
