"""The Python API shared by the command line and notebooks.

Every function here is what a ``surgeon`` subcommand does, minus argument
parsing and printing. The names avoid the subpackages' names (``merge_models``
rather than ``merge``) so that ``surgeon.merge`` stays the package::

    import surgeon
    surgeon.validate("recipes/quickstart.yaml")   # headers only; raises naming file:line on any problem
    report = surgeon.run("recipes/quickstart.yaml", output="out/qs", overwrite=True)
    surgeon.merge_models("ties", base="zoo/bpe-base", models=["zoo/bpe-python"], output="out/m",
                         parameters={"density": 0.5})
    surgeon.evaluate("out/m", "zoo/data/python/heldout.txt")   # first 4,096 tokens by default

(paths relative to the repository root; README.md's Python block is the tested version).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from .engine.pipeline import Pipeline, RunOptions
from .eval.protocol import DEFAULT_MAX_TOKENS
from .recipe.load import LoadedRecipe, load_recipe, load_recipe_text

__all__ = ["load_recipe", "validate", "plan", "run", "merge_models", "transplant_tokenizer", "fuse_models",
           "evaluate", "inspect_checkpoint", "diff", "convert", "push"]


def _load(recipe: str | Path | LoadedRecipe, output: str | None = None) -> LoadedRecipe:
    return recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, output_path=output)


def _run_options(options: dict[str, Any]) -> RunOptions:
    """RunOptions from keyword arguments; an unknown one is refused by name."""
    import dataclasses

    from .errors import InvalidInputError
    from .suggest import did_you_mean

    known = [f.name for f in dataclasses.fields(RunOptions)]
    for key in options:
        if key not in known:
            raise InvalidInputError(f"unknown run option {key!r}{did_you_mean(key, known)}; known: {', '.join(known)}")
    return RunOptions(**options)


def validate(recipe: str | Path | LoadedRecipe, **options: Any) -> list[dict[str, Any]]:
    """Check a recipe from safetensors headers only; returns each step's plan summary.
    ``options``: :class:`surgeon.engine.pipeline.RunOptions` fields (device, allow_pickle, ...)."""
    return Pipeline(_load(recipe), _run_options(options)).plan(headers_only=True)


def plan(recipe: str | Path | LoadedRecipe, **options: Any) -> list[dict[str, Any]]:
    """What each step reads and writes (tensor count, bytes, estimated peak memory)."""
    return validate(recipe, **options)


def run(recipe: str | Path | LoadedRecipe, output: str | None = None, *, overwrite: bool = False,
        work_dir: str | None = None, device: str = "cpu", quiet: bool = False, threads: int | None = None,
        prefetch: int = 1, allow_nonfinite: bool = False, allow_pickle: bool = False,
        max_shard_size: str | int | None = None, piece_size: str | int | None = None, evaluate: bool = True,
        push: bool = True, distributed: bool = False, progress: bool | None = None,
        remote_stream: bool | None = None, digests: bool = True) -> dict[str, Any]:
    """Execute a recipe (or a mergekit config); returns the run report.

    The keywords are :class:`surgeon.engine.pipeline.RunOptions` (documented
    there; tests/test_options.py checks that the defaults agree)."""
    loaded = _load(recipe, output)
    opts = RunOptions(output=output, overwrite=overwrite, work_dir=work_dir, device=device, quiet=quiet,
                      threads=threads, prefetch=prefetch, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
                      max_shard_size=max_shard_size, piece_size=piece_size, evaluate=evaluate, push=push,
                      distributed=distributed, progress=progress, remote_stream=remote_stream,
                      digests=digests)
    return Pipeline(loaded, opts).run()


def merge_models(method: str, models: Sequence[str | dict[str, Any]], output: str, base: str | None = None,
          parameters: dict[str, Any] | None = None, dtype: str | None = None, seed: int = 0,
          **options: Any) -> dict[str, Any]:
    """One merge without a recipe file. ``models`` are paths or ``{"model": path, **per_model_params}``."""
    ids: dict[str, str] = {}
    entries = []
    # errors name the flag the user typed, not a line of this generated recipe
    at: tuple[Any, ...] = ("steps", 0, "merge")
    labels: dict[tuple[Any, ...], str] = {(): f"surgeon merge {method}", at + ("method",): f"surgeon merge {method}",
                                          at + ("dtype",): "--dtype"}
    for key in parameters or {}:
        labels[at + ("parameters", key)] = f"--set {key}"
    for i, m in enumerate(models):
        entry = {"model": m} if isinstance(m, str) else dict(m)
        mid = f"model_{i}"
        ids[mid] = str(Path(entry["model"]).resolve()) if Path(entry["model"]).exists() else entry["model"]
        entries.append({**entry, "model": mid})
        labels[("models", mid)] = labels[at + ("models", i)] = f"--model {entry['model']}"
    labels[at + ("models",)] = "--model"
    step: dict[str, Any] = {"method": method, "models": entries, "parameters": parameters or {}}
    if base is not None:
        ids["base"] = str(Path(base).resolve()) if Path(base).exists() else base
        step["base"] = "base"
        labels[("models", "base")] = labels[at + ("base",)] = f"--base {base}"
    if dtype:
        step["dtype"] = dtype
    recipe = {"name": f"{method}-merge", "seed": seed, "models": ids, "steps": [{"id": "merge", "merge": step}],
              "output": {"path": str(Path(output).resolve())}}
    text = yaml.safe_dump(recipe, sort_keys=False)
    loaded = load_recipe_text(text, f"surgeon merge {method}", ".", labels=labels)
    return run(loaded, output=str(Path(output).resolve()), **options)


def transplant_tokenizer(base: str, donor: str, output: str, method: str = "omp", k: int = 64, *,
                         screen: int | str | None = "auto", batch_size: int | None = 512, device: str = "cpu",
                         overwrite: bool = False, progress: bool = True,
                         max_shard_size: int | str = "5GB") -> dict[str, Any]:
    """Give ``base`` the tokenizer of ``donor`` (training-free; OMP by default).

    ``method``, ``k``, ``screen``, ``batch_size``: :class:`surgeon.recipe.options.TransplantOptions`
    (the recipe's and the CLI's defaults are the same: tests/test_options.py)."""
    from .io.destination import check_destination, destination_lock
    from .transplant import transplant as _transplant

    check_destination(output, _local([("base model", base), ("donor model", donor)]), overwrite=overwrite)
    with destination_lock(output):
        return _transplant(base, donor, output, method=method, k=k, device=device, overwrite=overwrite,
                           screen=screen, batch_size=batch_size, progress=progress, max_shard_size=max_shard_size)


def fuse_models(pivot: str, sources: Sequence[str | dict[str, Any]], data: str, output: str, *,
                max_length: int = 256, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-4,
                schedule: str = "cosine", warmup_steps: int = 0, epochs: float = 1.0, steps: int | None = None,
                seed: int = 0, lambda_: float = 0.5, tokenwise_weight: float = 1.0, gld_weight: float = 1.0,
                top_k: int = 16, mixed_precision: str = "no", device: str = "cpu", overwrite: bool = False,
                progress: bool = True, options: dict[str, Any] | None = None, work_dir: str | None = None,
                callback: Any = None) -> dict[str, Any]:
    """Distil ``sources`` into ``pivot`` on ``data`` (InfiGFusion graph-on-logits loss).

    The keywords are :func:`surgeon.fusion.fuse`'s (tests/test_options.py checks
    that the defaults agree); ``options``: :class:`surgeon.recipe.options.FuseOptions`
    fields (refused by name when unknown)."""
    training = dict(max_length=max_length, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule,
                    warmup_steps=warmup_steps, epochs=epochs, steps=steps, seed=seed, lambda_=lambda_,
                    tokenwise_weight=tokenwise_weight, gld_weight=gld_weight, top_k=top_k,
                    mixed_precision=mixed_precision, device=device, overwrite=overwrite, progress=progress,
                    callback=callback)
    opts = dict(options or {})
    if work_dir is not None:
        opts["work_dir"] = work_dir
    from .fusion import fuse as _fuse
    from .io.destination import check_destination, destination_lock

    srcs = [{"path": s} if isinstance(s, str) else dict(s) for s in sources]
    if Path(data).exists():
        from .io.safe_files import check_regular

        check_regular(data)  # a FIFO or device as training data is refused by name, never read
    work = opts.get("work_dir") or Path(output).parent / f".{Path(output).name}.fuse-work"
    inputs = _local([("pivot model", pivot), *((f"source {s.get('path')}", s.get("path")) for s in srcs),
                     ("training data", data), ("the work folder", str(work))])
    check_destination(output, inputs, overwrite=overwrite)
    with destination_lock(output):
        return _fuse(pivot_dir=pivot, sources=srcs, dataset_path=data, out_dir=output, options=opts, **training)


def _local(inputs: Sequence[tuple[str, Any]]) -> list[tuple[str, str | None]]:
    """The inputs that are local paths (a hub id is not a folder the output could replace)."""
    return [(label, str(p)) for label, p in inputs if isinstance(p, (str, Path)) and Path(p).exists()
            or label == "the work folder"]


def evaluate(model: str, text: str, max_tokens: int | None = DEFAULT_MAX_TOKENS, **options: Any) -> dict[str, Any]:
    """Perplexity and bits per byte of ``model`` on the first ``max_tokens`` tokens of a text file
    (default :data:`surgeon.eval.protocol.DEFAULT_MAX_TOKENS`, as ``surgeon eval`` and recipes;
    0 or None scores the whole text). The result carries the cap as ``max_tokens``."""
    from .eval.perplexity import evaluate_text

    return {**evaluate_text(model, text, max_tokens=max_tokens or None, **options), "max_tokens": max_tokens or None}


def inspect_checkpoint(path: str, **options: Any) -> dict[str, Any]:
    """Architecture, parameters, dtypes, shards, tied embeddings, tokenizer of a checkpoint."""
    from .inspection import inspect_checkpoint as _inspect

    return _inspect(path, **options)


def diff(a: str, b: str, atol: float | None = None) -> dict[str, Any]:
    """Per-tensor comparison of two checkpoints."""
    from .eval.diff import diff_checkpoints

    return diff_checkpoints(a, b, atol=atol)


def convert(mergekit_config: str | Path) -> str:
    """The surgeon recipe (YAML text) equivalent to a mergekit config."""
    loaded = load_recipe(mergekit_config)
    return yaml.safe_dump(loaded.recipe.model_dump(mode="json", by_alias=True, exclude_defaults=True), sort_keys=False)


def push(folder: str, repo: str, **options: Any) -> dict[str, Any]:
    """Upload a checkpoint folder to the Hugging Face hub (creates the repo if needed)."""
    from .io import hub
    from .io.destination import check_push_folder, destination_lock

    check_push_folder(Path(folder))
    with destination_lock(Path(folder)):  # no run may replace the folder while it is uploaded
        return hub.push(Path(folder), repo, **options)
