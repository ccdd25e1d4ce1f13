"""Layer surgery: a merge step with ``slices`` (mergekit's ``slices:``, frankenmerges).

A sliced merge builds its output layer by layer. Output slice ``k`` takes
``layer_range = [start, stop)`` from each of its sources; its ``i``-th layer
merges layer ``start + i`` of every source with the step's method (or the
slice's own ``method``), and is written as output layer ``offset + i`` where
``offset`` counts the layers of the slices before it. Tensors outside the
layer stack follow mergekit: those before it (embeddings) are merged from the
first slice's sources, the rest (final norm, head) from the last slice's.

Nothing here merges a number itself. Each output layer (and the group of
tensors before and after the stack) is planned as an ordinary merge over
:class:`SliceView` s — views that show a source checkpoint's layer ``start +
i`` under the output layer's tensor names — and executed by the same engine
(:func:`surgeon.engine.merge_step.execute_merge`) into the step's one writer,
so sliced merges stream, resume and use the compiled kernels like any other.
A ``passthrough`` slice of one source is a copy (a weight-1 linear merge when
no passthrough method is registered: exact in float32).

Parameters follow mergekit's precedence (a source's own, then its slice's,
then the step's; a scope whose filters match nothing falls through) and a
gradient runs over the layers of its slice (``i / (n - 1)``; 1 for a
one-layer slice; 0 outside the stack). Gradients are resolved here, per
output layer, before the merge is planned. The output config gets the new
layer count and, for per-layer config lists (``layer_types``, ...), the entry
of each output layer's source layer (docs/merging.md, "Layer surgery").

To avoid an import cycle this module does not import
:mod:`surgeon.engine.merge_step`; the merge step passes its ``plan_merge`` and
``execute_merge`` in.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InvalidInputError
from ..io.checkpoint import Checkpoint
from ..merge.registry import get_method
from ..merge.tokenizer_build import step_tokenizer
from ..merge.vocab import is_vocab_tensor, tensor_role
from ..recipe.schema import MergeSpec, SliceSource

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# mergekit 0.1.5 methods that take no base (every input, the base included, is merged as a model)
_BASELESS = ("linear", "passthrough", "karcher")


class SliceView(Checkpoint):
    """A checkpoint's tensors under other names (output name -> source name); reads delegate."""

    def __init__(self, source: Checkpoint, names: dict[str, str], label: str, config: dict[str, Any] | None):
        tensors = {out: source.info(src) for out, src in names.items()}
        super().__init__(getattr(source, "path", None), tensors, config, label=label)  # type: ignore[arg-type]
        self.source, self.name_map = source, names

    @property
    def tokenizer_files(self) -> list[Any]:
        return self.source.tokenizer_files

    @property
    def has_tokenizer(self) -> bool:
        return self.source.has_tokenizer

    def get(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.source.get(self.name_map[name], *args, **kwargs)

    def get_rows(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.source.get_rows(self.name_map[name], *args, **kwargs)

    def map_rows(self, name: str, start: int, stop: int) -> Any:
        return self.source.map_rows(self.name_map[name], start, stop)

    def read_row_bytes(self, name: str, start: int, stop: int) -> Any:
        return self.source.read_row_bytes(self.name_map[name], start, stop)

    def close(self) -> None:  # the source's files belong to the source
        pass


def split_layer(name: str) -> tuple[str, int] | None:
    """``model.layers.7.mlp.up_proj.weight`` -> (``model.layers.{}.mlp.up_proj.weight``, 7)."""
    m = _LAYER_RE.search(name)
    if not m:
        return None
    return name[: m.start(1)] + "{}" + name[m.end(1):], int(m.group(1))


def _is_pre(name: str) -> bool:
    """Tensors mergekit lists before the layer stack: token and position embeddings."""
    return tensor_role(name) == "embedding" or any(k in name for k in ("embed", "wte", "wpe"))


def at_position(value: Any, t: float) -> Any:
    """A parameter value with its gradients evaluated at ``t`` (rules keep their filters)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [{**r, "value": at_position(r.get("value"), t)} for r in value]
    if isinstance(value, list) and value:
        if any(isinstance(v, (bool, str)) for v in value):
            return value[int(min(max(t, 0.0), 1.0) * (len(value) - 1))]
        x = min(max(t, 0.0), 1.0) * (len(value) - 1)
        lo = int(x)
        hi = min(lo + 1, len(value) - 1)
        return float(value[lo]) * (1 - (x - lo)) + float(value[hi]) * (x - lo)
    return value


def _as_rules(value: Any) -> list[Any]:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return list(value)
    return [{"value": value}]


def layered(high: dict[str, Any], low: dict[str, Any]) -> dict[str, Any]:
    """Two parameter scopes as one: ``high``'s rules first, then ``low``'s (mergekit's fall-through)."""
    out = dict(low)
    for key, value in high.items():
        out[key] = _as_rules(value) + _as_rules(low[key]) if key in low else value
    return out


@dataclass
class _Group:
    """One planned sub-merge: its plan and how to rebuild its views from the real inputs."""

    plan: Any  # MergePlan
    views: dict[str, tuple[str, dict[str, str]]]  # view id -> (model id, output name -> source name)


@dataclass
class SlicedPlan:
    """The plan of a sliced merge step: sub-merges writing into one checkpoint.

    Quacks like :class:`surgeon.engine.merge_step.MergePlan` where the merge
    step and the pipeline read it (tasks, specs, bytes, notes, template).
    """

    step_id: str
    groups: list[_Group]
    template_id: str
    tokenizer_id: str | None
    out_dtype: Any
    config_overrides: dict[str, Any]
    bytes_in: int
    notes: list[str] = field(default_factory=list)
    base_id: str | None = None
    model_ids: list[str] = field(default_factory=list)
    row_maps: dict[Any, Any] = field(default_factory=dict)
    tokenizer_dir: Any = None
    vocab_layout: Any = None

    @property
    def method(self) -> Any:
        return self.groups[0].plan.method

    @property
    def tasks(self) -> list[Any]:
        return [t for g in self.groups for t in g.plan.tasks]

    @property
    def specs(self) -> list[Any]:
        return [t.spec for t in self.tasks]

    @property
    def bytes_out(self) -> int:
        return sum(t.spec.nbytes for t in self.tasks)

    def peak_bytes(self, *args: Any, **kwargs: Any) -> int:
        return max(g.plan.peak_bytes(*args, **kwargs) for g in self.groups)

    def execute(self, inputs: dict[str, Any], writer: Any, rt: Any, execute_one: Callable[..., dict[str, Any]]
                ) -> dict[str, Any]:
        """Run every sub-merge into ``writer`` (views rebuilt over the real inputs)."""
        totals: dict[str, Any] = {"prepare_s": 0.0, "compute_s": 0.0, "tensors": 0, "sub_merges": len(self.groups)}
        for g in self.groups:
            views = {vid: SliceView(inputs[mid], names, f"{inputs[mid].label} ({vid})", inputs[mid].config)
                     for vid, (mid, names) in g.views.items()}
            d = execute_one(g.plan, views, writer, rt)
            for k in ("prepare_s", "compute_s"):
                totals[k] = round(totals[k] + float(d.get(k, 0.0)), 3)
            totals["tensors"] += int(d.get("tensors", 0))
            totals["resumed_tensors"] = d.get("resumed_tensors", 0)
        return totals


def _structure(ck: Any) -> tuple[dict[int, list[str]], list[str]]:
    """A checkpoint's per-layer name templates (by layer) and its other tensor names, in file order."""
    layers: dict[int, list[str]] = {}
    other: list[str] = []
    for name in ck.names:
        split = split_layer(name)
        if split is None:
            other.append(name)
        else:
            layers.setdefault(split[1], []).append(split[0])
    return layers, other


def plan_slices(step_id: str, spec: MergeSpec, inputs: dict[str, Any], where: Callable[..., str],
                plan_one: Callable[..., Any]) -> SlicedPlan:
    """Plan a merge step with ``slices`` (headers only). ``plan_one`` is the merge step's ``plan_merge``."""
    assert spec.slices
    structures = {mid: _structure(inputs[mid]) for sl in spec.slices for mid in {s.model for s in sl.sources}}
    for k, sl in enumerate(spec.slices):
        for j, src in enumerate(sl.sources):
            layers = structures[src.model][0]
            n = max(layers) + 1 if layers else 0
            start, stop = src.layer_range
            if stop > n:
                raise InvalidInputError(
                    f"{where('slices', k, 'sources', j, 'layer_range')}: layer_range {[start, stop]} reaches past "
                    f"the {n} layers of {src.model!r} ({inputs[src.model].label})")
    ref = spec.base or spec.slices[0].sources[0].model
    if ref not in structures:
        structures[ref] = _structure(inputs[ref])
    ref_ck = inputs[ref]
    # one output tokenizer for the whole step (tokenizer_source / tokenizer: / chat_template), over every
    # model it reads; each sub-merge lays its vocabulary tensors out in it (merge.tokenizer_build)
    step_models = list(dict.fromkeys(([spec.base] if spec.base else [])
                                     + [src.model for sl in spec.slices for src in sl.sources]))
    shared_tok = step_tokenizer(spec, inputs, spec.base or ref, [m for m in step_models if m != (spec.base or ref)],
                                where, is_vocab_tensor)
    step_params = dict(spec.parameters)
    groups: list[_Group] = []
    notes: list[str] = []
    layer_sources: list[tuple[str, int]] = []  # per output layer: (model, source layer) for per-layer config lists
    pending: list[dict[str, Any]] = []  # the group being gathered (at most one)

    def group(label: str, k: int, sources: list[SliceSource], slice_params: dict[str, Any], slice_base: str | None,
              method: str, t: float, names: list[tuple[str, Callable[[SliceSource], str]]]) -> None:
        views: dict[str, tuple[str, dict[str, str]]] = {}
        entries: list[dict[str, Any]] = []
        vids: list[str] = []
        for j, src in enumerate(sources):
            vid = f"{src.model}@{label}.{j}"
            mapping: dict[str, str] = {}
            for out_name, source_name in names:
                src_name = source_name(src)
                if src_name not in inputs[src.model]:
                    raise InvalidInputError(f"{where('slices', k, 'sources', j, 'model')}: model {src.model!r} "
                                            f"({inputs[src.model].label}) has no tensor {src_name!r} (needed for "
                                            f"output tensor {out_name!r})")
                mapping[out_name] = src_name
            views[vid] = (src.model, mapping)
            vids.append(vid)
            entries.append({"model": vid, **{key: at_position(v, t) for key, v in src.params.items()}})
        base_model = slice_base or spec.base
        base_vid = None
        if method not in _BASELESS and base_model is not None:
            base_vid = next((v for v, src in zip(vids, sources) if src.model == base_model), None)
        params = layered({key: at_position(v, t) for key, v in slice_params.items()},
                         {key: at_position(v, t) for key, v in step_params.items()})
        use_method = method
        if method == "passthrough":
            if len(sources) != 1:
                raise InvalidInputError(f"{where('slices', k, 'sources')}: passthrough takes exactly one source "
                                        f"per slice, got {len(sources)}")
            if not _registered("passthrough"):
                # x * scale in float32 (scale 1: an exact copy), mergekit's passthrough
                scale = entries[0].pop("scale", None)
                entries[0]["weight"] = 1.0 if scale is None else scale
                params = {"normalize": False}
                use_method = "linear"
        elif base_vid is None and method not in _BASELESS and get_method(method).needs_base:
            raise InvalidInputError(
                f"{where('slices', k)}: method {method!r} needs a base model among the slice's sources "
                + (f"(base {base_model!r} is not one of them)" if base_model else "(give base_model)"))
        sub = {"method": use_method, "models": [e for e, v in zip(entries, vids) if v != base_vid],
               "parameters": params}
        if base_vid is not None:
            sub["base"] = base_vid
        for key in ("dtype", "tokenizer_source", "vocab"):
            if getattr(spec, key, None) is not None:
                sub[key] = getattr(spec, key)
        for key in ("tokenizer", "chat_template"):  # present once the tokenizer work has landed
            if getattr(spec, key, None) is not None:
                sub[key] = getattr(spec, key)
        # Consecutive groups that merge the same models with the same resolved parameters (every layer of
        # a slice without gradients, the embeddings with the first slice) run as one sub-merge: one read /
        # compute / write pipeline instead of one per layer, which each drain before the next starts.
        signature = json.dumps([sub["method"], sub["parameters"], sub.get("base") is not None,
                                [{k: v for k, v in e.items() if k != "model"} for e in entries],
                                [src.model for src in sources]], sort_keys=True, default=str)
        if pending and pending[0]["signature"] == signature:
            for vid, (_, mapping) in zip(pending[0]["vids"], [views[v] for v in vids]):
                pending[0]["views"][vid][1].update(mapping)
            return
        flush()
        pending.append({"signature": signature, "sub": sub, "views": views, "vids": vids})

    def flush() -> None:
        if not pending:
            return
        job = pending.pop()
        views, sub = job["views"], job["sub"]
        sub_spec = MergeSpec.model_validate(sub)
        view_inputs = {vid: SliceView(inputs[mid], names, f"{inputs[mid].label} ({vid})", inputs[mid].config)
                       for vid, (mid, names) in views.items()}
        groups.append(_Group(plan_one(step_id, sub_spec, view_inputs, where,
                                      tokenizer=(shared_tok, {vid: mid for vid, (mid, _) in views.items()})), views))

    first, last = spec.slices[0], spec.slices[-1]
    pre = [n for n in structures[ref][1] if _is_pre(n)]
    post = [n for n in structures[ref][1] if not _is_pre(n)]
    if pre:
        group("pre", 0, list(first.sources), first.parameters, first.base, first.method or spec.method, 0.0,
              [(n, lambda s, n=n: n) for n in pre])
    offset = 0
    for k, sl in enumerate(spec.slices):
        n_layers = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        lead = sl.sources[0]
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1.0
            templates = structures[lead.model][0][lead.layer_range[0] + i]
            names = [(tpl.format(offset + i), lambda s, tpl=tpl, i=i: tpl.format(s.layer_range[0] + i))
                     for tpl in templates]
            group(f"s{k}.{i}", k, list(sl.sources), sl.parameters, sl.base, sl.method or spec.method, t, names)
            base_src = next((s for s in sl.sources if s.model == (sl.base or spec.base)), lead)
            layer_sources.append((base_src.model, base_src.layer_range[0] + i))
        offset += n_layers
    if post:
        post_sources = list(last.sources)[: len(first.sources)]  # mergekit pairs the last slice's sources with the first's count
        if len(post_sources) < len(last.sources):
            notes.append(f"final tensors merged from the last slice's first {len(post_sources)} sources "
                         "(mergekit pairs them with the first slice's source count)")
        group("post", len(spec.slices) - 1, post_sources, last.parameters, last.base, last.method or spec.method,
              0.0, [(n, lambda s, n=n: n) for n in post])
    flush()
    overrides = _config_overrides(ref_ck.config, offset, layer_sources, inputs)
    models = list(dict.fromkeys(src.model for sl in spec.slices for src in sl.sources))
    plan = SlicedPlan(step_id, groups, ref, ref, groups[0].plan.out_dtype, overrides,
                      sum(inputs[m].total_bytes for m in models), notes, model_ids=models)
    for g in groups:
        for note in g.plan.notes:
            if note not in plan.notes:
                plan.notes.append(note)
        if plan.tokenizer_dir is None and getattr(g.plan, "tokenizer_dir", None) is not None:
            plan.tokenizer_dir = g.plan.tokenizer_dir
        if plan.vocab_layout is None and getattr(g.plan, "vocab_layout", None) is not None:
            plan.vocab_layout = g.plan.vocab_layout
    plan.notes.insert(0, f"layer surgery: {offset} output layers from {len(spec.slices)} slice(s) "
                         f"({len(groups)} sub-merge{'s' if len(groups) != 1 else ''})")
    return plan


def _registered(name: str) -> bool:
    try:
        get_method(name)
        return True
    except InvalidInputError:
        return False


def _config_overrides(config: dict[str, Any] | None, n_out: int, layer_sources: list[tuple[str, int]],
                      inputs: dict[str, Any]) -> dict[str, Any]:
    """The output's layer count, and per-layer config lists rebuilt from each output layer's source layer."""
    cfg = config or {}
    out: dict[str, Any] = {}
    n_ref = next((cfg[k] for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            out[key] = n_out
    if n_ref and n_ref > 1:
        for key, value in cfg.items():
            if key == "architectures" or not isinstance(value, list) or len(value) != n_ref:
                continue
            rebuilt = []
            for mid, layer in layer_sources:
                src = (inputs[mid].config or {}).get(key)
                rebuilt.append(src[layer] if isinstance(src, list) and layer < len(src) else value[min(layer, n_ref - 1)])
            out[key] = rebuilt
    return out
