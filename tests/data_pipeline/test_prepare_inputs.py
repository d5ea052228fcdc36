"""prepare reads every input kind, counts bad records by reason, and fails fast on bad paths."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from prepare_testing import corpus_texts, decode, load, make_tokenizer, write_jsonl

from data_pipeline.formats import open_shardset
from data_pipeline.formats.writer import ResumeMismatch
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import InputError, split_long_text
from launch.cli import main as strata


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def options(tokenizer_path, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return PrepareOptions(tokenizer=str(tokenizer_path), **kw)


def test_every_input_kind_becomes_eos_terminated_documents(tmp_path, tokenizer_path):
    texts = corpus_texts(12)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[:3]).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[3:6]).encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[6:8]).encode()))
    pq.write_table(pa.table({"text": texts[8:10], "other": [1, 2]}), tmp_path / "d.parquet")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text(texts[10], encoding="utf-8")
    (tree / "sub" / "y.py").write_text(texts[11], encoding="utf-8")
    (tree / "ignored.bin").write_bytes(b"\x00\x01")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet")]
    inputs.append(str(tree))

    manifest = prepare(inputs, tmp_path / "out", options(tokenizer_path))

    shardset = open_shardset(tmp_path / "out")
    tokenizer = load(tokenizer_path)
    assert len(shardset) == 12 and manifest["counts"]["documents"] == 12
    assert manifest["dtype"] == "uint16" and shardset.dtype == np.uint16
    assert manifest["rejected"] == {}
    for i, text in enumerate(texts):  # input order is kept: files in argument order, trees sorted
        tokens = shardset.get(i)
        assert tokens[-1] == shardset.eos_id
        assert len(tokens) == shardset.lengths[i]
        assert decode(tokenizer, tokens) == text
    assert [manifest["sources"][s]["documents"] for s in inputs] == [3, 3, 2, 2, 2]
    assert sum(manifest["length_histogram"]["counts"]) == 12
    assert manifest["counts"]["tokens"] == int(shardset.lengths.sum())
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_bad_records_are_counted_by_reason_and_never_fatal(tmp_path, tokenizer_path):
    good = ["good one\n", "good two\n"]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8
        b'{"text": "unterminated',  # invalid JSON
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": " \n\t "}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps(["an", "array"]).encode(),
        b"   ",  # blank line
        json.dumps({"text": good[1]}).encode(),
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(b"".join(json.dumps({"text": f"gz {i}"}).encode() + b"\n" for i in range(400)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tree / "empty.md").write_bytes(b"")
    pq.write_table(pa.table({"text": ["pq ok", None]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"content": ["x", "y", "z"]}), tmp_path / "nofield.parquet")

    inputs = [str(tmp_path / n) for n in ("bad.jsonl", "cut.jsonl.gz", "tree", "t.parquet",
                                          "nofield.parquet")]
    manifest = prepare(inputs, tmp_path / "out", options(tokenizer_path))

    assert manifest["rejected"] == {
        "invalid_utf8": 3,  # bad bytes in JSONL, lone surrogate, latin-1 text file
        "invalid_json": 1,
        "missing_text_field": 6,  # no "text" key, JSON null, Parquet null, 3 rows without the column
        "non_string_text": 1,
        "empty_document": 3,  # "", whitespace only, empty.md
        "not_a_json_object": 1,
        "blank_line": 1,
        "truncated_or_corrupt_file": 1,
    }
    counts = manifest["counts"]
    assert counts["input_records"] == counts["documents"] + counts["rejected_records"]
    gz_docs = manifest["sources"][inputs[1]]["documents"]
    assert 0 < gz_docs < 400  # the readable part of the truncated file is kept
    shardset = open_shardset(tmp_path / "out")
    tokenizer = load(tokenizer_path)
    assert decode(tokenizer, shardset.get(0)) == good[0]
    assert decode(tokenizer, shardset.get(1)) == good[1]
    assert decode(tokenizer, shardset.get(2 + gz_docs)) == "pq ok"


def test_long_document_is_split_losslessly(tmp_path, tokenizer_path):
    line = "a long line of text that repeats, 12345 ünïcödé\n"
    huge = line * (2_000_000 // len(line))  # ~2 MB document
    write_jsonl(tmp_path / "big.jsonl", ["short doc\n", huge])
    manifest = prepare([tmp_path / "big.jsonl"], tmp_path / "out",
                       options(tokenizer_path, max_doc_chars=100_000))
    pieces = split_long_text(huge, 100_000)
    assert len(pieces) == manifest["counts"]["documents"] - 1 > 1
    assert manifest["counts"]["split_records"] == 1
    shardset = open_shardset(tmp_path / "out")
    tokenizer = load(tokenizer_path)
    decoded = "".join(decode(tokenizer, shardset.get(i)) for i in range(1, len(shardset)))
    assert decoded == huge
    assert all(len(p) <= 100_000 for p in pieces)

    whole = prepare([tmp_path / "big.jsonl"], tmp_path / "whole",
                    options(tokenizer_path, max_doc_chars=0))
    assert whole["counts"]["documents"] == 2 and whole["counts"]["split_records"] == 0
    assert decode(tokenizer, open_shardset(tmp_path / "whole").get(1)) == huge


def test_missing_input_and_unwritable_output_fail_before_any_work(tmp_path, tokenizer_path, capsys):
    write_jsonl(tmp_path / "ok.jsonl", ["hello\n"])
    with pytest.raises(InputError, match="input not found: .*missing.jsonl"):
        prepare([tmp_path / "ok.jsonl", tmp_path / "missing.jsonl"], tmp_path / "out",
                options(tokenizer_path))
    assert not (tmp_path / "out").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        prepare([tmp_path / "ok.jsonl"], blocker / "out", options(tokenizer_path))

    code = strata(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2"),
                   "--tokenizer", str(tokenizer_path)])
    assert code == 2
    assert "input not found" in capsys.readouterr().err
    code = strata(["prepare", str(tmp_path / "ok.jsonl"), "--out", str(tmp_path / "o3")])
    assert code == 2
    assert "tokenizer is required" in capsys.readouterr().err


def test_rerun_is_a_noop_and_other_arguments_are_refused(tmp_path, tokenizer_path):
    write_jsonl(tmp_path / "in.jsonl", corpus_texts(20))
    out = tmp_path / "out"
    first = prepare([tmp_path / "in.jsonl"], out, options(tokenizer_path, shard_size="1kb"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = prepare([tmp_path / "in.jsonl"], out, options(tokenizer_path, shard_size="1kb"))
    assert again == first
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(ResumeMismatch, match="different inputs or options"):
        prepare([tmp_path / "in.jsonl"], out, options(tokenizer_path, shard_size="2kb"))
    replaced = prepare([tmp_path / "in.jsonl"], out,
                       options(tokenizer_path, shard_size="2kb", overwrite=True))
    assert replaced["counts"]["documents"] == 20
    assert len(replaced["shards"]) < len(first["shards"])


def test_trained_tokenizer_and_named_eos(tmp_path):
    texts = corpus_texts(30)
    write_jsonl(tmp_path / "in.jsonl", texts, field="content")
    manifest = prepare(
        [tmp_path / "in.jsonl"], tmp_path / "out",
        PrepareOptions(train_tokenizer=300, text_field="content", workers=2, progress=False),
    )
    assert manifest["tokenizer"]["trained_on_input"] and manifest["tokenizer"]["vocab_size"] == 300
    shardset = open_shardset(tmp_path / "out")
    tokenizer = load(shardset.tokenizer_path)
    assert [decode(tokenizer, d) for d in (shardset.get(i) for i in range(30))] == texts

    with pytest.raises(ValueError, match="EOS token '<nope>'"):
        prepare([tmp_path / "in.jsonl"], tmp_path / "o2",
                PrepareOptions(tokenizer=str(shardset.tokenizer_path), eos_token="<nope>",
                               progress=False))


def test_literal_special_token_text_is_not_an_eos(tmp_path, tokenizer_path):
    text = "before <|endoftext|> after\n"
    write_jsonl(tmp_path / "in.jsonl", [text])
    prepare([tmp_path / "in.jsonl"], tmp_path / "out", options(tokenizer_path))
    shardset = open_shardset(tmp_path / "out")
    tokens = shardset.get(0)
    assert (tokens[:-1] != shardset.eos_id).all()
    assert decode(load(tokenizer_path), tokens) == text


def test_a_directory_of_jsonl_parquet_and_text_files_reads_them_all(tmp_path, tokenizer_path):
    """JSONL/Parquet files in a directory are inputs too (not silently skipped), each its own source."""
    texts = corpus_texts(5)
    data = tmp_path / "data"
    (data / "part").mkdir(parents=True)
    write_jsonl(data / "part" / "b.jsonl", texts[1:3])
    (data / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps({"text": texts[0]}).encode()))
    pq.write_table(pa.table({"text": texts[3:4]}), data / "c.parquet")
    (data / "notes.txt").write_text(texts[4], encoding="utf-8")

    manifest = prepare([str(data)], tmp_path / "out", options(tokenizer_path))

    sources = {name: s["documents"] for name, s in manifest["sources"].items()}
    assert sources == {f"{data}/a.jsonl.zst": 1, f"{data}/c.parquet": 1, f"{data}/part/b.jsonl": 2, str(data): 1}
    shardset, tokenizer = open_shardset(tmp_path / "out"), load(tokenizer_path)
    order = [texts[0], texts[3], texts[1], texts[2], texts[4]]  # sorted structured files, then the text files
    assert [decode(tokenizer, shardset.get(i)) for i in range(5)] == order


@pytest.mark.parametrize("flags, message", [
    (["--shard-size", "12XB"], "argument --shard-size: cannot parse size '12XB'"),
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--max-doc-chars", "-5"], "argument --max-doc-chars: must be >= 0, got -5"),
    (["--val-fraction", "0.5"], "prepare: error: --val-fraction applies only to --builtin"),
    (["--text-field", "body"], "all 2 input records were rejected (missing_text_field=2); check the inputs and --text-field (now 'body')"),
])
def test_wrong_prepare_flags_exit_2_naming_the_flag(flags, message, tmp_path, tokenizer_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["one\n", "two\n"])
    argv = ["prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer_path),
            "--workers", "1", "--quiet", *flags]
    try:
        code = strata(argv)
    except SystemExit as exit_info:  # argparse
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_model_directory_gives_its_tokenizer_json_and_a_wrong_one_says_what_to_do(tmp_path, tokenizer_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", corpus_texts(10))
    model_dir = tmp_path / "Llama-like"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    from_dir = prepare([tmp_path / "in.jsonl"], tmp_path / "a", options(model_dir))
    from_file = prepare([tmp_path / "in.jsonl"], tmp_path / "b", options(tokenizer_path))
    assert from_dir["tokenizer"] == from_file["tokenizer"] and from_dir["counts"] == from_file["counts"]

    (model_dir / "tokenizer.json").unlink()
    assert strata(["prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "c"), "--tokenizer", str(model_dir)]) == 2
    assert "a directory without tokenizer.json" in capsys.readouterr().err
    assert strata(["prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "d"), "--tokenizer", "some-org/some-model"]) == 2
    assert "huggingface-cli download some-org/some-model" in capsys.readouterr().err


def test_a_tokenizer_that_is_not_there_fails_before_the_output_directory_is_made(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    for missing in ("meta-llama/Llama-3.2-1B", str(tmp_path)):  # a Hub id; a directory without tokenizer.json
        with pytest.raises(FileNotFoundError):
            prepare([str(tmp_path / "a.txt")], tmp_path / "out", PrepareOptions(tokenizer=missing))
        assert not (tmp_path / "out").exists()
