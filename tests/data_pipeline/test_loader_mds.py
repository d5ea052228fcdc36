"""The loader over real MDS ShardSets written by `prepare` (not the in-memory fakes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prepare_testing import corpus_texts, make_tokenizer, write_jsonl

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.formats import open_shardset
from data_pipeline.loader import build_train_loader, eval_batches
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sampler import epoch_permutation


@pytest.fixture(scope="module")
def mds_sets(tmp_path_factory) -> list[str]:
    """Two small MDS ShardSets (several shards each) prepared from jsonl with a real tokenizer."""
    root = tmp_path_factory.mktemp("mds")
    tokenizer = make_tokenizer(root / "tokenizer.json")
    paths = []
    for name, n_docs, seed in (("web", 40, 0), ("code", 15, 1)):
        jsonl = write_jsonl(root / f"{name}.jsonl", corpus_texts(n_docs, seed=seed))
        options = PrepareOptions(
            tokenizer=str(tokenizer), shard_size="2kb", workers=1, progress=False
        )
        prepare([str(jsonl)], root / name, options)
        paths.append(str(root / name))
    return paths


def _config(paths: list[str], **overrides) -> DataConfig:
    values = dict(
        sources=[SourceConfig(path=p, weight=w) for p, w in zip(paths, (2.0, 1.0), strict=False)],
        seq_len=32,
        global_batch_size=4,
        micro_batch_size=2,
        seed=3,
        prefetch=2,
    )
    values.update(overrides)
    return DataConfig(**values)


def test_one_epoch_of_a_real_shardset_is_every_document_once_in_permutation_order(mds_sets):
    shardset = open_shardset(mds_sets[0])
    assert len(shardset.manifest["shards"]) > 1
    cfg = _config(mds_sets[:1])
    loader = build_train_loader(cfg, rank=0, world_size=1)  # opens the path itself
    tokens_per_epoch = int(np.asarray(shardset.lengths).sum())
    stream = []
    while sum(len(t) for t in stream) < tokens_per_epoch:
        stream += [m["input_ids"].reshape(-1) for m in loader.next_step()]
    loader.close()
    stream = torch.cat(stream).numpy()[:tokens_per_epoch]
    order = epoch_permutation(cfg.seed, 0, 0, len(shardset))
    expected = np.concatenate([shardset.get(int(d)) for d in order]).astype(np.int64)
    np.testing.assert_array_equal(stream, expected)
    assert (expected[np.cumsum(np.asarray(shardset.lengths)[order]) - 1] == shardset.eos_id).all()


def test_resume_over_real_shardsets_with_two_sources_matches_an_uninterrupted_run(
    mds_sets, tmp_path
):
    cfg = _config(mds_sets)

    def run(steps, state=None):
        loader = build_train_loader(cfg, rank=0, world_size=1)
        if state is not None:
            loader.load_state_dict(state)
        out = [torch.cat([m["input_ids"] for m in loader.next_step()]) for _ in range(steps)]
        final = loader.state_dict()
        loader.close()
        return out, final

    full, full_state = run(30)
    head, state = run(11)
    torch.save(state, tmp_path / "loader.pt")
    tail, tail_state = run(19, torch.load(tmp_path / "loader.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(full, head + tail, strict=True))
    assert tail_state == full_state
    assert full_state["sources"]["code"]["epoch"] >= 1


def test_eval_batches_over_a_real_shardset_are_stable(mds_sets):
    shardset = open_shardset(mds_sets[1])
    first = list(eval_batches(shardset, seq_len=16, batch_size=2, max_batches=3))
    second = list(eval_batches(shardset, seq_len=16, batch_size=2, max_batches=3))
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(first[0]["input_ids"][0].numpy(), shardset.get(0)[:16])
