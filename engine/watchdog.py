"""Hang watchdog (`train.hang_timeout_s`): a rank that makes no progress for that long writes
every thread's stack to stderr and RUN_DIR/hangs/rank<R>.txt, then exits with HANG_EXIT_CODE.

A hung collective (a frozen peer, a lost node) otherwise waits out the process group's timeout
(STRATA_DIST_TIMEOUT_MIN, 10 minutes) and a stuck read waits forever; exiting lets the launcher
act (Ray restarts from the last checkpoint, SLURM and local runs fail visibly) and the stacks
say where it stuck. Owns the timer and the dump; the trainer calls `progress()` after each step,
eval and save. faulthandler writes the stacks: it works while the main thread is blocked in C.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from engine.signals import HANG_EXIT_CODE

HANGS_DIR = "hangs"


class HangWatchdog:
    """A daemon thread that ends the process when `progress()` has not been called for
    `timeout_s` seconds; `close()` stops it. Does nothing with timeout 0."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int) -> None:
        self.timeout_s, self.run_dir, self.rank = timeout_s, Path(run_dir), rank
        self.what = "the first step"
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="strata-hang-watchdog", daemon=True)
            self._thread.start()

    def progress(self, next_what: str) -> None:
        """Something finished; `next_what` names what the rank does next (for the report)."""
        self._last, self.what = time.monotonic(), next_what

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._closed.wait(timeout=min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s:
                self._dump_and_exit(idle)

    def _dump_and_exit(self, idle: float) -> None:
        header = (f"rank {self.rank}: no progress for {idle:.0f} s (train.hang_timeout_s={self.timeout_s:g}) "
                  f"during {self.what}; stacks of every thread follow; exiting {HANG_EXIT_CODE}")  # fmt: skip
        print(f"error: {header}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            path = self.run_dir / HANGS_DIR / f"rank{self.rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as report:
                report.write(header + "\n")
                report.flush()
                faulthandler.dump_traceback(file=report, all_threads=True)
            print(f"stacks written to {path}", file=sys.stderr, flush=True)
        except OSError as err:  # a full or lost disk may be why it hangs: the stderr copy stands
            print(f"could not write the stacks to {self.run_dir / HANGS_DIR} ({err})", file=sys.stderr, flush=True)
        os._exit(HANG_EXIT_CODE)
