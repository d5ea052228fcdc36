"""Ray launcher: run the training ranks as Ray actors, locally (embedded) or on a cluster.

Why actors and not Ray Train's TorchTrainer: the trainer already owns everything TorchTrainer
would add — process-group setup from RANK/WORLD_SIZE/MASTER_* (engine.dist), checkpoints and
resume in the run directory (engine.checkpoint) — so a TorchTrainer would initialize a second
process group and keep a second checkpoint registry. Here Ray only places the workers (one
placement-group bundle per node), forwards their logs (prefixed `rankN`), and this module owns
the failure policy: when any worker dies, the whole group is killed and restarted (fresh
processes, fresh process group) from the run directory's latest checkpoint, up to
`max_failures` times; a run that diverged (engine.step_guard) is not restarted. Without an address a private Ray instance is started on 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.signals import CHECKPOINT_FAILED_EXIT_CODE, HANG_EXIT_CODE, REQUEUE_EXIT_CODE
from engine.step_guard import DIVERGED_EXIT_CODE

LOOPBACK = "127.0.0.1"
WORKERS_FILE = "ray_workers.json"  # under RUN_DIR/launcher/: pids of the current attempt
SAMPLES_DIR = "samples"  # under RUN_DIR/launcher/: per-rank sample audit (--sample-log)


@dataclass
class RayOptions:
    address: str | None = None
    nodes: int = 1
    workers_per_node: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has a GPU per worker, else 0 (CPU/gloo)
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    object_store_mb: int = 256
    num_cpus: int | None = None
    dashboard: bool = False
    placement_timeout_s: float = 120.0
    sample_log: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node

    def validate(self) -> RayOptions:
        for name in ("nodes", "workers_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if (self.gpus_per_worker or 0) < 0 or self.cpus_per_worker <= 0:
            raise ValueError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.object_store_mb < 80:
            raise ValueError(f"--object-store-mb must be at least 80 (Ray's minimum), got {self.object_store_mb}")
        return self


# -- connecting --------------------------------------------------------------------------------

def _prepare_ray_environment(local: bool) -> None:
    """Environment Ray reads at import/start: per-rank log lines are not merged, and a local
    instance takes 127.0.0.1 as its node address, so every Ray server binds to loopback."""
    os.environ["RAY_DEDUP_LOGS"] = "0"
    if not sys.stdout.isatty():  # plain "(rank0 pid=..)" prefixes in log files, no ANSI colours
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:  # imported before us: the constant was already read
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False


def connect(options: RayOptions) -> None:
    """ray.init: join `options.address`, or start a private single-machine instance on loopback."""
    local = options.address is None
    _prepare_ray_environment(local)
    import ray

    if ray.is_initialized():
        return
    if not local:
        ray.init(address=options.address, log_to_driver=True, logging_level="WARNING")
        return
    import torch

    needed_cpus = options.world_size * options.cpus_per_worker
    ray.init(
        address="local",  # always a new private instance, never one found in /tmp/ray or RAY_ADDRESS
        num_cpus=max(options.num_cpus or os.cpu_count() or 1, int(needed_cpus + 0.999)),
        num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        _node_ip_address=LOOPBACK,
        include_dashboard=options.dashboard,
        dashboard_host=LOOPBACK,
        object_store_memory=options.object_store_mb * 2**20,
        log_to_driver=True,
        logging_level="WARNING",
    )


# -- the worker ---------------------------------------------------------------------------------

def _install_sample_log(path: Path, rank: int, attempt: int) -> None:
    """Audit: append each step's sample ids of this rank to `path` (one JSON line per step)."""
    from data_pipeline.loader import TrainLoader

    original = TrainLoader.next_step
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a")

    def next_step(self):  # noqa: ANN001
        batches = original(self)
        samples = [[int(s.source), int(s.offset)] for s in self.last_sample_ids]
        log.write(json.dumps({"attempt": attempt, "rank": rank, "step": int(self.step), "samples": samples}) + "\n")
        log.flush()
        return batches

    TrainLoader.next_step = next_step


class TrainWorker:
    """One training rank in its own process (a Ray actor); runs engine.entry.run_training."""

    def __init__(self, rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size

    def __repr__(self) -> str:  # Ray prefixes this worker's log lines with it
        return f"rank{self.rank}"

    def describe(self) -> dict[str, Any]:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (called on rank 0 only)."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return host, int(sock.getsockname()[1])

    def run(self, config: str | dict, overrides: list[str], resume: str | None, master: tuple[str, int],
            attempt: int, sample_log_dir: str | None, devices: tuple[str, int] | None = None) -> int:
        """`devices`: (CUDA_VISIBLE_DEVICES of the whole node's group, this rank's index in it)."""
        local_rank = self.local_rank
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"], local_rank = devices[0], devices[1]
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
        )
        if sample_log_dir:
            _install_sample_log(Path(sample_log_dir) / f"rank{self.rank}.jsonl", self.rank, attempt)
        from engine.entry import run_training

        result = run_training(config, overrides, resume)
        sys.stdout.flush()
        return int(result.exit_code)


def node_device_plan(described: list[dict]) -> dict[int, tuple[str, int] | None]:
    """Rank -> (CUDA_VISIBLE_DEVICES, local device index). Ray shows each actor only its own GPU;
    the ranks of one node are given all of the node's group GPUs instead, so NCCL sees its peers
    (peer-to-peer / NVLink) as under torchrun. CPU ranks -> None."""
    by_node: dict[str, list[str]] = {}
    for worker in described:
        by_node.setdefault(worker["node_id"], []).extend(worker.get("gpu_ids", []))
    plan: dict[int, tuple[str, int] | None] = {}
    for worker in described:
        mine = worker.get("gpu_ids", [])
        if not mine:
            plan[worker["rank"]] = None
            continue
        node_gpus = sorted(set(by_node[worker["node_id"]]), key=lambda g: (len(g), g))
        plan[worker["rank"]] = (",".join(node_gpus), node_gpus.index(mine[0]))
    return plan


def _signal_process(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# -- the driver ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayRun:
    """What every worker trains: a config (YAML path, or an already-resolved config tree), its
    overrides, the run directory to resume from on the first attempt (None = fresh) and the run
    directory itself (every restart resumes from it)."""

    config: str | dict
    overrides: tuple[str, ...]
    resume: str | None
    run_dir: str


class _StopSignals:
    """SIGTERM/SIGUSR1 on the driver: remembered here, forwarded to every worker by the wait loop."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.received = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.pending.append(signum)
        self.received = True

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class RayLauncher:
    def __init__(self, run: RayRun, options: RayOptions, say: Callable[[str], None] | None = None) -> None:
        self.run, self.options = run, options.validate()
        self.say = say or (lambda text: print(f"[launcher] {text}", flush=True))
        self.launcher_dir = Path(run.run_dir) / "launcher"

    # placement: one bundle per node holding that node's workers
    def _placement_group(self):  # noqa: ANN202
        import ray
        from ray.util.placement_group import placement_group

        o = self.options
        bundle = {"CPU": o.workers_per_node * o.cpus_per_worker}
        if o.gpus_per_worker:
            bundle["GPU"] = o.workers_per_node * o.gpus_per_worker
        strategy = "STRICT_SPREAD" if o.nodes > 1 else "PACK"
        group = placement_group([dict(bundle) for _ in range(o.nodes)], strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=o.placement_timeout_s)
        if not ready:
            ray.util.remove_placement_group(group)
            total = ray.cluster_resources()
            raise RuntimeError(
                f"Ray could not place {o.nodes} node(s) x {bundle} within {o.placement_timeout_s:.0f}s; "
                f"the cluster has CPU={total.get('CPU', 0)}, GPU={total.get('GPU', 0)} "
                f"on {len([n for n in ray.nodes() if n.get('Alive')])} node(s)"
            )
        return group

    def _start_workers(self, group) -> list:  # noqa: ANN001
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        o = self.options
        actor_cls = ray.remote(TrainWorker)
        workers = []
        for node in range(o.nodes):
            for local_rank in range(o.workers_per_node):
                rank = node * o.workers_per_node + local_rank
                strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=node)
                workers.append(
                    actor_cls.options(num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker,
                                      scheduling_strategy=strategy, max_restarts=0)
                    .remote(rank, o.world_size, local_rank, o.workers_per_node)
                )
        return workers

    def _record_workers(self, attempt: int, described: list[dict]) -> None:
        self.launcher_dir.mkdir(parents=True, exist_ok=True)
        path = self.launcher_dir / WORKERS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"attempt": attempt, "workers": described}, indent=1))
        os.replace(tmp, path)

    def _forward_signal(self, described: list[dict], signum: int) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.say(f"received {signal.Signals(signum).name}: asking every rank to checkpoint and stop")
        kill = ray.remote(num_cpus=0)(_signal_process)
        refs = [
            kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(w["node_id"], soft=False))
            .remote(w["pid"], signum)
            for w in described
        ]
        ray.get(refs, timeout=60)

    def _attempt(self, group, attempt: int, stops: _StopSignals) -> tuple[str, int | str]:  # noqa: ANN001
        """One try; returns ('done', exit code) or ('failed', reason)."""
        import ray

        started = time.time()
        workers = self._start_workers(group)
        try:
            try:  # a lost node: its placement-group bundle must be rescheduled first
                described = ray.get([w.describe.remote() for w in workers], timeout=self.options.placement_timeout_s)
            except ray.exceptions.RayError as err:
                return "failed", f"workers did not start: {type(err).__name__}: {_first_line(err)}"
            self._record_workers(attempt, described)
            self.say(f"attempt {attempt + 1}: " + ", ".join(f"rank {d['rank']} pid {d['pid']} on {d['node_ip']}"
                                                           for d in described))
            master = ray.get(workers[0].rendezvous_address.remote())
            resume = self.run.resume if attempt == 0 else self.run.run_dir
            sample_dir = str(self.launcher_dir / SAMPLES_DIR) if self.options.sample_log else None
            devices = node_device_plan(described)
            pending = {
                w.run.remote(self.run.config, list(self.run.overrides), resume, master, attempt, sample_dir,
                             devices[rank]): rank
                for rank, w in enumerate(workers)
            }
            codes: dict[int, int] = {}
            while pending:
                while stops.pending:
                    self._forward_signal(described, stops.pending.pop(0))
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in done:
                    rank = pending.pop(ref)
                    try:
                        codes[rank] = ray.get(ref)
                    except Exception as err:  # actor died, or run_training raised
                        hang = _hang_report(self.run.run_dir, rank, since=started)
                        if hang:  # the watchdog's os._exit kills the actor: Ray reports a dead worker, not 124
                            return "failed", f"rank {rank} exited with status {HANG_EXIT_CODE}, {hang}"
                        return "failed", f"rank {rank}: {type(err).__name__}: {_first_line(err)}"
                    if codes[rank] in (DIVERGED_EXIT_CODE, CHECKPOINT_FAILED_EXIT_CODE):  # a restart would fail alike
                        return "done", codes[rank]
                    if codes[rank] not in (0, REQUEUE_EXIT_CODE):
                        hang = " (hang watchdog: stacks in RUN_DIR/hangs/)" if codes[rank] == HANG_EXIT_CODE else ""
                        return "failed", f"rank {rank} exited with status {codes[rank]}{hang}"
            if any(code == REQUEUE_EXIT_CODE for code in codes.values()):
                return "done", REQUEUE_EXIT_CODE
            return "done", 0
        finally:
            for worker in workers:
                ray.kill(worker, no_restart=True)

    def _say_outcome(self) -> None:
        """The run's closing line from its summary.json (rank 0 wrote it before returning)."""
        from engine.report import closing_line

        try:
            summary = json.loads((Path(self.run.run_dir) / "summary.json").read_text())
        except (OSError, ValueError):
            return
        self.say(closing_line(summary, self.run.run_dir))

    def launch(self) -> int:
        import ray

        connect(self.options)
        o = self.options
        if o.gpus_per_worker is None:
            o.gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= o.world_size else 0.0
        where = f"Ray cluster at {o.address}" if o.address else f"a local Ray instance on {LOOPBACK}"
        device = f"{o.gpus_per_worker:g} GPU(s)" if o.gpus_per_worker else f"{o.cpus_per_worker:g} CPU(s)"
        self.say(f"{o.world_size} worker(s) ({o.nodes} node(s) x {o.workers_per_node}, {device} each) on {where}")
        group = self._placement_group()
        try:
            with _StopSignals() as stops:
                for attempt in range(o.max_failures + 1):
                    outcome, detail = self._attempt(group, attempt, stops)
                    if outcome == "done":
                        if detail == REQUEUE_EXIT_CODE:
                            self.say(f"the ranks checkpointed after a stop request; exit {REQUEUE_EXIT_CODE} (requeue)")
                        elif detail == DIVERGED_EXIT_CODE:
                            self.say(f"the run diverged (exit {DIVERGED_EXIT_CODE}); not restarting: see the log for the steps skipped")
                        elif detail == CHECKPOINT_FAILED_EXIT_CODE:
                            self.say(f"checkpoint saves kept failing (exit {CHECKPOINT_FAILED_EXIT_CODE}); not restarting: "
                                     "see the log for why (a full disk?)")
                        else:  # rank 0's own last line can be lost when the workers are torn down
                            self._say_outcome()
                        return int(detail)
                    if stops.received:
                        self.say(f"a worker failed while stopping ({detail}); not restarting")
                        return 1
                    if attempt < o.max_failures:
                        self.say(f"worker failure ({detail}); restart {attempt + 1}/{o.max_failures} "
                                 f"from the latest checkpoint in {self.run.run_dir}")
                    else:
                        self.say(f"worker failure ({detail}); no restarts left (--max-failures {o.max_failures}): the run failed")
            return 1
        finally:
            ray.util.remove_placement_group(group)


def _hang_report(run_dir: str, rank: int, since: float) -> str | None:
    """What the hang watchdog of `rank` said, when it wrote RUN_DIR/hangs/rank<R>.txt at or after
    `since` (seen where the launcher shares the run directory), e.g. "the hang watchdog: rank 1: no
    progress for 31 s (...) during step 24; stacks in RUN_DIR/hangs/rank1.txt"; else None."""
    from engine.watchdog import HANGS_DIR

    path = Path(run_dir) / HANGS_DIR / f"rank{rank}.txt"
    try:
        if path.stat().st_mtime < since - 1:  # an earlier attempt's (1 s: file systems' coarse clocks)
            return None
        with path.open() as report:
            header = report.readline().strip()
    except OSError:
        return None
    header = header.split("; stacks of every thread follow")[0]
    return f"the hang watchdog: {header}; stacks in {path}"


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def launch_ray(run: RayRun, options: RayOptions) -> int:
    """Runs the training on Ray; shuts a private instance down afterwards. Returns the exit status."""
    launcher = RayLauncher(run, options)
    try:
        return launcher.launch()
    finally:
        if options.address is None:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def submit_ray(cfg: Any, num_workers: int = 2, **option_overrides: Any) -> int:
    """Trains a resolved config (StrataConfig or its dict) on a private local Ray instance with
    `num_workers` ranks (one GPU each when this machine has that many, else CPU/gloo)."""
    tree = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else copy.deepcopy(dict(cfg))
    run_dir = str(Path(tree["train"]["run_dir"]).absolute())
    tree["train"]["run_dir"] = run_dir
    options = RayOptions(workers_per_node=num_workers, **option_overrides)
    return launch_ray(RayRun(tree, (), None, run_dir), options)


# -- data work: ordered fan-out over stateful Ray actors -------------------------------------------

class _StatefulWorker:
    """Builds its object once (e.g. a tokenizer-holding encoder), then applies one method per item."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.obj = factory()

    def call(self, method: str, item: Any) -> Any:
        return getattr(self.obj, method)(item)


def ray_ordered_map(factory: Callable[[], Any], method: str, items: Iterable[Any], workers: int,
                    in_flight_per_worker: int = 2, address: str | None = None) -> Iterator[Any]:
    """`getattr(factory(), method)(item)` for each item on `workers` Ray actors; results come back in
    input order with at most `workers * in_flight_per_worker` items in flight (bounded memory).

    Connects like the training launcher (a private 127.0.0.1 instance unless `address`, or the
    cluster this process already joined). The caller keeps all state that makes its work
    resumable (e.g. the ShardSet writer's committed shards); this only moves the compute.
    """
    import ray

    if not ray.is_initialized():
        connect(RayOptions(address=address, num_cpus=workers, workers_per_node=workers))
    actor_cls = ray.remote(num_cpus=1)(_StatefulWorker)
    actors = [actor_cls.remote(factory) for _ in range(max(1, workers))]
    pending: deque = deque()
    try:
        for index, item in enumerate(items):
            pending.append(actors[index % len(actors)].call.remote(method, item))
            if len(pending) >= len(actors) * in_flight_per_worker:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    finally:
        for actor in actors:
            ray.kill(actor)


def ray_encoded_batches(batches: Iterable[list[tuple]], encoder_args: tuple, workers: int,
                        address: str | None = None) -> Iterator[tuple[list[tuple], Any]]:
    """Drop-in for data_pipeline.prepare's process-pool encoder: (batch, EncodedBatch) pairs in
    input order, the encoding done by data_pipeline.prepare.DocumentEncoder actors on Ray.
    Each batch holds (index, source, kind, payload) records, as prepare builds them."""
    from functools import partial

    from data_pipeline.prepare import DocumentEncoder

    queued: deque = deque()

    def payloads() -> Iterator[list[tuple]]:
        for batch in batches:
            queued.append(batch)
            yield [(record[2], record[3]) for record in batch]

    for encoded in ray_ordered_map(partial(DocumentEncoder, *encoder_args), "encode", payloads(), workers,
                                   address=address):
        yield queued.popleft(), encoded
