"""The sbatch script: directives from the options, every user value shell-quoted or refused,
no secrets, a syntactically valid script for each mode (no cluster needed)."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from launch_helpers import tiny_config, write_config

from launch.cli import build_parser
from launch.cli import main as strata_main
from launch.slurm import (
    SlurmError,
    SlurmJob,
    TrainRequest,
    render_script,
    task_argv,
    torch_environment_from_slurm,
)

HOSTILE = "x$(touch /tmp/strata-pwned) `id`; rm -rf ~ 'q' \"dq\""


def _job(tmp_path, **kw) -> SlurmJob:
    return SlurmJob(log_dir=str(tmp_path / "logs"), workdir=str(tmp_path), **kw)


def _request(**kw) -> TrainRequest:
    return TrainRequest(config="/cfg/tiny.yaml", run_dir="/runs/a", **kw)


def _bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_directives_follow_the_options(tmp_path):
    job = _job(tmp_path, job_name="pretrain-1b", nodes=4, tasks_per_node=8, gpus_per_node=8, cpus_per_task=12,
               partition="gpu", account="proj_42", time_limit="2-00:00:00", qos="high",
               extra_directives=["--mem=0", "--exclusive", "--constraint=h100|h200"], requeue=True, signal_lead_s=90)
    script = render_script(job, _request())
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        '#SBATCH --job-name="pretrain-1b"', "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --cpus-per-task=12", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj_42", "#SBATCH --time=2-00:00:00", "#SBATCH --qos=high",
        f"#SBATCH --output={tmp_path}/logs/%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@90", "#SBATCH --mem=0", "#SBATCH --exclusive", "#SBATCH --constraint=h100|h200",
    ]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "srun --wait=120 --label" in script and "-m launch.slurm task --run-dir /runs/a -- train /cfg/tiny.yaml" in script
    _bash_syntax_ok(script)


def test_every_user_value_in_shell_code_is_quoted(tmp_path):
    job = _job(tmp_path, job_name=HOSTILE.replace('"', "").replace("\\", ""), env={"EVIL": HOSTILE},
               source_files=[f"/opt/{HOSTILE}"], modules=[HOSTILE])
    request = TrainRequest(config=f"/cfg/{HOSTILE}.yaml", overrides=(f"train.seed={HOSTILE}",), resume=None,
                           run_dir=f"/runs/{HOSTILE}")
    script = render_script(job, request)
    _bash_syntax_ok(script)
    body = [line for line in script.splitlines() if not line.startswith("#")]
    for line in body:
        if "touch /tmp/strata-pwned" in line:
            words = shlex.split(line)  # quoted: the payload survives as (part of) one word
            assert any("$(touch /tmp/strata-pwned)" in w for w in words), line
    assert f"export EVIL={shlex.quote(HOSTILE)}" in script
    assert f"module load {shlex.quote(HOSTILE)}" in script


@pytest.mark.parametrize(
    ("field", "value"),
    [("partition", "gpu; rm -rf /"), ("account", "a b"), ("time_limit", "1:00\n#SBATCH --uid=0"),
     ("qos", "$(id)"), ("array", "0-3 --wrap=x")],
)
def test_unsafe_directive_values_are_refused_with_the_field_named(tmp_path, field, value):
    with pytest.raises(SlurmError, match=f"--{field.replace('_limit', '')}"):
        render_script(_job(tmp_path, **{field: value}), _request())


def test_unsafe_extra_directives_log_dir_and_job_names_are_refused(tmp_path):
    with pytest.raises(SlurmError, match="--sbatch"):
        render_script(_job(tmp_path, extra_directives=["--mem=1G\n#SBATCH --x"]), _request())
    with pytest.raises(SlurmError, match="--sbatch"):
        render_script(_job(tmp_path, extra_directives=["mem=1G"]), _request())
    with pytest.raises(SlurmError, match="--log-dir"):
        render_script(SlurmJob(log_dir=str(tmp_path / "with space"), workdir="/w"), _request())
    with pytest.raises(SlurmError, match="job name"):
        render_script(_job(tmp_path, job_name='a"b'), _request())
    with pytest.raises(SlurmError, match="job name"):
        render_script(_job(tmp_path, job_name="line\nbreak"), _request())


def test_no_secrets_in_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-456")
    script = render_script(_job(tmp_path, env={"NCCL_DEBUG": "WARN"}), _request())
    assert "hf_supersecret123" not in script and "wandb-secret-456" not in script
    with pytest.raises(SlurmError, match="secrets are never written"):
        render_script(_job(tmp_path, env={"HF_TOKEN": "x"}), _request())


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_container_modes_render_valid_scripts(tmp_path, runtime):
    job = _job(tmp_path, gpus_per_node=8, tasks_per_node=8, container_image="nvcr.io/strata:latest",
               container_runtime=runtime)
    script = render_script(job, _request())
    _bash_syntax_ok(script)
    if runtime == "pyxis":
        assert "--container-image=nvcr.io/strata:latest" in script
    else:
        assert "apptainer exec --nv --bind" in script
    assert " python -m launch.slurm task" in script  # the image's interpreter, not this one


def test_ray_on_slurm_renders_head_workers_and_driver(tmp_path):
    job = _job(tmp_path, nodes=2, gpus_per_node=4, ray_on_slurm=True, cpus_per_task=32, requeue=True)
    script = render_script(job, _request(), ray_argv=["--nodes", "2", "--workers-per-node", "4"])
    _bash_syntax_ok(script)
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "ray.scripts.scripts start --head --block" in script and "--include-dashboard=false" in script
    assert "--launcher ray" in script and '--address "$RAY_ADDRESS"' in script
    assert "--workers-per-node 4" in script
    assert "resume_args=(--resume /runs/a)" in script and '"${resume_args[@]}"' in script  # requeue resumes


def test_array_elements_get_their_own_run_dir_and_index():
    argv = task_argv("/runs/sweep", ["train", "c.yaml", "--set", "train.seed={array_task_id}"],
                     {"SLURM_ARRAY_TASK_ID": "3"})
    assert argv == ["train", "c.yaml", "--set", "train.seed=3", "--set", "train.run_dir=/runs/sweep/array_3"]


def test_requeued_task_resumes_its_run_dir():
    assert task_argv("/runs/a", ["train", "c.yaml"], {"SLURM_RESTART_COUNT": "0"}) == ["train", "c.yaml"]
    assert task_argv("/runs/a", ["train", "c.yaml"], {"SLURM_RESTART_COUNT": "2"}) == \
        ["train", "c.yaml", "--resume", "/runs/a"]


def test_torch_environment_from_slurm_variables():
    env = torch_environment_from_slurm({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                        "SLURM_NTASKS_PER_NODE": "4(x2)"})
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    with pytest.raises(SlurmError, match="SLURM_PROCID"):
        torch_environment_from_slurm({})


def test_submit_dry_run_prints_the_script(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STRATA_HOME", str(tmp_path / "home"))
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, tmp_path / "run"))
    status = strata_main(["submit", str(config), "--launcher", "slurm", "--dry-run", "--workers-per-node", "2",
                          "--job-name", "dry", "--partition", "debug", "--time", "00:10:00", "--requeue"])
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith('#!/bin/bash\n#SBATCH --job-name="dry"')
    assert f"#SBATCH --output={tmp_path}/run/slurm/%j.out" in out
    assert not (tmp_path / "home").exists()  # nothing submitted, nothing recorded
    _bash_syntax_ok(out)
    assert strata_main(["submit", str(config), "--launcher", "slurm", "--dry-run", "--partition", "a;b"]) == 2
    assert "--partition" in capsys.readouterr().err
    # the config is judged with the --set values: a schedule that only fits the overridden steps is fine
    long_warmup = write_config(tmp_path / "warm.yaml", tiny_config(corpus, tmp_path / "run", schedule={"warmup_steps": 20}))
    argv = ["submit", str(long_warmup), "--dry-run", "--set", "train.steps=40", "--set", "launch.launcher=slurm"]
    assert strata_main(argv) == 0 and capsys.readouterr().out.startswith("#!/bin/bash")


def test_submit_help_documents_every_flag(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["submit", "--help"])
    out = capsys.readouterr().out
    submit = parser._subparsers._group_actions[0].choices["submit"]
    for action in submit._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, f"{action.option_strings or action.dest} has no help text"
