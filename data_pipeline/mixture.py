"""Mixture schedules: the source weights of each step, as a pure function of the step.

Owns fixed weights and temperature sampling with a cooldown of T (METHODS.md §4); the sampler
(data_pipeline/sampler.py) turns a step's weights into slot assignments. No state, no I/O: the
loader passes the token counts it read from the ShardSets and the run's total steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from data_pipeline.config import MixtureConfig

COOLDOWN_SHAPES = ("constant", "step", "linear", "cosine")


class MixtureSchedule(Protocol):
    """Source weights as a function of the step (any world size, any resume point: same result)."""

    def weights_at(self, step: int) -> np.ndarray: ...


def _normalized(values: Sequence[float], what: str) -> np.ndarray:
    w = np.asarray(values, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"{what} must be finite, >= 0 and not all 0, got {list(values)}")
    return w / w.sum()


class FixedMixture:
    """The same normalized weights at every step."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = _normalized(weights, "mixture weights")

    def weights_at(self, step: int) -> np.ndarray:
        return self.weights


@dataclass(frozen=True)
class TemperatureCooldown:
    """T(step) over a run of `total_steps`, changing from `start` to `end` (boundary b =
    `at * total_steps`; linear and cosine move over [a, b], a = `start_at * total_steps`, with
    progress p = clip((step - a) / (b - a), 0, 1)):

    - constant: T = start at every step (`end` and `at` are not used);
    - step:     T = start for step < b, end from b on (Li et al. 2025 default: 5 -> 1 at 0.5);
    - linear:   T = start + (end - start) * p;
    - cosine:   T = end + (start - end) * (1 + cos(pi * p)) / 2.
    With b = 0 the run is at `end` from step 0 (except `constant`).
    """

    start: float = 5.0
    end: float = 1.0
    shape: str = "step"
    at: float = 0.5
    total_steps: int | None = None
    start_at: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in COOLDOWN_SHAPES:
            raise ValueError(
                f"cooldown: unknown shape {self.shape!r}, expected one of {COOLDOWN_SHAPES}"
            )
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"temperature_{name}: must be a finite number > 0, got {value}")
        if not 0.0 <= self.at <= 1.0:
            raise ValueError(f"cooldown_at: must be a fraction of the run in [0, 1], got {self.at}")
        if not 0.0 <= self.start_at <= self.at:
            raise ValueError(
                f"cooldown_from: must be in [0, cooldown_at = {self.at}], got {self.start_at}"
            )
        if self.shape != "constant" and (self.total_steps is None or self.total_steps <= 0):
            raise ValueError(
                f"cooldown {self.shape!r} needs the run's total steps (train.steps), got {self.total_steps}"
            )

    @property
    def boundary(self) -> float:
        """The step where `step` switches and `linear`/`cosine` arrive at `end`."""
        return self.at * (self.total_steps or 0)

    def __call__(self, step: int) -> float:
        if self.shape == "constant":
            return self.start
        boundary = self.boundary
        if self.shape == "step":
            return self.start if step < boundary else self.end
        begin = self.start_at * (self.total_steps or 0)
        if step >= boundary:
            progress = 1.0
        elif step <= begin:
            progress = 0.0
        else:
            progress = (step - begin) / (boundary - begin)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        if self.shape == "constant":
            return f"T={self.start:g}"
        return f"T {self.shape} {self.start:g}->{self.end:g} at {self.at:g} of {self.total_steps} steps"


def temperature_weights(
    token_counts: Sequence[float], temperature: float, weights: Sequence[float] | None = None
) -> np.ndarray:
    """p_i = w_i * n_i^(1/T) / sum_j w_j * n_j^(1/T); computed in log space (n up to 1e13 is fine).

    T = 1: proportional to w_i * n_i; T -> inf: proportional to w_i (uniform with all w_i = 1).
    """
    counts = np.asarray(token_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or not np.isfinite(counts).all() or (counts <= 0).any():
        raise ValueError(f"token counts must be finite and > 0, got {list(token_counts)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    prior = _normalized(np.ones(len(counts)) if weights is None else weights, "source weights")
    if prior.shape != counts.shape:
        raise ValueError(f"{len(prior)} source weights for {len(counts)} token counts")
    with np.errstate(divide="ignore"):
        logits = np.log(prior) + np.log(counts) / temperature
    logits -= logits.max()
    p = np.exp(logits)
    return p / p.sum()


class TemperatureMixture:
    """Temperature sampling with cooldown (Li et al. 2025, "Upsample or Upweight?"):
    p_i(s) = w_i * n_i^(1/T(s)) / sum_j w_j * n_j^(1/T(s)).

    n_i = tokens of source i (the sum of its ShardSet's document lengths); w_i = the user's
    per-source `weight`, applied as a multiplier AFTER the temperature (so T = 1 gives
    w_i * n_i and a high T gives the user's weights; all w_i = 1, the default, is the paper's
    formula). T(s) comes from a `TemperatureCooldown`. Pure function of the step.
    """

    def __init__(
        self,
        token_counts: Sequence[float],
        cooldown: TemperatureCooldown,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.token_counts = np.asarray(token_counts, dtype=np.float64)
        self.cooldown = cooldown
        self.prior = None if weights is None else np.asarray(weights, dtype=np.float64)
        temperature_weights(self.token_counts, cooldown.start, self.prior)  # validate inputs now
        self._last: tuple[float, np.ndarray] | None = None  # (T, weights): T changes rarely

    def temperature_at(self, step: int) -> float:
        return self.cooldown(step)

    def weights_at(self, step: int) -> np.ndarray:
        temperature = self.cooldown(step)
        last = self._last
        if last is not None and last[0] == temperature:
            return last[1]
        weights = temperature_weights(self.token_counts, temperature, self.prior)
        self._last = (temperature, weights)
        return weights


def build_mixture(
    cfg: MixtureConfig,
    token_counts: Sequence[float],
    weights: Sequence[float],
    total_steps: int | None,
) -> FixedMixture | TemperatureMixture:
    """The schedule `data.mixture` asks for; `weights` are the sources' `weight` fields and
    `total_steps` the run's `train.steps` (needed by every cooldown shape but `constant`)."""
    if cfg.kind == "fixed":
        return FixedMixture(weights)
    if cfg.cooldown != "constant" and total_steps is None:
        raise ValueError(
            f"data.mixture.cooldown: {cfg.cooldown!r} needs the run's total steps (train.steps); "
            "pass total_steps to the loader"
        )
    cooldown = TemperatureCooldown(
        start=cfg.temperature_start,
        end=cfg.temperature_end,
        shape=cfg.cooldown,
        at=cfg.cooldown_at,
        total_steps=total_steps,
        start_at=cfg.cooldown_from,
    )
    return TemperatureMixture(token_counts, cooldown, weights)
