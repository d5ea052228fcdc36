"""Hugging Face converter of the Llama family (the `hf_adapter` of models/llama.py's spec).

Strata's Llama uses HF's rotate-half RoPE, so conversion is a pure renaming of parameters
(no permutation). qk_norm models map to Qwen3ForCausalLM (Llama + per-head q/k RMSNorm before
RoPE); the others to LlamaForCausalLM. It does not read or write files (engine/export.py does).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from models.config import ModelConfig, RopeScaling
from models.hf_naming import HFNaming

# Strata name (after "layers.{i}.") -> HF name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# HF keys that carry no parameters of ours (old checkpoints saved the RoPE table).
NAMING = HFNaming("Llama", _LAYER_NAMES, _TOP_NAMES, hf_ignored=re.compile(r"(^|\.)rotary_emb\.inv_freq$"))

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")



def to_hf(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig | None = None
) -> dict[str, torch.Tensor]:
    """Strata Llama state dict -> HF LlamaForCausalLM / Qwen3ForCausalLM state dict (same tensors).

    A tied model has no `output.weight`; HF re-ties `lm_head` on load, so none is written.
    """
    return NAMING.to_hf(state_dict, tied=cfg is not None and cfg.tie_embeddings)


def from_hf(
    state_dict: dict[str, torch.Tensor], hf_config: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """HF Llama / Qwen3 state dict -> Strata Llama state dict (same tensors).

    With `hf_config` saying tie_word_embeddings, a stored `lm_head.weight` (a copy of the
    embedding) is dropped, since a tied Strata model has no `output`.
    """
    tied = bool(hf_config.get("tie_word_embeddings", False)) if hf_config is not None else False
    return NAMING.from_hf(state_dict, tied)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of the HF model equivalent to `cfg` (LlamaConfig, or Qwen3Config for qk_norm)."""
    if cfg.family != "llama":
        raise ValueError(f"model.family: the Llama HF converter got family {cfg.family!r}")
    fields: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if cfg.qk_norm else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.to_hf() if cfg.rope_scaling is not None else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }
    if cfg.qk_norm:
        fields.update(
            {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
        )
    else:
        fields.update({"mlp_bias": False, "pretraining_tp": 1})
    return fields


def model_config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig of the Strata Llama equivalent to an HF config.json dict.

    Rejects, naming the HF field, what Strata's Llama cannot represent (RoPE scalings other than
    linear / llama3 / yarn, biases,
    another activation, a head_dim other than hidden_size / heads, sliding windows).
    `overrides` set further ModelConfig fields (e.g. attn_backend).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type: {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if field not in hf:
            raise ValueError(f"{field}: missing from the HF config")
    rope_scaling = RopeScaling.from_hf(hf.get("rope_scaling"))  # a ValueError for kinds not computed
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}: biases are not supported by Strata's Llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window: sliding-window attention is not supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"head_dim: {head_dim} x {heads} heads != hidden_size {hidden} (unsupported)"
        )
    fields: dict[str, Any] = {
        "family": "llama",
        "vocab_size": hf["vocab_size"],
        "dim": hidden,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "ffn_hidden": hf["intermediate_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": hf.get("rope_theta", 10000.0),
        "rope_scaling": rope_scaling,
        "qk_norm": model_type == "qwen3",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": hf.get("initializer_range", 0.02),
    }
    fields.update(overrides)
    return ModelConfig(**fields)
