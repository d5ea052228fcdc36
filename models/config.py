"""The `model:` section of the config tree, shared by every model family.

Fields that only one family reads say so; `validate_for_family` checks the impossible
combinations (e.g. heads not dividing the width) and names the offending field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(BaseModel):
    """How RoPE stretches to a longer context (HF config.json `rope_scaling`)."""

    model_config = STRICT

    type: Literal["linear", "llama3", "yarn"] = Field(
        description="linear: positions / factor (PI); llama3: Llama 3.1's rule (low frequencies / factor, high kept, "
        "a smooth band between); yarn: YaRN's ramp between interpolation and extrapolation, plus its attention factor"
    )
    factor: float = Field(gt=0, description="how many times the original context")
    original_max_position_embeddings: int | None = Field(
        None, gt=0, description="llama3 (needed), yarn (default model.max_seq_len): the context before the extension"
    )
    low_freq_factor: float = Field(1.0, gt=0, description="llama3")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3")
    beta_fast: float = Field(32.0, gt=0, description="yarn: rotations above which a dimension extrapolates")
    beta_slow: float = Field(1.0, gt=0, description="yarn: rotations below which a dimension interpolates")
    attention_factor: float | None = Field(None, gt=0, description="yarn: cos/sin multiplier; None = 0.1 ln(factor) + 1")
    truncate: bool = Field(True, description="yarn: round the ramp's ends to whole dimensions")

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.type == "llama3":
            if self.original_max_position_embeddings is None:
                raise ValueError("original_max_position_embeddings: the llama3 rule needs the original context length")
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError("high_freq_factor: must exceed low_freq_factor")
        return self

    def to_hf(self) -> dict[str, Any]:
        """The config.json `rope_scaling` of transformers."""
        fields = {"rope_type": self.type, "factor": self.factor}
        if self.type in ("llama3", "yarn") and self.original_max_position_embeddings is not None:
            fields["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.type == "llama3":
            fields.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.type == "yarn":
            fields.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            if self.attention_factor is not None:
                fields["attention_factor"] = self.attention_factor
        return fields

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | None) -> RopeScaling | None:
        """transformers' `rope_scaling` (None or rope_type "default": no scaling); a ValueError naming
        `rope_scaling` for a kind Strata does not compute (dynamic NTK, longrope, DeepSeek's mscale)."""
        if not hf:
            return None
        kind = hf.get("rope_type", hf.get("type"))
        if kind in (None, "default"):
            return None
        if kind not in ("linear", "llama3", "yarn"):
            raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (linear, llama3 and yarn are)")
        if hf.get("mscale") or hf.get("mscale_all_dim"):
            raise ValueError("rope_scaling: yarn with mscale / mscale_all_dim is not supported")
        keys = set(cls.model_fields) - {"type"}
        try:
            return cls(type=kind, **{k: v for k, v in hf.items() if k in keys and v is not None})
        except ValueError as err:  # pydantic's ValidationError: say which HF field it came from
            raise ValueError(f"rope_scaling: {err}") from None


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
    rope_scaling: RopeScaling | None = Field(None, description="Llama: RoPE stretched to a longer context (models/rope.py)")
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
        if self.family == "gla" and self.rope_scaling is not None:
            raise ValueError("rope_scaling: GLA has no positional embedding to scale")
        return self
