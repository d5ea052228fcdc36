"""Helpers of the launcher tests: a tiny token corpus, a tiny training config, running `strata`.

(A uniquely named module, not conftest.py: test files and subprocesses import it by name.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DIR = Path(__file__).resolve().parent / "slurm_fixture"
VOCAB = 256
EOS_ID = 0


def write_token_corpus(out_dir: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """A synthetic MDS ShardSet: random tokens (ids 1..VOCAB-1) + EOS, lengths 8..80."""
    from data_pipeline.formats.writer import ShardSetWriter
    from data_pipeline.manifest import MANIFEST_NAME, write_json_atomic
    from data_pipeline.prepare import build_manifest

    rng = np.random.default_rng(seed)
    writer = ShardSetWriter(out_dir, "mds", np.dtype(np.uint16), shard_size_bytes=1 << 20, compression=None,
                            fingerprint={"tests/launch": n_docs, "seed": seed}, snapshot=lambda: {})
    for length in rng.integers(8, 80, size=n_docs):
        doc = rng.integers(1, VOCAB, size=int(length), dtype=np.uint16)
        doc[-1] = EOS_ID
        writer.add(doc)
    written = writer.finish()
    manifest = build_manifest(
        format_name="mds", dtype=np.dtype(np.uint16), eos_token="<eos>", eos_id=EOS_ID,
        tokenizer_info={"synthetic": True, "vocab_size": VOCAB},
        counts={"documents": len(written), "tokens": int(written.sum())}, lengths=written,
        shards=writer.shards, options={}, provenance={"method": "tests/launch", "parent": None},
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    writer.mark_complete()
    return out_dir


def tiny_config(corpus: Path, run_dir: Path, steps: int = 6, checkpoint_every: int = 0, **sections) -> dict:
    """A 2-layer dim-64 Llama on `corpus`: seconds per run on CPU."""
    config = {
        "model": {"family": "llama", "vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4,
                  "max_seq_len": 64},
        "data": {"sources": [{"path": str(corpus)}], "seq_len": 32, "global_batch_size": 8,
                 "micro_batch_size": 2, "prefetch": 0},
        "optim": {"lr": 3e-3},
        "train": {"steps": steps, "device": "cpu", "run_dir": str(run_dir), "num_threads": 1, "deterministic": True},
        "checkpoint": {"every": checkpoint_every, "keep_last": 3},
        "logging": {"log_every": 1, "tensorboard": False, "progress": True},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def strata(*argv: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None,
           check: bool = False) -> subprocess.CompletedProcess:
    """Runs `strata ARGV` in a fresh interpreter (as a user would) and captures its output."""
    result = subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd or REPO, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"strata {' '.join(argv)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_losses(run_dir: Path) -> list[float]:
    from engine.report import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl").records if "loss" in r]
