"""RoPE frequencies, plain or scaled for a longer context (`model.rope_scaling`): linear position
interpolation, Llama 3.1's "llama3" frequency-band rule, and YaRN, each as Hugging Face
transformers computes it (so Llama 3.1/3.2 and YaRN checkpoints import with equal logits).

Owns the inverse frequencies with their attention factor (cos and sin are multiplied by it); the
config (`RopeScaling`) lives in models/config.py, the tables and their use in models/llama.py. Written here because the
rules are a few lines of arithmetic on a config transformers keeps inside its model classes.
"""

from __future__ import annotations

import math

import torch

from models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None, max_seq_len: int = 0,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] (fp32) and the factor cos and sin are multiplied by.
    `max_seq_len` is YaRN's original context when the scaling names none (transformers' fallback)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(head_dim, theta, scaling, scaling.original_max_position_embeddings or max_seq_len, device)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Wavelengths above original/low_freq_factor are divided by the factor, those below
    original/high_freq_factor kept, and the band between blends the two linearly in 1/wavelength."""
    original = s.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelength >= original / s.high_freq_factor) & (wavelength <= original / s.low_freq_factor)
    return torch.where(in_band, blended, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling, original: int, device) -> tuple[torch.Tensor, float]:
    """Dimensions rotating fewer than beta_slow times over the original context interpolate (/ factor),
    more than beta_fast times extrapolate (unchanged), with a linear ramp between."""

    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times in `original` tokens
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(s.beta_fast), dimension_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    base = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    inv_freq = (1 / (s.factor * base)) * (1 - extrapolate) + (1 / base) * extrapolate
    attention = s.attention_factor if s.attention_factor is not None else (
        1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0)  # fmt: skip
    return inv_freq, float(attention)
