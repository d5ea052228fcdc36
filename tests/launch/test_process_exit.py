"""A rank ends with its own exit code: atexit handlers run, output is flushed, and pending gloo
work at exit no longer aborts the process (exit 134) after the work is done."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch.process_exit import exit_code_of, is_rank

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env={**base, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _done(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_who_is_a_rank():
    assert not is_rank({})
    assert not is_rank({"WORLD_SIZE": "1"})
    assert is_rank({"WORLD_SIZE": "2", "RANK": "1"})
    assert is_rank({"MASTER_ADDR": "10.0.0.1"})  # torchrun / srun at one process: a group is joined


def test_sys_exit_statuses():
    assert exit_code_of(SystemExit()) == 0
    assert exit_code_of(SystemExit(74)) == 74
    assert exit_code_of(SystemExit("usage: ...")) == 1


ENDING = """
    import atexit, sys
    from pathlib import Path
    from launch.process_exit import run_and_exit

    def main():
        atexit.register(lambda: Path(sys.argv[1]).write_text("ran"))
        print("no newline at the end", end="")
        {body}

    run_and_exit(main)
"""


@pytest.mark.parametrize(("body", "code", "in_stderr"), [
    ("return 74", 74, ""),
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("sys.exit('bad usage')", 1, "bad usage"),
])  # fmt: skip
@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_process_ends_with_its_status_its_output_and_its_atexit_handlers(
    tmp_path, body, code, in_stderr, world_size
):
    marker = tmp_path / "atexit"
    done = _done(_run(ENDING.format(body=body), {"WORLD_SIZE": world_size}, str(marker)))
    assert done.returncode == code, done.stderr
    assert done.stdout == "no newline at the end"
    assert in_stderr in done.stderr
    assert marker.read_text() == "ran"


PENDING_WORK = """
    import sys
    import time
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from launch.process_exit import run_and_exit

    def main():
        rank, port = int(sys.argv[1]), sys.argv[2]
        dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                                timeout=timedelta(seconds=60))
        if rank == 1:
            time.sleep(0.3)  # rank 0's collectives finish while it is already leaving
        global kept
        kept = [torch.ones(2_000_000) for _ in range(16)]  # alive until teardown, as a run's tensors are
        for tensor in kept:
            dist.all_reduce(tensor, async_op=True)  # still in the gloo workers' hands at exit
        return 0

    run_and_exit(main)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ranks_that_exit_with_gloo_work_in_flight_end_with_their_status_not_an_abort():
    """Through plain interpreter teardown, a rank of this pair aborted ("terminate called without an active exception", 134) in most tries here."""
    for _ in range(3):
        port = str(_free_port())
        ranks = [
            _run(PENDING_WORK, {"WORLD_SIZE": "2", "RANK": str(r)}, str(r), port) for r in (0, 1)
        ]
        for done in map(_done, ranks):
            assert done.returncode == 0, done.stderr
            assert "terminate called" not in done.stderr
