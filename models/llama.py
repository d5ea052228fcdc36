"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional qk-norm.

Built on the meta device, materialized with `to_empty` + `init_weights()`. Document
boundaries arrive as `position_ids` (0 at each document start): RoPE restarts there and
attention never crosses them. Registers the `llama` family spec.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import causal_attention, sharded_causal_attention
from models.config import ModelConfig, RopeScaling
from models.rope import inverse_frequencies
from models.spec import ModelSpec, register

if TYPE_CHECKING:
    from models.context_parallel import SequenceShard


def rope_tables(head_dim: int, max_len: int, theta: float, device=None,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, head_dim] of every position (models.rope: plain or scaled RoPE)."""
    inv_freq, attention_factor = inverse_frequencies(head_dim, theta, scaling, max_len, device)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout (HF LlamaForCausalLM)
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin broadcastable to [B, 1, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.backend = cfg.attn_backend
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x, cos, sin):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        cos, sin = cos[..., :t, :], sin[..., :t, :]  # a no-op unless given the whole table
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, position_ids=None, shard: SequenceShard | None = None):
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        if shard is not None:  # context parallel: queries here, keys/values of the whole sequence
            keys, values = shard.gather(torch.stack([k, v]), 3).unbind(0)  # one collective for both
            out = sharded_causal_attention(q, keys, values, shard, self.backend)
        else:
            out = causal_attention(q, k, v, position_ids, self.backend)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, position_ids=None, shard: SequenceShard | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, position_ids, shard)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # ModuleDict keyed "0".."n-1" keeps parameter names identical to a ModuleList while
        # letting pipeline/activation-checkpoint wrappers replace blocks by name.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, "meta", cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic init (given the torch seed): N(0, std), output projections scaled by depth."""
        std = self.cfg.init_std
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device,
                               self.cfg.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        depth_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers.values():
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=depth_std if name.endswith(("wo", "w2")) else std)
                elif isinstance(module, nn.RMSNorm):
                    module.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def rope(self, position_ids: torch.Tensor | None, seq_len: int):
        if position_ids is None:
            return self.rope_cos[:seq_len][None, None], self.rope_sin[:seq_len][None, None]
        return self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      shard: SequenceShard | None = None) -> torch.Tensor:
        """`shard` (context parallel): input_ids/position_ids are this rank's slice of the rows.
        A pipeline stage (engine.pipeline) without `tok_embeddings` takes hidden states
        [B, T, dim] in place of input_ids; one without `norm` returns its last block's output."""
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        rope_positions = shard.positions(input_ids.shape[0]) if shard is not None and position_ids is None else position_ids
        # a later stage's hidden states may be sequence-sharded (TP's sequence parallelism): the
        # whole table goes in and each block's attention cuts it to its gathered length
        seq_len = input_ids.shape[1] if self.tok_embeddings is not None else self.cfg.max_seq_len
        cos, sin = self.rope(rope_positions, seq_len)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for block in self.layers.values():
            h = block(h, cos, sin, position_ids, shard)
        return self.norm(h) if self.norm is not None else h

    def project(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                shard: SequenceShard | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, position_ids, shard)
        return self.project(h) if self.norm is not None else h  # no norm: a pipeline stage before the last

    # -- decoding with a KV cache (protocol of models/generate.py) --------------------------
    def init_decode_state(self, batch_size: int, max_len: int) -> dict:
        dev, dtype = self.tok_embeddings.weight.device, self.tok_embeddings.weight.dtype
        shape = (batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim)
        return {
            "pos": 0,
            "k": [torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers],
            "v": [torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers],
        }

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Feeds tokens [B, t] (t >= 1) after the cached prefix; returns logits [B, t, V]."""
        start, t = state["pos"], tokens.shape[1]
        if start + t > state["k"][0].shape[2]:
            raise ValueError(f"decode past the cache length {state['k'][0].shape[2]}")
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[start : start + t][None, None].to(h.dtype)
        sin = self.rope_sin[start : start + t][None, None].to(h.dtype)
        for i, block in enumerate(self.layers.values()):
            attn = block.attention
            q, k, v = attn.project_qkv(block.attention_norm(h), cos, sin)
            state["k"][i][:, :, start : start + t] = k
            state["v"][i][:, :, start : start + t] = v
            keys, values = state["k"][i][:, :, : start + t], state["v"][i][:, :, : start + t]
            # query j sees cached keys 0..start+j
            mask = torch.ones(t, start + t, dtype=torch.bool, device=h.device).tril(start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != keys.shape[1])
            h = h + attn.wo(out.transpose(1, 2).reshape(h.shape[0], t, -1))
            h = h + block.feed_forward(block.ffn_norm(h))
        state["pos"] = start + t
        return self.project(self.norm(h)), state


def llama_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * (matmul params) + attention scores/values: 6 * n_layers * seq_len * dim (causal half of 12)."""
    per_layer = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    per_layer += 3 * cfg.dim * cfg.hidden_dim
    matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim  # output projection
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6.0 * matmul_params + attention


def _parallelize_tp(model: nn.Module, tp_mesh, **options) -> None:
    from models.llama_tp import apply_llama_tp

    apply_llama_tp(model, tp_mesh, **options)  # options: sequence_parallel, loss_parallel


register(
    ModelSpec(
        "llama", Llama, llama_flops_per_token, _parallelize_tp, "models.hf_llama",
        hf_model_types=("llama", "qwen3"),
    )
)  # fmt: skip
