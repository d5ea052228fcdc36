"""Preemption signals: SIGTERM / SIGUSR1 ask the trainer to checkpoint and exit for a requeue.

The handler only sets a flag; the trainer checks it between steps (agreeing across ranks) so a
step is never cut in half. Launchers treat REQUEUE_EXIT_CODE as "requeue me".
"""

from __future__ import annotations

import signal
import threading

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL
# EX_IOERR: checkpoint saves kept failing (a full disk, say); launchers do not restart it, a restart would fail too
CHECKPOINT_FAILED_EXIT_CODE = 74
HANG_EXIT_CODE = 124  # as `timeout`: the hang watchdog ended a rank that made no progress (engine.watchdog)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (or by code); read by the training loop between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def request(self, reason: str = "requested") -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
