"""The errors the CLI turns into one line: `ConfigError` (a config that cannot run, naming the
field) and `CheckpointSaveError` (a checkpoint save that failed on some rank).

Kept in a module with no imports so the CLI (launch/cli.py) can catch them without importing
torch; `engine.config` re-exports ConfigError, `engine.checkpoint` CheckpointSaveError.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field path."""


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank, raised on every rank alike: its partial files are
    removed and the checkpoints before it are intact."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"checkpoint of step {step} failed: {reason}")
        self.step, self.reason = step, reason
