"""Which optimizer steps are applied: a step whose loss or gradient norm is not finite is skipped
(its gradients dropped, the weights and AdamW moments untouched), and so, optionally, is a step
whose loss or gradient norm spikes far above the recent applied steps (OLMo-core's skip-step
rule: value > mean + sigma * std over a rolling window). Too many skipped steps in a row end the
run with DIVERGED_EXIT_CODE and no checkpoint of the bad state. Owns the decision and its state
(kept in the checkpoint so a resumed run decides as the uninterrupted one); not the step itself.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

DIVERGED_EXIT_CODE = 3  # launchers do not restart it: the same data would diverge again
MIN_SPIKE_RATIO = 1.01  # a spike is also at least 1% above the window's mean


class TrainingDiverged(RuntimeError):
    """Raised by the guard after `max_in_a_row` skipped steps in a row."""


@dataclass(frozen=True)
class Verdict:
    apply: bool
    reason: str = ""  # why the step was skipped; empty when it is applied


class StepGuard:
    """Decides per step from the global loss and gradient norm (identical on every rank, so all
    ranks agree without another collective)."""

    def __init__(self, spike_sigma: float = 0.0, window: int = 128, max_in_a_row: int = 8):
        self.spike_sigma, self.max_in_a_row = spike_sigma, max_in_a_row
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.skipped_total, self.skipped_in_a_row = 0, 0

    @classmethod
    def from_config(cls, optim) -> StepGuard:
        return cls(optim.skip_spike_sigma, optim.skip_window, optim.max_skipped_in_a_row)

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """The verdict for `step` (1-based, as logged); raises TrainingDiverged when the run
        has skipped too many steps in a row."""
        reason = self._reason(loss, grad_norm)
        if not reason:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            self.skipped_in_a_row = 0
            return Verdict(True)
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"step {step}: {self.skipped_in_a_row} steps in a row skipped (last: {reason}); "
                "stopping without checkpointing this state. Resume from the last checkpoint with a "
                "lower optim.lr or a longer warmup, or from an earlier checkpoint"
            )
        return Verdict(False, reason)

    def _reason(self, loss: float, grad_norm: float) -> str:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss {loss} / grad norm {grad_norm}"
        if self.spike_sigma <= 0 or len(self.losses) < self.losses.maxlen:
            return ""
        for name, value, history in (("loss", loss, self.losses), ("grad norm", grad_norm, self.grad_norms)):
            mean = sum(history) / len(history)
            std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
            limit = max(mean + self.spike_sigma * std, mean * MIN_SPIKE_RATIO)  # std ~ 0 is no licence to skip
            if value > limit:
                return f"{name} spike {value:.4g} > {limit:.4g} (mean + {self.spike_sigma:g} std of the last {len(history)} steps)"
        return ""

    # -- checkpoint (JSON: trainer_state.json) ----------------------------------------------
    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "skipped_total": self.skipped_total,
            "skipped_in_a_row": self.skipped_in_a_row,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.grad_norms.clear()
        self.grad_norms.extend(state["grad_norms"])
        self.skipped_total, self.skipped_in_a_row = state["skipped_total"], state["skipped_in_a_row"]
