"""Running a recipe: resolve inputs, plan every step, execute, evaluate, report.

Each step writes a complete checkpoint: intermediate steps into the work
folder (``<work-dir>/<step-id>``), the final step straight to the output path,
always through the atomic writer. A finished checkpoint carries
``.surgeon-step.json`` with a fingerprint of the step's definition and of its
inputs; a rerun skips every step whose fingerprint still matches, so a long
pipeline resumes after a crash from the last finished step (and the writer's
journal resumes the step that was running from its last written tensor).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import version
from ..errors import InvalidInputError
from ..io.card import CardInfo, CardInput, render_card
from ..io.checkpoint import AUX_FILES, Checkpoint
from ..io.destination import check_destination, check_input_files, destination_lock
from ..io.lora import open_adapter, split_adapter_ref, with_adapter
from ..io.refs import parse_ref
from ..io.remote import StreamingCheckpoint
from ..io.stream_hash import ShardDigest, file_sha256
from ..io.distributed import coordinator_from_environment
from ..io.writer import CheckpointWriter, parse_size
from ..recipe.load import LoadedRecipe
from ..recipe.schema import MergeSpec, Step
from ..step import StepContext, StepPlan
from . import steps as step_kinds

log = logging.getLogger("surgeon")

STEP_MARKER = ".surgeon-step.json"
REPORT_SCHEMA = "surgeon.report/1"


@dataclass
class RunOptions:
    output: str | None = None  # overrides the recipe's output.path
    overwrite: bool = False
    work_dir: str | None = None
    device: str = "cpu"
    quiet: bool = False
    threads: int | None = None
    # reads ahead of the one being merged: 1 was as fast as 2 on the 1.1B bench (reads outpace
    # TIES' arithmetic; linear is read-bound either way) and peaked ~200 MB lower (TIES 1.1 vs 1.3 GB)
    prefetch: int = 1
    allow_nonfinite: bool = False
    allow_pickle: bool = False
    max_shard_size: str | int | None = None
    piece_size: str | int | None = None  # row pieces for block-wise merges (None: surgeon.engine.piecewise.PIECE_BYTES)
    evaluate: bool = True
    push: bool = True
    distributed: bool = False  # join the launcher's process group even if WORLD_SIZE is unset
    progress: bool | None = None  # None: only on a TTY and not quiet
    # hub inputs: True reads their weights over HTTP range requests (nothing downloaded), None only
    # when they are not cached and the disk lacks the room, False downloads them (surgeon.io.remote)
    remote_stream: bool | None = None
    # the report's sha256 of each output shard, hashed as the shard is written (~1.7 GB/s a core);
    # False: the report gives sizes and `sha256: null` (the CLI hashes only when it writes a report)
    digests: bool = True


#: range-cache bytes per streamed hub input (surgeon.io.remote.RangeCache)
STREAM_CACHE_PER_INPUT = 512 << 20


@dataclass
class StepResult:
    id: str
    kind: str
    path: str
    skipped: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """A loaded recipe bound to run options. ``plan()`` reads headers only."""

    def __init__(self, loaded: LoadedRecipe, options: RunOptions | None = None):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.opts = options or RunOptions()
        out = self.opts.output or loaded.resolve_path(self.recipe.output.path)
        self.output_path = Path(out).resolve()
        self.work_dir = Path(self.opts.work_dir).resolve() if self.opts.work_dir else \
            self.output_path.parent / f".{self.output_path.name}.surgeon-work"
        self.device = torch.device(self.opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("--device cuda: no CUDA device is available to torch on this machine")
        if self.opts.threads is not None and self.opts.threads < 1:
            raise InvalidInputError(f"--threads must be at least 1, got {self.opts.threads}")
        self.coord = coordinator_from_environment(self.opts.device, force=self.opts.distributed)
        if self.coord.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.coord.rank)))
        self._models: dict[str, Any] = {}
        self._resolved: dict[str, dict[str, Any]] = {}
        self._card_sections: dict[str, str] = {}  # added to the final card (the change map)
        self._notes: list[str] = []  # the last finished step's notes, kept when the card is rewritten
        self._digests: dict[Path, dict[str, ShardDigest]] = {}  # each committed output's shard digests

    # -- inputs ---------------------------------------------------------------
    def open_model(self, model_id: str, *, headers_only: bool = False) -> Any:
        """Open a recipe model (local or hub) as a lazy checkpoint."""
        if model_id in self._models and not (getattr(self._models[model_id], "headers_only", False) and not headers_only):
            return self._models[model_id]
        raw = self.recipe.models[model_id]
        # "model+adapter": a LoRA adapter applied as the model's tensors stream (surgeon/io/lora.py)
        raw, adapter = split_adapter_ref(raw, exists=lambda s: Path(self.loaded.resolve_path(s)).exists())
        ref = parse_ref(self.loaded.resolve_path(raw))
        where = self.loaded.where("models", model_id)
        if ref.is_hub:
            from ..io import hub

            try:
                resolved = hub.resolve(ref, headers_only=headers_only, allow_pickle=self.opts.allow_pickle,
                                       progress=not self.opts.quiet, stream=self.opts.remote_stream,
                                       fetch_options={"on_progress": self._fetch_progress(),
                                                      "cache": self._range_cache()})
            except InvalidInputError as exc:  # a misspelt local path reads as a hub id: say which it was
                typo = self.loaded.local_typo(raw)
                if typo is None:
                    raise type(exc)(f"{where}: model {model_id!r}: {exc}") from None
                reason = str(exc).removeprefix(f"{ref.repo_id}: ")
                raise type(exc)(f"{where}: {typo}, and no hub repo of that name ({reason})") from None
            self._resolved[model_id] = {"ref": raw, "hub_id": ref.repo_id, "revision": resolved.revision,
                                        "path": str(resolved.path)}
            ck = resolved.checkpoint
            if getattr(ck, "fetcher", None) is not None:  # streamed: the range cache grows by one input's share
                ck.fetcher.cache.budget += STREAM_CACHE_PER_INPUT
        else:
            try:
                ck = Checkpoint.open(ref.local, allow_pickle=self.opts.allow_pickle, label=str(ref.local))
            except InvalidInputError as exc:
                raise InvalidInputError(f"{where}: model {model_id!r}: {exc}") from None
            self._resolved[model_id] = {"ref": raw, "hub_id": None, "revision": None, "path": str(ref.local)}
        if adapter is not None:
            try:
                ck = with_adapter(ck, open_adapter(adapter, self.loaded.resolve_path, progress=not self.opts.quiet))
            except InvalidInputError as exc:
                raise type(exc)(f"{where}: model {model_id!r}: {exc}") from None
        self._models[model_id] = ck
        return ck

    def _step_where(self, index: int, kind: str) -> Callable[..., str]:
        return lambda *path: self.loaded.where("steps", index, kind, *path)

    def _context(self, step: Step, fingerprint: str | None = None) -> StepContext:
        """What a step kind may use of this run (it never sees the pipeline)."""
        def finish(writer: CheckpointWriter, config: dict[str, Any] | None, tokenizer_from: Any, aux_from: Any,
                   notes: list[str]) -> None:
            self.finish_checkpoint(writer, step, config, tokenizer_from, aux_from, fingerprint or "", notes)

        return StepContext(step.id, device=self.device, seed=self.recipe.seed, max_shard_size=self.max_shard_size,
                           resume_key=fingerprint, coordinator=self.coord, show_progress=self.show_progress,
                           quiet=self.opts.quiet, allow_nonfinite=self.opts.allow_nonfinite,
                           hash_output=self.opts.digests and step.id == self.recipe.final_step, options=self.opts,
                           say=self._say,
                           resolve_path=self.loaded.resolve_path, finish_output=finish)

    # -- planning -------------------------------------------------------------
    def plan(self, headers_only: bool = True) -> list[dict[str, Any]]:
        """Validate every step against headers and describe what it will do."""
        available: dict[str, Any] = {}
        summaries = []
        self._plans: dict[str, StepPlan] = {}
        problems: list[str] = []  # every step's problems in one pass (a step reading a failed one is skipped)
        failed: set[str] = set()
        for i, step in enumerate(self.recipe.steps):
            if failed & set(step.references()):
                failed.add(step.id)
                continue
            try:
                inputs = self._inputs_for(step, available, headers_only=headers_only)
                kind = step_kinds.get_kind(step.kind)
                sp = kind.plan(step, inputs, self._step_where(i, step.kind), self._context(step))
            except InvalidInputError as exc:
                problems.append(str(exc))
                failed.add(step.id)
                continue
            self._plans[step.id] = sp
            available[step.id] = sp.output
            summaries.append(sp.summary(step, self.opts.prefetch))
        if problems:
            from ..recipe.load import report_problems

            raise InvalidInputError(report_problems(problems))
        return summaries

    def _inputs_for(self, step: Step, available: dict[str, Any], headers_only: bool = False) -> dict[str, Any]:
        out = {}
        for ref in step.references():
            out[ref] = available[ref] if ref in available else self.open_model(ref, headers_only=headers_only)
        return out

    # -- running --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Execute the recipe; returns the run report (also written by the CLI).

        The main process holds the output's lock (surgeon.io.destination) from the destination check to
        the end of the report and push, so a second run to the same output fails at once and the
        report's hashes describe the files on disk.
        """
        previous = torch.get_num_threads()
        if self.opts.threads is not None:
            torch.set_num_threads(self.opts.threads)  # arithmetic threads; readers use the same cap
        try:
            if not self.coord.is_main:
                return self._run()
            check_destination(self.output_path, exists_ok=True)  # a file, a long name: before the lock
            with destination_lock(self.output_path):
                return self._run()
        finally:
            torch.set_num_threads(previous)  # the caller's setting, whatever this run used

    def run_inputs(self) -> list[tuple[str, str | None]]:
        """Everything the run reads that an output must never replace: local models, the recipe file,
        eval texts, training data and the work folder (``(label, path)`` pairs)."""
        out: list[tuple[str, str | None]] = []
        for mid, r in self._resolved.items():
            if not r.get("hub_id"):
                out.append((f"{self.loaded.where('models', mid)}: model {mid!r}", r["path"]))
        if Path(self.loaded.file).is_file():
            out.append(("the recipe file", self.loaded.file))
        if self.recipe.eval is not None:
            for tname, tpath in self.recipe.eval.texts.items():
                out.append((f"eval text {tname!r}", self.loaded.resolve_path(tpath)))
        for step in self.recipe.steps:
            data = getattr(step.spec, "data", None)
            if isinstance(data, str):
                out.append((f"step {step.id!r}: training data", self.loaded.resolve_path(data)))
            if step.kind == "fuse":  # its path options resolve by the rule the step itself uses
                held_out = step_kinds.fuse_paths(step.spec.options, self.loaded.resolve_path).get("eval_path")
                if held_out is not None:
                    out.append((f"step {step.id!r}: held-out text", held_out))
        out.append(("the work folder", str(self.work_dir)))
        return out

    def _run(self) -> dict[str, Any]:
        t_start = time.time()
        final_id = self.recipe.final_step
        if self.recipe.output.push and self.opts.push:
            from ..io import hub

            hub.check_push(self.recipe.output.push.repo)  # offline or no token: fail now, not after the work
        # Validate the whole pipeline from headers before any weight is read; each
        # step is planned here once, and executed from this plan.
        self.plan(headers_only=False)
        needed = self._needed_steps(final_id)
        fingerprints: dict[str, str] = {}
        for step in self.recipe.steps:
            if step.id in needed:
                fingerprints[step.id] = self._fingerprint(step, fingerprints)
        if self.coord.is_main:
            check_destination(self.output_path, self.run_inputs(), overwrite=self.opts.overwrite,
                              exists_ok=self._finished(self.output_path, fingerprints[final_id]))
            check_input_files(self.run_inputs())  # eval texts, training data: regular files, never a FIFO
        self._check_destinations(needed, final_id)
        available: dict[str, Any] = {}
        results: list[StepResult] = []
        sampler = None  # the final merge's change map, gathered while its output is written
        for i, step in enumerate(self.recipe.steps):
            if step.id not in needed:
                continue
            inputs = self._inputs_for(step, available)
            fp = fingerprints[step.id]
            dest = self.output_path if step.id == final_id else self.work_dir / step.id
            t0 = time.time()
            if self._finished(dest, fp):
                self._say(f"step {step.id}: already done ({dest}), skipping")
                results.append(StepResult(step.id, step.kind, str(dest), True, 0.0))
            else:
                kind = step_kinds.get_kind(step.kind)
                sp = self._plans[step.id]
                self._say(f"step {step.id}: {step.kind} -> {dest}")
                context = self._context(step, fp)
                if step.id == final_id:
                    sampler = self._changemap_sampler(step, available, sp.output)
                    if sampler is not None:
                        context = replace(context, watch_output=sampler.rows_written)
                # a partial output of this step resumes only under the same fingerprint (the context's resume key)
                try:
                    details = kind.execute(step, sp, inputs, dest, context)
                except KeyboardInterrupt as exc:  # the CLI's one-line message says what is kept
                    if results:
                        note = "finished steps " + ", ".join(f"{r.id} ({r.path})" for r in results)
                        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # add_note() needs 3.11
                    raise
                results.append(StepResult(step.id, step.kind, str(dest), False, round(time.time() - t0, 3), details))
            available[step.id] = Checkpoint.open(dest, label=f"step {step.id!r} ({dest})")
        if not self.coord.is_main:
            return {"schema": REPORT_SCHEMA, "rank": self.coord.rank, "steps": [r.id for r in results]}
        report = self._report(results, t_start)
        self._changemap(report, results, available, sampler)
        if self.coord.distributed:
            report["processes"] = self.coord.world
        if self.recipe.eval and self.opts.evaluate:
            report["evaluation"] = self.evaluate(available[final_id])
            self._rewrite_card(report)
        if self.recipe.output.push and self.opts.push:
            from ..io import hub

            push = self.recipe.output.push
            report["push"] = hub.push(self.output_path, push.repo, private=push.private, revision=push.revision,
                                      commit_message=push.commit_message)
        remote = self.remote_stats()
        if remote:
            report["remote"] = remote
        report["seconds"] = round(time.time() - t_start, 3)
        report["peak_rss_bytes"] = peak_rss_bytes()
        return report

    def _fetch_progress(self) -> Any:
        """The callback streamed hub inputs report fetched bytes to (a byte bar when progress shows)."""
        show = self.opts.progress if self.opts.progress is not None else (not self.opts.quiet and sys.stderr.isatty())
        if not show:
            return None
        if getattr(self, "_fetch_bar", None) is None:
            from tqdm.auto import tqdm

            self._fetch_bar = tqdm(desc="fetched from the hub", unit="B", unit_scale=True, leave=False)
            lock, bar = threading.Lock(), self._fetch_bar

            def fetched(nbytes: int) -> None:  # called from every fetching thread of every streamed input
                with lock:
                    bar.update(nbytes)

            self._fetch_update = fetched
        return self._fetch_update

    def _range_cache(self) -> Any:
        """One cache of recently fetched ranges for all streamed inputs of the run, of
        STREAM_CACHE_PER_INPUT bytes per streamed input (a shared 512 MiB for the three inputs of the
        300m TIES bench refetched 44 % of the bytes; 512 MiB per input fetched each byte once)."""
        if getattr(self, "_ranges", None) is None:
            from ..io.remote import RangeCache

            self._ranges = RangeCache(0)
        return self._ranges

    def remote_stats(self) -> dict[str, Any]:
        """Per streamed hub input: its weight bytes and what was fetched for it (bytes, requests, retries,
        cache hits); ``fetched_over_input`` > 1 means some bytes were fetched more than once."""
        out: dict[str, Any] = {}
        for mid, ck in self._models.items():
            fetcher = getattr(ck, "fetcher", None)
            if fetcher is None:
                continue
            st = dict(fetcher.stats())
            st["input_bytes"] = int(sum(i.nbytes for i in ck.infos()))  # tensor bytes (headers are read apart)
            st["fetched_over_input"] = round(st["fetched_bytes"] / max(1, st["input_bytes"]), 4)
            out[mid] = st
        return out

    def _check_destinations(self, needed: set[str], final_id: str) -> None:
        """Never replace an input model, or a folder surgeon did not write, with a step's output."""
        for mid, r in self._resolved.items():
            if r.get("hub_id"):
                continue
            src = Path(r["path"]).resolve()
            for dest in [self.output_path] + [self.work_dir / s for s in needed if s != final_id]:
                if dest == src or dest in src.parents:
                    raise InvalidInputError(f"{self.loaded.where('models', mid)}: model {mid!r} ({src}) is inside the "
                                            f"destination {dest}, which the run would replace; choose another output "
                                            "or --work-dir")
        inputs = [i for i in self.run_inputs() if i[0] != "the work folder"]
        for sid in needed - {final_id}:
            dest = self.work_dir / sid
            check_destination(dest, inputs, exists_ok=True)
            if dest.exists() and not (dest / STEP_MARKER).exists():
                raise InvalidInputError(f"{dest}: exists and was not written by surgeon (no {STEP_MARKER}); "
                                        "choose another --work-dir or remove it")

    def _needed_steps(self, final_id: str) -> set[str]:
        by_id = {s.id: s for s in self.recipe.steps}
        need, todo = set(), [final_id]
        while todo:
            sid = todo.pop()
            if sid in need or sid not in by_id:
                continue
            need.add(sid)
            todo += by_id[sid].references()
        return need

    def _fingerprint(self, step: Step, previous: dict[str, str]) -> str:
        """The step's identity for resuming: its definition, the seed, its inputs (their
        fingerprints or files) and surgeon's version (another version may compute other bytes)."""
        parts: dict[str, Any] = {"step": step.model_dump(mode="json", by_alias=True), "seed": self.recipe.seed,
                                 "surgeon": version.__version__}
        for ref in step.references():
            if ref in previous:
                parts[ref] = previous[ref]
            else:
                ck = self.open_model(ref)
                parts[ref] = self._resolved.get(ref, {}).get("revision") or [
                    (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in getattr(ck, "files", [])
                ]
        if step.kind == "merge":
            parts["max_shard_size"] = str(self.max_shard_size)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    @staticmethod
    def _finished(dest: Path, fingerprint: str) -> bool:
        marker = dest / STEP_MARKER
        if not marker.exists():
            return False
        try:
            return json.loads(marker.read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            return False

    @property
    def max_shard_size(self) -> int:
        return parse_size(self.opts.max_shard_size or self.recipe.output.max_shard_size)

    @property
    def show_progress(self) -> bool:
        if not self.coord.is_main:
            return False
        if self.opts.progress is not None:
            return self.opts.progress
        return not self.opts.quiet and sys.stderr.isatty()

    def _say(self, msg: str) -> None:
        log.info(msg)
        if not self.opts.quiet and self.coord.is_main:
            print(msg, file=sys.stderr)

    # -- shared helpers for step kinds ----------------------------------------
    def finish_checkpoint(self, writer: CheckpointWriter, step: Step, config: dict[str, Any] | None,
                          tokenizer_from: Any, aux_from: Any, fingerprint: str, notes: list[str],
                          extra: dict[str, Any] | None = None) -> None:
        """Config, tokenizer, generation config, card, recipe and marker, then commit."""
        if config is not None:
            writer.write_json("config.json", config)
        for f in getattr(tokenizer_from, "tokenizer_files", []):
            writer.copy_file(f)
        for name in AUX_FILES:
            src = Path(getattr(aux_from, "path", "")) / name
            if src.is_file():
                writer.copy_file(src)
        writer.write_text("surgeon-recipe.yaml", self.loaded.text)
        self._notes = list(notes)
        writer.write_text("README.md", render_card(self.card_info([step], notes)))
        writer.write_json(STEP_MARKER, {"fingerprint": fingerprint, "step": step.id, "kind": step.kind, **(extra or {})})
        writer.commit()
        self._digests[Path(writer.dest).resolve()] = writer.digests  # for the report (shard_hashes)

    def card_info(self, steps: list[Step], notes: list[str], evaluation: dict[str, Any] | None = None) -> CardInfo:
        used = []
        for s in self.recipe.steps:
            used += [r for r in s.references() if r in self.recipe.models]
        inputs = []
        for mid in dict.fromkeys(used):
            r = self._resolved.get(mid, {"ref": self.recipe.models[mid]})
            inputs.append(CardInput(mid, r.get("ref", ""), r.get("hub_id"), r.get("revision")))
        return CardInfo(
            name=self.recipe.name,
            operations=[{"fuse": "fusion"}.get(s.kind, s.kind) for s in self.recipe.steps],
            inputs=inputs,
            steps=[_step_summary(s) for s in self.recipe.steps],
            recipe_text=self.loaded.text,
            evaluation=evaluation,
            notes=notes,
            extra_sections=dict(self._card_sections),
            evaluation_notes=_evaluation_notes(evaluation, self.recipe.steps),
            from_mergekit=self.loaded.from_mergekit,
        )

    def _rewrite_card(self, report: dict[str, Any]) -> None:
        card = render_card(self.card_info(self.recipe.steps, self._notes, report.get("evaluation")))
        tmp = self.output_path / ".README.md.tmp"
        tmp.write_text(card, encoding="utf-8")
        os.replace(tmp, self.output_path / "README.md")

    def _changemap_sources(self, step: Step, available: dict[str, Any]) -> tuple[Any, list[Any]] | str | None:
        """The base (or None) and inputs a final merge's change map compares, a reason
        (str) when it cannot be drawn here, or None when the step has none to draw."""
        if step.kind != "merge" or not getattr(step.merge, "models", None):
            return None
        spec = step.merge

        def get(ref: str) -> Any:
            return available[ref] if ref in available else self.open_model(ref)

        base = get(spec.base) if spec.base else None
        inputs = [get(m.model) for m in spec.models]
        if any(isinstance(ck, StreamingCheckpoint) for ck in [base, *inputs]):
            # the picture would fetch the streamed inputs a second time (docs/hub.md: each byte once)
            return (f"step {step.id}: no change map for inputs streamed from the hub; "
                    f"`surgeon diff BASE {self.output_path} --plot changemap.png` draws it from local copies")
        return base, inputs

    def _changemap_sampler(self, step: Step, available: dict[str, Any], planned: Any) -> Any:
        """A sampler to watch the final merge's output being written (surgeon.eval.changemap), or
        None; it draws the picture of the ``planned`` output as soon as the merge has written it."""
        if not self.coord.is_main:
            return None
        try:
            sources = self._changemap_sources(step, available)
            if not isinstance(sources, tuple):
                return None
            from ..eval.changemap import changemap_title, sampler_for_merge

            sampler = sampler_for_merge(step.merge.method, *sources)
            if sampler is not None:
                sampler.expect(planned, changemap_title(step.merge.method))
            return sampler
        except Exception:  # noqa: BLE001 - the picture is an extra; _changemap says what failed
            return None

    def _changemap(self, report: dict[str, Any], results: list[StepResult], available: dict[str, Any],
                   sampler: Any = None) -> None:
        """A final merge gets its per-layer change picture and numbers beside its card
        (surgeon.eval.changemap; ``sampler`` watched its output being written); a failure
        there costs the picture, never the merge. A final transplant's card gets the
        reconstruction error by k its step wrote (surgeon.transplant.error_curve)."""
        final = results[-1] if results else None
        step = next((s for s in self.recipe.steps if final is not None and s.id == final.id), None)
        if step is not None and step.kind == "transplant":
            from ..transplant.error_curve import SECTION, existing_section as curve_section

            section = curve_section(self.output_path)  # written by the step (fresh or resumed)
            if section:
                self._card_sections[SECTION] = section
                self._rewrite_card(report)
            return
        if step is None or step.kind != "merge" or not getattr(step.merge, "models", None):
            return
        from ..eval.changemap import changemap_for_merge, existing_section

        if final.skipped:  # a resumed run: the picture is there; keep it in the card
            section = existing_section(self.output_path)
            if section:
                self._card_sections["What changed where"] = section
            return
        try:
            sources = self._changemap_sources(step, available)
            if isinstance(sources, str):
                self._say(sources)
                return
            assert sources is not None
            found = changemap_for_merge(self.output_path, step.merge.method, *sources,
                                        output=available.get(step.id), sampler=sampler)
        except Exception as exc:  # noqa: BLE001 - the picture is an extra
            self._say(f"step {step.id}: no change map ({type(exc).__name__}: {exc})")
            return
        if found:
            report["changemap"] = {"json": found["json"], "png": found["png"]}
            self._card_sections["What changed where"] = found["card"]
            self._rewrite_card(report)

    # -- evaluation -------------------------------------------------------------
    def evaluate(self, output: Checkpoint) -> dict[str, dict[str, Any]]:
        from transformers.utils import logging as hf_logging

        from ..eval.perplexity import evaluate_text
        from ..eval.protocol import DEFAULT_MAX_TOKENS

        hf_logging.disable_progress_bar()  # one bar per evaluation is ours; no loading bars per model

        spec = self.recipe.eval
        assert spec is not None
        cap = spec.max_tokens or DEFAULT_MAX_TOKENS  # the documented default (surgeon.eval.protocol)
        models: dict[str, Path] = {}
        if spec.inputs:
            for mid in self.recipe.models:
                ck = self.open_model(mid)
                models[mid] = Path(ck.path)
        models["output"] = Path(output.path)
        results: dict[str, dict[str, Any]] = {}
        for label, path in models.items():
            results[label] = {}
            for tname, tpath in spec.texts.items():
                r = evaluate_text(path, self.loaded.resolve_path(tpath), max_tokens=cap,
                                  device=self.opts.device, progress=self.show_progress)
                results[label][tname] = {k: r[k] for k in ("perplexity", "bits_per_byte", "tokens", "bytes") if k in r}
                results[label][tname]["max_tokens"] = cap
        return results

    # -- report -----------------------------------------------------------------
    def _report(self, results: list[StepResult], t_start: float) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "recipe": {"name": self.recipe.name, "file": self.loaded.file, "seed": self.recipe.seed,
                       "sha256": hashlib.sha256(self.loaded.text.encode()).hexdigest()},
            "inputs": {mid: self._resolved.get(mid, {"ref": ref}) for mid, ref in self.recipe.models.items()
                       if mid in self._resolved},
            "steps": [
                {"id": r.id, "kind": r.kind, "path": r.path, "skipped": r.skipped, "seconds": r.seconds,
                 "parameters": _step_summary(next(s for s in self.recipe.steps if s.id == r.id)), **r.details}
                for r in results
            ],
            "output": {"path": str(self.output_path),
                       "files": shard_hashes(self.output_path, self._digests.get(self.output_path),
                                             hash_files=self.opts.digests)},
            "started": t_start,
        }


def _evaluation_notes(evaluation: dict[str, Any] | None, steps: list[Step]) -> list[str]:
    """The sentences under the card's evaluation table (surgeon.eval.report.reading_lines)."""
    if not evaluation or not steps:
        return []
    from ..eval.report import reading_lines

    return reading_lines(evaluation, _step_summary(steps[-1]))


def _step_summary(s: Step) -> dict[str, Any]:
    d = s.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    d["id"], d["kind"] = s.id, s.kind
    if isinstance(s.spec, MergeSpec):
        d["models"] = [m.model for m in s.spec.models]
        d["model_parameters"] = {m.model: m.params for m in s.spec.models}
    elif s.kind == "fuse":
        d["sources"] = [src.model for src in s.spec.sources]  # type: ignore[union-attr]
    return d


def shard_hashes(folder: Path, digests: Mapping[str, ShardDigest] | None = None,
                 hash_files: bool = True) -> dict[str, dict[str, Any]]:
    """sha256 and size of each shard: from ``digests`` (the writer's, hashed while it
    wrote the shard: surgeon.io.stream_hash) while the file is unchanged, else read
    back; without ``hash_files``, sizes only (``sha256`` None)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        sha = None
        if hash_files:
            known = digests.get(f.name) if digests else None
            sha = known.current() if known is not None else None
            sha = sha if sha is not None else file_sha256(f)
        out[f.name] = {"sha256": sha, "bytes": f.stat().st_size}
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
