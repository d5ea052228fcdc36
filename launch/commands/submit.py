"""`strata submit CONFIG --launcher ray|slurm|local`: run the training on Ray, SLURM or local processes.

Argument parsing and the mapping onto launch.ray_launcher / launch.slurm / launch.local; the
config is loaded once here so a bad config fails before anything is started or submitted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from engine.errors import ConfigError
from launch.arguments import add_set_argument, positive_int

EPILOG = """examples:
  strata submit configs/demo.yaml --launcher ray --workers-per-node 2
  strata submit cfg.yaml --launcher ray --address auto --nodes 4 --workers-per-node 8 --gpus-per-worker 1
  strata submit cfg.yaml --launcher local --nproc 2
  strata submit cfg.yaml --launcher slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 --requeue
  strata submit cfg.yaml --launcher slurm --ray-on-slurm --nodes 4 --gpus-per-node 8 --dry-run

Security: a local Ray instance binds to 127.0.0.1 only; rendered sbatch scripts shell-quote
every value and never contain secrets (export them in the submitting shell; sbatch passes the
environment on)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run the training on a Ray cluster (default: a local one), SLURM, or local processes",
        description="Launch `strata train CONFIG` as a distributed job. --launcher ray (default) starts a "
        "private Ray instance on 127.0.0.1 unless --address names a cluster; --launcher slurm renders and "
        "submits an sbatch script; --launcher local spawns --nproc processes on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("--launcher", choices=["ray", "slurm", "local"], default=None,
                   help="where the ranks run (default: the config's launch.launcher if set to ray/slurm, else ray)")
    add_set_argument(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest intact checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="output directory of the run (same as --set train.run_dir=DIR)")

    size = p.add_argument_group("size (ray and slurm)")
    size.add_argument("--nodes", type=int, default=1, help="machines to use (default 1)")
    size.add_argument("--workers-per-node", type=int, default=None,
                      help="training ranks per node (default: --gpus-per-node on SLURM GPUs, else the config's launch.nproc)")
    size.add_argument("--gpus-per-worker", type=float, default=None,
                      help="ray: GPUs per rank (default: 1 when the Ray cluster has a GPU for every rank, else 0 = CPU/gloo)")
    size.add_argument("--cpus-per-worker", type=float, default=1.0,
                      help="CPU cores per rank (ray actor CPUs; slurm --cpus-per-task) (default 1)")

    local = p.add_argument_group("local")
    local.add_argument("--nproc", type=positive_int, default=None,
                       help="processes on this machine (torchrun equivalent) (default: the config's launch.nproc)")

    ray = p.add_argument_group("ray")
    ray.add_argument("--address", metavar="ADDR",
                     help="join an existing cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local instance on 127.0.0.1)")
    ray.add_argument("--max-failures", type=int, default=3,
                     help="restart the whole group from the latest checkpoint this many times after a worker dies (default 3)")
    ray.add_argument("--object-store-mb", type=int, default=256,
                     help="local instance: object store size in MiB (default 256; training passes no large objects)")
    ray.add_argument("--num-cpus", type=int, default=None,
                     help="local instance: CPUs Ray may schedule (default: this machine's cores)")
    ray.add_argument("--dashboard", action="store_true",
                     help="local instance: start the Ray dashboard on 127.0.0.1 (default off)")
    ray.add_argument("--sample-log", action="store_true",
                     help="audit: every rank appends the sample ids it trains on to RUN_DIR/launcher/samples/rankN.jsonl")

    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--job-name", default="strata", help="SLURM job name (default strata)")
    slurm.add_argument("--gpus-per-node", type=int, default=0,
                       help="GPUs per node; one srun task per GPU (default 0: CPU tasks, --workers-per-node of them)")
    slurm.add_argument("--partition", help="#SBATCH --partition")
    slurm.add_argument("--account", help="#SBATCH --account")
    slurm.add_argument("--time", dest="time_limit", metavar="TIME", help="#SBATCH --time, e.g. 24:00:00 or 2-00:00:00")
    slurm.add_argument("--qos", help="#SBATCH --qos")
    slurm.add_argument("--array", metavar="SPEC",
                       help="#SBATCH --array (e.g. 0-3); each element trains in RUN_DIR/array_N and "
                       "'{array_task_id}' in --set values becomes the element's index")
    slurm.add_argument("--sbatch", dest="extra_directives", action="append", default=[], metavar="OPTION",
                       help="extra #SBATCH line, e.g. --sbatch=--mem=64G or --sbatch=--exclusive (repeatable)")
    slurm.add_argument("--env", dest="env", action="append", default=[], metavar="NAME=VALUE",
                       help="export NAME=VALUE in the job (repeatable; secret-like names are refused)")
    slurm.add_argument("--source", dest="source_files", action="append", default=[], metavar="FILE",
                       help="source FILE before starting (e.g. a venv's bin/activate) (repeatable)")
    slurm.add_argument("--module", dest="modules", action="append", default=[], metavar="NAME",
                       help="`module load NAME` before starting (repeatable)")
    slurm.add_argument("--container-image", metavar="IMAGE",
                       help="run the tasks in this image (pyxis: srun --container-image; apptainer: apptainer exec)")
    slurm.add_argument("--container-runtime", choices=["pyxis", "apptainer"], default="pyxis",
                       help="how --container-image is run (default pyxis)")
    slurm.add_argument("--container-mounts", metavar="SRC:DST[,...]",
                       help="bind mounts for the container (default: the working directory)")
    slurm.add_argument("--requeue", action="store_true",
                       help="on preemption or time limit (SIGUSR1 --signal-lead seconds ahead) the trainer "
                       "checkpoints, the job requeues itself and resumes")
    slurm.add_argument("--signal-lead", dest="signal_lead_s", type=int, default=120, metavar="SECONDS",
                       help="with --requeue: #SBATCH --signal=B:USR1@SECONDS (default 120)")
    slurm.add_argument("--ray-on-slurm", action="store_true",
                       help="start a Ray head + workers on the allocation and run the Ray launcher there")
    slurm.add_argument("--log-dir", metavar="DIR",
                       help="where the script and job output go (default RUN_DIR/slurm)")
    slurm.add_argument("--python", default=None,
                       help="Python interpreter on the compute nodes (default: this one; `python` inside a container)")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    p.set_defaults(func=run)


def _run_dir(args: argparse.Namespace):
    """(the user's overrides + one absolute train.run_dir, that run dir, the config they give);
    validates the config with every override (array elements: element 0's)."""
    from engine.config import load_config
    from launch.slurm import ARRAY_PLACEHOLDER

    # array elements substitute their index later; validate with element 0
    probe = [o.replace(ARRAY_PLACEHOLDER, "0") for o in args.overrides]
    if args.run_dir:
        probe.append(f"train.run_dir={args.run_dir}")
    if args.resume:
        probe.append(f"train.run_dir={args.resume}")
    cfg = load_config(args.config, probe)
    run_dir = str(Path(cfg.train.run_dir).expanduser().absolute())
    return [*args.overrides, f"train.run_dir={run_dir}"], run_dir, cfg


def run(args: argparse.Namespace) -> int:
    overrides, run_dir, cfg = _run_dir(args)
    launcher = args.launcher or (cfg.launch.launcher if cfg.launch.launcher in ("ray", "slurm") else "ray")
    config = str(Path(args.config).absolute())
    if args.resume is None and not (launcher == "slurm" and (args.array or args.dry_run)):
        # a new run: never on top of another one's checkpoints
        from engine.entry import check_new_run_dir

        check_new_run_dir(run_dir)
    nproc_default = cfg.launch.nproc
    try:
        if launcher == "local":
            return _run_local(args, cfg, config, overrides, nproc_default)
        if launcher == "ray":
            return _run_ray(args, cfg, config, overrides, run_dir, nproc_default)
        return _run_slurm(args, cfg, config, overrides, run_dir, nproc_default)
    except ConfigError:  # `config error: FIELD: ...` (launch.cli), as from `strata train`
        raise
    except ValueError as err:  # SlurmError and bad sizes: a clear message, exit 2
        print(f"submit: error: {err}", file=sys.stderr)
        return 2


def _run_local(args: argparse.Namespace, cfg, config: str, overrides: list[str], nproc_default: int) -> int:
    from launch.local import check_before_spawning, launch_local

    nproc = args.nproc or args.workers_per_node or nproc_default
    check_before_spawning(cfg, nproc)
    argv = ["train", config, *[x for o in overrides for x in ("--set", o)]]
    if args.resume:
        argv += ["--resume", args.resume]
    return launch_local(argv, nproc=nproc)


def _ray_options(args: argparse.Namespace, nproc_default: int):  # noqa: ANN202
    from launch.ray_launcher import RayOptions

    return RayOptions(
        address=args.address, nodes=args.nodes, workers_per_node=args.workers_per_node or args.nproc or nproc_default,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, object_store_mb=args.object_store_mb, num_cpus=args.num_cpus,
        dashboard=args.dashboard, sample_log=args.sample_log,
    ).validate()


def _run_ray(args: argparse.Namespace, cfg, config: str, overrides: list[str], run_dir: str, nproc_default: int) -> int:
    from launch.local import check_before_spawning
    from launch.ray_launcher import RayRun, launch_ray

    options = _ray_options(args, nproc_default)
    if args.address is None and args.nodes > 1:
        raise ValueError("--nodes > 1 needs a cluster: pass --address (a local instance is one node)")
    check_before_spawning(cfg, options.world_size, data=args.address is None)  # a cluster's paths may be its own
    return launch_ray(RayRun(config, tuple(overrides), args.resume, run_dir), options)


def _cpus_per_task(args: argparse.Namespace, tasks: int) -> int | None:
    """srun tasks get --cpus-per-worker cores; a Ray node daemon gets the cores of all its workers."""
    if args.ray_on_slurm:
        return max(1, math.ceil(tasks * args.cpus_per_worker))
    return math.ceil(args.cpus_per_worker) if args.cpus_per_worker > 1 else None


def _run_slurm(args: argparse.Namespace, cfg, config: str, overrides: list[str], run_dir: str, nproc_default: int) -> int:
    from launch.local import check_before_spawning
    from launch.slurm import SlurmJob, TrainRequest, parse_env_assignment, render_script, submit

    if args.gpus_per_node and args.workers_per_node and args.workers_per_node != args.gpus_per_node \
            and not args.ray_on_slurm:
        raise ValueError(f"--workers-per-node {args.workers_per_node} != --gpus-per-node {args.gpus_per_node}: "
                         "SLURM runs one task per GPU")
    tasks = args.gpus_per_node or args.workers_per_node or args.nproc or nproc_default
    check_before_spawning(cfg, args.nodes * (args.gpus_per_node or tasks), data=False)  # the nodes' paths may differ
    job = SlurmJob(
        job_name=args.job_name, nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
        cpus_per_task=_cpus_per_task(args, tasks),
        partition=args.partition, account=args.account, time_limit=args.time_limit, qos=args.qos,
        array=args.array, extra_directives=list(args.extra_directives),
        env=dict(parse_env_assignment(e) for e in args.env), source_files=[str(Path(f).absolute()) for f in args.source_files],
        modules=list(args.modules), container_image=args.container_image,
        container_runtime=args.container_runtime, container_mounts=args.container_mounts,
        requeue=args.requeue, signal_lead_s=args.signal_lead_s, ray_on_slurm=args.ray_on_slurm,
        log_dir=str(Path(args.log_dir).absolute()) if args.log_dir else str(Path(run_dir) / "slurm"),
        workdir=os.getcwd(), python=args.python or sys.executable,
    )
    request = TrainRequest(config, tuple(overrides), args.resume, run_dir)
    ray_argv: list[str] = []
    if args.ray_on_slurm:
        ray_argv = ["--nodes", str(args.nodes), "--workers-per-node", str(args.gpus_per_node or tasks),
                    "--gpus-per-worker", "1" if args.gpus_per_node else "0",
                    "--cpus-per-worker", f"{args.cpus_per_worker:g}", "--max-failures", str(args.max_failures)]
    if args.dry_run:
        print(render_script(job, request, ray_argv))
        return 0
    job_id, script = submit(job, request, ray_argv)
    log = f"{job.log_dir}/{job_id}_<index>.out" if job.array else f"{job.log_dir}/{job_id}.out"
    print(f"submitted SLURM job {job_id} ({script}); output: {log}")
    print(f"follow it with: strata jobs | strata logs {job_id}{'_0' if job.array else ''} --follow")
    return 0
