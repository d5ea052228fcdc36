"""`strata generate CKPT --prompt ...` on checkpoints written by the engine, for both families."""

from __future__ import annotations

import argparse

import pytest
import torch

from engine.checkpoint import Checkpointer
from engine.config import StrataConfig, dump_config
from engine.dist import DistContext
from launch.commands import generate as generate_cmd
from models.config import ModelConfig
from models.generate import generate
from models.spec import get_spec


def write_run(tmp_path, family: str, with_tokenizer: bool = True):
    from data_pipeline.tokenizer import train_byte_level_bpe

    run_dir = tmp_path / family
    run_dir.mkdir()
    model_cfg = ModelConfig(
        family=family, vocab_size=300, dim=32, n_layers=2, n_heads=2, max_seq_len=128
    )
    cfg = StrataConfig(model=model_cfg, data={"seq_len": 32}, train={"run_dir": str(run_dir)})
    dump_config(cfg, run_dir / "config.yaml")
    if with_tokenizer:
        train_byte_level_bpe(["hello world, hello strata"] * 20, vocab_size=300).save(
            str(run_dir / "tokenizer.json")
        )
    with torch.device("meta"):
        model = get_spec(family).build(model_cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    model.init_weights()
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    Checkpointer(run_dir / "checkpoints", ctx).save(
        3, model, torch.optim.AdamW(model.parameters()), {"tokens_seen": 0}
    )
    return run_dir, model


def call(*argv) -> int:
    parser = argparse.ArgumentParser()
    generate_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", *map(str, argv)])
    return args.func(args)


@pytest.mark.parametrize("family", ["gla", "llama"])
def test_generate_ids_equal_library_greedy(tmp_path, capsys, family):
    run_dir, model = write_run(tmp_path, family, with_tokenizer=False)
    assert call(run_dir, "--ids", "--prompt", "5,9,13", "--max-new-tokens", 6, "--no-eos-stop") == 0
    printed = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert printed == [5, 9, 13] + generate(model, [5, 9, 13], 6)


def test_generate_text_with_the_run_tokenizer(tmp_path, capsys):
    run_dir, _ = write_run(tmp_path, "gla")
    assert (
        call(run_dir, "--prompt", "hello", "--max-new-tokens", 4, "--temperature", 0.8, "--seed", 1)
        == 0
    )
    assert capsys.readouterr().out.startswith("hello")


def test_generate_errors_are_one_line_exit_2(tmp_path, capsys):
    run_dir, _ = write_run(tmp_path, "gla", with_tokenizer=False)
    assert call(run_dir, "--prompt", "hello") == 2
    assert "--tokenizer" in capsys.readouterr().err  # errors on stderr
    assert call(run_dir, "--ids", "--prompt", "1,x") == 2
    assert call(run_dir, "--ids", "--prompt", "999") == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert call(tmp_path / "nowhere", "--ids", "--prompt", "1") == 2


def test_generate_from_a_hugging_face_directory_equals_its_checkpoint(tmp_path, capsys):
    from engine.export import export_hf

    run_dir, model = write_run(tmp_path, "llama")
    export_hf(run_dir, tmp_path / "hf")
    assert call(tmp_path / "hf", "--ids", "--prompt", "5,9,13", "--max-new-tokens", 6, "--no-eos-stop") == 0
    printed = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert printed == [5, 9, 13] + generate(model, [5, 9, 13], 6)
    assert call(tmp_path / "hf", "--prompt", "hello", "--max-new-tokens", 3) == 0  # the directory's tokenizer.json
    assert capsys.readouterr().out.startswith("hello")
