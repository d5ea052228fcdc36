"""Parity on CPU (gloo): 10 steps of a tiny Llama from the same init and data give the
single-process losses (1e-4 relative) under FSDP2, TP, FSDP2 x TP (also with sequence and loss
parallel), and HSDP (also with gradient accumulation, HSDP all-reducing once and FSDP2 holding
unsharded gradients between micro-batches); a degree product that is not the world size is a clear config error."""

from __future__ import annotations

import json

import pytest
from distributed_runs import assert_close, losses, run_tree, shared_run

from engine.config import ConfigError, load_config
from engine.dist import DistContext
from engine.parallel import ParallelDims, resolve_degrees

STEPS = range(1, 11)


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    return shared_run("single", tmp_path_factory, tiny_corpus, 1, steps=20)


@pytest.mark.parametrize(
    ("name", "nproc", "parallel", "steps"),
    [
        ("fsdp2", 2, {}, 20),  # 20 steps: also the reference of the kill and SIGTERM tests
        ("tp2", 2, {"tp": 2}, 10),
        ("hsdp2x1", 2, {"dp_replicate": 2}, 10),
        # two micro-batches per rank: HSDP all-reduces once per step; FSDP2 holding unsharded
        # gradients reduce-scatters once per step
        ("hsdp2x1_accumulate", 2, {"dp_replicate": 2, "micro_batch_size": 2}, 10),
        ("fsdp2_accumulate_unsharded", 2, {"accumulate_unsharded_grads": True, "micro_batch_size": 2}, 10),
    ],
)
def test_two_process_layouts_match_one_process(name, nproc, parallel, steps, single, tiny_corpus, tmp_path_factory):
    overrides = {f"data.{k}" if k == "micro_batch_size" else f"parallel.{k}": v for k, v in parallel.items()}
    run = shared_run(name, tmp_path_factory, tiny_corpus, nproc, steps=steps, **overrides)
    assert_close(losses(run), losses(single), STEPS)


def test_fsdp2_x_tp2_on_four_processes_matches_one_process(single, tiny_corpus, tmp_path_factory):
    run = shared_run("fsdp2xtp2", tmp_path_factory, tiny_corpus, 4, steps=20,
                     **{"parallel.tp": 2, "checkpoint.every": 10})
    assert_close(losses(run), losses(single), range(1, 21))
    # eval shards rows over the data-parallel ranks only (TP ranks share them)
    val_4, val_1 = (json.loads((r / "summary.json").read_text())["val"] for r in (run, single))
    assert val_4["val_tokens"] == val_1["val_tokens"]
    assert abs(val_4["val_loss"] - val_1["val_loss"]) <= 1e-4 * val_1["val_loss"]


def test_degrees_resolve_and_a_wrong_product_is_a_clear_config_error():
    from engine.config import ParallelConfig

    assert resolve_degrees(ParallelConfig(tp=2), 8) == ParallelDims(1, 4, 2)
    assert resolve_degrees(ParallelConfig(dp_replicate=2, tp=2), 8).dp_size == 4
    assert ParallelDims(1, 2, 2).dp_rank(3) == 1
    with pytest.raises(ConfigError, match=r"dp_replicate x dp_shard x cp x tp = 1x3x1x2 != world size 4"):
        resolve_degrees(ParallelConfig(dp_shard=3, tp=2), 4)
    with pytest.raises(ConfigError, match=r"tp \(3\) does not divide the world size \(4\)"):
        resolve_degrees(ParallelConfig(tp=3), 4)


def test_tp_options_are_checked(tiny_corpus, tmp_path):
    import torch

    from engine.trainer import build_model

    cfg = load_config(run_tree(tiny_corpus, tmp_path, **{"parallel.loss_parallel": True}))
    with pytest.raises(ConfigError, match="need parallel.tp > 1"):
        build_model(cfg, DistContext(0, 1, 0, torch.device("cpu")))


def test_sequence_and_loss_parallel_with_untied_output_and_qk_norm(tiny_corpus, tmp_path_factory):
    """FSDP2 x TP2 with every TP option on a model using every TP-relevant feature (untied
    vocab-sharded output, head-sharded qk-norm, GQA) against its own single-process run."""
    model = {"model.tie_embeddings": False, "model.qk_norm": True}
    single = shared_run("single_untied_qk", tmp_path_factory, tiny_corpus, 1, **model)
    options = {"parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.loss_parallel": True}
    run = shared_run("fsdp2xtp2_sp_lp", tmp_path_factory, tiny_corpus, 4, **model, **options)
    assert_close(losses(run), losses(single), STEPS)
