"""Temperature sampling with cooldown (METHODS.md §4): the formula, the cooldown shapes, batches
that do not depend on resume point or world size, config errors, and the weights in metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.config import DataConfig, MixtureConfig, SourceConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.mixture import (
    FixedMixture,
    TemperatureCooldown,
    TemperatureMixture,
    build_mixture,
    temperature_weights,
)
from data_pipeline.sampler import Sampler
from engine.config import ConfigError, load_config
from launch.cli import main
from tests.conftest import tiny_config

# -- the formula -----------------------------------------------------------------------------


def test_temperature_one_is_proportional_to_tokens():
    np.testing.assert_allclose(temperature_weights([900, 90, 10], 1.0), [0.9, 0.09, 0.01])


def test_high_temperature_is_uniform():
    np.testing.assert_allclose(temperature_weights([900, 90, 10], 1e6), [1 / 3] * 3, atol=1e-5)


def test_temperature_five_matches_hand_computed_vector():
    # 900^0.2 = 3.89805, 90^0.2 = 2.45951, 10^0.2 = 1.58489; over their sum 7.94245
    np.testing.assert_allclose(
        temperature_weights([900, 90, 10], 5.0), [0.490787, 0.309666, 0.199547], atol=1e-6
    )


def test_user_weights_multiply_after_the_temperature():
    weights = [1.0, 3.0]
    np.testing.assert_allclose(temperature_weights([100, 100], 5.0, weights), [0.25, 0.75])
    np.testing.assert_allclose(temperature_weights([300, 100], 1.0, weights), [0.5, 0.5])
    np.testing.assert_allclose(temperature_weights([300, 100], 1e9, weights), [0.25, 0.75])


def test_huge_counts_and_low_temperature_stay_finite():
    p = temperature_weights([1e13, 1.0], 0.05)
    assert np.isfinite(p).all() and p[0] == pytest.approx(1.0) and p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "counts, temperature", [([0, 10], 1.0), ([10, np.nan], 1.0), ([10, 1], 0.0), ([10, 1], np.inf)]
)
def test_bad_inputs_are_refused(counts, temperature):
    with pytest.raises(ValueError):
        temperature_weights(counts, temperature)


# -- the cooldown shapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",  # T at steps 0, 25, 49, 50, 99 of 100 (start 5, end 1, at 0.5)
    [
        ("constant", [5, 5, 5, 5, 5]),
        ("step", [5, 5, 5, 1, 1]),
        ("linear", [5, 3, 5 - 4 * 49 / 50, 1, 1]),
        ("cosine", [5, 3, 1 + 2 * (1 + np.cos(np.pi * 49 / 50)), 1, 1]),
    ],
)
def test_cooldown_shape_at_start_middle_end(shape, expected):
    cooldown = TemperatureCooldown(start=5.0, end=1.0, shape=shape, at=0.5, total_steps=100)
    np.testing.assert_allclose([cooldown(s) for s in (0, 25, 49, 50, 99)], expected)


def test_cosine_lingers_near_the_ends_where_linear_does_not():
    cosine = TemperatureCooldown(5.0, 1.0, "cosine", 1.0, 100)
    linear = TemperatureCooldown(5.0, 1.0, "linear", 1.0, 100)
    assert cosine(10) > linear(10) and cosine(90) < linear(90)
    temperatures = [cosine(s) for s in range(100)]
    assert all(a >= b for a, b in zip(temperatures, temperatures[1:], strict=False))  # monotone


def test_cooldown_at_zero_starts_at_the_end_temperature():
    for shape in ("step", "linear", "cosine"):
        assert TemperatureCooldown(5.0, 1.0, shape, 0.0, 10)(0) == 1.0


def test_default_cooldown_is_the_papers_step():
    cfg = MixtureConfig(kind="temperature")
    mixture = build_mixture(cfg, [900, 100], [1.0, 1.0], total_steps=10)
    assert isinstance(mixture, TemperatureMixture)
    assert [mixture.temperature_at(s) for s in (0, 4, 5, 9)] == [5.0, 5.0, 1.0, 1.0]
    np.testing.assert_allclose(mixture.weights_at(9), [0.9, 0.1])


def test_a_cooldown_needs_the_total_steps():
    with pytest.raises(ValueError, match="train.steps"):
        build_mixture(MixtureConfig(kind="temperature"), [9, 1], [1, 1], total_steps=None)
    constant = MixtureConfig(kind="temperature", cooldown="constant", temperature_start=1.0)
    np.testing.assert_allclose(
        build_mixture(constant, [9, 1], [1, 1], None).weights_at(7), [0.9, 0.1]
    )


# -- determinism: resume point and world size ------------------------------------------------

TOTAL_STEPS = 10


def _data_config(**overrides) -> DataConfig:
    values = dict(
        sources=[
            SourceConfig(path="/data/big", name="big"),
            SourceConfig(path="/data/small", name="small"),
        ],
        seq_len=8,
        global_batch_size=8,
        micro_batch_size=2,
        seed=11,
        prefetch=0,
        mixture=MixtureConfig(
            kind="temperature", temperature_start=10.0, cooldown="linear", cooldown_at=0.6
        ),
    )
    values.update(overrides)
    return DataConfig(**values)


def _sources(random_shardset):
    return [random_shardset(200, seed=1), random_shardset(12, seed=2, token_base=1_000_000)]


def _global_ids(cfg, shardsets, steps, world_size=1, state=None):
    """Sample ids of each step over all ranks (rank slices concatenated), and the final state."""
    loaders = [
        build_train_loader(cfg, rank, world_size, shardsets, total_steps=TOTAL_STEPS)
        for rank in range(world_size)
    ]
    per_step = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    for _ in range(steps):
        ids = []
        for loader in loaders:
            loader.next_step()
            ids.extend(loader.last_sample_ids)
        per_step.append(ids)
    final = loaders[0].state_dict()
    assert all(loader.state_dict() == final for loader in loaders)
    for loader in loaders:
        loader.close()
    return per_step, final


def test_slots_follow_the_weights_of_their_step(random_shardset):
    cfg = _data_config()
    shardsets = _sources(random_shardset)
    ids, _ = _global_ids(cfg, shardsets, TOTAL_STEPS)
    mixture = build_mixture(
        cfg.mixture, [int(s.lengths.sum()) for s in shardsets], [1.0, 1.0], TOTAL_STEPS
    )
    for step, samples in enumerate(ids):
        small = sum(sample.source == 1 for sample in samples)
        expected = mixture.weights_at(step)[1] * cfg.global_batch_size
        assert np.floor(expected) <= small <= np.ceil(expected), step
    assert mixture.weights_at(0)[1] > 0.3 and mixture.weights_at(TOTAL_STEPS - 1)[1] < 0.1


@pytest.mark.parametrize("world_size", [2, 4])
def test_batches_do_not_depend_on_world_size(random_shardset, world_size):
    shardsets = _sources(random_shardset)
    reference, reference_state = _global_ids(_data_config(), shardsets, TOTAL_STEPS)
    ids, state = _global_ids(_data_config(), shardsets, TOTAL_STEPS, world_size=world_size)
    assert ids == reference and state == reference_state


@pytest.mark.parametrize("cooldown", ["step", "linear", "cosine"])
def test_resume_gives_the_uninterrupted_batches(random_shardset, cooldown):
    mixture = MixtureConfig(
        kind="temperature", temperature_start=10.0, cooldown=cooldown, cooldown_at=0.6
    )
    shardsets = _sources(random_shardset)
    reference, _ = _global_ids(_data_config(mixture=mixture), shardsets, TOTAL_STEPS)
    first, state = _global_ids(
        _data_config(mixture=mixture, prefetch=2), shardsets, 4, world_size=2
    )
    rest, _ = _global_ids(_data_config(mixture=mixture), shardsets, 6, world_size=4, state=state)
    assert first + rest == reference


def test_sampler_state_at_replays_the_changing_weights(random_shardset):
    shardsets = _sources(random_shardset)
    lengths = [np.asarray(s.lengths) for s in shardsets]
    cooldown = TemperatureCooldown(10.0, 1.0, "cosine", 0.8, TOTAL_STEPS)
    mixture = TemperatureMixture([int(x.sum()) for x in lengths], cooldown)
    sampler = Sampler(lengths, seed=3, seq_len=8, global_batch_size=16, mixture=mixture)
    state = sampler.initial_state()
    for step in range(TOTAL_STEPS):
        assert sampler.state_at(step) == state
        _, state = sampler.plan(state)


def test_fixed_stays_the_default_and_logs_no_weights(random_shardset):
    cfg = _data_config(mixture=MixtureConfig())
    assert cfg.mixture.kind == "fixed" and DataConfig().mixture.kind == "fixed"
    loader = build_train_loader(cfg, 0, 1, _sources(random_shardset))
    assert isinstance(loader.sampler.mixture, FixedMixture)
    loader.next_step()
    assert loader.step_metrics() == {}


# -- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.mixture.kind=temprature", "data.mixture.kind:"),
        ("data.mixture.temperature_start=0", "data.mixture.temperature_start:"),
        ("data.mixture.temperature_start=.inf", "data.mixture.temperature_start:"),
        ("data.mixture.temperature_end=-1", "data.mixture.temperature_end:"),
        ("data.mixture.cooldown=exponential", "data.mixture.cooldown:"),
        ("data.mixture.cooldown_at=1.5", "data.mixture.cooldown_at:"),
        ("data.mixture.cooldown_after=0.5", "data.mixture.cooldown_after: unknown key"),
    ],
)
def test_bad_mixture_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_cli_exits_2_on_a_bad_mixture(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  mixture:\n    kind: temperature\n    cooldown: exponential\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: data.mixture.cooldown:")


# -- the trainer logs the weights --------------------------------------------------------------


def test_trainer_metrics_show_weights_cooling_from_uniform_to_proportional(tiny_corpus, tmp_path):
    from data_pipeline.formats import open_shardset
    from engine.entry import run_training

    run_dir = tmp_path / "run"
    tree = tiny_config(
        tiny_corpus,
        run_dir,
        **{
            "data.sources": [
                {"path": str(tiny_corpus / "train"), "name": "big"},
                {"path": str(tiny_corpus / "val"), "name": "small"},
            ],
            "data.mixture": {"kind": "temperature", "temperature_start": 50.0, "cooldown_at": 0.5},
            "checkpoint.every": 0,
            "checkpoint.save_final": False,
            "logging.tensorboard": False,
        },
    )
    result = run_training(tree)
    assert result.exit_code == 0 and result.step == 6
    counts = np.array([open_shardset(str(tiny_corpus / n)).lengths.sum() for n in ("train", "val")])
    proportional = counts / counts.sum()
    assert proportional[1] < 0.3  # the two sources differ in size, or the test proves nothing
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "mixture_weight/big" in r}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    for step, record in by_step.items():
        weights = [record["mixture_weight/big"], record["mixture_weight/small"]]
        assert sum(weights) == pytest.approx(1.0)
        if step <= 3:  # sampler steps 0..2: T = 50, near uniform
            assert record["mixture_temperature"] == 50.0
            np.testing.assert_allclose(weights, [0.5, 0.5], atol=0.03)
        else:  # sampler steps 3..5: T = 1, proportional to tokens
            assert record["mixture_temperature"] == 1.0
            np.testing.assert_allclose(weights, proportional, rtol=1e-9)


def test_schedule_plot_draws_the_mixture_weights(tiny_corpus, tmp_path, capsys):
    import yaml

    tree = tiny_config(
        tiny_corpus,
        tmp_path / "run",
        **{
            "data.sources": [
                {"path": str(tiny_corpus / "train"), "name": "big"},
                {"path": str(tiny_corpus / "val"), "name": "small"},
            ],
            "data.mixture": {
                "kind": "temperature",
                "temperature_start": 50.0,
                "cooldown": "cosine",
            },
        },
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "lr.png"
    assert main(["schedule", "plot", str(config), "--out", str(out), "--mixture"]) == 0
    assert (tmp_path / "lr_mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("mixture small")
    ]
    first, last = (float(part.split("= ")[1]) for part in lines[0].split(", "))
    assert first == pytest.approx(0.5, abs=0.03) and last < 0.3


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_cooldown_can_start_late(shape):
    """cooldown_from: T holds its start value until the window opens, then moves to the end."""
    cooldown = TemperatureCooldown(5.0, 1.0, shape, at=0.9, total_steps=100, start_at=0.5)
    assert [cooldown(s) for s in (0, 30, 50)] == [5.0, 5.0, 5.0]
    assert 1.0 < cooldown(70) < 5.0
    assert cooldown(70) == pytest.approx(3.0)  # the middle of the window, both shapes
    assert cooldown(90) == cooldown(99) == 1.0


def test_cooldown_window_is_checked_in_the_config():
    from data_pipeline.config import MixtureConfig

    with pytest.raises(ValueError, match="cooldown_from"):
        MixtureConfig(kind="temperature", cooldown="linear", cooldown_from=0.8, cooldown_at=0.5)
