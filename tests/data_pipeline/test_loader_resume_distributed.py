"""Acceptance: the global sample sequence survives a resume at another world size (gloo).

(a) 1 process runs N steps; (b) 1 process runs k < N, saves the loader state to a file, and 2
processes resume to N; (c) 2 processes run k, save, and 1 process resumes to N. Two mixed
sources, both crossing an epoch boundary before N. The global sample ids per step and the
tokens must be identical in all three, with nothing repeated or skipped. Run as a script, this
file is one gloo worker (launched by the test in subprocesses).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.loader import build_train_loader

REPO_ROOT = Path(__file__).resolve().parents[2]
N_STEPS, K_STEPS = 14, 5
SOURCES = [(30, 11, 1), (12, 12, 1_000_000)]  # (n_docs, seed, token_base) per fake source


def _config() -> DataConfig:
    return DataConfig(
        sources=[
            SourceConfig(path="/data/web", weight=2.0),
            SourceConfig(path="/data/code", weight=1.0),
        ],
        seq_len=16,
        global_batch_size=8,
        micro_batch_size=2,
        seed=21,
        prefetch=2,
    )


def _shardsets(make_shardset) -> list:
    return [make_shardset(n, seed=s, token_base=b) for n, s, b in SOURCES]


def _digest(batches: list[dict]) -> str:
    """Hash of this rank's tokens for one step."""
    h = hashlib.sha256()
    for micro in batches:
        for key in ("input_ids", "labels", "position_ids"):
            h.update(micro[key].numpy().tobytes())
    return h.hexdigest()


def _run_steps(loader, steps: int) -> list[tuple[list, list[str]]]:
    """Per step: this rank's sample ids and the digests of its rows' tokens."""
    out = []
    for _ in range(steps):
        batches = loader.next_step()
        row_digests = [
            _digest([{k: v[i : i + 1] for k, v in m.items()}])
            for m in batches
            for i in range(len(m["input_ids"]))
        ]
        out.append(([tuple(s) for s in loader.last_sample_ids], row_digests))
    return out


def _worker(args: argparse.Namespace) -> None:
    """One rank: optionally load a state file, run steps, gather the global record on rank 0."""
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_shardset  # this directory's fakes (run as a script)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world_size,
    )
    loader = build_train_loader(_config(), args.rank, args.world_size, _shardsets(make_shardset))
    if args.state_in:
        loader.load_state_dict(torch.load(args.state_in, weights_only=True))
    local = _run_steps(loader, args.steps)
    state = loader.state_dict()
    loader.close()
    gathered_records = [None] * args.world_size
    gathered_states = [None] * args.world_size
    dist.all_gather_object(gathered_records, local)
    dist.all_gather_object(gathered_states, state)
    if args.rank == 0:
        assert all(s == state for s in gathered_states), "ranks disagree on the loader state"
        merged = [
            (
                [sid for rank_record in gathered_records for sid in rank_record[step][0]],
                [d for rank_record in gathered_records for d in rank_record[step][1]],
            )
            for step in range(args.steps)
        ]
        torch.save({"steps": merged, "state": state}, args.record_out)
        if args.state_out:
            torch.save(state, args.state_out)
    dist.destroy_process_group()


def _launch(
    world_size: int,
    steps: int,
    record_out: Path,
    state_in: Path | None = None,
    state_out: Path | None = None,
) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world_size):
        cmd = [
            sys.executable,
            __file__,
            "--rank",
            str(rank),
            "--world-size",
            str(world_size),
            "--port",
            str(port),
        ]
        cmd += ["--steps", str(steps), "--record-out", str(record_out)]
        if state_in:
            cmd += ["--state-in", str(state_in)]
        if state_out:
            cmd += ["--state-out", str(state_out)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        outputs.append(out.decode(errors="replace"))
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"
    return torch.load(record_out, weights_only=True)


def _in_process(random_shardset, steps: int, state: dict | None = None) -> dict:
    loader = build_train_loader(_config(), 0, 1, _shardsets(random_shardset))
    if state is not None:
        loader.load_state_dict(state)
    record = {"steps": _run_steps(loader, steps), "state": loader.state_dict()}
    loader.close()
    return record


def test_global_sample_sequence_is_independent_of_world_size_across_resumes(
    tmp_path, random_shardset
):
    reference = _in_process(random_shardset, N_STEPS)  # (a)
    ref_steps = reference["steps"]
    seq_len = _config().seq_len

    # nothing repeated or skipped, and both sources crossed an epoch boundary
    for k, name in enumerate(("web", "code")):
        offsets = [sid[1] for ids, _ in ref_steps for sid in ids if sid[0] == k]
        assert offsets == list(range(0, len(offsets) * seq_len, seq_len))
        assert reference["state"]["sources"][name]["epoch"] >= 1, f"{name} never finished an epoch"

    # (b) 1 process for k steps, checkpoint the loader state, 2 processes resume to N
    first = _in_process(random_shardset, K_STEPS)
    state_file = tmp_path / "loader_state_1proc.pt"
    torch.save(first["state"], state_file)
    resumed = _launch(2, N_STEPS - K_STEPS, tmp_path / "b.pt", state_in=state_file)
    assert first["steps"] + resumed["steps"] == ref_steps
    assert resumed["state"] == reference["state"]

    # (c) 2 processes for k steps, checkpoint, 1 process resumes to N
    state_file_2 = tmp_path / "loader_state_2proc.pt"
    first_2 = _launch(2, K_STEPS, tmp_path / "c.pt", state_out=state_file_2)
    rest = _in_process(
        random_shardset, N_STEPS - K_STEPS, torch.load(state_file_2, weights_only=True)
    )
    assert first_2["steps"] + rest["steps"] == ref_steps
    assert rest["state"] == reference["state"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--record-out", required=True)
    parser.add_argument("--state-in")
    parser.add_argument("--state-out")
    from launch.process_exit import run_and_exit

    arguments = parser.parse_args()
    run_and_exit(lambda: _worker(arguments), as_rank=True)
