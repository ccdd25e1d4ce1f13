"""What a step kind gets from the engine and gives back: :class:`StepContext`, :class:`StepPlan`.

A recipe step (merge, transplant, fuse) plans from headers alone into a
:class:`StepPlan` (its output as a :class:`~surgeon.io.virtual.VirtualCheckpoint`,
sizes, notes) and later executes into a destination folder. It never sees the
pipeline: everything it may use comes in a :class:`StepContext`, and the
engine owns the writer's configuration (shard size, process coordination,
resume key, ``--allow-nonfinite``) and the finishing of the output (config, tokenizer, card, recipe,
marker) through :meth:`StepContext.open_writer` and :attr:`StepContext.finish`.

This module sits below the step libraries (:mod:`surgeon.transplant`,
:mod:`surgeon.fusion`) and the engine, so neither library imports the engine.
See docs/architecture.md ("Steps").
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .io.distributed import SINGLE, Coordinator
from .io.virtual import VirtualCheckpoint
from .io.writer import CheckpointWriter, TensorSpec

#: ``finish(writer, config, notes)``: write config, tokenizer, card, recipe and marker, then commit
Finish = Callable[[CheckpointWriter, "dict[str, Any] | None", "list[str]"], None]


@dataclass
class StepPlan:
    """A step's plan: its output (planned), what it reads, how much memory it needs."""

    output: VirtualCheckpoint
    bytes_in: int
    tensors: int
    peak_bytes: int
    notes: list[str] = field(default_factory=list)
    detail: Any = None

    @property
    def bytes_out(self) -> int:
        return self.output.total_bytes

    def summary(self, step: Any, prefetch: int) -> dict[str, Any]:
        """One row of ``surgeon plan``."""
        return {
            "id": step.id,
            "kind": step.kind,
            "reads": step.references(),
            "tensors": self.tensors,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "peak_bytes_estimate": self.peak_bytes,
            "notes": self.notes,
        }


def _print_note(msg: str) -> None:  # pragma: no cover - the engine passes its own
    print(msg, file=sys.stderr)


@dataclass
class StepContext:
    """What one step may use of the run (built by the engine for each step).

    ``options`` is the run's :class:`surgeon.engine.pipeline.RunOptions`
    (threads, prefetch, piece size, ...: data only). ``finish_output`` is the
    engine's finishing of an output, called through :meth:`finisher`.
    """

    step_id: str
    device: Any = "cpu"
    seed: int = 0
    max_shard_size: int | str = "5GB"
    resume_key: str | None = None
    coordinator: Coordinator = field(default_factory=lambda: SINGLE)
    show_progress: bool = True
    quiet: bool = False
    #: writers write Inf/NaN in float16/float8 tensors instead of refusing them (--allow-nonfinite)
    allow_nonfinite: bool = False
    #: writers hash their shards as they write them (the report's sha256; off where nothing asks for it)
    hash_output: bool = True
    options: Any = None
    say: Callable[[str], None] = _print_note
    resolve_path: Callable[[str], str] = str
    finish_output: Callable[..., None] | None = None
    #: given the rows of every tensor the step writes, as they are written:
    #: ``watch_output(name, shape, start_row, rows)`` (:attr:`surgeon.io.writer.CheckpointWriter.watch`)
    watch_output: Callable[[str, tuple[int, ...], int, Any], None] | None = None
    #: set by the step kind (:meth:`bound`): finishes this step's output
    finish: Finish | None = None

    def open_writer(self, dest: str | Path, specs: Sequence[TensorSpec], *, overwrite: bool = True,
                    metadata: dict[str, str] | None = None) -> CheckpointWriter:
        """The output writer, configured by the engine: shards at ``max_shard_size``,
        ranks coordinated, a partial output resumed only under ``resume_key``,
        non-finite stored values refused unless ``allow_nonfinite``, written rows
        shown to ``watch_output``, shards hashed while written if ``hash_output``."""
        return CheckpointWriter(dest, specs, max_shard_size=self.max_shard_size, overwrite=overwrite,
                                metadata=metadata, coordinator=self.coordinator, resume_key=self.resume_key,
                                allow_nonfinite=self.allow_nonfinite, watch=self.watch_output,
                                hash_shards=self.hash_output)

    def bound(self, tokenizer_from: Any, aux_from: Any, **changes: Any) -> StepContext:
        """This context with :attr:`finish` set: ``finish(writer, config, notes)``
        writes the tokenizer files of ``tokenizer_from`` and the generation
        config etc. of ``aux_from`` besides config, card, recipe and marker."""
        if self.finish_output is None:
            raise RuntimeError(f"step {self.step_id!r}: no output finisher in this context")
        done = self.finish_output

        def finish(writer: CheckpointWriter, config: dict[str, Any] | None, notes: list[str]) -> None:
            done(writer, config, tokenizer_from, aux_from, notes)

        return replace(self, finish=finish, **changes)
