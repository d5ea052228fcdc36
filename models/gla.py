"""Gated Linear Attention family (Yang et al. 2023; METHODS.md §9): layer, model, spec.

Layer exactly as the paper parameterizes it: d_k = d/2, d_v = d, low-rank forget gate
`log a = logsigmoid(x W1 W2 + b) / tau` (rank 16, tau = 16), swish output gate, per-head RMSNorm,
no positional embedding; block = pre-norm GLA + SwiGLU MLP. Document boundaries come from
position_ids (0 = document start) and reset the recurrent state. Also: FLOPs per token, the TP
plan (heads split across ranks), decoding with an O(1) state, and the Hugging Face converter
(fla's GLAForCausalLM names). Kernels live in models/kernels/gla.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import ModelConfig
from models.context_parallel import SequenceShard, gla_carry_in
from models.hf_naming import HFNaming
from models.kernels.gla import gla, gla_step
from models.kernels.gla._common import CHUNK, compute_dtype
from models.llama import FeedForward
from models.packing import cu_seqlens_from_position_ids, last_segment_of_rows
from models.spec import ModelSpec, register


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.key_dim, self.value_dim = cfg.dim // 2, cfg.dim
        self.head_k_dim = self.key_dim // cfg.n_heads
        self.head_v_dim = self.value_dim // cfg.n_heads
        self.tau = cfg.gla_gate_tau
        self.backend = cfg.gla_backend
        self.wq = nn.Linear(cfg.dim, self.key_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.key_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.value_dim, bias=False)
        self.wg = nn.Linear(cfg.dim, self.value_dim, bias=False)  # output gate W_r
        self.gk_down = nn.Linear(cfg.dim, cfg.gla_gate_rank, bias=False)  # W1
        self.gk_up = nn.Linear(cfg.gla_gate_rank, self.key_dim, bias=True)  # W2, b
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=cfg.norm_eps)  # per head, shared weight
        self.wo = nn.Linear(self.value_dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor):
        """q, k, log_g [B, T, heads, d_k/H] and v [B, T, heads, d_v/H]; heads = -1 under TP."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_k_dim)
        k = self.wk(x).view(b, t, -1, self.head_k_dim)
        v = self.wv(x).view(b, t, -1, self.head_v_dim)
        gate_logits = self.gk_up(self.gk_down(x))
        log_g = (
            F.logsigmoid(gate_logits.to(compute_dtype(gate_logits.dtype))) / self.tau
        )  # fp32 at least
        return q, k, v, log_g.view(b, t, -1, self.head_k_dim)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """(swish(x W_r) * Norm_per_head(o)) W_o."""
        b, t, _ = x.shape
        o = self.g_norm(o.to(x.dtype)).reshape(b, t, -1)
        return self.wo(F.silu(self.wg(x)) * o)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                shard: SequenceShard | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`shard` (context parallel): x is this rank's contiguous slice of the rows, and the
        state carried in from the ranks before is added (models.context_parallel)."""
        b, t, _ = x.shape
        q, k, v, log_g = self.project(x)
        inputs = (q, k, v, log_g)
        if cu_seqlens is not None:  # documents over the flattened batch
            inputs = tuple(z.reshape(1, b * t, *z.shape[2:]) for z in inputs)
        o, last = gla(*inputs, cu_seqlens=cu_seqlens, output_final_state=shard is not None, backend=self.backend)
        o = o.reshape(b, t, *o.shape[2:])
        if shard is not None:
            if cu_seqlens is not None:
                last = last[last_segment_of_rows(cu_seqlens, b, t)]
            o = o + gla_carry_in(q, log_g, last, position_ids, self.head_k_dim**-0.5, shard).to(o.dtype)
        return self.output(x, o)

    def decode(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continues from `state` [B, heads, d_k/H, d_v/H] over x [B, t, d]; one token is one step."""
        q, k, v, log_g = self.project(x)
        if x.shape[1] == 1:
            o, state = gla_step(
                q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], state, self.head_k_dim**-0.5
            )
            o = o[:, None]
        else:  # a prompt: the chunked kernels, carrying the state in and out
            o, state = gla(
                q, k, v, log_g, initial_state=state, output_final_state=True, backend=self.backend
            )
        return self.output(x, o), state


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = GatedLinearAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                shard: SequenceShard | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cu_seqlens, shard, position_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class GLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "gla":
            raise ValueError(f"model.family: the GLA model got family {cfg.family!r}")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic init (given the torch seed): N(0, std), output projections scaled by
        depth, gate bias 0 (a = sigmoid(0)^(1/tau) ~ 0.96 per token at the start)."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        depth_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers.values():
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(
                        module.weight, std=depth_std if name.endswith(("wo", "w2")) else std
                    )
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.RMSNorm):
                    module.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """`shard` (context parallel): input_ids/position_ids are this rank's slice of the rows.
        A pipeline stage (engine.pipeline) without `tok_embeddings` takes hidden states
        [B, T, dim] in place of input_ids; one without `norm` returns its last block's output."""
        cu_seqlens = None if position_ids is None else cu_seqlens_from_position_ids(position_ids)
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        for block in self.layers.values():
            h = block(h, cu_seqlens, shard, position_ids) if shard is not None else block(h, cu_seqlens)
        return self.norm(h) if self.norm is not None else h

    def project(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; a document starts wherever position_ids == 0 (None: one per row)."""
        h = self.hidden_states(input_ids, position_ids, shard)
        return self.project(h) if self.norm is not None else h  # no norm: a pipeline stage before the last

    # -- decoding with the recurrent state (protocol of models/generate.py) -----------------
    def init_decode_state(self, batch_size: int, max_len: int) -> dict:
        """One fp32 (fp64 for an fp64 model) state [B, heads, d_k/H, d_v/H] per layer; its size
        does not depend on max_len."""
        first = self.layers["0"].attention
        shape = (batch_size, self.cfg.n_heads, first.head_k_dim, first.head_v_dim)
        weight = self.tok_embeddings.weight
        dtype = compute_dtype(weight.dtype)
        return {
            "pos": 0,
            "state": [torch.zeros(shape, device=weight.device, dtype=dtype) for _ in self.layers],
        }

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Feeds tokens [B, t] (t >= 1) after the decoded prefix; returns logits [B, t, V]."""
        h = self.tok_embeddings(tokens)
        for i, block in enumerate(self.layers.values()):
            out, state["state"][i] = block.attention.decode(
                block.attention_norm(h), state["state"][i]
            )
            h = h + out
            h = h + block.feed_forward(block.ffn_norm(h))
        state["pos"] += tokens.shape[1]
        return self.project(self.norm(h)), state


def gla_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x matmul parameters + the chunkwise recurrence, forward + backward (3 x forward).

    Per head and token the chunked forward does q S and k^T v against the d_k x d_v state
    (2 x 2 d_k d_v) and the within-chunk attention A = QK^T, AV over a causal half-chunk
    (2 x (C/2) x (d_k + d_v)), C = 64. Independent of seq_len: linear in time.
    """
    d, rank = cfg.dim, cfg.gla_gate_rank
    key_dim, value_dim = d // 2, d
    per_layer = d * (2 * key_dim + 2 * value_dim) + value_dim * d  # wq wk wv wg wo
    per_layer += d * rank + rank * key_dim + 3 * d * cfg.hidden_dim  # gate, SwiGLU
    matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * d  # output projection
    head_k, head_v = key_dim // cfg.n_heads, value_dim // cfg.n_heads
    recurrence = cfg.n_heads * (4 * head_k * head_v + CHUNK * (head_k + head_v))
    return 6.0 * matmul_params + 3.0 * cfg.n_layers * recurrence


def parallelize_tp(model: nn.Module, tp_mesh) -> None:
    """Heads split across ranks: column-wise q/k/v/output-gate/gate-up projections, row-wise
    output projection; embedding and the low-rank gate's first factor stay replicated."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    for field, value in (
        ("model.n_heads", model.cfg.n_heads),
        ("model.ffn_hidden", model.cfg.hidden_dim),
    ):
        if value % tp:
            raise ValueError(f"{field} ({value}) must be divisible by parallel.tp ({tp})")
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wg": ColwiseParallel(),
        "attention.gk_up": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        # the per-head norm sees this rank's heads [b, t, heads/tp, d_v/H]: sum its weight grads
        "attention.g_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)


# -- Hugging Face converter: flash-linear-attention's GLAForCausalLM (model_type "gla") ------
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn.q_proj.weight",
    "attention.wk.weight": "attn.k_proj.weight",
    "attention.wv.weight": "attn.v_proj.weight",
    "attention.wg.weight": "attn.g_proj.weight",
    "attention.gk_down.weight": "attn.gk_proj.0.weight",
    "attention.gk_up.weight": "attn.gk_proj.1.weight",
    "attention.gk_up.bias": "attn.gk_proj.1.bias",
    "attention.g_norm.weight": "attn.g_norm_swish_gate.weight",
    "attention.wo.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embeddings.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
NAMING = HFNaming("GLA", _LAYER_NAMES, _TOP_NAMES)


def to_hf(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig | None = None
) -> dict[str, torch.Tensor]:
    """Strata GLA state dict -> GLAForCausalLM state dict (same tensors, renamed)."""
    return NAMING.to_hf(state_dict, tied=cfg is not None and cfg.tie_embeddings)


def from_hf(
    state_dict: dict[str, torch.Tensor], hf_config: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """GLAForCausalLM state dict -> Strata GLA state dict (a tied model drops lm_head)."""
    tied = bool(hf_config.get("tie_word_embeddings", False)) if hf_config is not None else False
    return NAMING.from_hf(state_dict, tied)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of the equivalent fla GLAForCausalLM (gate rank and tau are fixed at 16 there)."""
    if cfg.family != "gla":
        raise ValueError(f"model.family: the GLA HF converter got family {cfg.family!r}")
    for field, value in (
        ("model.gla_gate_rank", cfg.gla_gate_rank),
        ("model.gla_gate_tau", cfg.gla_gate_tau),
    ):
        if value != 16:
            raise ValueError(f"{field}: fla's GLAForCausalLM fixes it at 16, got {value}")
    return {
        "architectures": ["GLAForCausalLM"],
        "model_type": "gla",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "expand_k": 0.5,
        "expand_v": 1.0,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_heads": cfg.n_heads,
        "num_kv_heads": None,
        "feature_map": None,
        "attn_mode": "chunk",
        "use_short_conv": False,
        "use_output_gate": True,
        "clamp_min": None,
        "hidden_act": "swish",
        "max_position_embeddings": cfg.max_seq_len,
        "elementwise_affine": True,
        "norm_eps": cfg.norm_eps,
        "use_gk": True,
        "use_gv": False,
        "fuse_norm": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }


def model_config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig of the Strata GLA equivalent to a GLAForCausalLM config.json dict."""
    if hf.get("model_type") != "gla":
        raise ValueError(f"model_type: {hf.get('model_type')!r} is not 'gla'")
    for field, expected in (  # a missing field takes fla's default, which Strata's GLA matches
        ("expand_k", 0.5),
        ("expand_v", 1.0),
        ("use_short_conv", False),
        ("feature_map", None),
        ("use_output_gate", True),
        ("hidden_act", "swish"),  # the output gate and the MLP
        ("clamp_min", None),  # no floor on the log forget gate
        ("elementwise_affine", True),
        ("attn", None),  # no softmax-attention (hybrid) layers
        ("attnres_block_size", None),
    ):
        if hf.get(field, expected) != expected:
            raise ValueError(
                f"{field}: {hf[field]!r} is not supported (Strata's GLA uses {expected!r})"
            )
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads"):
        if field not in hf:
            raise ValueError(f"{field}: missing from the HF config")
    if hf.get("num_kv_heads") not in (None, hf["num_heads"]):
        raise ValueError(
            f"num_kv_heads: {hf['num_kv_heads']!r} is not supported (Strata's GLA has one key "
            f"head per query head, {hf['num_heads']})"
        )
    ffn_hidden = hf.get("intermediate_size")
    if ffn_hidden is None:  # fla's GatedMLP: 2/3 hidden_ratio x hidden, rounded up to 256
        ffn_hidden = int(hf["hidden_size"] * (hf.get("hidden_ratio") or 4) * 2 / 3)
        ffn_hidden = 256 * ((ffn_hidden + 255) // 256)
    fields: dict[str, Any] = {
        "family": "gla",
        "vocab_size": hf["vocab_size"],
        "dim": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_heads"],
        "ffn_hidden": ffn_hidden,
        "norm_eps": hf.get("norm_eps", 1e-6),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": hf.get("initializer_range", 0.02),
    }
    fields.update(overrides)
    return ModelConfig(**fields)


register(
    ModelSpec(
        "gla", GLA, gla_flops_per_token, parallelize_tp, "models.gla", ("gla",),
        cp_layout="contiguous",
    )
)  # fmt: skip
