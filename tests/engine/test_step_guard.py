"""Skipped steps: non-finite and spiking steps leave weights and optimizer state untouched; too
many in a row end the run with DIVERGED_EXIT_CODE and no checkpoint of the bad state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.checkpoint import latest_checkpoint
from engine.config import ConfigError, load_config
from engine.dist import init_distributed
from engine.step_guard import DIVERGED_EXIT_CODE, StepGuard, TrainingDiverged
from engine.trainer import Trainer
from tests.conftest import tiny_config


def test_non_finite_values_are_skipped_and_finite_ones_applied():
    guard = StepGuard()
    assert guard.check(1, 2.5, 1.0).apply
    for loss, grad_norm in ((math.nan, 1.0), (2.5, math.inf), (-math.inf, 1.0)):
        verdict = guard.check(2, loss, grad_norm)
        assert not verdict.apply and "non-finite" in verdict.reason
    assert guard.skipped_total == 3 and list(guard.losses) == [2.5]  # skipped values stay out of the window


def test_spike_rule_waits_for_a_full_window_then_skips_outliers():
    guard = StepGuard(spike_sigma=3.0, window=4)
    assert guard.check(1, 100.0, 1.0).apply  # window not full: no spike rule yet
    for step, loss in enumerate((3.0, 3.1, 2.9), start=2):
        assert guard.check(step, loss, 1.0 + 0.01 * step).apply
    verdict = guard.check(5, 1000.0, 1.0)
    assert not verdict.apply and verdict.reason.startswith("loss spike")
    verdict = guard.check(6, 3.0, 50.0)
    assert not verdict.apply and verdict.reason.startswith("grad norm spike")
    assert guard.check(7, 3.0, 1.0).apply and guard.skipped_in_a_row == 0


def test_a_flat_window_needs_a_real_jump_to_call_a_spike():
    guard = StepGuard(spike_sigma=6.0, window=3)
    for step in (1, 2, 3):
        guard.check(step, 2.0, 1.0)  # std 0: mean + 6 std is the mean itself
    assert guard.check(4, 2.0001, 1.0).apply
    assert not guard.check(5, 2.5, 1.0).apply


def test_too_many_skips_in_a_row_raise():
    guard = StepGuard(max_in_a_row=3)
    guard.check(1, math.nan, 1.0)
    guard.check(2, math.nan, 1.0)
    with pytest.raises(TrainingDiverged, match="step 3: 3 steps in a row skipped"):
        guard.check(3, math.nan, 1.0)


def test_state_round_trip_decides_the_same():
    a = StepGuard(spike_sigma=2.0, window=3)
    for step, loss in enumerate((3.0, 3.2, 2.8, math.nan), start=1):
        a.check(step, loss, 1.0)
    b = StepGuard(spike_sigma=2.0, window=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # trainer_state.json is JSON
    for loss in (3.1, 9.0, 3.0):
        assert a.check(9, loss, 1.0) == b.check(9, loss, 1.0)
    assert a.state_dict() == b.state_dict()


def test_config_names_the_field():
    with pytest.raises(ConfigError, match="optim.skip_window"):
        load_config({"optim": {"skip_window": 1}})


def poison(trainer: Trainer, steps: set[int]) -> None:
    """Logits become NaN during the (0-based) trainer steps in `steps`."""
    def hook(module, inputs, output):
        return output * math.nan if trainer.step in steps else output

    trainer.model.register_forward_hook(hook)


def test_a_nan_step_changes_nothing_and_the_run_goes_on(tiny_corpus, tmp_path):
    cfg = load_config(tiny_config(tiny_corpus, tmp_path / "run"))
    trainer = Trainer(cfg, init_distributed("cpu"))
    poison(trainer, {2})
    for _ in range(2):
        trainer.train_step(trainer.loader.next_step())
        trainer.step += 1
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state.items()}
    loss, grad_norm, _ = trainer.train_step(trainer.loader.next_step())
    assert math.isnan(loss) and math.isnan(grad_norm)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for param, state in trainer.optimizer.state.items():
        assert torch.equal(state["exp_avg"], moments[param])
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.step += 1
    loss, grad_norm, _ = trainer.train_step(trainer.loader.next_step())  # the next batch trains as usual
    assert math.isfinite(loss) and math.isfinite(grad_norm)
    assert trainer.guard.skipped_total == 1
    trainer.loader.close()


def test_the_whole_run_logs_the_skip_and_finishes(tiny_corpus, tmp_path, capsys):
    cfg = load_config(tiny_config(tiny_corpus, tmp_path / "run"))
    trainer = Trainer(cfg, init_distributed("cpu"))
    poison(trainer, {3})
    result = trainer.fit()
    assert result.exit_code == 0 and math.isfinite(result.final_loss)
    assert "step 4 skipped: non-finite loss" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in records if "skipped_steps" in r}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r and r["step"] != 4)


def test_divergence_stops_without_checkpointing_the_bad_state(tiny_corpus, tmp_path, capsys):
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"optim.max_skipped_in_a_row": 2})
    trainer = Trainer(load_config(tree), init_distributed("cpu"))
    poison(trainer, {3, 4, 5})
    result = trainer.fit()
    assert result.exit_code == DIVERGED_EXIT_CODE and result.step == 4
    out = capsys.readouterr().out
    assert "training diverged: step 5: 2 steps in a row skipped" in out
    assert "run diverged at step 4 " in out and f"outputs in {tmp_path / 'run'}/" in out
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"  # the last good one
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exit_code"] == DIVERGED_EXIT_CODE
    state = json.loads((latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainer_state.json").read_text())
    assert state["step_guard"]["skipped_total"] == 0 and len(state["step_guard"]["losses"]) == 3


def _poisoned_rank(rank: int, tree: dict, poisoned_ranks: list[int]) -> dict:
    """One FSDP2 rank of a 2-process run whose logits are NaN at step 3 on `poisoned_ranks` only."""
    trainer = Trainer(load_config(tree), init_distributed("cpu"))
    poison(trainer, {2} if rank in poisoned_ranks else set())
    result = trainer.fit()
    return {"exit_code": result.exit_code, "skipped": trainer.guard.skipped_total, "final_loss": result.final_loss}


@pytest.mark.slow  # two spawned ranks, twice: ~20-40 s on 2 busy cores
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tiny_corpus, tmp_path):
    """Loss and grad norm are global, so a NaN on one rank is the same skip everywhere: the run
    goes on in step, exactly as when every rank saw the NaN."""
    from distributed_runs import run_in_ranks, run_tree

    outcomes = {}
    for poisoned in ([1], [0, 1]):
        out = tmp_path / "".join(map(str, poisoned))
        tree = run_tree(tiny_corpus, out / "run", steps=5)
        outcomes[tuple(poisoned)] = run_in_ranks(_poisoned_rank, 2, out, tree, poisoned, timeout=240)
    for ranks in outcomes.values():
        assert [(r["exit_code"], r["skipped"]) for r in ranks] == [(0, 1), (0, 1)]
        assert math.isfinite(ranks[0]["final_loss"]) and ranks[0]["final_loss"] == ranks[1]["final_loss"]
    assert outcomes[(1,)][0]["final_loss"] == outcomes[(0, 1)][0]["final_loss"]
