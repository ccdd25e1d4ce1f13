"""What a merge method and its kernel see for one output tensor: :class:`TensorMerge`.

One type serves the reference function (whole float32 tensors), the block
driver (1-D float32 blocks with their flat ``offset``) and the kernel
factories (no tensors yet: :meth:`TensorMerge.header`). See
docs/architecture.md ("Merge methods").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from .rng import stream_key, uniform_stream


@dataclass
class TensorMerge:
    """Everything a merge method sees for one output tensor.

    Tensors are float32 on the compute device, all of the same shape (the
    engine has aligned vocabularies and checked shapes). ``models`` excludes
    the base. ``model_params[i]`` holds the resolved per-model parameters of
    ``models[i]``; ``params`` the resolved step parameters.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int = 0
    role: str = "other"  # "embedding" | "lm_head" | "other"
    state: Any = None
    # A block of a larger tensor (see surgeon.merge.kernels.base): the flat index of
    # this block's first entry.
    offset: int = 0
    # Filled in from the tensors when they are given; set explicitly for a
    # header-only TensorMerge (see :meth:`header`), which kernel factories get.
    shape: tuple[int, ...] = ()
    has_base: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        ref = self.base if self.base is not None else (self.models[0] if self.models else None)
        if ref is not None:
            self.shape = tuple(ref.shape)
            self.has_base = self.base is not None
            self.device = ref.device

    @classmethod
    def header(cls, name: str, shape: tuple[int, ...], model_params: list[dict[str, Any]], params: dict[str, Any],
               has_base: bool, *, seed: int = 0, role: str = "other", state: Any = None,
               device: torch.device | None = None) -> TensorMerge:
        """A TensorMerge without tensors: what a kernel factory knows about a
        tensor before any weight is read (shape, parameters, base or not)."""
        return cls(name, None, [], model_params, params, seed=seed, role=role, state=state, shape=tuple(shape),
                   has_base=has_base, device=device if device is not None else torch.device("cpu"))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def uniform(self, salt: str = "") -> torch.Tensor:
        """Uniform [0, 1) floats for this tensor's entries, shaped like the inputs.

        Entry ``i`` of the tensor (flat index ``offset + i``) is a pure
        function of (recipe seed, tensor name, ``salt``, flat index): see
        :mod:`surgeon.merge.rng`. A block of the tensor therefore gets
        exactly the numbers the whole tensor would, however the engine cut it,
        and every device draws the same numbers.
        """
        ref = self.base if self.base is not None else self.models[0]
        return uniform_stream(stream_key(self.seed, self.name, salt), self.offset, ref.numel(),
                              ref.device).reshape(ref.shape)

    def weights(self, key: str = "weight") -> list[float]:
        return [float(p[key]) for p in self.model_params]

    def deltas(self) -> list[torch.Tensor]:
        """Task vectors: each model minus the base."""
        if self.base is None:
            raise InvalidInputError(f"tensor {self.name!r}: this method needs a base model")
        return [m - self.base for m in self.models]
