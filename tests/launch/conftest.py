"""Shared pieces of the launcher tests: a tiny token corpus, a tiny training config, and a
session-scoped real SLURM cluster (tests/launch/slurm_fixture/start.sh) started on demand.

The SLURM fixture installs Debian's slurm-wlm with apt-get when it is missing; it skips only
when that is impossible (not root, no apt-get, or the install fails), saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from launch_helpers import write_token_corpus

FIXTURE_DIR = Path(__file__).resolve().parent / "slurm_fixture"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_token_corpus(tmp_path_factory.mktemp("corpus") / "tokens")


# -- a real SLURM cluster ----------------------------------------------------------------------

def _slurm_unavailable_reason() -> str | None:
    """None when the daemons and clients are installed (installing them if we can)."""
    needed = ("slurmctld", "slurmd", "sbatch", "munged")
    if all(shutil.which(tool) or Path("/usr/sbin", tool).exists() for tool in needed):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and the tests are not running as root, so apt-get cannot install it"
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install Debian's slurm-wlm"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            return f"`{' '.join(argv)}` failed: {(result.stderr or result.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster on 127.0.0.1; yields the environment clients need."""
    reason = _slurm_unavailable_reason()
    if reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster: starting slurmctld/slurmd/munged needs root")
    # One fixed place: a crashed session's daemons are found (by PID file) and stopped on the next start.
    base = Path(os.environ.get("STRATA_SLURM_BASE", "/tmp/strata-test-slurm"))
    env = {**os.environ, "STRATA_SLURM_BASE": str(base)}
    started = subprocess.run([str(FIXTURE_DIR / "start.sh")], capture_output=True, text=True, env=env, timeout=300)
    if started.returncode != 0:
        pytest.fail(f"the SLURM fixture failed to start:\n{started.stdout}\n{started.stderr}")
    conf = base / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield {"SLURM_CONF": str(conf), "STRATA_SLURM_BASE": str(base)}
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        subprocess.run([str(FIXTURE_DIR / "stop.sh")], capture_output=True, text=True, env=env, timeout=120)
