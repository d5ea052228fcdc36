"""GLA tensor parallelism on real ranks (CPU, gloo): the TP=2 model gives the unparallelized
model's logits and parameter gradients (packed documents included), and TP / FSDP2 x TP /
context-parallel (the state handed rank to rank) training runs follow the one-process loss curve
to the same final weights. Ranks and runs come from
tests/engine/distributed_runs.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from engine.export import load_checkpoint_weights
from models.config import ModelConfig
from models.spec import get_spec
from tests.engine.distributed_runs import assert_close, losses, run_in_ranks, shared_run

TP = 2
TOLERANCE = 1e-5  # fp32 logits and gradients, TP=2 vs one process: max absolute difference
RELATIVE_TOLERANCE = 1e-4  # ... and relative to the tensor's largest entry
GLA_MODEL = {  # configs/gla_demo.yaml, shrunk: 4 heads (2 per TP rank), rank-16 gate, tau 16, tied
    "family": "gla",
    "vocab_size": 384,
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "max_seq_len": 64,
    "gla_gate_rank": 16,
    "gla_gate_tau": 16.0,
    "gla_backend": "torch",
    "tie_embeddings": True,
}
GLA_OPTIM = {"lr": 3e-3, "weight_decay": 0.1, "beta2": 0.95, "grad_clip": 1.0}


def _tiny_model(tie_embeddings: bool):
    cfg = ModelConfig(
        **{**GLA_MODEL, "vocab_size": 97, "n_layers": 3, "tie_embeddings": tie_embeddings}
    )
    with torch.device("meta"):
        model = get_spec("gla").build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():  # norm weights and gate biases off their constant init: heads differ
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param), alpha=0.5)
    return model


def _inputs():
    """(ids, position_ids) cases: one document per row, and packed rows whose documents
    restart mid-row (one document crosses the 64-token chunk of the torch kernel)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 80), generator=gen)
    packed = torch.stack(
        [
            torch.cat([torch.arange(n) for n in (5, 70, 5)]),
            torch.cat([torch.arange(n) for n in (30, 50)]),
        ]
    )
    return [("one_document_per_row", ids, None), ("packed_documents", ids, packed)]


def _max_diffs(reference, parallel, ids, position_ids) -> dict[str, tuple[float, float]]:
    """(max |difference|, max |reference|) of the logits and of every parameter gradient
    (DTensors gathered) under the training loss (mean next-token cross-entropy)."""
    diffs = {}
    outputs = []
    for model in (reference, parallel):
        model.zero_grad(set_to_none=True)
        logits = model(ids, position_ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        outputs.append(logits.detach())
    diffs["logits"] = _diff(outputs[0], outputs[1])
    parallel_params = dict(parallel.named_parameters())
    for name, param in reference.named_parameters():
        grad = parallel_params[name].grad
        assert grad is not None, f"{name}: no gradient under TP"
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        diffs[f"grad {name}"] = _diff(param.grad, full)
    return diffs


def _diff(want, got) -> tuple[float, float]:
    """(max |got - want|, max |want|)."""
    return (got - want).abs().max().item(), want.abs().max().item()


def _model_parity_rank(rank: int, tie_embeddings: bool) -> dict:
    """One TP rank: reference model and its TP=2 copy from the same init; returns the diffs."""
    dist.init_process_group("gloo")
    reference = _tiny_model(tie_embeddings)
    parallel = copy.deepcopy(reference)
    get_spec("gla").parallelize_tp(parallel, init_device_mesh("cpu", (TP,)))
    return {
        name: _max_diffs(reference, parallel, ids, position_ids)
        for name, ids, position_ids in _inputs()
    }


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_tp2_logits_and_gradients_match_one_process(tie_embeddings, tmp_path):
    for rank, result in enumerate(run_in_ranks(_model_parity_rank, TP, tmp_path, tie_embeddings)):
        for case, diffs in result.items():
            assert diffs.keys() >= {"logits", "grad layers.0.attention.g_norm.weight"}
            worst = max(diffs, key=lambda name: diffs[name][0])
            assert diffs[worst][0] <= TOLERANCE, (rank, case, worst, diffs[worst])
            # and small against each tensor's own scale (tiny gradients pass TOLERANCE anyway)
            relative = {name: diff / max(scale, 1e-12) for name, (diff, scale) in diffs.items()}
            worst = max(relative, key=relative.get)
            assert relative[worst] <= RELATIVE_TOLERANCE, (rank, case, worst, diffs[worst])


def _gla_run(key, tmp_path_factory, corpus, nproc, **parallel):
    overrides = {"model": GLA_MODEL, "optim": GLA_OPTIM}
    overrides.update({f"parallel.{k}": v for k, v in parallel.items()})
    return shared_run(key, tmp_path_factory, corpus, nproc, steps=8, **overrides)


@pytest.mark.parametrize(
    ("name", "nproc", "parallel"),
    [("gla_tp2", 2, {"tp": 2}), ("gla_fsdp2xtp2", 4, {"tp": 2}), ("gla_cp2", 2, {"cp": 2})],
)
def test_gla_training_under_tp_or_cp_matches_one_process(
    name, nproc, parallel, tiny_corpus, tmp_path_factory
):
    single = _gla_run("gla_single", tmp_path_factory, tiny_corpus, 1)
    run = _gla_run(name, tmp_path_factory, tiny_corpus, nproc, **parallel)
    assert_close(losses(run), losses(single), range(1, 9))
    # the final weights too (per-head norm weights included, whose TP gradients are Partial
    # DTensors until the optimizer or FSDP reduces them); 8 Adam steps move a weight up to 2.4e-2
    want, _, _ = load_checkpoint_weights(single)
    got, _, _ = load_checkpoint_weights(run)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert (got[key] - value).abs().max().item() <= 1e-4, key
