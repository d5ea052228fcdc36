"""Activation checkpointing (selective every k-th block, op-level, full) and per-block
torch.compile give the plain run's losses (1e-4 relative) on CPU, also under tensor and context
parallel."""

from __future__ import annotations

import pytest
import torch
from distributed_runs import assert_close, losses, run_ranks, run_tree, shared_run

from engine.parallel import apply_activation_checkpointing
from models.config import ModelConfig
from models.llama import Llama

STEPS = range(1, 11)


@pytest.fixture(scope="module")
def plain(tiny_corpus, tmp_path_factory):
    return losses(shared_run("single", tmp_path_factory, tiny_corpus, 1, steps=20))


@pytest.mark.parametrize("parallel", [
    {"activation_checkpointing": "selective", "ac_every": 2},
    {"activation_checkpointing": "full"},
    {"compile": True},  # inductor: C++ kernels on CPU
])
def test_single_process_matches_plain(parallel, plain, tiny_corpus, tmp_path):
    # no final eval: under compile it would add two more compilations (no-grad, short batch)
    tree = run_tree(tiny_corpus, tmp_path / "run", **{"data.val_path": None},
                    **{f"parallel.{k}": v for k, v in parallel.items()})
    assert_close(losses(run_ranks(1, tmp_path / "run", tree)), plain, STEPS)


def test_compile_and_ac_under_tensor_and_sequence_parallel_match_plain(plain, tiny_corpus, tmp_path):
    """The compiled blocks take DTensor-backed activations (AOTAutograd is where that can go
    wrong; aot_eager keeps it without the C++ build)."""
    options = {"parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.compile": True,
               "parallel.activation_checkpointing": "selective", "parallel.ac_every": 2, "data.val_path": None}
    tree = run_tree(tiny_corpus, tmp_path / "run", **options)
    assert_close(losses(run_ranks(2, tmp_path / "run", tree, compile_backend="aot_eager")), plain, STEPS)


def test_compile_under_context_parallel_matches_plain(plain, tiny_corpus, tmp_path):
    """Compiled blocks take the SequenceShard and run the K/V all-gather (an autograd Function
    around a collective) inside."""
    options = {"parallel.cp": 2, "parallel.compile": True, "data.val_path": None}
    tree = run_tree(tiny_corpus, tmp_path / "run", **options)
    assert_close(losses(run_ranks(2, tmp_path / "run", tree, compile_backend="aot_eager")), plain, STEPS)


def _tiny_model() -> Llama:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


@pytest.mark.parametrize(("mode", "every", "op_level", "wrapped"), [
    ("selective", 2, False, ["0", "2"]),
    ("selective", 2, True, ["0", "1", "2"]),
    ("full", 1, False, ["0", "1", "2"]),
])
def test_checkpointed_blocks_give_the_same_gradients(mode, every, op_level, wrapped):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], list(range(12))])
    reference, model = _tiny_model(), _tiny_model()
    apply_activation_checkpointing(model, mode, every, op_level=op_level)
    assert [n for n, b in model.layers.items() if type(b).__name__ == "CheckpointWrapper"] == wrapped
    for m in (reference, model):
        torch.nn.functional.cross_entropy(m(ids, position_ids).flatten(0, 1), ids.flatten()).backward()
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        name = name.replace("._checkpoint_wrapped_module", "")
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7)
