"""HF interop: Strata Llama -> HF safetensors loads in transformers with equal logits, and back.

fp32 on CPU, tiny random models built locally (no hub access). Logits must agree to 1e-4.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.export import (  # noqa: E402
    SAFE_INDEX,
    build_model_from_hf,
    load_hf_into_model,
    read_hf_weights,
    save_hf,
)
from models import hf_llama  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.spec import get_spec  # noqa: E402

TOL = 1e-4


def strata_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    with torch.device("meta"):
        model = get_spec("llama").build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    # init_weights leaves norms at 1: perturb every parameter so a swapped name would show
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=80,
        max_seq_len=64,
        rope_theta=500.0,
        norm_eps=1e-5,
        attn_backend="sdpa",
    )
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_embeddings": False},
        {"tie_embeddings": True},
        {"qk_norm": True, "tie_embeddings": False},
    ],
    ids=["untied", "tied", "qk_norm-qwen3"],
)
def test_strata_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    cfg = tiny_cfg(**overrides)
    model = strata_model(cfg)
    # a small shard limit forces several shards + the index file
    out = save_hf(model.state_dict(), cfg, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((out / SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(read_hf_weights(out))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="eager"
    )
    hf.eval()
    expected_class = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(hf, ids)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < TOL


def _random_hf_llama(tmp_path, tie: bool, **kw):
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=112,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        **kw,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True, max_shard_size="50KB")
    return hf, tmp_path / "src"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_llama_imports_into_strata_with_equal_logits(tmp_path, tie):
    hf, src = _random_hf_llama(tmp_path, tie)
    model, cfg = build_model_from_hf(src, attn_backend="sdpa")
    assert (cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim, cfg.tie_embeddings) == (
        48,
        6,
        3,
        72,
        tie,
    )
    ids = torch.randint(0, 112, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
    assert (ours - hf_logits(hf, ids)).abs().max().item() < TOL


def test_import_then_export_round_trips_exactly(tmp_path):
    hf, src = _random_hf_llama(tmp_path, tie=False)
    model, cfg = build_model_from_hf(src)
    out = save_hf(model.state_dict(), cfg, tmp_path / "back")
    original, back = read_hf_weights(src), read_hf_weights(out)
    assert set(original) == set(back)
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name


def test_load_hf_into_model_rejects_mismatched_shapes(tmp_path):
    _, src = _random_hf_llama(tmp_path, tie=False)
    wrong = strata_model(
        tiny_cfg(
            vocab_size=112, dim=48, n_heads=6, n_kv_heads=3, ffn_hidden=64, tie_embeddings=False
        )
    )
    with pytest.raises(ValueError, match="mlp|feed_forward"):
        load_hf_into_model(wrong, src)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),  # no original context length
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_unsupported_hf_configs_name_the_field(change, field):
    base = hf_llama.hf_config(tiny_cfg())
    with pytest.raises(ValueError, match=field):
        hf_llama.model_config_from_hf({**base, **change})


def test_config_round_trip_and_name_mapping_is_a_bijection():
    cfg = tiny_cfg(qk_norm=True, tie_embeddings=False)
    assert hf_llama.model_config_from_hf(
        hf_llama.hf_config(cfg), attn_backend="sdpa"
    ) == cfg.model_copy(update={"multiple_of": 64})
    state = strata_model(cfg).state_dict()
    assert hf_llama.from_hf(hf_llama.to_hf(state)).keys() == state.keys()
    with pytest.raises(KeyError, match="bogus"):
        hf_llama.to_hf({"bogus.weight": torch.zeros(1)})


def test_export_command_from_a_strata_checkpoint(tmp_path, capsys):
    """`strata export RUN --hf OUT` on a checkpoint written by the engine's Checkpointer."""
    import argparse

    from data_pipeline.tokenizer import train_byte_level_bpe
    from engine.checkpoint import Checkpointer
    from engine.config import StrataConfig, dump_config
    from engine.dist import DistContext
    from launch.commands import export as export_cmd

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = StrataConfig(
        model=tiny_cfg(vocab_size=300, tie_embeddings=False),
        data={"seq_len": 32},
        train={"run_dir": str(run_dir)},
    )
    dump_config(cfg, run_dir / "config.yaml")
    train_byte_level_bpe(["hello world, hello strata"] * 20, vocab_size=300).save(
        str(run_dir / "tokenizer.json")
    )
    model = strata_model(cfg.model, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    Checkpointer(run_dir / "checkpoints", ctx).save(7, model, optimizer, {"tokens_seen": 0})

    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "hf"
    args = parser.parse_args(["export", str(run_dir), "--hf", str(out), "--max-shard-size", "60KB"])
    assert args.func(args) == 0
    assert (out / SAFE_INDEX).is_file() and (out / "tokenizer.json").is_file()
    assert args.func(args) == 2  # OUT exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf, ids)).abs().max().item() < TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("hello strata")["input_ids"]) == "hello strata"
    assert (
        json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        == tokenizer.eos_token_id
    )


def test_load_hf_into_model_gives_hf_logits(tmp_path):
    hf, src = _random_hf_llama(tmp_path, tie=True)
    cfg = hf_llama.model_config_from_hf(json.loads((src / "config.json").read_text()))
    model = strata_model(cfg, seed=9)  # different weights until the load
    assert load_hf_into_model(model, src) == cfg
    ids = torch.randint(0, 112, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf, ids)).abs().max().item() < TOL


def test_import_hf_command_starts_a_run_from_hf_weights(tmp_path, capsys):
    """`strata import-hf HF CONFIG`: step-0 checkpoint == HF weights, then trains and resumes."""
    import argparse

    import yaml

    from data_pipeline.prepare import PrepareOptions, prepare
    from engine.checkpoint import resolve_checkpoint
    from engine.export import export_hf
    from launch.commands import import_hf

    texts = [
        f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(60)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(
        [str(tmp_path / "in.jsonl")],
        tmp_path / "shards",
        PrepareOptions(train_tokenizer=300, workers=1, progress=False),
    )
    vocab = 300  # the trained tokenizer has at most this many ids
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"attn_backend": "sdpa", "max_seq_len": 32},
                "data": {
                    "sources": [{"path": str(tmp_path / "shards")}],
                    "seq_len": 32,
                    "global_batch_size": 4,
                    "micro_batch_size": 2,
                    "prefetch": 0,
                },
                "optim": {"lr": 1e-3},
                "schedule": {"name": "constant"},
                "train": {"steps": 2, "device": "cpu", "run_dir": str(run_dir)},
                "checkpoint": {"keep_last": 5},
                "logging": {"tensorboard": False, "progress": False},
            }
        )
    )
    parser = argparse.ArgumentParser()
    import_hf.add_parser(parser.add_subparsers())
    args = parser.parse_args(["import-hf", str(tmp_path / "hf"), str(config)])
    assert args.func(args) == 0
    assert json.loads((run_dir / "imported_from.json").read_text())["hf_dir"].endswith("hf")

    step0 = resolve_checkpoint(run_dir / "checkpoints" / "step_00000000")
    export_hf(step0, tmp_path / "back")
    original, back = read_hf_weights(tmp_path / "hf"), read_hf_weights(tmp_path / "back")
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name
    assert resolve_checkpoint(run_dir).name == "step_00000002"  # it trained
    assert args.func(args) == 2  # a second import into the same run is refused
    assert "--resume" in capsys.readouterr().err

    clash = parser.parse_args(
        [
            "import-hf",
            str(tmp_path / "hf"),
            str(config),
            "--set",
            "model.dim=64",
            "--run-dir",
            str(tmp_path / "other"),
        ]
    )
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="model.dim"):
        clash.func(clash)
