"""Context-parallel training on CPU (gloo): a tiny Llama whose rows are split over 2 CP ranks
(packed documents, zigzag layout) follows the one-process loss curve (1e-4 relative), also with
full activation checkpointing, and FSDP2 x CP, HSDP x CP and CP x TP (sequence parallel) on 4
processes; a CP checkpoint resumes on one process without CP and continues the curve; CP settings
that cannot work stop at once naming the field."""

from __future__ import annotations

import json

import pytest
from distributed_runs import (
    assert_close,
    losses,
    resume_on_one_process,
    run_tree,
    shared_run,
)

from engine.config import ConfigError, ParallelConfig, load_config
from engine.parallel import ParallelDims, context_parallel_plan, resolve_degrees


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    return shared_run("single", tmp_path_factory, tiny_corpus, 1, steps=20)


@pytest.fixture(scope="module")
def cp2(tiny_corpus, tmp_path_factory):
    return shared_run("cp2", tmp_path_factory, tiny_corpus, 2, steps=20,
                      **{"parallel.cp": 2, "checkpoint.every": 10})  # fmt: skip


def test_cp2_with_activation_checkpointing_follows_the_one_process_curve(single, tiny_corpus, tmp_path_factory):
    """Recomputed blocks gather K/V again in backward, in the same order on every rank."""
    run = shared_run("cp2_full_ac", tmp_path_factory, tiny_corpus, 2, steps=10,
                     **{"parallel.cp": 2, "parallel.activation_checkpointing": "full"})  # fmt: skip
    assert_close(losses(run), losses(single), range(1, 11))


def test_cp2_follows_the_one_process_curve(cp2, single):
    assert_close(losses(cp2), losses(single), range(1, 21))
    # eval: the CP ranks of a group score the same rows once
    val_cp, val_1 = (json.loads((r / "summary.json").read_text())["val"] for r in (cp2, single))
    assert val_cp["val_tokens"] == val_1["val_tokens"]
    assert abs(val_cp["val_loss"] - val_1["val_loss"]) <= 1e-4 * val_1["val_loss"]


@pytest.mark.parametrize(
    ("name", "parallel"),
    [("fsdp2xcp2", {"cp": 2}), ("hsdp2xcp2", {"cp": 2, "dp_replicate": 2}),
     ("cp2xtp2_sequence_parallel", {"cp": 2, "tp": 2, "sequence_parallel": True})],
)
def test_cp_with_fsdp2_or_tp_on_four_processes_follows_the_one_process_curve(name, parallel, single, tiny_corpus, tmp_path_factory):
    run = shared_run(name, tmp_path_factory, tiny_corpus, 4, steps=10, **{f"parallel.{k}": v for k, v in parallel.items()})
    assert_close(losses(run), losses(single), range(1, 11))


def test_a_cp_checkpoint_resumes_on_one_process_without_cp(cp2, tmp_path):
    got = resume_on_one_process(cp2, tmp_path / "resumed", 10, ["parallel.cp=1"])
    assert sorted(got) == list(range(11, 21))
    assert_close(got, losses(cp2), range(11, 21))


def test_degrees_and_rank_layout_with_cp():
    dims = resolve_degrees(ParallelConfig(cp=2, tp=2), 8)
    assert dims == ParallelDims(1, 2, 2, 2) and dims.dp_size == 2 and dims.fsdp_size == 4
    # ranks (dp_shard, cp, tp): 0-3 read batch slice 0, 4-7 slice 1; tp innermost
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [dims.cp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ConfigError, match=r"cp \(3\) x tp \(1\) does not divide the world size \(4\)"):
        resolve_degrees(ParallelConfig(cp=3), 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.seq_len": 30}, r"data.seq_len: 30 tokens do not split into 4 equal parts \(parallel.cp = 2, zigzag"),
        ({"data.decomposition": {"path": "x"}, "data.sources": []}, r"parallel.cp: data.decomposition"),
    ],
)
def test_cp_settings_that_cannot_work_name_the_field(overrides, message, tiny_corpus, tmp_path):
    try:
        cfg = load_config(run_tree(tiny_corpus, tmp_path, **{"parallel.cp": 2, **overrides}))
    except ConfigError as err:  # the config itself already refuses it
        pytest.fail(f"config refused before the CP check: {err}")
    with pytest.raises(ConfigError, match=message):
        context_parallel_plan(cfg, ParallelDims(1, 1, 1, 2), None, 0)
