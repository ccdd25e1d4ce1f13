"""The option sets of the transplant and fuse steps: one definition each.

Each default lives here once. The recipe schema uses these models
(``transplant:`` steps, ``fuse: options:``), so an unknown or mistyped key
fails ``surgeon validate`` with file:line and a suggestion, like a merge
parameter; the fuse step and its command-line flags read :class:`FuseOptions`
(:mod:`surgeon.fusion.cli_flags` derives a flag from every field);
``transplant()`` and ``surgeon transplant`` are checked against
:class:`TransplantOptions` (tests/test_options.py). See docs/architecture.md.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from ..errors import InvalidInputError
from ..suggest import did_you_mean

#: token-wise distillation terms
TOKENWISE = ("kl", "uld", "kl+uld", "none")
#: how pivot and source positions are paired
PAIRING = ("dp", "dp_checked", "offsets", "exact")
#: the choices of FuseOptions' string fields
FUSE_CHOICES: dict[str, tuple[str, ...]] = {
    "tokenwise": TOKENWISE,
    "pairing": PAIRING,
    "kl_sparse": ("rest", "topk", "fusellm"),
    "vocab_merge": ("sum", "first"),
    "cache_dtype": ("float16", "bfloat16", "float32"),
}


class TransplantOptions(BaseModel):
    """A transplant step's settings (besides ``model`` and ``donor``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["omp", "mean", "zero", "subword"] = "omp"
    k: int = Field(default=64, ge=1, le=4096)
    # OMP candidates per new token: "auto" (exact unless its products exceed 1e14 FLOP, then 128), an
    # integer, or null (exact OMP)
    screen: Union[Annotated[int, Field(ge=1)], Literal["auto"], None] = "auto"
    batch_size: int = Field(default=512, ge=1)


@dataclass(config=ConfigDict(extra="forbid"))
class FuseOptions:
    """A fuse step's settings beyond the common ones (``options:`` in a recipe)."""

    tokenwise: str = "uld"             # "uld" (the paper's sorted top-k distance) | "kl" | "kl+uld" | "none"
    pairing: str = "dp"                # "dp" | "dp_checked" | "exact" | "offsets" (see fusion.distill._pairs_for)
    temperature: float = 1.0           # for the token-wise terms (both sides tempered)
    kl_sparse: str = "rest"            # KL to a sparse teacher: "rest" | "topk" | "fusellm" (tokenwise.kl_loss)
    vocab_merge: str = "sum"           # teacher ids mapped onto one pivot id: "sum" their mass | "first" (FuseLLM)
    gld_top_k: Optional[int] = None    # top-k for the graphs (default: top_k)
    gld: Optional[dict] = None         # extra gld_loss options (values, nodes, feature, p, ...)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    save_every: Optional[int] = None   # optimizer steps between saved states (default: ~10 per run)
    log_every: int = 1
    eval_path: Optional[str] = None    # held-out text: perplexity before/after in the report
    eval_window: int = 128
    eval_max_chars: Optional[int] = None
    max_examples: Optional[int] = None
    dtype: Optional[str] = None        # output dtype (default: the pivot's)
    work_dir: Optional[str] = None     # caches and training state (default: beside the output)
    keep_state: bool = False           # keep the accelerate state after success
    cache_batch_size: int = 8
    shard_size: int = 256
    cache_dtype: str = "float16"       # teacher cache values: "float16" | "bfloat16" | "float32"
    eval_every: Optional[int] = None   # optimizer steps between held-out evaluations (needs eval_path)
    transplant_k: int = 64
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name, choices in FUSE_CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}{did_you_mean(str(value), choices)}")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> FuseOptions:
        """Options from a mapping; unknown keys and bad values raise :class:`InvalidInputError`."""
        d = dict(d or {})
        known = list(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        bad = [k for k in d if k not in known]
        if bad:
            raise InvalidInputError("fuse: unknown option(s) " + ", ".join(
                f"{k!r}{did_you_mean(k, known)}" for k in bad) + f"; known: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise InvalidInputError(f"fuse: option {where or '?'}: {err.get('msg', exc)}") from None
