"""Step Law (METHODS.md §8): test vectors to 3 significant digits, `auto` resolution, the CLI."""

import argparse
import math

import pytest

from engine.hparams import (
    non_embedding_params,
    parse_count,
    resolve_auto_hparams,
    step_law,
    step_law_tokens_for_steps,
)
from models.config import ModelConfig


def sig3(x: float) -> float:
    return float(f"{x:.3g}")


@pytest.mark.parametrize(
    "n, d, lr, batch",
    [(1e9, 1e11, 1.632e-3, 1.108e6), (4e8, 4e10, 2.368e-3, 6.56e5)],
)
def test_step_law_vectors(n, d, lr, batch):
    got_lr, got_batch = step_law(n, d)
    assert sig3(got_lr) == sig3(lr)
    assert sig3(got_batch) == sig3(batch)


def test_step_law_rejects_nonpositive():
    with pytest.raises(ValueError, match="params"):
        step_law(0, 1e9)
    with pytest.raises(ValueError, match="tokens"):
        step_law(1e6, -1)


def test_tokens_for_steps_is_self_consistent():
    d = step_law_tokens_for_steps(5000)
    assert d / 5000 == pytest.approx(step_law(1e8, d)[1], rel=1e-9)


def test_non_embedding_params_counts_blocks_and_final_norm():
    cfg = ModelConfig(
        vocab_size=1000,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        tie_embeddings=False,
    )
    kv = 2 * 16
    per_layer = 64 * 64 * 2 + 64 * kv * 2 + 3 * 64 * 128 + 2 * 64
    assert non_embedding_params(cfg) == 2 * per_layer + 64


def test_resolve_auto_lr_and_batch():
    tree = {
        "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "max_seq_len": 128},
        "optim": {"lr": "auto", "weight_decay": 0.0},
        "data": {"tokens_per_step": "auto", "seq_len": 128, "micro_batch_size": 2},
        "train": {"steps": 2000},
    }
    new, info = resolve_auto_hparams(tree)
    assert tree["optim"]["lr"] == "auto"  # input untouched
    b_opt = step_law_tokens_for_steps(2000) / 2000
    expected_sequences = 2 * round(b_opt / 128 / 2)
    assert new["data"]["global_batch_size"] == expected_sequences == info.global_batch_size
    assert "tokens_per_step" not in new["data"]
    n = non_embedding_params(ModelConfig(**tree["model"]))
    d = 2000 * expected_sequences * 128
    assert new["optim"] == {"lr": step_law(n, d)[0], "weight_decay": 0.0}
    assert info.n_tokens == d and len(info.notes) == 2


def test_resolve_auto_lr_with_fixed_batch_and_noop():
    tree = {
        "optim": {"lr": "auto"},
        "data": {"global_batch_size": 16, "seq_len": 64},
        "train": {"steps": 10},
    }
    new, info = resolve_auto_hparams(tree)
    assert info.n_tokens == 10 * 16 * 64 and info.global_batch_size is None
    assert math.isclose(new["optim"]["lr"], step_law(info.n_params_non_embedding, 10240)[0])
    plain = {"optim": {"lr": 1e-3}}
    assert resolve_auto_hparams(plain) == (plain, None)


def test_parse_count():
    assert parse_count("400M") == 4e8
    assert parse_count("1.5B") == 1.5e9
    assert parse_count("1e11") == 1e11
    with pytest.raises(ValueError):
        parse_count("lots")


def test_cli_prints_step_law(capsys):
    from launch.commands import hparams

    parser = argparse.ArgumentParser()
    hparams.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["hparams", "--params", "1e9", "--tokens", "100B", "--seq-len", "4096"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "0.001632" in out and "1.108e+06" in out and "270 x 4096" in out
    bad = parser.parse_args(["hparams", "--params", "1e9", "--tokens", "x"])
    assert bad.func(bad) == 2
    assert capsys.readouterr().err.startswith("hparams error: --tokens: 'x'")  # names the flag
    with pytest.raises(SystemExit):  # was silently ignored (0) or printed half the output (< 0)
        parser.parse_args(["hparams", "--params", "1e9", "--tokens", "1e11", "--seq-len", "0"])
    assert "argument --seq-len: must be >= 1" in capsys.readouterr().err
