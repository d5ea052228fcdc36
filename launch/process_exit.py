"""Ending a `strata` process with its exit code, safely when it was one rank of a process group.

A rank that leaves through normal interpreter teardown can abort (SIGABRT, "terminate called
without an active exception", exit 134) after its work is done: a gloo worker thread that still
holds a finished collective's tensors takes the GIL to free them, and a C++ thread that takes the
GIL while the interpreter finalizes is ended by pthread_exit through noexcept frames. Whether it
happens depends on thread timing, so a run that stopped cleanly (exit 0, 74 or 75) could report
134 now and then, and a launcher would treat a finished run as crashed. A rank therefore runs
the atexit handlers itself (while the interpreter is whole), flushes its streams and leaves with
os._exit, skipping the teardown. Ranks also enable faulthandler, so a native crash prints every
thread's Python stack.

A process that is no rank (WORLD_SIZE unset or 1, no MASTER_ADDR) exits the ordinary way.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import NoReturn


def is_rank(environ: Mapping[str, str]) -> bool:
    """Whether a launcher (ours, torchrun, srun) started this process as a rank of a process group."""
    return int(environ.get("WORLD_SIZE", "1") or 1) > 1 or "MASTER_ADDR" in environ


def exit_code_of(stop: SystemExit) -> int:
    """The status `sys.exit(x)` would give: None -> 0, an int -> itself, anything else (a message) -> 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_and_exit(main: Callable[[], int], as_rank: bool | None = None) -> NoReturn:
    """Runs `main` and ends the process with its return value as the exit status; `as_rank`
    None decides from the environment whether this process is a rank."""
    if not (is_rank(os.environ) if as_rank is None else as_rank):
        sys.exit(main())
    faulthandler.enable()
    try:
        code = int(main() or 0)
    except SystemExit as stop:  # argparse errors, sys.exit inside a command
        code = exit_code_of(stop)
    except BaseException:  # what the interpreter would print, then its status
        traceback.print_exc()
        code = 1
    _leave(code)


def _leave(code: int) -> NoReturn:
    try:
        atexit._run_exitfuncs()  # what teardown would run (W&B, multiprocessing, logging), minus the teardown
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
                pass
        os._exit(code)
