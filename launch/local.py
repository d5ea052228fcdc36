"""Multi-process launch on one machine: a torchrun equivalent for `strata` subcommands.

Owns: spawning N `strata ...` processes with the torch.distributed environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), streaming their output
with a rank prefix, forwarding SIGTERM/SIGUSR1/SIGINT, and turning the children's exit codes
into one (a failure stops the others; REQUEUE_EXIT_CODE passes through). Not the trainer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from engine.signals import REQUEUE_EXIT_CODE

LOOPBACK = "127.0.0.1"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell would report it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def rank_environment(
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    master_addr: str,
    master_port: int,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment one rank needs for `torch.distributed` env:// rendezvous."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        PYTHONUNBUFFERED="1",
    )
    if "OMP_NUM_THREADS" not in env:  # N processes sharing the cores: no oversubscription
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_world_size))
    return env


class _PrefixedStream(threading.Thread):
    """Copies one child's output line by line to `sink`, each line prefixed with its rank."""

    def __init__(self, source: TextIO, prefix: str, sink: TextIO, lock: threading.Lock) -> None:
        super().__init__(name=f"strata-output-{prefix}", daemon=True)
        self.source, self.prefix, self.sink, self.lock = source, prefix, sink, lock

    def run(self) -> None:
        for line in self.source:
            with self.lock:
                self.sink.write(f"{self.prefix}{line if line.endswith(chr(10)) else line + chr(10)}")
                self.sink.flush()
        self.source.close()


class LocalGroup:
    """N child processes started together and stopped together."""

    def __init__(self, commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], sink: TextIO) -> None:
        self.sink = sink
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self._streams: list[_PrefixedStream] = []
        for rank, (command, env) in enumerate(zip(commands, envs, strict=True)):
            proc = subprocess.Popen(
                list(command),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
            )
            self.procs.append(proc)
            stream = _PrefixedStream(proc.stdout, f"[rank{rank}] ", sink, self._lock)
            stream.start()
            self._streams.append(stream)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send_signal(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM the ones still running, then SIGKILL whatever is left after `grace_s`."""
        self.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def note(self, text: str) -> None:
        with self._lock:
            self.sink.write(f"[launcher] {text}\n")
            self.sink.flush()

    def wait(self, requeue_grace_s: float = 120.0, failure_grace_s: float = 10.0) -> int:
        """Blocks until the group is done; returns its exit status.

        All zero -> 0. A rank exiting with REQUEUE_EXIT_CODE (it checkpointed after a stop
        request, which every rank agreed on) -> the others get `requeue_grace_s` to do the
        same -> REQUEUE_EXIT_CODE. Any other failure -> the rest are stopped and the first
        failing rank's status is returned.
        """
        failure: tuple[int, int] | None = None
        requeue_since: float | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            for rank, code in enumerate(codes):
                if code is None or code == 0 or failure is not None:
                    continue
                status = exit_status(code)
                if status == REQUEUE_EXIT_CODE:
                    requeue_since = requeue_since or time.monotonic()
                else:
                    failure = (rank, status)
            if failure is not None:
                rank, status = failure
                self.note(f"rank {rank} exited with status {status}; stopping the other ranks")
                self.stop(failure_grace_s)
                break
            if all(code is not None for code in codes):
                break
            if requeue_since is not None and time.monotonic() - requeue_since > requeue_grace_s:
                self.note("a rank asked for a requeue but others are still running; stopping them")
                self.stop(failure_grace_s)
                break
            time.sleep(0.05)
        for stream in self._streams:
            stream.join(timeout=5)
        if failure is not None:
            return failure[1]
        statuses = [exit_status(p.returncode) for p in self.procs]
        if any(s == REQUEUE_EXIT_CODE for s in statuses):
            return REQUEUE_EXIT_CODE
        return next((s for s in statuses if s != 0), 0)


def strata_command(strata_argv: Sequence[str], python: str | None = None) -> list[str]:
    """The command line that runs `strata ARGV...` with this interpreter."""
    return [python or sys.executable, "-m", "launch.cli", *strata_argv]


class _ForwardSignals:
    """While active, SIGTERM/SIGUSR1/SIGINT received by the launcher go to every child."""

    def __init__(self, group: LocalGroup) -> None:
        self.group = group
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._forward)
        return self

    def _forward(self, signum: int, frame: object) -> None:
        self.group.note(f"received {signal.Signals(signum).name}; forwarding to every rank")
        self.group.send_signal(signum)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def check_before_spawning(cfg, world_size: int, *, data: bool = True) -> None:  # noqa: ANN001 (a StrataConfig)
    """The checks every rank makes first (parallel degrees for `world_size`, the context- and
    pipeline-parallel splits, and with `data` the data paths), made once here before any process
    starts: a wrong combination is one `config error:` line (exit 2) rather than one per rank, and
    a SLURM job is refused at submission rather than after it waited in the queue."""
    from engine.entry import check_data_paths
    from engine.parallel import context_parallel_plan, resolve_degrees

    dims = resolve_degrees(cfg.parallel, world_size)
    context_parallel_plan(cfg, dims, None, 0)  # None when cp == 1
    if dims.pp > 1:
        from engine.pipeline import check_pipeline

        check_pipeline(cfg, dims)
    if data:
        check_data_paths(cfg)


def launch_local(
    strata_argv: Sequence[str],
    nproc: int,
    *,
    master_port: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    sink: TextIO | None = None,
    python: str | None = None,
) -> int:
    """Runs `strata ARGV...` as `nproc` ranks on this machine; returns the group's exit status.

    e.g. launch_local(["train", "cfg.yaml", "--set", "train.steps=10"], nproc=2).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    port = master_port or free_port()
    base = {**os.environ, **(extra_env or {})}
    envs = [rank_environment(r, nproc, r, nproc, LOOPBACK, port, base) for r in range(nproc)]
    command = strata_command(strata_argv, python)
    group = LocalGroup([command] * nproc, envs, sink or sys.stdout)
    group.note(f"started {nproc} ranks (pids {', '.join(map(str, group.pids))}) on {LOOPBACK}:{port}")
    with _ForwardSignals(group):
        try:
            status = group.wait()
        except BaseException:
            group.stop(5.0)
            raise
    if status != 0:
        group.note(f"exit status {status}")
    return status
