"""The `data:` section of the config tree: where the token shards are and how batches are drawn.

The engine builds the loader from this; the data pipeline itself never imports the engine.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(BaseModel):
    model_config = STRICT

    path: str = Field(description="ShardSet directory (holds manifest.json) or a remote MDS location")
    name: str | None = Field(None, description="label in metrics; defaults to the directory name")
    weight: float = Field(1.0, gt=0, description="mixture weight (normalized over sources)")


class DataConfig(BaseModel):
    model_config = STRICT

    sources: list[SourceConfig] = Field(default_factory=list)
    val_path: str | None = Field(None, description="ShardSet used for evaluation")
    seq_len: int = Field(256, gt=0, description="tokens per training sequence")
    global_batch_size: int = Field(32, gt=0, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward on one rank")
    seed: int = 1234
    prefetch: int = Field(4, ge=0, description="steps prepared ahead in the background")
    cross_document_attention: bool = Field(False, description="False: attention and RoPE restart at each document")
    cache_dir: str | None = Field(None, description="local cache for remote MDS sources")

    @model_validator(mode="after")
    def _check_batch(self) -> DataConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide global_batch_size ({self.global_batch_size})"
            )
        return self
