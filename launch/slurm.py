"""SLURM launcher: render an sbatch script, submit it, follow it, requeue it on preemption.

Owns: `SlurmJob` (what to ask SLURM for) -> `render_script` (one `srun` task per GPU/worker
running `strata train` with rendezvous from SLURM variables, or a Ray head + workers on the
allocation), submission through `sbatch`, the job registry behind `strata jobs` / `strata logs`,
and `python -m launch.slurm task` (the per-task wrapper). Not the trainer, not Ray itself.

Quoting rules: every user value that reaches shell code goes through shlex.quote; `#SBATCH`
directive values are not shell-parsed, so they are checked against a safe character set instead
(the job name, a free-form label, is written double-quoted, which sbatch's own parser honours).
No environment values are copied into the script: sbatch passes the submitting environment on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.signals import REQUEUE_EXIT_CODE

# Directive values: no whitespace, quotes, backslashes, `$`, `;`, newlines.
_SAFE_DIRECTIVE = re.compile(r"[A-Za-z0-9_.,:=/@%+\-\[\]|*]+", re.ASCII)
# Job names: printable ASCII except the characters that end a double-quoted sbatch argument.
_SAFE_JOB_NAME = re.compile(r"[ -!#-\[\]-~]{1,200}", re.ASCII)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?", re.ASCII)

CONTAINER_RUNTIMES = ("pyxis", "apptainer")
STRAGGLER_GRACE_S = 120  # srun --wait: seconds the other tasks get once the first one exited
ARRAY_PLACEHOLDER = "{array_task_id}"


class SlurmError(ValueError):
    """A job description that cannot be rendered safely, or a SLURM command that failed."""


def check_directive_value(field_name: str, value: str) -> str:
    """`value` if it can be written after `#SBATCH --x=` unchanged, else a clear SlurmError."""
    if not isinstance(value, str) or not _SAFE_DIRECTIVE.fullmatch(value):
        raise SlurmError(
            f"{field_name}: {value!r} cannot go into an #SBATCH directive; allowed characters are "
            "letters, digits and _ . , : = / @ % + - [ ] | * (no spaces, quotes, $ or ;)"
        )
    return value


def check_job_name(name: str) -> str:
    if not _SAFE_JOB_NAME.fullmatch(name or ""):
        raise SlurmError(
            f"job name: {name!r} must be 1-200 printable ASCII characters without double quotes or backslashes"
        )
    return name


def parse_env_assignment(text: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (KEY, VALUE); refuses names that look like secrets."""
    key, sep, value = text.partition("=")
    if not sep or not _ENV_KEY.fullmatch(key):
        raise SlurmError(f"--env {text!r}: expected NAME=VALUE with NAME a shell variable name")
    if _SECRET_KEY.search(key):
        raise SlurmError(
            f"--env {key}=...: secrets are never written into job scripts; export {key} in the "
            "submitting shell instead (sbatch passes the submitting environment to the job)"
        )
    return key, value


def check_extra_directive(text: str) -> str:
    """An extra `#SBATCH` argument such as '--mem=64G' or '--exclusive'."""
    if not text.startswith("-"):
        raise SlurmError(f"--sbatch {text!r}: expected an sbatch option such as --mem=64G")
    return check_directive_value("--sbatch", text)


@dataclass
class SlurmJob:
    """What the job asks SLURM for and how its tasks start."""

    job_name: str = "strata"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    qos: str | None = None
    array: str | None = None
    extra_directives: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    source_files: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    container_image: str | None = None
    container_runtime: str = "pyxis"
    container_mounts: str | None = None
    requeue: bool = False
    signal_lead_s: int = 120
    ray_on_slurm: bool = False
    ray_port: int = 6379
    log_dir: str = "slurm_logs"
    workdir: str = "."
    python: str = sys.executable

    def validate(self) -> SlurmJob:
        check_job_name(self.job_name)
        for name, value in (("nodes", self.nodes), ("tasks_per_node", self.tasks_per_node)):
            if value < 1:
                raise SlurmError(f"{name} must be at least 1, got {value}")
        if self.gpus_per_node < 0:
            raise SlurmError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmError(f"cpus_per_task must be at least 1, got {self.cpus_per_task}")
        if self.signal_lead_s < 1:
            raise SlurmError(f"signal lead time must be a positive number of seconds, got {self.signal_lead_s}")
        for name in ("partition", "account", "time_limit", "qos", "array"):
            value = getattr(self, name)
            if value is not None:
                check_directive_value(f"--{name.replace('_limit', '')}", value)
        for extra in self.extra_directives:
            check_extra_directive(extra)
        for key in self.env:
            parse_env_assignment(f"{key}=")
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise SlurmError(f"container runtime must be one of {CONTAINER_RUNTIMES}, got {self.container_runtime!r}")
        check_directive_value("--log-dir", self.log_dir)
        if not Path(self.log_dir).is_absolute():
            raise SlurmError(f"--log-dir must be absolute when rendered, got {self.log_dir!r}")
        return self

    @property
    def output_pattern(self) -> str:
        """sbatch --output value: one file per job (per array element)."""
        return f"{self.log_dir}/%A_%a.out" if self.array else f"{self.log_dir}/%j.out"


@dataclass(frozen=True)
class TrainRequest:
    """The `strata train` invocation every task runs, plus the run directory it writes."""

    config: str
    overrides: tuple[str, ...] = ()
    resume: str | None = None
    run_dir: str = "runs/default"

    def train_argv(self) -> list[str]:
        argv = ["train", self.config]
        for override in self.overrides:
            argv += ["--set", override]
        if self.resume:
            argv += ["--resume", self.resume]
        return argv


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _directives(job: SlurmJob) -> list[str]:
    lines = [f'#SBATCH --job-name="{job.job_name}"', f"#SBATCH --nodes={job.nodes}"]
    if job.ray_on_slurm:
        lines.append("#SBATCH --ntasks-per-node=1")
        if job.cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    else:
        lines.append(f"#SBATCH --ntasks-per-node={job.tasks_per_node}")
        if job.cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    for flag, value in (("partition", job.partition), ("account", job.account), ("time", job.time_limit),
                        ("qos", job.qos), ("array", job.array)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines.append(f"#SBATCH --output={job.output_pattern}")
    lines.append("#SBATCH --open-mode=append")
    if job.requeue:
        lines.append("#SBATCH --requeue")
        lines.append(f"#SBATCH --signal=B:USR1@{job.signal_lead_s}")
    lines += [f"#SBATCH {extra}" for extra in job.extra_directives]
    return lines


def _environment_block(job: SlurmJob) -> list[str]:
    lines = [f"cd {_q(job.workdir)}"]
    lines += [f"module load {_q(module)}" for module in job.modules]
    lines += [f"source {_q(path)}" for path in job.source_files]
    lines += [f"export {key}={_q(value)}" for key, value in job.env.items()]
    lines.append("export PYTHONUNBUFFERED=1")
    return lines


def _container_prefix(job: SlurmJob) -> list[str]:
    """Words put before the task command (srun options for pyxis, a wrapper for apptainer)."""
    if not job.container_image:
        return []
    mounts = job.container_mounts or f"{job.workdir}:{job.workdir}"
    if job.container_runtime == "pyxis":
        return [f"--container-image={job.container_image}", f"--container-mounts={mounts}",
                f"--container-workdir={job.workdir}"]
    binds = ["--bind", mounts, "--pwd", job.workdir]
    return ["apptainer", "exec", *(["--nv"] if job.gpus_per_node else []), *binds, job.container_image]


def _task_command(job: SlurmJob, request: TrainRequest) -> str:
    python = job.python if not job.container_image else "python"
    task = [python, "-m", "launch.slurm", "task", "--run-dir", request.run_dir, "--", *request.train_argv()]
    prefix = _container_prefix(job)
    # --wait instead of --kill-on-bad-exit: ranks leaving with REQUEUE_EXIT_CODE one after the
    # other must not be killed mid-cleanup, but a crashed rank's peers are stopped after a grace.
    srun_opts = [f"--wait={STRAGGLER_GRACE_S}", "--label"]
    if job.container_image and job.container_runtime == "pyxis":
        srun_opts += prefix
        prefix = []
    return " ".join(["srun", *map(_q, srun_opts), *map(_q, prefix), *map(_q, task)])


def _ray_driver_command(job: SlurmJob, request: TrainRequest, ray_argv: Sequence[str]) -> str:
    python = job.python if not job.container_image else "python"
    argv = [python, "-m", "launch.cli", "submit", *request.train_argv()[1:2], "--launcher", "ray",
            "--run-dir", request.run_dir, *ray_argv]
    for override in request.overrides:
        argv += ["--set", override]
    if request.resume:
        argv += ["--resume", request.resume]
    return " ".join(_q(a) for a in argv) + ' --address "$RAY_ADDRESS" "${resume_args[@]}"'


_SUPERVISE = """\
# The batch shell forwards preemption signals to the job step and requeues when the trainer
# checkpointed and exited with REQUEUE_EXIT_CODE.
REQUEUE_EXIT_CODE={code}
child=""
forward() {{
  echo "strata: batch script received SIG$1; asking the trainer to checkpoint and exit"
  if [ -n "$child" ]; then kill -"$1" "$child" 2>/dev/null || true; fi
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"""

_WAIT_AND_REQUEUE = """\
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
status=$?
echo "strata: job step finished with status $status"
if [ "$status" -eq "$REQUEUE_EXIT_CODE" ]; then
{requeue}
fi
exit "$status"
"""


def render_script(job: SlurmJob, request: TrainRequest, ray_argv: Sequence[str] = ()) -> str:
    """The whole sbatch script as text (what `--dry-run` prints)."""
    job.validate()
    out = ["#!/bin/bash", *_directives(job), "",
           "# Rendered by `strata submit --launcher slurm`. Secrets are not written here: sbatch",
           "# passes the submitting environment to the job.",
           "set -uo pipefail", f"STRATA_JOB_NAME={_q(job.job_name)}", *_environment_block(job), ""]
    out.append(_SUPERVISE.format(code=REQUEUE_EXIT_CODE))
    out.append('echo "strata: job $SLURM_JOB_ID ($STRATA_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"')
    if job.ray_on_slurm:
        out += _ray_block(job, request, ray_argv)
    else:
        out += [
            "# Rendezvous: the first node of the allocation hosts the TCP store; the port depends on",
            "# the job id and restart count so a requeued job never meets its predecessor's socket.",
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0} * 131) % 20000 ))",
            "export MASTER_ADDR MASTER_PORT",
            f"{_task_command(job, request)} &",
        ]
    if job.requeue:
        requeue = ('  echo "strata: requeueing job $SLURM_JOB_ID; it resumes from its latest checkpoint"\n'
                   '  scontrol requeue "$SLURM_JOB_ID"\n  exit 0')
    else:
        requeue = '  echo "strata: the trainer checkpointed for a requeue, but the job was not submitted with --requeue"'
    out.append(_WAIT_AND_REQUEUE.format(requeue=requeue))
    return "\n".join(out)


def _ray_block(job: SlurmJob, request: TrainRequest, ray_argv: Sequence[str]) -> list[str]:
    python = job.python if not job.container_image else "python"
    ray = f"{_q(python)} -m ray.scripts.scripts"
    cpus = '"${SLURM_CPUS_PER_TASK:-$(nproc)}"'
    resources = f"--num-cpus={cpus} --num-gpus={job.gpus_per_node}"
    container = " ".join(_q(w) for w in _container_prefix(job))
    pyxis = job.container_image and job.container_runtime == "pyxis"
    srun_node = "srun --nodes=1 --ntasks=1 --overlap" + (f" {container}" if pyxis else "")
    wrap = "" if (pyxis or not job.container_image) else f"{container} "
    return [
        "# Ray on the allocation: head on the first node, one worker daemon per other node, then the",
        "# driver (`strata submit --launcher ray --address HEAD`) on this batch node.",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'head_node=${nodes[0]}',
        'head_ip=$(srun --nodes=1 --ntasks=1 --overlap -w "$head_node" hostname --ip-address | awk \'{print $1}\')',
        f"RAY_ADDRESS=\"$head_ip:{job.ray_port}\"",
        "# Ray's token authentication: every daemon and the driver read the token from",
        "# ~/.ray/auth_token (created by the head when missing; a shared home makes it cluster-wide)",
        "# or from RAY_AUTH_TOKEN exported in the submitting shell (never written here).",
        "export RAY_ADDRESS RAY_AUTH_MODE=token",
        f'{srun_node} -w "$head_node" {wrap}{ray} start --head --block --node-ip-address="$head_ip" '
        f'--port={job.ray_port} --include-dashboard=false {resources} &',
        "ray_pids=($!)",
        f'for _ in $(seq 120); do {wrap}{ray} status --address="$RAY_ADDRESS" >/dev/null 2>&1 && break; sleep 1; done',
        'for node in "${nodes[@]:1}"; do',
        f'  {srun_node} -w "$node" {wrap}{ray} start --block --address="$RAY_ADDRESS" {resources} &',
        "  ray_pids+=($!)",
        "done",
        "stop_ray() { kill \"${ray_pids[@]}\" 2>/dev/null || true; }",
        "trap stop_ray EXIT",
        "# a requeued job resumes the run directory's latest checkpoint",
        "resume_args=()",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume_args=(--resume ' + _q(request.run_dir) + '); fi',
        f"{wrap}{_ray_driver_command(job, request, ray_argv)} &",
    ]


# -- submission and the job registry -------------------------------------------------------

def strata_home() -> Path:
    """Where Strata keeps per-user state (the SLURM job registry): $STRATA_HOME or ~/.strata."""
    return Path(os.environ.get("STRATA_HOME") or Path.home() / ".strata")


def registry_path() -> Path:
    return strata_home() / "slurm_jobs.jsonl"


@dataclass
class JobRecord:
    job_id: str
    job_name: str
    script: str
    log_dir: str
    array: bool
    run_dir: str
    submitted_at: float


def read_registry() -> list[JobRecord]:
    path = registry_path()
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(JobRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a torn or foreign line: skip it, keep the rest
    return records


def _append_registry(record: JobRecord) -> None:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.is_file() else ""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(previous + json.dumps(asdict(record)) + "\n")
    os.replace(tmp, path)


def _run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"`{argv[0]}` not found: is this a SLURM login node (slurm-client installed)?")
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def write_script(job: SlurmJob, text: str) -> Path:
    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = log_dir / f"strata-{stamp}-{os.getpid()}.sbatch"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def submit(job: SlurmJob, request: TrainRequest, ray_argv: Sequence[str] = ()) -> tuple[str, Path]:
    """Renders, writes and submits the script; returns (job id, script path)."""
    text = render_script(job, request, ray_argv)
    script = write_script(job, text)
    result = _run(["sbatch", "--parsable", str(script)])
    if result.returncode != 0:
        raise SlurmError(f"sbatch failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    _append_registry(JobRecord(job_id, job.job_name, str(script), job.log_dir, bool(job.array),
                               request.run_dir, time.time()))
    return job_id, script


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"job id {job_id!r}: expected digits, or ARRAYJOB_TASK for an array element")
    return job_id


def scontrol_job(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o` records (one per array element), empty when SLURM forgot the job."""
    result = _run(["scontrol", "show", "job", "-o", check_job_id(job_id)])
    if result.returncode != 0:
        return []
    records = []
    for line in result.stdout.splitlines():
        record: dict[str, str] = {}
        for token in re.finditer(r"(\w+)=(\S*)", line):
            record.setdefault(token.group(1), token.group(2))
        if record:
            records.append(record)
    return records


def job_states(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """Job id -> {state, elapsed, exit, reason, name} from scontrol, else sacct when it works."""
    states: dict[str, dict[str, str]] = {}
    for job_id in job_ids:
        for rec in scontrol_job(job_id):
            key = f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}" if rec.get("ArrayTaskId") else rec.get("JobId", job_id)
            states[key] = {"state": rec.get("JobState", "?"), "elapsed": rec.get("RunTime", ""),
                           "exit": rec.get("ExitCode", ""), "reason": rec.get("Reason", ""),
                           "restarts": rec.get("Restarts", "0"), "log": rec.get("StdOut", "")}
    missing = [j for j in job_ids if not any(k == j or k.startswith(f"{j}_") for k in states)]
    if missing and shutil.which("sacct"):
        result = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Elapsed,ExitCode", "-j", ",".join(missing)])
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 4:
                    states[parts[0]] = {"state": parts[1], "elapsed": parts[2], "exit": parts[3],
                                        "reason": "", "restarts": "", "log": ""}
    return states


def find_log(job_id: str) -> Path | None:
    """The output file of a job (or of an array element ARRAYJOB_INDEX): from SLURM while it
    remembers the job, else from the registry."""
    check_job_id(job_id)
    for rec in scontrol_job(job_id):
        element = f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}" if rec.get("ArrayTaskId") else None
        if rec.get("StdOut") and element in (None, job_id):
            return Path(rec["StdOut"])
    base = job_id.split("_")[0]
    for record in reversed(read_registry()):
        if record.job_id == base:
            if record.array and "_" not in job_id:
                raise SlurmError(f"job {job_id} is an array: name one element, e.g. {job_id}_0")
            return Path(record.log_dir) / f"{job_id}.out"
    return None


# -- inside the job: one srun task -----------------------------------------------------------

def torch_environment_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE for one srun task (MASTER_* come from
    the batch script)."""
    try:
        env = {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"],
        }
    except KeyError as missing:
        raise SlurmError(f"`launch.slurm task` runs under srun; {missing.args[0]} is not set") from None
    tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if tasks_per_node.isdigit():
        env["LOCAL_WORLD_SIZE"] = tasks_per_node
    return env


def task_argv(run_dir: str, train_argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The `strata` argv of one task: array elements get their own run directory (and
    `{array_task_id}` in --set values is replaced); a requeued job resumes its run directory."""
    argv = list(train_argv)
    array_task = environ.get("SLURM_ARRAY_TASK_ID")
    if array_task is not None:
        argv = [a.replace(ARRAY_PLACEHOLDER, array_task) for a in argv]
        run_dir = str(Path(run_dir) / f"array_{array_task}")
        argv += ["--set", f"train.run_dir={run_dir}"]
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts > 0 and "--resume" not in argv:
        argv += ["--resume", run_dir]
    return argv


def _task_main(argv: Sequence[str]) -> int:
    """argv: --run-dir DIR -- STRATA_ARGV..."""
    if len(argv) < 3 or argv[0] != "--run-dir" or argv[2] != "--":
        print("usage: python -m launch.slurm task --run-dir DIR -- train CONFIG ...", file=sys.stderr)
        return 2
    run_dir, strata_argv = argv[1], list(argv[3:])
    os.environ.update(torch_environment_from_slurm(os.environ))
    from launch.cli import main as strata_main

    return strata_main(task_argv(run_dir, strata_argv, os.environ))


if __name__ == "__main__":
    from launch.process_exit import run_and_exit

    run_and_exit(lambda: _task_main(sys.argv[2:]) if sys.argv[1:2] == ["task"] else _task_main([]))
