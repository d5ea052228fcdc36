"""The `data:` section of the config tree: where the token shards are and how batches are drawn.

The engine builds the loader from this; the data pipeline itself never imports the engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(BaseModel):
    model_config = STRICT

    path: str = Field(description="ShardSet directory (holds manifest.json) or a remote MDS location")
    name: str | None = Field(None, description="label in metrics; defaults to the directory name")
    weight: float = Field(1.0, gt=0, description="mixture weight (normalized over sources)")


class MixtureConfig(BaseModel):
    """How source weights move over the run (data_pipeline/mixture.py, METHODS.md §4)."""

    model_config = STRICT

    kind: Literal["fixed", "temperature"] = Field(
        "fixed",
        description="fixed: the sources' `weight`s; temperature: p_i ∝ weight_i * n_i^(1/T), n_i = tokens of source i",
    )
    temperature_start: float = Field(5.0, gt=0, allow_inf_nan=False, description="T at step 0")
    temperature_end: float = Field(1.0, gt=0, allow_inf_nan=False, description="T after the cooldown")
    cooldown: Literal["constant", "step", "linear", "cosine"] = Field(
        "step", description="shape of T from start to end; constant = temperature_start throughout"
    )
    cooldown_at: float = Field(
        0.5, ge=0, le=1, description="fraction of train.steps where `step` switches / linear and cosine arrive"
    )
    cooldown_from: float = Field(
        0.0, ge=0, le=1, description="fraction of train.steps where linear and cosine start moving"
    )

    @model_validator(mode="after")
    def _check_cooldown_window(self) -> MixtureConfig:
        if self.cooldown_from > self.cooldown_at:
            raise ValueError(
                f"cooldown_from ({self.cooldown_from}) must not be after cooldown_at ({self.cooldown_at})"
            )
        return self


class DecompositionConfig(BaseModel):
    """Train on a dataset decomposition (METHODS.md §3): one bucket length per step, a variable
    sequence-length curriculum (data_pipeline/curriculum.py). Replaces `data.sources`."""

    model_config = STRICT

    path: str = Field(description="directory written by `strata decompose` (index over its parent ShardSet)")
    curriculum: Literal["uniform", "grow_linear", "grow_p2"] = Field(
        "grow_p2",
        description="bucket odds, shortest first: uniform 1:1:..., grow_linear n:...:2:1, grow_p2 2^(n-1):...:2:1",
    )
    cycles: int = Field(8, ge=1, description="each bucket's batches are split into this many curriculum cycles per epoch")
    tokens_per_step: int | None = Field(
        None, gt=0, description="input tokens per optimizer step, all ranks; default global_batch_size * seq_len"
    )
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="tokens per forward/backward on one rank; default micro_batch_size * seq_len"
    )


def check_metric_names(named: dict[str, str], what: str) -> dict[str, str]:
    """Names that become metric suffixes (`val_loss/NAME`): non-empty, no '/', no outer spaces."""
    for name in named:
        if not name or "/" in name or name != name.strip():
            raise ValueError(f"{what} name {name!r}: non-empty, no '/', no surrounding spaces")
    return named


class DataConfig(BaseModel):
    model_config = STRICT

    sources: list[SourceConfig] = Field(default_factory=list)
    val_path: str | None = Field(None, description="ShardSet used for evaluation")
    val_sets: dict[str, str] = Field(
        default_factory=dict,
        description="more ShardSets evaluated with val_path, NAME: PATH, logged as val_loss/NAME and val_bpb/NAME "
        "(e.g. the old domain during continual pretraining: forgetting, step by step)",
    )
    seq_len: int = Field(256, gt=0, description="tokens per training sequence")
    global_batch_size: int = Field(32, gt=0, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward on one rank")
    seed: int = 1234
    prefetch: int = Field(4, ge=0, description="steps prepared ahead in the background")
    cross_document_attention: bool = Field(False, description="False: attention and RoPE restart at each document")
    cache_dir: str | None = Field(None, description="local cache for remote MDS sources")
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    decomposition: DecompositionConfig | None = Field(
        None, description="train on `strata decompose` chunks with a length curriculum instead of sources"
    )

    @field_validator("val_sets")
    @classmethod
    def _val_set_names(cls, value: dict[str, str]) -> dict[str, str]:
        return check_metric_names(value, "val set")

    @field_validator("decomposition")
    @classmethod
    def _decomposition_replaces_sources(
        cls, value: DecompositionConfig | None, info: ValidationInfo
    ) -> DecompositionConfig | None:
        if value is None:
            return value
        if info.data.get("sources"):
            raise ValueError(
                "replaces data.sources (its chunks come from the decomposition's parent ShardSet); "
                "leave data.sources empty"
            )
        mixture = info.data.get("mixture")
        if mixture is not None and mixture.kind != "fixed":
            raise ValueError("a decomposition has one source; data.mixture.kind must stay 'fixed'")
        return value

    @model_validator(mode="after")
    def _check_batch(self) -> DataConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide global_batch_size ({self.global_batch_size})"
            )
        return self
