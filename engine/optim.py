"""AdamW construction: decay on matrices only, the fused kernel where the device has one."""

from __future__ import annotations

import torch

from engine.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Embeddings, norms and biases are not decayed (standard practice since GPT-3).
        (decay if param.ndim >= 2 and "embeddings" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = cfg.fused
    if fused is None:
        fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
