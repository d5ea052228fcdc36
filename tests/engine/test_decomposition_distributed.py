"""The decomposition curriculum under real data parallelism: FSDP2 on two gloo processes trains
the same variable-length steps to the same losses as one process."""

from __future__ import annotations

import json
import shutil

from distributed_runs import assert_close, losses, run_ranks, run_tree

from launch.cli import main

STEPS = 6


def test_two_process_fsdp_curriculum_matches_one_process(tiny_corpus, tmp_path):
    parent = tmp_path / "train"
    shutil.copytree(tiny_corpus / "train", parent)
    index = tmp_path / "decomposed"
    assert (
        main(["decompose", str(parent), "--out", str(index), "--min-log2", "3", "--max-log2", "6"])
        == 0
    )
    decomposition = {
        "path": str(index),
        "tokens_per_step": 256,
        "micro_batch_tokens": 64,
        "cycles": 2,
    }
    runs = {}
    for nproc, parallel in ((1, {}), (2, {"parallel.dp_shard": 2})):
        run_dir = tmp_path / f"p{nproc}"
        tree = run_tree(
            tiny_corpus, run_dir, steps=STEPS, **parallel,
            **{"data.sources": [], "data.decomposition": decomposition, "train.eval_batches": 1},
        )  # fmt: skip
        runs[nproc] = run_ranks(nproc, run_dir, tree)
    assert_close(losses(runs[2]), losses(runs[1]), range(1, STEPS + 1))
    records = [json.loads(x) for x in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert len({r["seq_len"] for r in records if "seq_len" in r}) > 1  # the length did change
