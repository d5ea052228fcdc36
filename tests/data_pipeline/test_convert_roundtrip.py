"""`convert` keeps every document through mds -> wds -> megatron -> mds, and names its parent."""

from __future__ import annotations

import json

import numpy as np
from prepare_testing import all_documents, corpus_texts, make_tokenizer, output_files, write_jsonl

from data_pipeline.convert import convert
from data_pipeline.formats import open_shardset
from data_pipeline.manifest import manifest_sha256
from data_pipeline.prepare import PrepareOptions, prepare
from launch.cli import main as strata


def test_round_trip_through_every_format(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    write_jsonl(tmp_path / "in.jsonl", corpus_texts(40))
    prepare([tmp_path / "in.jsonl"], tmp_path / "mds",
            PrepareOptions(tokenizer=str(tokenizer), shard_size="3kb", workers=1, progress=False))
    original = all_documents(open_shardset(tmp_path / "mds"))

    chain = [("mds", "wds"), ("wds", "megatron"), ("megatron", "mds2")]
    for parent, child in chain:
        fmt = child.rstrip("2")
        manifest = convert(tmp_path / parent, tmp_path / child, fmt, shard_size="2kb",
                           progress=False)
        assert manifest["format"] == fmt
        assert manifest["provenance"]["parent"] == manifest_sha256(tmp_path / parent)
        assert manifest["provenance"]["parent_relative_path"] == f"../{parent}"  # findable after a move
        docs = all_documents(open_shardset(tmp_path / child))
        assert len(docs) == len(original)
        assert all(np.array_equal(a, b) for a, b in zip(docs, original, strict=True))

    first = json.loads((tmp_path / "mds" / "manifest.json").read_text())
    last = json.loads((tmp_path / "mds2" / "manifest.json").read_text())
    for key in ("counts", "sources", "rejected", "tokenizer", "dtype", "eos_id", "length_histogram"):
        assert first[key] == last[key], key
    tokenizer_copy = (tmp_path / "mds2" / "tokenizer.json").read_bytes()
    assert tokenizer_copy == (tmp_path / "mds" / "tokenizer.json").read_bytes()


def test_convert_cli_and_same_shards_at_same_size(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    write_jsonl(tmp_path / "in.jsonl", corpus_texts(25))
    prepare([tmp_path / "in.jsonl"], tmp_path / "mds",
            PrepareOptions(tokenizer=str(tokenizer), shard_size="2kb", workers=1, progress=False))
    assert strata(["convert", str(tmp_path / "mds"), "--out", str(tmp_path / "wds"),
                   "--format", "wds", "--shard-size", "2kb", "--quiet"]) == 0
    assert strata(["convert", str(tmp_path / "wds"), str(tmp_path / "back"),  # DST positional, as in the README
                   "--format", "mds", "--shard-size", "2kb", "--quiet"]) == 0
    # same documents and shard size -> byte-identical MDS shards as written by prepare
    original, back = output_files(tmp_path / "mds"), output_files(tmp_path / "back")
    shard_names = [n for n in original if n.startswith("shard.")] + ["index.json", "lengths.npy"]
    assert all(original[n] == back[n] for n in shard_names)
    assert strata(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "x"),
                   "--format", "wds"]) == 2
    assert strata(["convert", str(tmp_path / "mds"), str(tmp_path / "y"), "--out", str(tmp_path / "z"),
                   "--format", "wds"]) == 2  # DST twice
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
