"""Helpers of the distributed engine tests: tiny training runs as N real processes on CPU (gloo).

Ranks are forked from a forkserver that has imported the engine once (no per-rank import
cost), each with the torch.distributed environment a launcher would give it. Runs that
several test files compare against are memoized per session (`shared_run`).
(A uniquely named module, not conftest.py: the test files import it by name.)
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

from engine.report import read_metrics
from launch.process_exit import run_and_exit
from tests.conftest import tiny_config

STEP_TIMEOUT_S = 300
_SHARED: dict[str, Path] = {}
_CONTEXT = None


def run_tree(corpus: Path, run_dir: Path, steps: int = 10, **overrides) -> dict:
    """The tiny Llama of tests/conftest.py, deterministic, constant LR after 2 warmup steps
    (so runs of different lengths follow the same curve), no prefetch thread."""
    values = {
        "train.steps": steps,
        "train.deterministic": True,
        "train.num_threads": 1,
        "train.eval_batches": 0,  # the whole (small) val set: the same rows at any dp size
        "schedule": {"name": "constant", "warmup_steps": 2},
        "data.prefetch": 0,
        "checkpoint.every": 0,
        "logging.tensorboard": False,
        "logging.progress": False,
    }
    values.update(overrides)
    return tiny_config(corpus, run_dir, **values)


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["engine.trainer", "engine.entry", "torch._inductor.config", "distributed_runs"])
    return _CONTEXT


def _rank_main(rank: int, world_size: int, port: int, tree: dict | None, resume: str | None,
               overrides: list[str], log_path: str, sys_path: list[str], compile_backend: str | None) -> None:
    sys.path[:] = sys_path
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # one process = no process group, whatever the server inherited
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["OMP_NUM_THREADS"] = "1"

    def train() -> int:
        import torch
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1  # no compile worker pool on 2 cores
        if compile_backend is not None:  # e.g. aot_eager: AOTAutograd without C++ codegen
            import functools

            torch.compile = functools.partial(torch.compile, backend=compile_backend)
        from engine.entry import run_training

        return run_training(tree, overrides, resume).exit_code

    run_and_exit(train, as_rank=True)  # a forked rank ends through os._exit, whatever its world size


class RankGroup:
    """N rank processes of one run; logs in RUN_DIR/rank<r>.log."""

    def __init__(self, nproc: int, run_dir: Path, tree: dict | None = None, resume: str | None = None,
                 overrides: list[str] | None = None, compile_backend: str | None = None) -> None:
        from launch.local import free_port

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        ctx = _context()
        self.procs = [
            ctx.Process(target=_rank_main, args=(r, nproc, port, tree, resume, overrides or [],
                                                 str(self.run_dir / f"rank{r}.log"), list(sys.path), compile_backend))
            for r in range(nproc)
        ]
        for proc in self.procs:
            proc.start()

    def wait(self, timeout: float = STEP_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        if any(p.exitcode is None for p in self.procs):
            self.kill()
            raise AssertionError(f"ranks of {self.run_dir} still running after {timeout}s:\n{self.logs()}")
        return [p.exitcode for p in self.procs]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self.procs:
            proc.join()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.run_dir.glob("rank*.log")))


def run_ranks(nproc: int, run_dir: Path, tree: dict | None = None, resume: str | None = None,
              overrides: list[str] | None = None, expect: int = 0, compile_backend: str | None = None) -> Path:
    """Runs to completion; asserts every rank exited with `expect`; returns the run dir."""
    group = RankGroup(nproc, run_dir, tree, resume, overrides, compile_backend)
    codes = group.wait()
    assert codes == [expect] * nproc, f"exit codes {codes}\n{group.logs()}"
    return Path(run_dir)


def _function_rank_main(rank: int, size: int, port: int, fn, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip

    def call() -> int:
        import json

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        result = fn(rank, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0

    run_and_exit(call, as_rank=True)


def run_in_ranks(fn, size: int, out_dir: Path, *args, timeout: float = 180) -> list:
    """`fn(rank, *args)` in `size` forked processes with the torch.distributed environment set
    (fn calls `dist.init_process_group("gloo")` itself, or a trainer does); returns each rank's
    JSON-able result, by rank. `fn` must be a module-level function (it is pickled by name)."""
    import json

    from launch.local import free_port

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = _context()
    procs = [ctx.Process(target=_function_rank_main, args=(r, size, port, fn, args, str(out_dir))) for r in range(size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * size, f"rank exit codes {codes} (tracebacks above, in the captured stderr)"
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(size)]


def shared_run(key: str, tmp_path_factory, corpus: Path, nproc: int, **overrides) -> Path:
    """A run several test files compare against, done once per session."""
    if key not in _SHARED:
        run_dir = tmp_path_factory.mktemp(key) / "run"
        _SHARED[key] = run_ranks(nproc, run_dir, run_tree(corpus, run_dir, **overrides))
    return _SHARED[key]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (a resumed run) keeps the last."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl").records
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_close(got: dict[int, float], want: dict[int, float], steps, rel: float = 1e-4) -> None:
    for step in steps:
        assert step in got, f"step {step} missing: {sorted(got)}"
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


def resume_on_one_process(run_dir: Path, dest: Path, step: int, overrides: list[str]) -> dict[int, float]:
    """Copies `run_dir` with only its step-`step` checkpoint, resumes it on one process with
    `overrides` to the run's end, and returns the resumed run's losses."""
    resumed = copy_run(run_dir, dest, keep_steps=[step])
    run_ranks(1, resumed, resume=str(resumed), overrides=overrides)
    return losses(resumed)


def copy_run(run_dir: Path, dest: Path, keep_steps: list[int] | None = None) -> Path:
    """A copy of a run directory's config and checkpoints (only `keep_steps` if given)."""
    dest.mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    for ckpt in (run_dir / "checkpoints").iterdir():
        if keep_steps is None or int(ckpt.name.split("_")[1]) in keep_steps:
            shutil.copytree(ckpt, dest / "checkpoints" / ckpt.name)
    return dest
