"""The recipe schema (pydantic v2). Unknown keys are errors everywhere.

A recipe names its input models, lists steps that each produce a checkpoint
from models or earlier steps, and says which step's result is the output::

    name: demo
    seed: 0
    models: {base: ./zoo/bpe-base, poet: ./zoo/bpe-shakespeare}
    steps:
      - id: merged
        merge:
          method: ties
          base: base
          models: [{model: poet, weight: 1.0, density: 0.5}]
          parameters: {lambda: 1.0}
    output: {from: merged, path: ./out/demo}

Structural checks live here; checks that need the method registry (merge
parameters: :mod:`surgeon.recipe.load`) or the checkpoints (references,
shapes: the engine's planning) live there.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .options import FuseOptions, TransplantOptions

ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
DTYPES = ("float32", "bfloat16", "float16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(BaseModel):
    """``{model: id, weight: 0.5, density: 0.7, ...}``: a model and its per-model parameters."""

    model_config = ConfigDict(extra="allow")
    model: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TokenSourceSpec(_Strict):
    """``{kind: model_token, model: id, token: str | token_id: int}`` or ``{kind: zero}``."""

    kind: Literal["model_token", "zero"]
    model: Optional[str] = None
    token: Optional[str] = None
    token_id: Optional[int] = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _fields(self) -> "TokenSourceSpec":
        if self.kind == "zero":
            if self.model is not None or self.token is not None or self.token_id is not None:
                raise ValueError("kind: zero takes no model, token or token_id")
        elif self.model is None or (self.token is None) == (self.token_id is None):
            raise ValueError("kind: model_token needs a model and exactly one of token, token_id")
        return self


class TokenSpec(_Strict):
    """One ``tokenizer.tokens`` entry: where the token's embedding rows come from."""

    source: Optional[str | TokenSourceSpec] = None
    force: bool = False


class TokenizerSpec(_Strict):
    """mergekit's ``tokenizer:`` section (docs/merging.md, "Tokenizers")."""

    source: str = "union"
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = Field(default=None, ge=1)

    def models(self) -> list[str]:
        """Model ids this section names."""
        refs = [self.source] if self.source not in ("base", "union") else []
        for t in self.tokens.values():
            if isinstance(t.source, str):
                refs.append(t.source)
            elif t.source is not None and t.source.model is not None:
                refs.append(t.source.model)
        return refs


class SliceSource(BaseModel):
    """``{model: id, layer_range: [start, stop], weight: 0.5, ...}``: layers ``start..stop-1`` of a model."""

    model_config = ConfigDict(extra="allow")
    model: str
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range must be [start, stop] with 0 <= start <= stop, got {list(v)}")
        return v

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SliceSpec(_Strict):
    """One output slice of a layer-surgery merge (mergekit's ``slices:`` entry).

    Its sources must span the same number of layers; output layer ``i`` of the
    slice merges layer ``start + i`` of every source with the step's method
    (or this slice's ``method``). ``base`` overrides the step's base for this
    slice; ``parameters`` sit between the sources' own and the step's.
    """

    sources: list[SliceSource] = Field(min_length=1)
    base: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    method: Optional[str] = None

    @model_validator(mode="after")
    def _same_length(self) -> "SliceSpec":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class MergeSpec(_Strict):
    """A merge of ``models`` (every tensor of each), or of ``slices`` (layer surgery: a frankenmerge)."""

    method: str
    base: Optional[str] = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: Optional[list[SliceSpec]] = Field(default=None, min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None
    vocab: Literal["align", "refuse"] = "align"

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> "MergeSpec":
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or a tokenizer section, not both")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _plain_ids(cls, v: Any) -> Any:
        # allow `models: [a, b]` as shorthand for `[{model: a}, {model: b}]`
        if isinstance(v, list):
            return [{"model": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _models_or_slices(self) -> "MergeSpec":
        if bool(self.models) == bool(self.slices):
            raise ValueError("a merge needs exactly one of 'models' (at least one) or 'slices'")
        return self


class TransplantSpec(TransplantOptions):
    """A transplant step: ``model`` gets ``donor``'s tokenizer; the settings are
    :class:`surgeon.recipe.options.TransplantOptions` (one definition)."""

    model: str
    donor: str


class FuseSource(_Strict):
    model: str
    weight: float = Field(default=1.0, ge=0)
    align: Literal["dp", "transplant"] = "dp"


class FuseSpec(_Strict):
    pivot: str
    sources: list[FuseSource] = Field(min_length=1)
    data: str
    max_length: int = Field(default=256, ge=8)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    epochs: float = Field(default=1.0, gt=0)
    steps: Optional[int] = Field(default=None, ge=1)
    top_k: int = Field(default=16, ge=1)
    lambda_: float = Field(default=0.5, ge=0, le=1, alias="lambda")
    tokenwise_weight: float = Field(default=1.0, ge=0)
    gld_weight: float = Field(default=1.0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    options: FuseOptions = Field(default_factory=FuseOptions)  # surgeon.recipe.options: one definition

    @field_validator("sources", mode="before")
    @classmethod
    def _plain_ids(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": x} if isinstance(x, str) else x for x in v]
        return v


STEP_KINDS = ("merge", "transplant", "fuse")


class Step(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    merge: Optional[MergeSpec] = None
    transplant: Optional[TransplantSpec] = None
    fuse: Optional[FuseSpec] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Step":
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"step {self.id!r} must have exactly one of {', '.join(STEP_KINDS)}; has "
                + (", ".join(given) if given else "none")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> MergeSpec | TransplantSpec | FuseSpec:
        return getattr(self, self.kind)

    def references(self) -> list[str]:
        """Ids of the models or steps this step reads."""
        s = self.spec
        if isinstance(s, MergeSpec):
            refs = ([s.base] if s.base else []) + [m.model for m in s.models]
            for sl in s.slices or []:
                refs += ([sl.base] if sl.base else []) + [src.model for src in sl.sources]
            if s.tokenizer_source and s.tokenizer_source not in ("base", "union"):
                refs.append(s.tokenizer_source)
            if s.tokenizer is not None:
                refs += s.tokenizer.models()
        elif isinstance(s, TransplantSpec):
            refs = [s.model, s.donor]
        else:
            refs = [s.pivot] + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))


class PushSpec(_Strict):
    repo: str
    private: bool = False
    revision: Optional[str] = None
    commit_message: Optional[str] = None


class OutputSpec(_Strict):
    from_: Optional[str] = Field(default=None, alias="from")
    path: str
    max_shard_size: str | int = "5GB"
    push: Optional[PushSpec] = None


class EvalSpec(_Strict):
    """Evaluate the output (and, optionally, every input) on held-out texts."""

    texts: dict[str, str] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=16)
    inputs: bool = True


class Recipe(_Strict):
    name: str = "surgeon-recipe"
    seed: int = 0
    models: dict[str, str] = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)
    output: OutputSpec
    eval: Optional[EvalSpec] = None

    @field_validator("models")
    @classmethod
    def _model_ids(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for key in v:
            if not re.fullmatch(ID_PATTERN, str(key)):
                raise ValueError(f"model id {key!r} must start with a letter and use letters, digits, _ . -")
        return v

    @property
    def final_step(self) -> str:
        return self.output.from_ or self.steps[-1].id
