"""Shared fixtures: a tiny real corpus (stdlib files -> BPE -> MDS ShardSets) and tiny configs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# Keep each test process to one intra-op thread: tests run beside each other on 2 cores and
# fixed threading keeps float reductions identical between runs that are compared exactly.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nodes without a shared disk (simulated by some tests) are told apart by a probe file other
# ranks never see; waiting 35 s for a network file system's cache is for real clusters.
os.environ.setdefault("STRATA_SHARED_DISK_WAIT_S", "1")
# Without a GPU, Triton kernels run under the interpreter. The switch must be set before the
# first `import triton` anywhere in the session (fla imports it too), or the interpreted kernels
# meet Triton's compiled standard library.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def small_disk_supported() -> bool:
    """Whether `on_small_disk` works here (unprivileged user + mount namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


REPO = Path(__file__).resolve().parents[1]


def small_disk_command(mount_point: Path, size: str, script: str, *args: str) -> list[str]:
    """The command line of `on_small_disk` (for running several at once: each gets its own disk
    on the same `mount_point`, as nodes without a shared disk do); run it with cwd=REPO."""
    Path(mount_point).mkdir(parents=True, exist_ok=True)
    wrapped = 'mount -t tmpfs -o size="$0" tmpfs "$1" || exit 90\n' + script
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", wrapped, size, str(mount_point), *args]


def on_small_disk(mount_point: Path, size: str, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the shell `script` (cwd: the repository) with a `size` tmpfs (e.g. "3m") mounted on
    `mount_point` (created if missing), in a private user + mount namespace: no root needed, and the disk is gone when
    the script ends (copy out what is to be looked at). The script's $1 is the mount point, then `args`;
    `mount -o remount,size=N "$1"` frees space."""
    return subprocess.run(small_disk_command(mount_point, size, script, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """OUT/{train,val,tokenizer.json}: 40 stdlib files, byte-level BPE of 384 tokens."""
    from data_pipeline.builtin import build_stdlib_corpus

    out = tmp_path_factory.mktemp("tiny_corpus")
    build_stdlib_corpus(out, vocab_size=384, val_fraction=0.1, max_files=40, workers=1, progress=False)
    return out


def tiny_config(corpus: Path, run_dir: Path, **overrides) -> dict:
    """A config tree for a 2-layer dim-64 Llama on `corpus`; `overrides` as {'a.b': value}."""
    tree = {
        "model": {"vocab_size": 384, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {
            "sources": [{"path": str(corpus / "train"), "name": "tiny"}],
            "val_path": str(corpus / "val"),
            "seq_len": 32,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "prefetch": 2,
        },
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {"steps": 6, "run_dir": str(run_dir), "eval_batches": 2, "num_threads": 1},
        "checkpoint": {"every": 3, "keep_last": 5},
        "logging": {"log_every": 1, "tensorboard": True, "progress": False},
    }
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def stepped_model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A two-Linear model and its AdamW after one step (moments filled): checkpoint round trips."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 64, max_seq_len: int = 32) -> torch.nn.Module:
    """A 2-layer dim-32 model of `family`, deterministically initialized, in eval mode."""
    from models.config import ModelConfig
    from models.spec import get_spec

    cfg = ModelConfig(family=family, vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = get_spec(family).build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()
