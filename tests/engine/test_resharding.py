"""Resharding on load: a checkpoint saved by FSDP2 x TP2 on 4 processes resumes on 1 process
and on FSDP 2; the next 10 losses match the uninterrupted 4-process run (1e-4 relative) and
the sampler hands out the same global samples whatever the data-parallel width."""

from __future__ import annotations

import json

import pytest
from distributed_runs import assert_close, copy_run, losses, run_ranks, shared_run

from data_pipeline.loader import build_train_loader
from engine.config import load_config

SAVED_AT = 10
NEXT = range(SAVED_AT + 1, SAVED_AT + 11)


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    """The 4-process FSDP2 x TP2 run of the parity test (20 steps, checkpoints at 10 and 20)."""
    return shared_run("fsdp2xtp2", tmp_path_factory, tiny_corpus, 4, steps=20,
                      **{"parallel.tp": 2, "checkpoint.every": 10})


@pytest.mark.parametrize(("nproc", "layout"), [(1, "one process"), (2, "FSDP 2")])
def test_resume_at_another_mesh_continues_the_loss_curve(nproc, layout, uninterrupted, tmp_path):
    run_dir = copy_run(uninterrupted, tmp_path / "resumed", keep_steps=[SAVED_AT])
    run_ranks(nproc, run_dir, resume=str(run_dir), overrides=["parallel.tp=1"])
    log = (run_dir / "rank0.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000010'} at step 10" in log, log
    got = losses(run_dir)
    assert sorted(got) == list(NEXT), layout
    assert_close(got, losses(uninterrupted), NEXT)


def _global_samples(cfg, dp_size: int, state: dict | None, steps: int, skip: int = 0) -> list[list]:
    """Per step, the samples of all dp ranks in rank order (= the global batch)."""
    loaders = [build_train_loader(cfg.data, r, dp_size) for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
        for _ in range(skip):
            loader.next_step()
    out = []
    for _ in range(steps):
        batch = []
        for loader in loaders:
            loader.next_step()
            batch += list(loader.last_sample_ids)
        out.append(batch)
    for loader in loaders:
        loader.close()
    return out


def test_sampler_state_in_the_checkpoint_gives_the_same_global_samples_at_any_width(uninterrupted):
    cfg = load_config(uninterrupted / "config.yaml")
    state = json.loads((uninterrupted / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["step"] == SAVED_AT and state["loader"]["step"] == SAVED_AT
    saved_mesh = _global_samples(cfg, 2, None, 10, skip=SAVED_AT)  # the 4-process run: dp = 2
    assert len(saved_mesh[0]) == cfg.data.global_batch_size
    for dp_size in (1, 2):
        assert _global_samples(cfg, dp_size, state["loader"], 10) == saved_mesh, dp_size
