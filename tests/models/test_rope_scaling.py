"""Scaled RoPE (model.rope_scaling: linear, llama3, yarn) equals Hugging Face transformers': the
inverse frequencies and attention factor of its ROPE_INIT_FUNCTIONS, and the logits of a Llama
with that config.json, both ways (export to transformers, import from it)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from engine.export import build_model_from_hf, save_hf  # noqa: E402
from models.config import ModelConfig, RopeScaling  # noqa: E402
from models.rope import inverse_frequencies  # noqa: E402
from tests.models.test_hf_roundtrip import strata_model, tiny_cfg  # noqa: E402

SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "llama3-3.1": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0},
    "llama3-3.2": {"type": "llama3", "factor": 32.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-tuned": {"type": "yarn", "factor": 2.5, "original_max_position_embeddings": 24, "beta_fast": 16.0,
                   "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False},
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("head_dim, theta", [(16, 500.0), (64, 500000.0), (128, 10000.0)])
def test_frequencies_and_attention_factor_are_transformers(name, head_dim, theta):
    scaling = RopeScaling(**SCALINGS[name])
    hf = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                                  max_position_embeddings=64, rope_scaling=scaling.to_hf())  # fmt: skip
    theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling.type](hf, "cpu")
    ours, our_factor = inverse_frequencies(head_dim, theta, scaling, max_seq_len=64)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)
    assert RopeScaling.from_hf(scaling.to_hf()) == scaling  # config.json round trip


@pytest.mark.parametrize("name", ["linear", "llama3-3.2", "yarn"])
def test_a_scaled_llama_exports_to_transformers_and_imports_back_with_equal_logits(tmp_path, name):
    cfg = tiny_cfg(rope_scaling=SCALINGS[name], tie_embeddings=name == "llama3-3.2")
    model = strata_model(cfg)
    out = save_hf(model.state_dict(), cfg, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == cfg.rope_scaling.type
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(4))  # past the original 16-32
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    unscaled = strata_model(tiny_cfg(tie_embeddings=name == "llama3-3.2"))
    with torch.no_grad():
        assert (unscaled(ids) - theirs).abs().max().item() > 1e-2  # the scaling matters at these positions

    back, back_cfg = build_model_from_hf(out)
    assert back_cfg.rope_scaling == cfg.rope_scaling
    with torch.no_grad():
        assert (back.eval()(ids) - theirs).abs().max().item() < 1e-4


def test_scaling_is_checked_where_it_is_written():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling(type="llama3", factor=8.0)
    with pytest.raises(ValueError, match="rope_scaling: GLA has no positional embedding"):
        ModelConfig(family="gla", rope_scaling={"type": "linear", "factor": 2.0})
