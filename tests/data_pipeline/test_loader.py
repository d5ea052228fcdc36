"""The training loader: batch contract, coverage across epochs, world-size independence, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.loader import build_train_loader, eval_batches


def _config(n_sources: int = 1, **overrides) -> DataConfig:
    weights = [3.0, 1.0, 2.0][:n_sources]
    sources = [SourceConfig(path=f"/data/s{k}", weight=w) for k, w in enumerate(weights)]
    values = dict(
        sources=sources, seq_len=16, global_batch_size=8, micro_batch_size=2, seed=7, prefetch=0
    )
    values.update(overrides)
    return DataConfig(**values)


def _run(cfg, shardsets, steps, rank=0, world_size=1, state=None):
    """(batches per step, sample ids per step) for this rank, and the final state."""
    loader = build_train_loader(cfg, rank, world_size, shardsets)
    if state is not None:
        loader.load_state_dict(state)
    batches, ids = [], []
    for _ in range(steps):
        batches.append(loader.next_step())
        ids.append(list(loader.last_sample_ids))
    final = loader.state_dict()
    loader.close()
    return batches, ids, final


def test_batches_follow_the_contract(random_shardset):
    cfg = _config()
    batches, _, state = _run(cfg, [random_shardset(50, seed=0)], steps=2)
    assert len(batches[0]) == cfg.global_batch_size // cfg.micro_batch_size
    for micro in batches[0]:
        assert set(micro) == {"input_ids", "labels", "position_ids"}
        for tensor in micro.values():
            assert tensor.dtype == torch.int64 and tensor.shape == (
                cfg.micro_batch_size,
                cfg.seq_len,
            )
        starts = micro["position_ids"] == 0
        assert starts[:, 0].all()
    assert state["step"] == 2


def test_one_source_stream_is_read_whole_every_epoch_in_a_new_order(random_shardset):
    shardset = random_shardset(40, seed=3)
    cfg = _config(global_batch_size=4, micro_batch_size=4)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    n_steps = 3 * shardset.lengths.sum() // tokens_per_step + 1  # > 3 epochs
    batches, ids, _ = _run(cfg, [shardset], n_steps)
    offsets = [sample.offset for step in ids for sample in step]
    assert offsets == list(range(0, len(offsets) * cfg.seq_len, cfg.seq_len))  # contiguous, no gap
    stream = torch.cat([m["input_ids"].reshape(-1) for step in batches for m in step]).numpy()
    epoch = int(shardset.lengths.sum())
    orders = []
    for e in range(3):
        tokens = stream[e * epoch : (e + 1) * epoch]
        body = np.sort(tokens[tokens != shardset.eos_id])
        np.testing.assert_array_equal(body, shardset.all_body_tokens())  # every token once
        assert (tokens == shardset.eos_id).sum() == len(shardset)
        orders.append(tokens[tokens != shardset.eos_id][:20].tolist())
    assert orders[0] != orders[1] != orders[2]


def test_labels_are_the_next_token_except_across_a_document_start(random_shardset):
    cfg = _config()
    batches, _, _ = _run(cfg, [random_shardset(50, seed=1)], steps=3)
    for step in batches:
        for micro in step:
            ids, labels, pos = micro["input_ids"], micro["labels"], micro["position_ids"]
            inner = labels[:, :-1] != -100
            assert torch.equal(labels[:, :-1][inner], ids[:, 1:][inner])
            # masked exactly where the next token starts a document (not at row starts)
            next_starts_doc = (pos[:, 1:] == 0) & (ids[:, :-1] == 0)
            assert torch.equal(labels[:, :-1] == -100, next_starts_doc)
            # a masked label always follows EOS
            assert (ids[labels == -100] == 0).all()


def test_cross_document_attention_gives_plain_positions(random_shardset):
    cfg = _config(cross_document_attention=True)
    batches, _, _ = _run(cfg, [random_shardset(50, seed=1)], steps=1)
    for micro in batches[0]:
        assert torch.equal(micro["position_ids"], torch.arange(16).expand(2, 16))
        assert (micro["labels"] != -100).all()


def test_mixture_follows_weights_and_each_source_stays_contiguous(two_sources):
    cfg = _config(n_sources=2, global_batch_size=8)
    _, ids, state = _run(cfg, two_sources, steps=120)
    counts = np.zeros(2)
    per_source: dict[int, list[int]] = {0: [], 1: []}
    for step in ids:
        step_counts = np.bincount([s.source for s in step], minlength=2)
        assert set(step_counts.tolist()) <= {6, 5, 7} | {2, 1, 3}  # floor/ceil of 8 * w
        counts += step_counts
        for s in step:
            per_source[s.source].append(s.offset)
    assert counts[0] / counts.sum() == pytest.approx(0.75, abs=0.01)
    for k in (0, 1):
        assert per_source[k] == list(range(0, 16 * len(per_source[k]), 16))
        assert state["sources"][f"s{k}"]["cursor"] == 16 * len(per_source[k])
    assert state["sources"]["s1"]["epoch"] >= 1  # the small source rolled over


def test_world_size_and_prefetch_do_not_change_the_global_batches(two_sources):
    reference, ref_ids, _ = _run(_config(n_sources=2), two_sources, steps=6)
    for world_size in (2, 4):
        for prefetch in (0, 3):
            cfg = _config(n_sources=2, prefetch=prefetch)
            per_rank = [
                _run(cfg, two_sources, 6, rank=r, world_size=world_size) for r in range(world_size)
            ]
            for step in range(6):
                ids = [s for r in range(world_size) for s in per_rank[r][1][step]]
                assert ids == ref_ids[step]
                merged = torch.cat(
                    [m["input_ids"] for r in range(world_size) for m in per_rank[r][0][step]]
                )
                assert torch.equal(merged, torch.cat([m["input_ids"] for m in reference[step]]))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state_dict_continues_the_same_sequence(two_sources, prefetch):
    cfg = _config(n_sources=2, prefetch=prefetch)
    _, full, _ = _run(cfg, two_sources, steps=10)
    _, first, state = _run(cfg, two_sources, steps=4)
    _, rest, _ = _run(cfg, two_sources, steps=6, state=state)
    assert first + rest == full


def test_state_dict_excludes_prefetched_steps(random_shardset):
    shardsets = [random_shardset(30, seed=5)]
    loader = build_train_loader(_config(prefetch=4), 0, 1, shardsets)
    loader.next_step()
    loader.next_step()
    state = loader.state_dict()
    after = loader.next_step()
    loader.load_state_dict(state)  # rewind while the prefetch thread is ahead
    again = loader.next_step()
    loader.close()
    assert state["step"] == 2
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(after, again, strict=True)
    )


def test_sampler_state_at_matches_stepping(two_sources):
    cfg = _config(n_sources=2)
    loader = build_train_loader(cfg, 0, 1, two_sources)
    for _ in range(9):
        loader.next_step()
    replayed = loader.sampler.state_at(9)
    assert replayed.step == 9
    assert [loader.state_dict()["sources"][n]["cursor"] for n in ("s0", "s1")] == replayed.cursors


def test_load_state_dict_rejects_other_seed_and_changed_data(random_shardset):
    cfg = _config()
    _, _, state = _run(cfg, [random_shardset(30, seed=5)], steps=1)
    with pytest.raises(ValueError, match="data.seed"):
        _run(_config(seed=8), [random_shardset(30, seed=5)], steps=0, state=state)
    with pytest.raises(ValueError, match="data changed"):
        _run(cfg, [random_shardset(31, seed=5)], steps=0, state=state)


def test_new_source_in_a_continued_run_starts_at_its_beginning(two_sources, random_shardset):
    _, _, state = _run(_config(n_sources=2), two_sources, steps=3)
    third = random_shardset(10, seed=9, token_base=5_000_000)
    _, ids, final = _run(_config(n_sources=3), [*two_sources, third], steps=2, state=state)
    first_of_new = [s.offset for step in ids for s in step if s.source == 2]
    assert first_of_new[0] == 0
    assert final["sources"]["s0"]["cursor"] > state["sources"]["s0"]["cursor"]


def test_bad_batch_geometry_is_rejected(random_shardset):
    with pytest.raises(ValueError, match="world size"):
        build_train_loader(_config(), 0, 3, [random_shardset(10, seed=0)])
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_train_loader(
            _config(global_batch_size=8, micro_batch_size=4), 0, 4, [random_shardset(10, seed=0)]
        )


def test_eval_batches_are_deterministic_in_document_order(fake_shardset):
    shardset = fake_shardset([5] * 40)  # 200 tokens
    first = list(eval_batches(shardset, seq_len=8, batch_size=4, max_batches=3))
    second = list(eval_batches(shardset, seq_len=8, batch_size=4, max_batches=3))
    assert len(first) == 3
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second, strict=True)
    )
    flat = torch.cat([b["input_ids"].reshape(-1) for b in first])
    assert flat[:5].tolist() == [1, 2, 3, 4, 0]  # starts at document 0
    halves = [list(eval_batches(shardset, 8, 4, 3, rank=r, world_size=2)) for r in range(2)]
    for b in range(3):
        joined = torch.cat([halves[0][b]["input_ids"], halves[1][b]["input_ids"]])
        assert torch.equal(joined, first[b]["input_ids"])


def test_eval_batches_stop_at_the_end_of_the_set(fake_shardset):
    shardset = fake_shardset([5] * 8)  # 40 tokens: 4 sequences of 8 (+1 label token)
    batches = list(eval_batches(shardset, seq_len=8, batch_size=3, max_batches=10))
    assert [b["input_ids"].shape for b in batches] == [(3, 8), (1, 8)]
    # stream token 24 is the EOS of document 4, then document 5 (body ids 21..24)
    assert batches[1]["input_ids"][0, :3].tolist() == [0, 21, 22]


def test_eval_batches_pad_uneven_rank_shares_with_unscored_rows(fake_shardset):
    shardset = fake_shardset([5] * 40)
    whole = list(eval_batches(shardset, seq_len=8, batch_size=3, max_batches=2))
    shares = [list(eval_batches(shardset, 8, 3, 2, rank=r, world_size=2)) for r in range(2)]
    for b in range(2):
        assert [s[b]["input_ids"].shape[0] for s in shares] == [2, 2]
        assert (shares[1][b]["labels"][1] == -100).all()  # the padding row scores nothing
        real = torch.cat([shares[0][b]["input_ids"], shares[1][b]["input_ids"][:1]])
        assert torch.equal(real, whole[b]["input_ids"])
        scored = sum(int((s[b]["labels"] != -100).sum()) for s in shares)
        assert scored == int((whole[b]["labels"] != -100).sum())


def test_a_read_error_in_the_prefetch_thread_reaches_the_caller(fake_shardset):
    class Broken(fake_shardset):
        def get(self, doc_id):
            raise OSError(f"shard for document {doc_id} is unreadable")

    loader = build_train_loader(_config(prefetch=2), 0, 1, [Broken([9] * 20)])
    with pytest.raises(RuntimeError, match="prefetch failed") as info:
        loader.next_step()
    assert isinstance(info.value.__cause__, OSError)
    loader.close()


def test_close_stops_a_prefetch_thread_blocked_on_a_full_queue(random_shardset):
    loader = build_train_loader(_config(prefetch=1), 0, 1, [random_shardset(30, seed=0)])
    loader.next_step()
    thread = loader._prefetcher._thread
    loader.close()
    assert not thread.is_alive()
    assert loader.state_dict()["step"] == 1
