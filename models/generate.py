"""Family-agnostic autoregressive generation over a small decoding protocol.

A model that can generate implements:
  `init_decode_state(batch_size: int, max_len: int) -> state`
      Fresh decoding state for `batch_size` sequences of at most `max_len` tokens in total
      (prompt + generated); raises ValueError if the model cannot decode that far. The state is
      opaque to this module (Llama: a KV cache; GLA: one recurrent state per layer).
  `decode_step(tokens: LongTensor[B, t], state) -> (logits: Tensor[B, t, V], state)`
      Feeds t >= 1 tokens that follow everything fed so far (the prompt goes in one call, then one
      token per call) and returns their next-token logits, exactly as the model's parallel
      forward over the whole sequence would; runs under no_grad; may update `state` in place.
This module owns sampling (greedy, temperature, top-k) and stopping; it knows no model family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax at temperature 0, else sampled."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continues one prompt; returns the generated token ids (prompt excluded, eos included).

    Stops after `max_new_tokens` or right after emitting `eos_id`. Greedy at temperature 0;
    otherwise samples (optionally from the top_k logits) with `generator` for reproducibility.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    if prompt.numel() == 0:
        raise ValueError("generate: the prompt is empty (it needs at least one token)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        state = model.init_decode_state(1, prompt.numel() + max_new_tokens)
        logits, state = model.decode_step(prompt[None].to(device), state)
        new_tokens: list[int] = []
        for step in range(max_new_tokens):
            token = sample_next(logits[:, -1], temperature, top_k, generator)
            new_tokens.append(int(token))
            if eos_id is not None and new_tokens[-1] == eos_id:
                break
            if step + 1 < max_new_tokens:
                logits, state = model.decode_step(token[:, None].to(device), state)
        return new_tokens
    finally:
        model.train(was_training)
