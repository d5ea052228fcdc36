"""`strata inspect`: counts, lengths, tokenizer, rejections and shards of every format; the
provenance chain (ok, changed since, missing, after a move); the CLI's exit codes, --json, --docs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from prepare_testing import corpus_texts, decode, load, make_tokenizer

from data_pipeline.decompose import write_decomposition
from data_pipeline.formats import open_shardset
from data_pipeline.inspect import NotAnArtifact, inspect_artifact, sample_documents
from data_pipeline.manifest import manifest_sha256
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.select import Scores, select
from launch.cli import main as strata

FORMATS = ("mds", "wds", "megatron")
TEXTS = corpus_texts(30)
BAD_LINES = ["{not json", json.dumps({"title": "no text field"}), json.dumps({"text": ""})]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """ROOT/{mds,wds,megatron}: the same 30 documents (+3 rejected records), 2 kB shards."""
    root = tmp_path_factory.mktemp("inspect")
    tokenizer = make_tokenizer(root / "tokenizer.json")
    lines = [json.dumps({"text": t}) for t in TEXTS] + BAD_LINES
    (root / "in.jsonl").write_text("\n".join(lines) + "\n")
    for fmt in FORMATS:
        options = PrepareOptions(
            format=fmt, tokenizer=str(tokenizer), shard_size="2kb", workers=1, progress=False
        )
        prepare([root / "in.jsonl"], root / fmt, options)
    return root


def test_every_format_reports_counts_lengths_tokenizer_rejections_and_shards(corpus):
    reports = {fmt: inspect_artifact(corpus / fmt) for fmt in FORMATS}
    lengths = np.load(corpus / "mds" / "lengths.npy")
    for fmt, report in reports.items():
        assert report["kind"] == "shardset" and report["format"] == fmt
        assert report["documents"] == len(TEXTS) == len(lengths)
        assert report["tokens"] == int(lengths.sum())
        stats = report["length_stats"]
        assert (stats["min"], stats["max"]) == (int(lengths.min()), int(lengths.max()))
        assert stats["median"] == float(np.median(lengths)) and stats["mean"] == pytest.approx(
            lengths.mean(), abs=1e-3
        )
        assert stats["p90"] == float(np.percentile(lengths, 90))
        rows = report["length_histogram"]
        assert sum(r["documents"] for r in rows) == len(lengths) and rows[0]["documents"] > 0
        for r in rows:
            inside = (lengths >= max(r["lower"], 1)) & (lengths <= r["upper"])
            assert r["documents"] == int(inside.sum())
        assert report["rejected"] == {
            "empty_document": 1,
            "invalid_json": 1,
            "missing_text_field": 1,
        }
        (source,) = report["sources"].values()
        assert source["documents"] == len(TEXTS) and source["input_records"] == len(TEXTS) + 3
        tokenizer = report["tokenizer"]
        assert tokenizer["file_vocab_size"] == 400 and tokenizer["fingerprint_matches"] is True
        manifest = json.loads((corpus / fmt / "manifest.json").read_text())
        files = [name for s in manifest["shards"] for name in s["files"]]
        assert report["shards"]["count"] == len(manifest["shards"]) > 1
        assert report["shards"]["bytes"] == sum((corpus / fmt / n).stat().st_size for n in files)
        assert report["shards"]["missing_files"] == [] and report["problems"] == []
        (step,) = report["provenance"]
        assert step["status"] == "this" and step["method"] == "strata prepare"
        assert step["parameters"]["format"] == fmt

    def comparable(report):
        tokenizer = {k: v for k, v in report["tokenizer"].items() if k != "file_path"}
        return [
            report[k]
            for k in ("documents", "tokens", "length_stats", "length_histogram", "rejected")
        ] + [tokenizer]

    assert (
        comparable(reports["mds"]) == comparable(reports["wds"]) == comparable(reports["megatron"])
    )


def _select_child(parent, out):
    """A CoLoR-Filter child of `parent` chosen from a written scores file (no model needed)."""
    n = len(open_shardset(parent))
    prior = np.linspace(0.0, 1.0, n)
    scores = Scores(
        "color-filter",
        {"prior": prior, "conditional": prior[::-1].copy()},
        64,
        manifest_sha256(parent),
        {},
    )
    scores.save(out.parent / "scores.npz")
    select("color-filter", parent, out, 2.0, scores_file=out.parent / "scores.npz", progress=False)


def test_chain_walks_to_the_root_survives_a_move_and_marks_changed_and_missing(corpus, tmp_path):
    work = tmp_path / "a"
    work.mkdir()
    shutil.copytree(corpus / "wds", work / "pool")
    _select_child(work / "pool", work / "kept")
    write_decomposition(work / "kept", work / "chunks", 3, 6)

    def chain(path):
        return [(s["method"], s["status"]) for s in inspect_artifact(path)["provenance"]]

    full = [
        ("strata decompose", "this"),
        ("strata select color-filter", "ok"),
        ("strata prepare", "ok"),
    ]
    assert chain(work / "chunks") == full
    report = inspect_artifact(work / "chunks")
    assert report["provenance"][1]["parameters"]["tau"] == 2.0
    assert report["provenance"][1]["parameters"]["kept"] == len(TEXTS) // 2
    assert report["parent"]["status"] == "ok" and report["problems"] == []
    manifest = json.loads((work / "chunks" / "manifest.json").read_text())
    assert report["buckets"] == manifest["buckets"] and report["tokens"] == manifest["tokens"]

    moved = tmp_path / "elsewhere" / "b"
    shutil.move(work, moved)  # every absolute path recorded is gone; relative ones still hold
    assert chain(moved / "chunks") == full
    assert inspect_artifact(moved / "chunks")["provenance"][2]["path"] == str(
        (moved / "pool").resolve()
    )

    pool_manifest = moved / "pool" / "manifest.json"
    pool_manifest.write_text(pool_manifest.read_text() + " ")  # edited after the fact
    assert chain(moved / "chunks")[2] == ("strata prepare", "changed since")
    assert chain(moved / "kept")[1] == ("strata prepare", "changed since")

    shutil.rmtree(moved / "pool")  # the select child embeds its parent's provenance
    report = inspect_artifact(moved / "kept")
    assert [(s["method"], s["status"]) for s in report["provenance"]] == [
        ("strata select color-filter", "this"),
        ("strata prepare", "missing"),
    ]
    assert str((moved / "pool").resolve()) in report["provenance"][1]["tried"]
    shutil.rmtree(moved / "kept")  # a decomposition records no more than its parent
    report = inspect_artifact(moved / "chunks")
    assert [s["status"] for s in report["provenance"]] == ["this", "missing"]
    assert report["parent"]["status"] == "missing" and report["problems"]


def test_cli_tables_json_docs_and_exit_codes(corpus, tmp_path, capsys):
    assert strata(["inspect", str(corpus / "megatron")]) == 0
    out = capsys.readouterr().out
    for shown in ("megatron", "invalid_json", "strata prepare", "p99", "length histogram", "█"):
        assert shown in out, shown

    assert (
        strata(["inspect", str(corpus / "mds"), "--json", "--docs", "2", "--max-chars", "25"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == len(TEXTS) and report["format"] == "mds"
    first, second = report["documents_shown"]
    assert first["text"] == TEXTS[0][:25] and first["truncated"] is True
    assert second["doc_id"] == 1 and second["text"] == TEXTS[1][:25]

    assert strata(["inspect", str(corpus / "wds"), "--docs", "1", "--max-chars", "1000"]) == 0
    assert TEXTS[0].splitlines()[0] in capsys.readouterr().out

    write_decomposition(corpus / "wds", tmp_path / "chunks", 3, 5)
    assert strata(["inspect", str(tmp_path / "chunks"), "--json", "--docs", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "decomposition" and [b["length"] for b in report["buckets"]] == [
        8,
        16,
        32,
    ]
    parent = open_shardset(corpus / "wds")
    tokenizer = load(corpus / "tokenizer.json")
    for chunk in report["documents_shown"]:
        begin = chunk["begin"]
        tokens = parent.get(chunk["doc_id"])[begin : begin + chunk["tokens"]]
        assert chunk["text"] == decode(tokenizer, np.append(tokens, 0))

    not_strata = tmp_path / "plain"
    not_strata.mkdir()
    (not_strata / "notes.txt").write_text("hello")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text('{"name": "something else"}')
    for path, expected in (
        (tmp_path / "nope", "no such directory"),
        (not_strata, "no manifest.json"),
        (odd, "neither a ShardSet"),
        (corpus, "it holds some: mds, megatron, wds"),
    ):
        assert strata(["inspect", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err
        assert "want a ShardSet" in err
        with pytest.raises(NotAnArtifact):
            inspect_artifact(path)
    assert strata(["inspect", str(corpus / "mds"), "--docs", "-1"]) == 2
    assert sample_documents(corpus / "mds", 0) == []
