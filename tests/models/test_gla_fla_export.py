"""`strata export` of a GLA run loads strictly into fla's GLAForCausalLM with Strata's logits,
and a GLAForCausalLM saved by fla converts back to a Strata GLA with fla's logits.

fla runs its Triton kernels on CPU under the interpreter, so it lives in a child process with
TRITON_INTERPRET=1 set before anything imports triton (the parent's triton/fla modules may
already be built for another mode). fp32, tiny models; skipped where fla is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import Checkpointer
from engine.config import StrataConfig, dump_config
from engine.dist import DistContext
from engine.export import read_hf_config, read_hf_weights
from launch.commands import export as export_cmd
from models.config import ModelConfig
from models.spec import get_spec

RTOL = 1e-4  # max |difference| relative to max |logit|
VOCAB = 97
LENGTHS = [30, 70]  # one packed row: a short document and one longer than a 64-token chunk

# The child: loads every exported directory with fla and writes its logits next to the inputs.
# Under the interpreter there is no device to time autotuning candidates on (triton asks for an
# active GPU driver), so every candidate reports 0 and the first one that survives pruning runs.
FLA_CHILD = """
import json, sys
import torch
import triton.runtime.autotuner as autotuner
autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles: [0.0] * len(quantiles))
from fla.models import GLAConfig, GLAForCausalLM
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

work = sys.argv[1]
report = {}
for name in sys.argv[2:]:
    hf_dir = f"{work}/{name}"
    if name == "from_fla":  # born in fla: random weights, perturbed so that no norm stays at 1
        config = GLAConfig(**json.loads(open(f"{work}/{name}.config.json").read()))
        torch.manual_seed(0)
        born = GLAForCausalLM(config)
        with torch.no_grad():
            for p in born.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        born.save_pretrained(hf_dir)
    assert isinstance(AutoConfig.from_pretrained(hf_dir), GLAConfig)
    model, info = GLAForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    inputs = load_file(f"{work}/{name}.inputs.safetensors")
    logits = {}
    with torch.no_grad():
        logits["rows"] = model(input_ids=inputs["ids"], use_cache=False).logits
        if "packed_ids" in inputs:
            logits["packed"] = model(
                input_ids=inputs["packed_ids"], cu_seqlens=inputs["cu_seqlens"], use_cache=False
            ).logits
    save_file(logits, f"{work}/{name}.logits.safetensors")
    report[name] = {
        "loading": {key: [str(x) for x in value] for key, value in info.items()},
        "lm_head_is_embedding": model.lm_head.weight.data_ptr()
        == model.model.embeddings.weight.data_ptr(),
    }
print(json.dumps(report))
"""


def gla_cfg(tie_embeddings: bool) -> ModelConfig:
    return ModelConfig(
        family="gla",
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=2,
        ffn_hidden=96,
        max_seq_len=128,
        norm_eps=1e-5,  # not fla's default (1e-6): the exported config must carry it
        tie_embeddings=tie_embeddings,
    )


def trained_looking_gla(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = get_spec("gla").build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():  # norms at 1 and gate bias at 0 would hide a swapped name
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def export_run(run_dir: Path, out: Path, model: torch.nn.Module, cfg: ModelConfig) -> None:
    """What a user does: a checkpoint written by the engine, then `strata export RUN --hf OUT`."""
    run_dir.mkdir()
    dump_config(
        StrataConfig(model=cfg, data={"seq_len": 64}, train={"run_dir": str(run_dir)}),
        run_dir / "config.yaml",
    )
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    Checkpointer(run_dir / "checkpoints", ctx).save(3, model, optimizer, {"tokens_seen": 0})
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", str(run_dir), "--hf", str(out)])
    assert args.func(args) == 0


def run_fla(work: Path, names: list[str]) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", FLA_CHILD, str(work), *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_close_logits(name: str, ours: dict[str, torch.Tensor], theirs: dict) -> None:
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        diff = (value - theirs[key]).abs().max().item()
        relative = diff / value.abs().max().item()
        print(f"{name} {key}: max |strata - fla| = {diff:.2e} ({relative:.2e} of max |logit|)")
        assert relative < RTOL, (name, key, diff, relative)


@pytest.fixture(scope="module")
def fla_run(tmp_path_factory):
    """Two Strata runs exported (untied, tied) and one model born in fla, all run by fla in one
    child process (importing fla is most of its cost): (work dir, Strata logits, fla's report).

    find_spec, not importorskip: importing fla here would cost ~8 s for nothing, and a broken
    install then fails in the child instead of skipping."""
    if importlib.util.find_spec("fla") is None:
        pytest.skip("flash-linear-attention (fla) is not installed")
    work = tmp_path_factory.mktemp("fla")
    generator = torch.Generator().manual_seed(0)
    # rows of <= 64 tokens take fla's fused recurrent kernel; the packed row (100 tokens, one
    # document across a chunk boundary) its chunked kernel with cu_seqlens
    rows = torch.randint(0, VOCAB, (2, 48), generator=generator)
    packed = torch.randint(0, VOCAB, (1, sum(LENGTHS)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.long)

    ours = {}
    for seed, name in enumerate(["untied", "tied"]):
        cfg = gla_cfg(tie_embeddings=name == "tied")
        model = trained_looking_gla(cfg, seed)
        export_run(work / f"run_{name}", work / name, model, cfg)
        inputs = {"ids": rows}
        with torch.no_grad():
            ours[name] = {"rows": model(rows)}
            if name == "untied":  # the packed check once: it is the slow one under the interpreter
                inputs.update(packed_ids=packed, cu_seqlens=cu_seqlens)
                ours[name]["packed"] = model(packed, position_ids)
        save_file(inputs, str(work / f"{name}.inputs.safetensors"))
    # fla's defaults otherwise: no intermediate_size (its MLP width comes from hidden_ratio)
    born = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2}
    (work / "from_fla.config.json").write_text(json.dumps({**born, "hidden_ratio": 2}))
    save_file({"ids": rows}, str(work / "from_fla.inputs.safetensors"))
    return work, ours, run_fla(work, [*ours, "from_fla"])


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_exported_gla_loads_in_fla_with_equal_logits(fla_run, name):
    work, ours, report = fla_run
    config = json.loads((work / name / "config.json").read_text())
    assert config["model_type"] == "gla" and config["norm_eps"] == 1e-5
    loading = report[name]["loading"]
    assert loading["missing_keys"] == [] and loading["unexpected_keys"] == [], loading
    assert loading["mismatched_keys"] == [] and loading["error_msgs"] == [], loading
    assert report[name]["lm_head_is_embedding"] == (name == "tied")
    assert_close_logits(name, ours[name], load_file(str(work / f"{name}.logits.safetensors")))


def test_gla_saved_by_fla_imports_with_equal_logits(fla_run):
    work, _, _ = fla_run
    hf_dir = work / "from_fla"
    adapter = get_spec("gla").load_hf_adapter()
    hf_config = read_hf_config(hf_dir)
    cfg = adapter.model_config_from_hf(hf_config)
    assert cfg.hidden_dim == 256  # fla's rule: 2/3 x 2 x 64 = 85, rounded up to 256
    with torch.device("meta"):
        model = get_spec("gla").build(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(adapter.from_hf(read_hf_weights(hf_dir), hf_config), strict=True)
    rows = load_file(str(work / "from_fla.inputs.safetensors"))["ids"]
    with torch.no_grad():
        ours = {"rows": model.eval()(rows)}
    assert_close_logits("from_fla", ours, load_file(str(work / "from_fla.logits.safetensors")))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clamp_min", -1.0),
        ("hidden_act", "relu"),
        ("use_output_gate", False),
        ("elementwise_affine", False),
        ("num_kv_heads", 1),
        ("attn", {"layers": [1]}),
    ],
)
def test_model_config_from_hf_refuses_what_strata_gla_does_not_compute(field, value):
    adapter = get_spec("gla").load_hf_adapter()
    hf = adapter.hf_config(gla_cfg(tie_embeddings=False))
    assert adapter.model_config_from_hf(hf).hidden_dim == 96
    with pytest.raises(ValueError, match=field):
        adapter.model_config_from_hf({**hf, field: value})
