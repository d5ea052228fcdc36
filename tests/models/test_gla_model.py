"""The GLA model family: build contract, packed documents, backends, decoding, spec, converter."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.spec import get_spec


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(
        family="gla",
        vocab_size=97,
        dim=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=256,
        tie_embeddings=False,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float64):
    with torch.device("meta"):
        model = get_spec("gla").build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype)


def test_meta_build_and_deterministic_init():
    cfg = tiny_cfg()
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    layer = a.layers["0"].attention
    assert layer.wq.weight.shape == (16, 32)  # d_k = d / 2
    assert layer.wv.weight.shape == (32, 32)  # d_v = d
    assert layer.gk_down.weight.shape == (16, 32) and layer.gk_up.weight.shape == (
        16,
        16,
    )  # rank 16
    assert not any(p.is_meta for p in a.parameters())
    logits = a(torch.randint(0, 97, (2, 10)))
    assert logits.shape == (2, 10, 97) and logits.dtype == torch.float64


def test_packed_rows_equal_documents_run_alone():
    model = build(tiny_cfg())
    lengths = [5, 70, 3, 22]  # one row of 100 tokens, 4 documents (one crosses a chunk)
    ids = torch.randint(0, 97, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids)
        start = 0
        for n in lengths:
            alone = model(ids[:, start : start + n])
            torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-9, atol=1e-9)
            start += n


def test_two_rows_with_documents_match_row_by_row():
    model = build(tiny_cfg())
    ids = torch.randint(0, 97, (2, 40))
    position_ids = torch.stack([torch.cat([torch.arange(25), torch.arange(15)]), torch.arange(40)])
    with torch.no_grad():
        both = model(ids, position_ids)
        for row in range(2):
            torch.testing.assert_close(
                both[row : row + 1], model(ids[row : row + 1], position_ids[row : row + 1])
            )


def test_backends_agree_on_model_logits_and_grads():
    cfg = tiny_cfg()
    ids = torch.randint(0, 97, (2, 80))
    outputs = {}
    for backend in ("torch", "recurrent"):
        model = build(cfg.model_copy(update={"gla_backend": backend}), seed=1)
        logits = model(ids)
        logits.square().mean().backward()
        outputs[backend] = (logits.detach(), model.layers["1"].attention.gk_up.weight.grad)
    torch.testing.assert_close(outputs["torch"][0], outputs["recurrent"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outputs["torch"][1], outputs["recurrent"][1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("prefill", [1, 9])
def test_recurrent_decoding_equals_parallel_forward(prefill):
    model = build(tiny_cfg(), seed=2)
    ids = torch.randint(0, 97, (2, 75))
    with torch.no_grad():
        parallel = model(ids)
        state = model.init_decode_state(2, 75)
        logits, state = model.decode_step(ids[:, :prefill], state)
        steps = [logits]
        for t in range(prefill, 75):
            logits, state = model.decode_step(ids[:, t : t + 1], state)
            steps.append(logits)
    assert state["pos"] == 75
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, rtol=1e-9, atol=1e-9)


def test_flops_per_token_counts_parameters_and_recurrence():
    cfg = tiny_cfg()
    model = build(cfg)
    spec = get_spec("gla")
    matmul_params = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n
    )
    flops = spec.flops_per_token(cfg, 512)
    assert flops > 6 * matmul_params
    assert flops == spec.flops_per_token(cfg, 4096)  # linear attention: no T-dependence per token


def test_hf_names_round_trip_and_config():
    cfg = tiny_cfg()
    model = build(cfg, dtype=torch.float32)
    adapter = get_spec("gla").load_hf_adapter()
    hf = adapter.to_hf(model.state_dict(), cfg)
    assert "model.layers.1.attn.gk_proj.1.bias" in hf and "lm_head.weight" in hf
    back = adapter.from_hf(hf, adapter.hf_config(cfg))
    assert back.keys() == model.state_dict().keys()
    again = adapter.model_config_from_hf(adapter.hf_config(cfg))
    assert again.hidden_dim == cfg.hidden_dim
    assert again.model_copy(update={"ffn_hidden": None}) == cfg
    with pytest.raises(ValueError, match="gla_gate_tau"):
        adapter.hf_config(tiny_cfg(gla_gate_tau=8.0))


def test_hf_directory_imports_as_gla_by_model_type(tmp_path):
    """An exported GLA directory comes back through the generic HF import (picked by model_type)."""
    import json

    from engine.export import build_model_from_hf, save_hf

    cfg = tiny_cfg()
    model = build(cfg, dtype=torch.float32).eval()
    save_hf(model.state_dict(), cfg, tmp_path / "hf")
    loaded, loaded_cfg = build_model_from_hf(tmp_path / "hf")
    assert loaded_cfg.family == "gla"
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"model_type: 'mamba' is not supported .*gla.*llama"):
        build_model_from_hf(tmp_path / "hf")


def test_import_hf_command_starts_a_gla_run(tmp_path, tiny_corpus):
    """`strata import-hf` on an fla-style GLA directory: family from model_type, step-0 weights."""
    import argparse

    import yaml

    from engine.checkpoint import resolve_checkpoint
    from engine.export import export_hf, read_hf_weights, save_hf
    from launch.commands import import_hf
    from tests.conftest import tiny_config

    cfg = tiny_cfg(vocab_size=384, max_seq_len=64)
    save_hf(build(cfg, dtype=torch.float32).state_dict(), cfg, tmp_path / "hf")
    tree = tiny_config(tiny_corpus, tmp_path / "run")
    tree["model"] = {"max_seq_len": 64, "gla_backend": "torch"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    parser = argparse.ArgumentParser()
    import_hf.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["import-hf", str(tmp_path / "hf"), str(tmp_path / "run.yaml"), "--no-train"]
    )
    assert args.func(args) == 0
    step0 = resolve_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000000")
    export_hf(step0, tmp_path / "back")
    original, back = read_hf_weights(tmp_path / "hf"), read_hf_weights(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name
    run_config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_config["model"]["family"] == "gla"


def test_tensor_parallel_plan_on_one_rank(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = build(tiny_cfg(), dtype=torch.float32)
        ids = torch.randint(0, 97, (2, 20))
        expected = model(ids)
        get_spec("gla").parallelize_tp(model, init_device_mesh("cpu", (1,)))
        torch.testing.assert_close(model(ids), expected)
    finally:
        dist.destroy_process_group()
