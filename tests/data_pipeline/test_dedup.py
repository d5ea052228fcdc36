"""`strata dedup`: exact and near duplicates dropped (first kept), distinct documents kept, the
same result for any number of workers, duplicates.npz, provenance and counts, every input
format, bad arguments, and training on the output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from prepare_testing import make_tokenizer, write_jsonl

import data_pipeline.dedup as dedup_module
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.dedup import (
    DUPLICATES_NAME,
    DedupParams,
    SignatureMaker,
    document_ranges,
    load_duplicates,
    shingle_hashes,
)
from data_pipeline.formats import open_shardset
from data_pipeline.inspect import inspect_artifact
from data_pipeline.loader import build_train_loader
from data_pipeline.manifest import manifest_sha256
from data_pipeline.prepare import PrepareOptions, prepare
from launch.cli import main as strata

FORMATS = ("mds", "wds", "megatron")


def random_text(rng: np.random.Generator, words: int = 80) -> str:
    """Random letter strings: no 5-token shingle is shared by two such texts by chance."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join(
        "".join(rng.choice(letters, size=int(rng.integers(4, 9)))) for _ in range(words)
    )


def change_two_words(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    words[20], words[50] = random_text(rng, 1), random_text(rng, 1)
    return " ".join(words)


def corpus() -> tuple[list[str], dict[int, tuple[int, str]], dict[int, tuple[int, str]]]:
    """Texts and, per method, the expected {dropped doc: (kept doc, reason)}."""
    rng = np.random.default_rng(0)
    texts = [random_text(rng) for _ in range(10)]  # docs 0-9: distinct
    near = change_two_words(texts[4], rng)
    texts += [
        texts[2],  # 10: exact copy of 2
        near,  # 11: doc 4 with two words changed
        "a",  # 12: shorter than the 5-gram (2 tokens with EOS)
        texts[2],  # 13: exact copy of 2 again
        "a",  # 14: exact copy of the short 12
        near,  # 15: exact copy of 11, itself a near duplicate of 4
        "b",  # 16: short, distinct
    ]
    exact = {
        10: (2, "exact_duplicate"),
        13: (2, "exact_duplicate"),
        14: (12, "exact_duplicate"),
        15: (11, "exact_duplicate"),
    }
    minhash = {**exact, 11: (4, "near_duplicate"), 15: (4, "near_duplicate")}
    return texts, exact, minhash


TEXTS, EXPECTED_EXACT, EXPECTED_MINHASH = corpus()


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """ROOT/{mds,wds,megatron}: TEXTS prepared in each format (small shards)."""
    root = tmp_path_factory.mktemp("dedup")
    tokenizer = make_tokenizer(root / "tokenizer.json")
    write_jsonl(root / "in.jsonl", TEXTS)
    for fmt in FORMATS:
        options = PrepareOptions(
            format=fmt, tokenizer=str(tokenizer), shard_size="4kb", workers=1, progress=False
        )
        prepare([root / "in.jsonl"], root / fmt, options)
    return root


def documents(path) -> list[np.ndarray]:
    shardset = open_shardset(path)
    return [np.asarray(shardset.get(i)) for i in range(len(shardset))]


def run_dedup(pool, out, *flags: str) -> None:
    assert strata(["dedup", str(pool), "--out", str(out), "--quiet", *flags]) == 0


def check_output(pool, out, expected: dict[int, tuple[int, str]]) -> dict:
    """The output holds the parent's non-dropped documents in corpus order; duplicates.npz names
    every dropped one and the kept document it duplicates. Returns the manifest."""
    parent = documents(pool)
    kept = [d for d in range(len(parent)) if d not in expected]
    child = documents(out)
    assert len(child) == len(kept)
    assert all(np.array_equal(c, parent[d]) for c, d in zip(child, kept, strict=True))
    dup = load_duplicates(out / DUPLICATES_NAME)
    found = {
        int(d): (int(k), str(r))
        for d, k, r in zip(dup["doc_id"], dup["duplicate_of"], dup["reason"], strict=True)
    }
    assert found == expected
    assert set(dup["duplicate_of"].tolist()) <= set(kept)  # always a kept document
    assert dup["kept_doc_id"].tolist() == kept
    assert dup["meta"]["parent_manifest_sha256"] == manifest_sha256(pool)
    return json.loads((out / "manifest.json").read_text())


# --------------------------------------------------------------------------- fingerprints


def test_shingles_are_a_pure_function_of_the_ngrams():
    tokens = np.array([5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 0], dtype=np.uint16)
    hashes = shingle_hashes(tokens, 5)
    assert hashes.dtype == np.uint32 and np.all(np.diff(hashes.astype(np.int64)) > 0)
    assert len(hashes) == 6  # 7 windows, (5..9) twice
    assert np.array_equal(hashes, shingle_hashes(tokens.astype(np.uint32), 5))  # dtype-free
    assert len(shingle_hashes(tokens[:4], 5)) == 0 and len(shingle_hashes(tokens, 1)) == 6
    assert not np.array_equal(shingle_hashes(tokens[::-1].copy(), 5), hashes)  # order matters


def test_minhash_estimate_tracks_the_true_jaccard():
    rng = np.random.default_rng(1)
    maker = SignatureMaker(num_perm=256, seed=1)
    a = rng.integers(0, 60000, size=3000)
    b = a.copy()
    b[1000:1300] = rng.integers(0, 60000, size=300)  # a changed stretch
    sa, sb = set(shingle_hashes(a, 5).tolist()), set(shingle_hashes(b, 5).tolist())
    true = len(sa & sb) / len(sa | sb)
    estimate = np.mean(
        maker.signature(shingle_hashes(a, 5)) == maker.signature(shingle_hashes(b, 5))
    )
    assert 0.7 < true < 0.9 and abs(estimate - true) < 0.08


def test_ranges_cover_every_document_once_in_order():
    lengths = np.random.default_rng(2).integers(1, 5000, size=3000)
    for workers in (1, 2, 16):
        ranges = document_ranges(lengths, workers, "minhash")
        assert ranges[0][0] == 0 and ranges[-1][1] == len(lengths)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:], strict=False))
    # exact hashing is too cheap to spread 7.5M tokens over processes
    assert document_ranges(lengths, 2, "exact") == [(0, len(lengths))]
    assert document_ranges(np.zeros(0, np.int64), 2) == []


# --------------------------------------------------------------------------- the command


def test_exact_drops_identical_documents_and_keeps_the_first(pools, tmp_path):
    out = tmp_path / "exact"
    run_dedup(pools / "mds", out, "--method", "exact")
    check_output(pools / "mds", out, EXPECTED_EXACT)
    # the near duplicate (11) survives exact dedup
    assert np.array_equal(documents(out)[10], documents(pools / "mds")[11])


def test_minhash_also_drops_near_duplicates(pools, tmp_path):
    out = tmp_path / "near"
    run_dedup(pools / "mds", out, "--method", "minhash")
    check_output(pools / "mds", out, EXPECTED_MINHASH)
    dup = load_duplicates(out / DUPLICATES_NAME)
    jaccard = dict(zip(dup["doc_id"].tolist(), dup["jaccard"].tolist(), strict=True))
    assert 0.8 <= jaccard[11] < 1.0 and jaccard[10] == 1.0
    # a stricter threshold than the pair's similarity keeps the near duplicate
    strict = tmp_path / "strict"
    run_dedup(pools / "mds", strict, "--method", "minhash", "--threshold", "1.0")
    check_output(pools / "mds", strict, EXPECTED_EXACT)


def test_distinct_documents_are_all_kept(pools, tmp_path):
    for method in ("exact", "minhash"):
        out = tmp_path / method
        run_dedup(pools / "mds", out, "--method", method)
        dropped = set(load_duplicates(out / DUPLICATES_NAME)["doc_id"].tolist())
        assert not dropped & set(range(10)) and 16 not in dropped  # the distinct ones


def test_same_output_for_one_and_two_workers(pools, tmp_path, monkeypatch):
    # tiny tasks, so two worker processes each get several ranges
    monkeypatch.setattr(dedup_module, "TASK_TOKENS", {"exact": (100, 100), "minhash": (100, 100)})
    assert len(document_ranges(open_shardset(pools / "wds").lengths, 2, "exact")) > 4
    for method in ("exact", "minhash"):
        outs = [tmp_path / f"{method}{w}" for w in (1, 2)]
        for out, workers in zip(outs, (1, 2), strict=True):
            run_dedup(pools / "wds", out, "--method", method, "--workers", str(workers))
        one, two = (load_duplicates(out / DUPLICATES_NAME) for out in outs)
        for key in ("doc_id", "duplicate_of", "reason", "jaccard", "kept_doc_id"):
            assert np.array_equal(one[key], two[key]), key
        assert all(
            np.array_equal(a, b)
            for a, b in zip(documents(outs[0]), documents(outs[1]), strict=True)
        )
        manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
        assert manifests[0]["counts"] == manifests[1]["counts"]


def test_manifest_records_provenance_and_counts_and_inspect_shows_them(pools, tmp_path):
    pool, out = pools / "mds", tmp_path / "near"
    run_dedup(pool, out, "--method", "minhash", "--ngram", "4", "--threshold", "0.7")
    manifest = json.loads((out / "manifest.json").read_text())
    provenance = manifest["provenance"]
    lengths = open_shardset(pool).lengths
    dropped = sorted(EXPECTED_MINHASH)
    assert provenance["tool"] == "strata dedup minhash"
    assert provenance["parent"] == manifest_sha256(pool)
    assert provenance["parent_path"] == str(pool.resolve())
    assert provenance["parent_relative_path"] == os.path.relpath(pool.resolve(), out.resolve())
    record = provenance["dedup"]
    assert (record["method"], record["ngram"], record["num_perm"], record["threshold"]) == (
        "minhash",
        4,
        128,
        0.7,
    )
    assert record["lsh_bands"] * record["lsh_rows"] <= 128
    assert (record["documents"], record["kept"], record["dropped"]) == (17, 17 - 5, 5)
    assert record["dropped_by_reason"] == {"exact_duplicate": 3, "near_duplicate": 2}
    assert record["tokens_dropped"] == int(lengths[dropped].sum())
    assert (
        record["tokens_kept"]
        == manifest["counts"]["tokens"]
        == int(lengths.sum()) - int(lengths[dropped].sum())
    )
    assert record["tokens_dropped_by_reason"]["near_duplicate"] == int(lengths[[11, 15]].sum())
    assert record["short_documents"] == 2  # 12 and 16 ("a" again at 14 is an exact duplicate)
    assert manifest["counts"]["documents"] == 12 and manifest["counts"]["input_records"] == 17
    assert manifest["rejected"] == {"exact_duplicate": 3, "near_duplicate": 2}
    assert manifest["tokenizer"] == open_shardset(pool).manifest["tokenizer"]
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".near*"))

    report = inspect_artifact(out)
    assert report["problems"] == [] and report["documents"] == 12
    this, parent = report["provenance"]
    assert this["method"] == "strata dedup minhash"
    assert this["parameters"]["kept"] == 12 and this["parameters"]["dropped"] == 5
    assert this["parameters"]["threshold"] == 0.7
    assert parent["status"] == "ok" and parent["method"] == "strata prepare"


@pytest.mark.parametrize("fmt", ["wds", "megatron"])
def test_wds_and_megatron_inputs_give_the_same_documents(pools, tmp_path, fmt):
    out = tmp_path / fmt
    run_dedup(pools / fmt, out, "--method", "minhash")
    manifest = check_output(pools / fmt, out, EXPECTED_MINHASH)
    assert manifest["format"] == fmt
    mds = tmp_path / "as_mds"
    run_dedup(pools / fmt, mds, "--method", "minhash", "--format", "mds")
    assert json.loads((mds / "manifest.json").read_text())["format"] == "mds"
    assert all(np.array_equal(a, b) for a, b in zip(documents(out), documents(mds), strict=True))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--method", "minhash", "--threshold", "0"], "--threshold"),
        (["--method", "minhash", "--threshold", "1.5"], "--threshold"),
        (["--method", "minhash", "--ngram", "0"], "--ngram"),
        (["--num-perm", "1"], "--num-perm"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(pools, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert strata(["dedup", str(pools / "mds"), "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and err[0].startswith("dedup: error:")
    assert not out.exists()


def test_missing_input_and_existing_output_exit_2_naming_the_path(pools, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert strata(["dedup", str(missing), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert strata(["dedup", str(pools / "mds"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and str(out) in err[0] and "already exists" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    assert strata(["dedup", str(pools / "mds"), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and len(documents(out)) == 17 - len(EXPECTED_EXACT)
    # the input is never a valid output
    assert strata(["dedup", str(pools / "mds"), "--out", str(pools / "mds"), "--overwrite"]) == 2
    assert (pools / "mds" / "manifest.json").is_file()


def test_the_output_trains(pools, tmp_path):
    out = tmp_path / "kept"
    run_dedup(pools / "megatron", out, "--method", "minhash")
    cfg = DataConfig(
        sources=[SourceConfig(path=str(out))],
        seq_len=32,
        global_batch_size=4,
        micro_batch_size=2,
        prefetch=0,
    )
    loader = build_train_loader(cfg, rank=0, world_size=1)
    try:
        batches = loader.next_step()
    finally:
        loader.close()
    assert len(batches) == 2
    for batch in batches:
        assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].dtype == torch.int64
        assert set(batch) >= {"input_ids", "labels", "position_ids"}
    kept_tokens = set(np.concatenate(documents(out)).tolist())
    assert set(batches[0]["input_ids"].reshape(-1).tolist()) <= kept_tokens


def test_params_check_names_each_flag():
    with pytest.raises(ValueError, match="--method"):
        DedupParams(method="fuzzy").check()
    DedupParams(method="minhash", threshold=1.0, ngram=1).check()  # the edges are valid
