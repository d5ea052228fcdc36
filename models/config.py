"""The `model:` section of the config tree, shared by every model family.

Fields that only one family reads say so; `validate_for_family` checks the impossible
combinations (e.g. heads not dividing the width) and names the offending field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(BaseModel):
    model_config = STRICT

    family: Literal["llama", "gla"] = "llama"
    vocab_size: int = Field(8192, gt=0)
    dim: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="GQA groups; None = n_heads")
    ffn_hidden: int | None = Field(None, gt=0, description="SwiGLU hidden width; None = 8/3 dim rounded to multiple_of")
    multiple_of: int = Field(64, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    max_seq_len: int = Field(512, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    qk_norm: bool = False
    z_loss: float = Field(0.0, ge=0, description="coefficient of log^2 Z (METHODS.md §10: 1e-4)")
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    # GLA only (METHODS.md §9)
    gla_gate_rank: int = Field(16, gt=0, description="GLA: low-rank gate width")
    gla_gate_tau: float = Field(16.0, gt=0, description="GLA: gate temperature")
    gla_backend: Literal["auto", "torch", "triton", "fla", "recurrent"] = "auto"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"dim / n_heads ({self.head_dim}) must be even for RoPE")
        if self.family == "gla" and (self.dim // 2) % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide the GLA key width dim/2 ({self.dim // 2})")
        return self
