"""Dataset decomposition and its length curriculum: chunking, odds, constant tokens per step,
determinism across resume and world size, config errors, CLI and a short training run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from data_pipeline.config import DataConfig, DecompositionConfig
from data_pipeline.curriculum import (
    CurriculumSampler,
    DecompositionLoader,
    curriculum_odds,
    cycle_order,
    read_chunks,
)
from data_pipeline.decompose import decompose_lengths, open_decomposition
from data_pipeline.loader import build_train_loader
from data_pipeline.packing import IGNORE_INDEX


def _chunks(lengths, min_log2, max_log2):
    d = decompose_lengths(np.asarray(lengths), min_log2, max_log2)
    return [
        (int(a), int(b), 1 << int(c)) for a, b, c in zip(d.doc_id, d.begin, d.log2_len, strict=True)
    ], d



def decomposition_run(corpus, run_dir, decomposition, steps: int, **extra) -> dict:
    """The tiny Llama trained on `decomposition` (128 tokens per step, 64 per forward, 1 cycle)."""
    from tests.conftest import tiny_config

    overrides = {
        "data.sources": [],
        "data.decomposition": {
            "path": str(decomposition),
            "tokens_per_step": 128,
            "micro_batch_tokens": 64,
            "cycles": 1,
        },
        "train.steps": steps,
        "checkpoint.every": 0,
        "train.eval_batches": 1,
        "logging.tensorboard": False,
        **extra,
    }
    return tiny_config(corpus, run_dir, **overrides)


def test_methods_test_vectors():
    chunks, d = _chunks([1001], 8, 13)  # 1000 tokens + EOS
    assert chunks == [(0, 0, 512), (0, 512, 256)]
    assert d.dropped_tokens == 233 and d.bucket_counts() == {8: 1, 9: 1, 10: 0, 11: 0, 12: 0, 13: 0}
    chunks, d = _chunks([4000], 8, 11)
    assert [length for _, _, length in chunks] == [2048, 1024, 512, 256]
    assert [begin for _, begin, _ in chunks] == [0, 2048, 3072, 3584]
    assert d.dropped_tokens == 160


def test_long_documents_and_counts_match_a_greedy_reference():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(0, 3000, size=300), [20000, 255, 256, 0]])
    chunks, d = _chunks(lengths, 8, 10)
    expected, dropped = [], 0
    for doc, length in enumerate(lengths.tolist()):  # largest power of two that fits, repeatedly
        begin = 0
        while length - begin >= 256:
            size = min(1024, 1 << ((length - begin).bit_length() - 1))
            expected.append((doc, begin, size))
            begin += size
        dropped += length - begin
    assert chunks == expected
    assert d.dropped_tokens == dropped
    assert d.dropped_documents == int((lengths < 256).sum())
    assert sum(chunks_of == 1024 for _, _, chunks_of in chunks) == d.bucket_counts()[10]
    assert [c for c in chunks if c[0] == 300][:20] == [(300, 1024 * k, 1024) for k in range(19)] + [
        (300, 19456, 512)
    ]


class _Shardset:
    """Document d = tokens 1000*d + [0, 1, ...], so a token names its document and offset."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.eos_id = 0

    def __len__(self):
        return len(self.lengths)

    def get(self, doc_id):
        return np.arange(int(self.lengths[doc_id]), dtype=np.int64) + 100_000 * doc_id


def test_labels_follow_the_document_past_the_chunk_but_not_past_its_end():
    shardset = _Shardset([13, 8])  # doc 0 -> 8 + 4 (+1 dropped); doc 1 -> 8 (ends the document)
    _, d = _chunks(shardset.lengths, 2, 3)
    batch = read_chunks(shardset, d, np.array([0]), 3)
    assert batch["input_ids"][0].tolist() == list(range(8))
    assert batch["labels"][0].tolist() == list(
        range(1, 9)
    )  # last label: first token of the next chunk
    batch = read_chunks(shardset, d, np.array([1]), 2)
    assert batch["input_ids"][0].tolist() == [8, 9, 10, 11]
    assert batch["labels"][0].tolist() == [9, 10, 11, 12]  # the dropped remainder's token as target
    batch = read_chunks(shardset, d, np.array([2]), 3)
    assert batch["labels"][0].tolist() == [100_001 + k for k in range(7)] + [IGNORE_INDEX]
    assert "position_ids" not in batch  # one document per row: the plain causal path


def test_cycle_order_follows_the_odds_among_non_empty_buckets():
    odds = curriculum_odds("grow_p2", 4)
    assert odds.tolist() == [8, 4, 2, 1] and curriculum_odds("grow_linear", 6).tolist() == [
        6,
        5,
        4,
        3,
        2,
        1,
    ]
    order = cycle_order(np.random.default_rng(0), np.array([20000, 20000, 20000, 20000]), odds)
    frequencies = np.bincount(order[:6000], minlength=4) / 6000  # no bucket runs dry this early
    np.testing.assert_allclose(frequencies, odds / odds.sum(), atol=0.02)
    order = cycle_order(np.random.default_rng(1), np.array([5, 0, 3, 7]), odds)
    assert np.bincount(order, minlength=4).tolist() == [5, 0, 3, 7]  # every batch, once


def _decomposition(per_bucket: dict[int, int]):
    """A decomposition whose documents are single chunks: per_bucket[log2] documents of 2^log2."""
    lengths = np.concatenate([np.full(n, 1 << i) for i, n in sorted(per_bucket.items())])
    return _Shardset(lengths), decompose_lengths(lengths, min(per_bucket), max(per_bucket))


def test_grow_p2_shows_short_buckets_first_and_an_epoch_uses_every_full_batch_once():
    _, d = _decomposition({3: 800, 4: 400, 5: 200, 6: 100})  # 25 batches each at 256 tokens/step
    sampler = CurriculumSampler(d, seed=3, tokens_per_step=256, cycles=2, curriculum="grow_p2")
    assert sampler.steps_per_epoch == 100
    plans = [sampler.plan(s) for s in range(100)]
    used = np.concatenate([p.chunks for p in plans])
    assert len(np.unique(used)) == len(used) == len(d)  # chunk counts divide evenly here
    for cycle in (0, 1):
        positions = {i: [] for i in (3, 4, 5, 6)}
        for k, p in enumerate(q for q in plans if q.cycle == cycle):
            positions[p.log2_len].append(k)
        means = [np.mean(positions[i]) for i in (3, 4, 5, 6)]
        assert means == sorted(means)  # shortest first on average
        assert [len(positions[i]) for i in (3, 4, 5, 6)] in ([12, 12, 12, 12], [13, 13, 13, 13])
    uniform = CurriculumSampler(d, seed=3, tokens_per_step=256, cycles=2, curriculum="uniform")
    first_half = [uniform.plan(s).log2_len for s in range(25)]
    assert len(set(first_half)) == 4  # uniform odds mix all lengths from the start
    assert sampler.plan(100).epoch == 1 and not np.array_equal(
        sampler.plan(100).chunks, plans[0].chunks
    )


def _loader_config(**decomposition) -> DataConfig:
    settings = dict(
        path="unused",
        curriculum="grow_linear",
        cycles=3,
        tokens_per_step=512,
        micro_batch_tokens=64,
    )
    settings.update(decomposition)
    return DataConfig(seed=11, prefetch=0, decomposition=DecompositionConfig(**settings))


def _steps(cfg, world_size, steps, state=None):
    """Per step: the global batch, rows of all ranks concatenated in rank order, per tensor."""
    shardset, d = _decomposition({3: 700, 4: 300, 5: 160, 6: 90})
    loaders = [DecompositionLoader(cfg, r, world_size, shardset, d) for r in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step() for loader in loaders]
        out.append(
            {
                k: np.concatenate([mb[k].numpy() for rank in per_rank for mb in rank])
                for k in per_rank[0][0]
            }
        )
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    assert all(s == states[0] for s in states)
    return out, states[0]


def test_constant_tokens_per_step_and_micro_batches_of_constant_tokens():
    shardset, d = _decomposition({3: 700, 4: 300, 5: 160, 6: 90})
    loader = DecompositionLoader(_loader_config(), 0, 2, shardset, d)
    lengths = set()
    for _ in range(12):
        micro_batches = loader.next_step()
        length = micro_batches[0]["input_ids"].shape[1]
        lengths.add(length)
        assert sum(mb["input_ids"].numel() for mb in micro_batches) == 512 // 2  # this rank's half
        assert all(mb["input_ids"].numel() == 64 for mb in micro_batches)  # micro_batch_tokens
        assert loader.step_metrics()["seq_len"] == length
    assert len(lengths) > 1


def test_global_batches_do_not_depend_on_world_size_prefetch_or_resume():
    cfg = _loader_config()
    whole, _ = _steps(cfg, 1, 10)
    two, _ = _steps(cfg, 2, 10)
    prefetched, _ = _steps(cfg.model_copy(update={"prefetch": 3}), 4, 10)
    first, state = _steps(cfg, 2, 4)
    rest, _ = _steps(cfg, 4, 6, state=state)
    for a, b, c, d in zip(whole, two, prefetched, first + rest, strict=True):
        for key in a:
            assert (
                np.array_equal(a[key], b[key])
                and np.array_equal(a[key], c[key])
                and np.array_equal(a[key], d[key])
            )
    assert state["step"] == 4


def test_config_and_topology_errors_name_the_field():
    with pytest.raises(ValidationError, match="replaces data.sources"):
        DataConfig(sources=[{"path": "x"}], decomposition={"path": "d"})
    with pytest.raises(ValidationError, match="decomposition.cycles"):
        DataConfig(decomposition={"path": "d", "cycles": 0})
    with pytest.raises(ValidationError, match="curriculum"):
        DataConfig(decomposition={"path": "d", "curriculum": "shrink"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataConfig(decomposition={"path": "d", "bucket": 3})
    with pytest.raises(ValidationError, match="mixture.kind"):
        DataConfig(mixture={"kind": "temperature"}, decomposition={"path": "d"})
    shardset, d = _decomposition({3: 700, 4: 300, 5: 160, 6: 90})
    with pytest.raises(ValueError, match="tokens_per_step .* multiple of the longest bucket"):
        DecompositionLoader(_loader_config(tokens_per_step=96), 0, 1, shardset, d)
    with pytest.raises(ValueError, match="not divisible by the data-parallel world size"):
        DecompositionLoader(_loader_config(tokens_per_step=128), 0, 4, shardset, d)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        DecompositionLoader(_loader_config(micro_batch_tokens=24), 0, 2, shardset, d)
    loader = DecompositionLoader(_loader_config(), 0, 1, shardset, d)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="data.decomposition.cycles"):
        DecompositionLoader(_loader_config(cycles=4), 0, 1, shardset, d).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"version": 1, "step": 3})


def test_cli_writes_an_index_with_provenance_and_a_short_training_run_varies_length(
    tiny_corpus, tmp_path, capsys
):
    from engine.entry import run_training
    from launch.cli import main

    parent = tmp_path / "train"
    shutil.copytree(tiny_corpus / "train", parent)
    out = tmp_path / "decomposed"
    args = ["decompose", str(parent), "--out", str(out), "--min-log2", "3", "--max-log2", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["parent"]["path"] == str(parent.resolve())
        and len(manifest["parent"]["manifest_sha256"]) == 64
    )
    assert [row["length"] for row in manifest["buckets"]] == [8, 16, 32, 64]
    assert all(f"{row['chunks']:,}" in printed for row in manifest["buckets"])
    lengths = np.load(parent / "lengths.npy")
    assert manifest["tokens"] + manifest["dropped"]["tokens"] == int(lengths.sum())
    index = open_decomposition(out)
    assert index.decomposition.bucket_counts() == {
        r["log2_len"]: r["chunks"] for r in manifest["buckets"]
    }
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # refused, left intact
    assert main([*args, "--overwrite"]) == 0

    tree = decomposition_run(tiny_corpus, tmp_path / "run", out, 5, **{"checkpoint.save_final": False})
    assert run_training(tree).exit_code == 0
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    seq_lens = [r["seq_len"] for r in records if "seq_len" in r]
    assert len(seq_lens) == 5 and len(set(seq_lens)) > 1
    assert all(np.isfinite(r["loss"]) for r in records if "seq_len" in r)

    (parent / "manifest.json").write_text((parent / "manifest.json").read_text() + " ")
    with pytest.raises(ValueError, match="changed since decomposition"):
        build_train_loader(DataConfig(decomposition={"path": str(out)}), 0, 1)


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "seq_len" in r]


def test_training_resumes_mid_curriculum_and_refuses_rows_longer_than_the_model(
    tiny_corpus, tmp_path
):
    from engine.entry import run_training
    from launch.cli import main

    out = tmp_path / "decomposed"
    assert (
        main(
            [
                "decompose",
                str(tiny_corpus / "train"),
                "--out",
                str(out),
                "--min-log2",
                "4",
                "--max-log2",
                "6",
            ]
        )
        == 0
    )

    def tree(run_dir, steps, **extra):  # constant LR: the same rates whatever train.steps says
        return decomposition_run(tiny_corpus, run_dir, out, steps, **{"schedule.name": "constant", **extra})

    assert run_training(tree(tmp_path / "whole", 4)).exit_code == 0
    assert run_training(tree(tmp_path / "cut", 2)).exit_code == 0
    resumed = run_training(tree(tmp_path / "cut", 4), resume=str(tmp_path / "cut"))
    assert resumed.exit_code == 0 and resumed.step == 4
    whole, cut = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    assert [r["seq_len"] for r in whole] == [r["seq_len"] for r in cut]
    np.testing.assert_allclose([r["loss"] for r in whole], [r["loss"] for r in cut], rtol=1e-5)
    with pytest.raises(ValueError, match="exceed model.max_seq_len"):
        run_training(tree(tmp_path / "short", 2, **{"model.max_seq_len": 32}))


def test_parent_and_index_moved_together_still_train_and_a_changed_parent_is_refused(
    tiny_corpus, tmp_path
):
    from data_pipeline.decompose import write_decomposition

    first = tmp_path / "first"
    shutil.copytree(tiny_corpus / "train", first / "train")
    write_decomposition(first / "train", first / "decomposed", 3, 5)
    manifest = json.loads((first / "decomposed" / "manifest.json").read_text())
    assert manifest["parent"]["path"] == str((first / "train").resolve())
    assert manifest["parent"]["relative_path"] == "../train"

    def loader_for(root):
        settings = {"path": str(root / "decomposed"), "tokens_per_step": 64, "cycles": 1}
        config = DataConfig(prefetch=0, decomposition={**settings, "micro_batch_tokens": 32})
        return build_train_loader(config, 0, 1)

    moved = tmp_path / "elsewhere" / "moved"  # e.g. rsync to another prefix: old paths are gone
    shutil.move(first, moved)
    assert open_decomposition(moved / "decomposed").parent == (moved / "train").resolve()
    loader = loader_for(moved)
    assert sum(mb["input_ids"].numel() for mb in loader.next_step()) == 64
    loader.close()

    copy = tmp_path / "copy"  # the recorded absolute path exists again, but its parent changed
    shutil.copytree(moved, copy)
    shutil.move(moved, first)
    (first / "train" / "manifest.json").write_text(
        (first / "train" / "manifest.json").read_text() + " "
    )
    assert open_decomposition(copy / "decomposed").parent == (copy / "train").resolve()
    loader_for(copy).close()
    with pytest.raises(ValueError, match="changed since decomposition") as refused:
        loader_for(first)
    assert str((first / "train").resolve()) in str(refused.value)

    (copy / "train" / "manifest.json").write_text(
        (copy / "train" / "manifest.json").read_text() + " "
    )
    with pytest.raises(ValueError, match="changed since decomposition") as refused:
        loader_for(copy)
    assert all(str(p.resolve()) in str(refused.value) for p in (first / "train", copy / "train"))
    shutil.rmtree(copy / "train")
    shutil.rmtree(first / "train")
    with pytest.raises(FileNotFoundError, match="parent ShardSet is gone"):
        loader_for(copy)

    old = tmp_path / "old"  # a manifest written before relative paths were recorded
    shutil.copytree(tiny_corpus / "train", old / "train")
    write_decomposition(old / "train", old / "decomposed", 3, 5)
    manifest = json.loads((old / "decomposed" / "manifest.json").read_text())
    del manifest["parent"]["relative_path"]
    (old / "decomposed" / "manifest.json").write_text(json.dumps(manifest))
    loader_for(old).close()
