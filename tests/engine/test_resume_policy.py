"""Continual-run policy (engine/continual.py): each keep/reset option does what it says.

A 6-step source run (tiny Llama, infinite schedule in its constant phase) is continued under
each policy; we look at the built Trainer's weights, AdamW state, step, schedule and sampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.checkpoint import latest_checkpoint
from engine.config import ConfigError, load_config
from engine.continual import SUMMARY_FILE, fresh_adam_state
from engine.dist import init_distributed
from engine.entry import run_training
from engine.signals import REQUEUE_EXIT_CODE
from engine.trainer import Trainer
from launch.cli import main
from tests.conftest import tiny_config

LR = 3e-3
LR_CONST = 0.25 * LR  # the source's constant phase
SOURCE_SCHEDULE = {"name": "infinite", "warmup_steps": 2, "cooldown_end": 4, "anneal_start": 1.0}
REWARM = {"name": "rewarm", "warmup_steps": 2, "start_lr": "current"}


def source_tree(corpus: Path, run_dir: Path) -> dict:
    return tiny_config(corpus, run_dir, schedule=dict(SOURCE_SCHEDULE), **{"data.prefetch": 0})


def two_sources(corpus: Path, old_weight: float = 1.0, new_weight: float = 3.0) -> list[dict]:
    """The source run's data ('tiny') replayed beside a new domain ('b': held-out files)."""
    return [
        {"path": str(corpus / "train"), "name": "tiny", "weight": old_weight},
        {"path": str(corpus / "val"), "name": "b", "weight": new_weight},
    ]


def run_source(corpus: Path, run_dir: Path) -> SimpleNamespace:
    """Trains the 6-step source run and records what it checkpointed at its end."""
    trainer = Trainer(load_config(source_tree(corpus, run_dir)), init_distributed("cpu"))
    trainer.fit()
    params = dict(trainer.model.named_parameters())
    return SimpleNamespace(
        run_dir=run_dir,
        step_dir=run_dir / "checkpoints" / "step_00000006",
        weights={n: p.detach().clone() for n, p in params.items()},
        exp_avg={n: trainer.optimizer.state[p]["exp_avg"].clone() for n, p in params.items()},
        loader=trainer.loader.state_dict(),
        schedule=trainer.schedule.state_dict(),
        tokens_seen=trainer.tokens_seen,
    )


@pytest.fixture(scope="module")
def source(tiny_corpus, tmp_path_factory) -> SimpleNamespace:
    return run_source(tiny_corpus, tmp_path_factory.mktemp("source") / "run")


def continual_trainer(corpus, source, run_dir, policy: dict, **overrides) -> Trainer:
    values = {"schedule": dict(REWARM), "train.steps": 10, "data.prefetch": 0, **overrides}
    tree = tiny_config(corpus, run_dir, **values)
    tree["continual"] = {"source": str(source.run_dir), **policy}
    return Trainer(load_config(tree), init_distributed("cpu"))


def named_state(trainer: Trainer, key: str) -> dict[str, torch.Tensor]:
    return {n: trainer.optimizer.state[p][key] for n, p in trainer.model.named_parameters()}


def assert_weights_equal(trainer: Trainer, weights: dict[str, torch.Tensor]) -> None:
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.detach(), weights[name], rtol=0, atol=0, msg=name)


def test_optimizer_keep_preserves_moments_with_the_new_hyperparameters(
    tiny_corpus, source, tmp_path
):
    trainer = continual_trainer(
        tiny_corpus, source, tmp_path / "keep", {"optimizer": "keep"},
        **{"optim.weight_decay": 0.05, "optim.beta2": 0.99},
    )  # fmt: skip
    trainer.loader.close()
    assert_weights_equal(trainer, source.weights)
    for name, moment in named_state(trainer, "exp_avg").items():
        torch.testing.assert_close(moment, source.exp_avg[name], rtol=0, atol=0, msg=name)
    assert all(float(s) == 6 for s in named_state(trainer, "step").values())
    decay_group = trainer.optimizer.param_groups[0]
    assert decay_group["weight_decay"] == 0.05 and decay_group["betas"] == (0.9, 0.99)


def test_optimizer_reset_zeroes_moments_and_keeps_weights(tiny_corpus, source, tmp_path):
    trainer = continual_trainer(tiny_corpus, source, tmp_path / "reset", {"optimizer": "reset"})
    trainer.loader.close()
    assert_weights_equal(trainer, source.weights)
    assert any(m.abs().sum() > 0 for m in source.exp_avg.values())
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(t.abs().sum() == 0 for t in named_state(trainer, key).values()), key
    assert all(float(s) == 0 for s in named_state(trainer, "step").values())


@pytest.mark.parametrize("fused", [False, True])
def test_fresh_adam_state_updates_exactly_like_a_never_stepped_adamw(fused):
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 4)
    twin = torch.nn.Linear(8, 4)
    twin.load_state_dict(reference.state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused) for m in (reference, twin)]
    fresh_adam_state(optimizers[1])
    for _ in range(3):
        x = torch.randn(5, 8)
        for model, optimizer in zip((reference, twin), optimizers, strict=True):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(reference.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_and_schedule_continue(tiny_corpus, source, tmp_path):
    trainer = continual_trainer(
        tiny_corpus, source, tmp_path / "c", {"schedule": "continue", "step": "continue"}
    )
    trainer.loader.close()
    assert trainer.step == 6 and trainer.tokens_seen == source.tokens_seen
    assert trainer.schedule.state_dict() == source.schedule  # the source's schedule, not REWARM
    assert trainer.schedule(6) == pytest.approx(LR_CONST) and trainer.schedule(9) == pytest.approx(
        LR_CONST
    )
    notes = json.loads((tmp_path / "c" / SUMMARY_FILE).read_text())["notes"]
    assert notes == [
        "this config's schedule section is not used (schedule: continue)",
        f"the source's schedule ends at step 6; later steps keep its final LR {LR_CONST:.4g}",
    ]


def test_schedule_restart_rewarms_from_the_source_lr_at_the_start_step(
    tiny_corpus, source, tmp_path
):
    trainer = continual_trainer(
        tiny_corpus, source, tmp_path / "r", {"schedule": "restart", "step": "continue"}
    )
    trainer.loader.close()
    assert trainer.step == 6 and trainer.cfg.continual.current_lr == pytest.approx(LR_CONST)
    assert trainer.schedule.start_step == 6 and trainer.schedule.total_steps == 4
    assert trainer.schedule(6) == pytest.approx(LR_CONST + (LR - LR_CONST) / 2)  # warmup 1 of 2
    assert trainer.schedule(7) == pytest.approx(LR)
    assert trainer.schedule(9) == pytest.approx(0.1 * LR)  # rewarm: cosine to min_lr_ratio


def test_step_reset_restarts_the_counter_and_the_schedule_at_zero(tiny_corpus, source, tmp_path):
    trainer = continual_trainer(
        tiny_corpus, source, tmp_path / "z", {"step": "reset"}, **{"train.steps": 4}
    )
    trainer.loader.close()
    assert trainer.step == 0 and trainer.tokens_seen == 0
    assert trainer.schedule.start_step == 0 and trainer.schedule.total_steps == 4
    assert trainer.schedule(0) == pytest.approx(LR_CONST + (LR - LR_CONST) / 2)
    assert_weights_equal(trainer, source.weights)


def test_data_continue_draws_exactly_what_the_source_would_have_drawn_next(
    tiny_corpus, source, tmp_path
):
    trainer = continual_trainer(tiny_corpus, source, tmp_path / "d", {"data": "continue"})
    assert trainer.loader.state_dict() == source.loader
    got = trainer.loader.next_step()
    trainer.loader.close()
    reference = Trainer(
        load_config(source_tree(tiny_corpus, tmp_path / "ref")), init_distributed("cpu")
    )
    reference.loader.load_state_dict(source.loader)
    expected = reference.loader.next_step()
    reference.loader.close()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_data_continue_with_replay_keeps_old_cursors_and_starts_new_sources(
    tiny_corpus, source, tmp_path
):
    trainer = continual_trainer(
        tiny_corpus,
        source,
        tmp_path / "rp",
        {"data": "continue"},
        **{"data.sources": two_sources(tiny_corpus)},
    )
    trainer.loader.close()
    state = trainer.loader.state_dict()
    assert state["step"] == source.loader["step"] == 6
    assert state["sources"]["tiny"]["cursor"] == source.loader["sources"]["tiny"]["cursor"] > 0
    assert state["sources"]["b"]["cursor"] == 0


def test_data_new_starts_a_fresh_sampler(tiny_corpus, source, tmp_path):
    trainer = continual_trainer(
        tiny_corpus,
        source,
        tmp_path / "n",
        {"data": "new"},
        **{"data.sources": two_sources(tiny_corpus)},
    )
    trainer.loader.close()
    state = trainer.loader.state_dict()
    assert state["step"] == 0 and {s["cursor"] for s in state["sources"].values()} == {0}


def test_data_continue_refuses_a_changed_seed(tiny_corpus, source, tmp_path):
    with pytest.raises(ConfigError, match=r"continual\.data.*data\.seed"):
        continual_trainer(
            tiny_corpus, source, tmp_path / "s", {"data": "continue"}, **{"data.seed": 99}
        )


def test_summary_says_what_was_kept_and_reset(tiny_corpus, source, tmp_path, capsys):
    run_dir = tmp_path / "sum"
    policy = {"optimizer": "reset", "schedule": "restart", "data": "continue", "step": "continue"}
    trainer = continual_trainer(
        tiny_corpus, source, run_dir, policy, **{"data.sources": two_sources(tiny_corpus)}
    )
    trainer.loader.close()
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("continual run"))
    block = lines[start : start + 9]
    cursor = source.loader["sources"]["tiny"]["cursor"]
    epoch = cursor / source.loader["sources"]["tiny"]["tokens_per_epoch"]
    assert block[0] == f"continual run {run_dir} <- {source.step_dir.resolve()} (step 6)"
    assert block[1] == f"  weights:   loaded from {source.step_dir.resolve()}"
    assert block[2] == "  optimizer: reset (fresh AdamW: zero moments, step 0)"
    assert (
        block[3]
        == f"  step:      continued at 6 -> ends at 10 (4 steps; {source.tokens_seen:,} tokens seen before)"
    )
    assert block[4].startswith(
        "  schedule:  restarted (this config's schedule): LR schedule from step 6: rewarm"
    )
    assert block[4].endswith(f"(the source's LR there: {LR_CONST:.4g})")
    assert block[5] == "  data:      continued (sampler position from the source), sampler step 6"
    assert block[6].startswith(f"    tiny: weight 25%, at epoch {epoch:.2f}, ~")
    assert block[6].endswith("[in the source run's mixture]")
    assert block[7].startswith("    b: weight 75%, from its start, ~")
    saved = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert saved["optimizer"].startswith("reset") and saved["step"] == {
        "policy": "continue", "start": 6, "end": 10, "tokens_seen": source.tokens_seen,
    }  # fmt: skip
    assert [s["name"] for s in saved["data"]["sources"]] == ["tiny", "b"]
    b_epoch = trainer.loader.state_dict()["sources"]["b"]["tokens_per_epoch"]
    planned = 0.75 * (10 - 6) * 8 * 32  # share x steps x global batch x seq_len
    assert saved["data"]["sources"][1]["epoch_end"] == pytest.approx(planned / b_epoch)
    # the run's own first checkpoint, and a config that pins the policy and reloads
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000006"
    pinned = load_config(run_dir / "config.yaml").continual
    assert (pinned.optimizer, pinned.data, pinned.start_step) == ("reset", "continue", 6)
    assert pinned.source == str(source.step_dir.resolve())


def test_own_checkpoints_win_over_the_source_and_resume_exactly(
    tiny_corpus, source, tmp_path, monkeypatch, capsys
):
    def tree(run_dir):
        values = {"schedule": dict(REWARM), "train.steps": 10, "checkpoint.every": 0}
        out = tiny_config(tiny_corpus, run_dir, **values)
        out["continual"] = {"source": str(source.run_dir), "optimizer": "reset", "data": "new"}
        out["data"]["sources"] = two_sources(tiny_corpus)
        return out

    assert run_training(tree(tmp_path / "whole")).exit_code == 0
    monkeypatch.setattr(Trainer, "_stop_agreed", lambda self: self.step == 8)
    assert run_training(tree(tmp_path / "cut")).exit_code == REQUEUE_EXIT_CODE
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000008" in out and "continual run" not in out

    def losses(run_dir):
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(whole) == [7, 8, 9, 10]
    assert all(cut[s] == whole[s] for s in (7, 8, 9, 10))


def test_a_different_model_is_a_config_error(tiny_corpus, source, tmp_path):
    with pytest.raises(ConfigError, match=r"model: .*shape"):
        continual_trainer(tiny_corpus, source, tmp_path / "m", {}, **{"model.n_kv_heads": 4})


@pytest.mark.parametrize(
    ("continual", "message"),
    [
        ({"optimizer": "reset"}, r"continual: optimizer: set, but no continual\.source"),
        ({"from_hf": "x", "optimizer": "keep"}, r"optimizer: 'keep' needs a Strata checkpoint"),
        ({"from_hf": "x", "data": "continue"}, r"data: 'continue' needs a Strata checkpoint"),
        (
            {"source": "x", "schedule": "continue", "step": "reset"},
            r"schedule: 'continue' needs step 'continue'",
        ),
        ({"source": "x", "from_hf": "y"}, r"either"),
    ],
)
def test_policy_contradictions_are_config_errors(continual, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"continual": continual})


def test_train_steps_must_pass_the_start_step(tiny_corpus, source, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps: 6 is the global step the run ends at"):
        continual_trainer(tiny_corpus, source, tmp_path / "t", {}, **{"train.steps": 6})


def test_a_missing_source_is_a_config_error(tiny_corpus, tmp_path):
    tree = tiny_config(tiny_corpus, tmp_path / "x")
    tree["continual"] = {"source": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"continual\.source: no intact checkpoint"):
        Trainer(load_config(tree), init_distributed("cpu"))


def test_summary_plans_several_epochs_of_a_small_subset(tiny_corpus, source, tmp_path, capsys):
    """Stability-gap recipe 1 (several epochs of a small subset): the sampler reshuffles each
    epoch, and the summary says how many epochs each source will have gone through."""
    subset = [{"path": str(tiny_corpus / "val"), "name": "subset"}]
    trainer = continual_trainer(
        tiny_corpus,
        source,
        tmp_path / "ep",
        {"data": "new"},
        **{"data.sources": subset, "train.steps": 2006},
    )
    trainer.loader.close()
    per_epoch = trainer.loader.state_dict()["sources"]["subset"]["tokens_per_epoch"]
    epochs = 2000 * 8 * 32 / per_epoch
    assert epochs > 2
    assert (
        f"    subset: weight 100%, from its start, ~{epochs:.2f} epochs by the end"
        in capsys.readouterr().out
    )


def test_new_data_cools_its_mixture_over_the_continual_run_not_the_global_steps(
    tiny_corpus, source, tmp_path
):
    """continual.data=new starts a fresh sampler at 0: a temperature cooldown spans the steps
    this run trains (train.steps - start step), not the global step count."""
    trainer = continual_trainer(
        tiny_corpus, source, tmp_path / "mix", {"data": "new"},
        **{"data.sources": two_sources(tiny_corpus), "data.mixture": {"kind": "temperature"}},
    )  # fmt: skip
    trainer.loader.close()
    assert trainer.step == 6
    assert trainer.loader.sampler.mixture.cooldown.total_steps == 10 - 6
    mixture = trainer.loader.sampler.mixture
    expected = (
        mixture.weights_at(0)
        + mixture.weights_at(1)
        + mixture.weights_at(2)
        + mixture.weights_at(3)
    ) / 4
    summary = json.loads((tmp_path / "mix" / SUMMARY_FILE).read_text())
    shares = [s["weight"] for s in summary["data"]["sources"]]
    assert shares == pytest.approx(expected.tolist())  # the cooldown's mean, not the fixed 1:3


def test_continual_run_can_switch_to_a_decomposition_curriculum(tiny_corpus, source, tmp_path):
    """A packed-mixture source continued on a decomposition (data=new) trains its steps with the
    curriculum's lengths; taking the source's data position (data=continue) is a clear error."""
    from engine.config import ConfigError
    from launch.cli import main

    index = tmp_path / "decomposed"
    args = ["decompose", str(tiny_corpus / "train"), "--out", str(index)]
    assert main([*args, "--min-log2", "3", "--max-log2", "5"]) == 0
    overrides = {
        "data.sources": [],
        "data.decomposition": {
            "path": str(index),
            "tokens_per_step": 256,
            "micro_batch_tokens": 128,
        },
    }
    trainer = continual_trainer(tiny_corpus, source, tmp_path / "new", {"data": "new"}, **overrides)
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "seq_len" in r] == [7, 8, 9, 10]
    with pytest.raises(ConfigError, match="continual.data: .*decomposition"):
        continual_trainer(tiny_corpus, source, tmp_path / "cont", {"data": "continue"}, **overrides)


def test_skip_data_moves_the_position_on_without_training_on_the_skipped_batches(tiny_corpus, source, tmp_path):
    """`continual.skip_data_steps` (strata resume --skip-data): the first step draws what the
    source would have drawn 3 steps later; the step counter and the schedule are not moved."""
    trainer = continual_trainer(tiny_corpus, source, tmp_path / "s", {"data": "continue", "skip_data_steps": 3,
                                                                      "schedule": "continue"})  # fmt: skip
    assert trainer.step == 6 and trainer.loader.state_dict()["step"] == 9
    got = trainer.loader.next_step()
    trainer.loader.close()
    reference = Trainer(load_config(source_tree(tiny_corpus, tmp_path / "ref")), init_distributed("cpu"))
    reference.loader.load_state_dict(source.loader)
    for _ in range(3):
        reference.loader.next_step()
    expected = reference.loader.next_step()
    reference.loader.close()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
    summary = json.loads((tmp_path / "s" / "continual.json").read_text())
    assert summary["data"]["sampler_step"] == 9
    assert any("3 global batches (~768 tokens) skipped, never trained on" in note for note in summary["notes"])
