"""Context parallelism on real ranks (CPU, gloo): a sequence split over 2 or 4 ranks gives the
one-process model's logits and parameter gradients, for Llama (zigzag layout, all-gathered K/V)
and GLA (contiguous layout, recurrent state handed from rank to rank), with one document per
row and with packed documents that cross rank boundaries or start exactly on one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.config import ModelConfig
from models.context_parallel import SequenceShard, local_positions
from models.spec import get_spec
from tests.engine.distributed_runs import run_in_ranks

SEQ = 48
TOLERANCE = 1e-5  # fp64 would be 1e-12; fp32 sums in another order: max |difference| / max |value|
MODELS = {
    "llama": {"family": "llama", "vocab_size": 97, "dim": 32, "n_layers": 2, "n_heads": 4,
              "n_kv_heads": 2, "max_seq_len": SEQ},
    "gla": {"family": "gla", "vocab_size": 97, "dim": 32, "n_layers": 2, "n_heads": 2,
            "max_seq_len": SEQ, "gla_gate_rank": 16, "gla_gate_tau": 16.0, "gla_backend": "torch"},
}  # fmt: skip
MODELS["gla_triton"] = {**MODELS["gla"], "gla_backend": "triton"}  # TRITON_INTERPRET=1 on CPU


def _model(name: str):
    cfg = ModelConfig(**MODELS[name])
    with torch.device("meta"):
        model = get_spec(cfg.family).build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():  # gates and norms off their constant init
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param), alpha=0.5)
    return model


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, SEQ), generator=gen)
    packed = torch.stack([
        torch.cat([torch.arange(n) for n in (5, 30, 13)]),  # documents across rank boundaries
        torch.cat([torch.arange(n) for n in (12, 12, 24)]),  # starts exactly on boundaries
    ])  # fmt: skip
    return [("one_document_per_row", ids, None), ("packed", ids, packed)]


def _loss(logits, labels, total):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / total


def _rank_parity(rank: int, size: int, family: str) -> dict:
    """One CP rank: the reference model on the whole rows and a copy on this rank's part;
    the relative differences of its logits and of the all-reduced parameter gradients."""
    dist.init_process_group("gloo")
    layout = "zigzag" if family == "llama" else "contiguous"  # the trainer asks the model spec
    result = {}
    for case, ids, position_ids in _cases():
        labels = torch.roll(ids, -1, dims=1)
        reference, sharded = _model(family), _model(family)
        full = reference(ids, position_ids)
        _loss(full, labels, labels.numel()).backward()

        shard = SequenceShard(dist.group.WORLD, rank, size, SEQ, layout, position_ids, torch.device("cpu"))
        local = sharded(shard.take(ids), shard.take(position_ids), shard=shard)
        _loss(local, shard.take(labels), labels.numel()).backward()
        diffs = {"logits": _diff(full[:, shard.index].detach(), local.detach())}
        for (name, want), got in zip(reference.named_parameters(), sharded.parameters(), strict=True):
            grad = got.grad.clone()
            dist.all_reduce(grad)  # each rank's gradient covers its own tokens
            diffs[name] = _diff(want.grad, grad)
        result[case] = diffs
    return result


def _diff(want: torch.Tensor, got: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    ("family", "size"), [("llama", 2), ("gla", 2), ("llama", 4), ("gla", 4), ("gla_triton", 2)]
)
def test_sharded_sequence_gives_the_one_process_logits_and_gradients(family, size, tmp_path):
    for rank, result in enumerate(run_in_ranks(_rank_parity, size, tmp_path, size, family)):
        for case, diffs in result.items():
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] <= TOLERANCE, (rank, case, worst, diffs[worst])


def test_layouts_cover_the_sequence_once_and_balance_causal_work():
    for layout in ("zigzag", "contiguous"):
        held = torch.cat([local_positions(48, 4, r, layout) for r in range(4)])
        assert sorted(held.tolist()) == list(range(48))
    # zigzag: every rank's queries see the same number of causal keys
    work = [int((local_positions(48, 4, r, "zigzag") + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match=r"data.seq_len: 50 tokens do not split into 8 equal parts"):
        local_positions(50, 4, 0, "zigzag")


def test_flex_attention_path_equals_the_masked_sdpa_path():
    """The GPU path (FlexAttention, the rank's positions looked up in its mask function) and
    the CPU path (SDPA with the boolean mask) agree; forward only (FlexAttention has no CPU
    backward)."""
    import torch.nn.functional as F

    from models.attention import _flex_sharded

    torch.manual_seed(0)
    packed = torch.stack([torch.cat([torch.arange(n) for n in (5, 40, 19)]), torch.arange(64)])
    for rank in (0, 1):
        for position_ids in (packed, None):
            shard = SequenceShard(None, rank, 2, 64, "zigzag", position_ids, torch.device("cpu"))
            q, k, v = torch.randn(2, 4, 32, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
            with torch.no_grad():
                flex = _flex_sharded(q, k, v, shard)
                sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=shard.attention_mask(), enable_gqa=True)
            assert (flex - sdpa).abs().max().item() < 1e-5, (rank, position_ids is None)
