"""Built-in `stdlib` corpus: deterministic train/val split, exact round trip, rerun is a no-op."""

from __future__ import annotations

from prepare_testing import decode, load

from data_pipeline.builtin import build_stdlib_corpus, split_train_val, stdlib_files, stdlib_root
from data_pipeline.formats import open_shardset
from launch.cli import main as strata


def test_stdlib_files_exclude_tests_and_split_is_stable():
    root = stdlib_root()
    files = stdlib_files(root)
    assert len(files) > 100
    rel = [f.relative_to(root).parts for f in files]
    assert not any({"test", "tests", "site-packages", "encodings"} & set(parts) for parts in rel)
    train, val = split_train_val(files, root, 0.02)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(files)
    assert 0.005 < len(val) / len(files) < 0.06
    _, val_again = split_train_val(list(reversed(files)), root, 0.02)
    assert sorted(val_again) == sorted(val)  # membership depends on the path only


def test_builtin_stdlib_round_trips_and_resumes(tmp_path):
    out = tmp_path / "stdlib"
    result = build_stdlib_corpus(out, vocab_size=1000, max_files=60, workers=1, progress=False)
    assert {"train", "val", "tokenizer"} <= result.keys()
    tokenizer = load(out / "tokenizer.json")
    assert tokenizer.get_vocab_size() == 1000

    root = stdlib_root()
    train_files, val_files = split_train_val(stdlib_files(root)[:60], root, 0.02)
    assert val_files
    for split, files in (("train", train_files), ("val", val_files)):
        shardset = open_shardset(out / split)
        texts = [f.read_text(encoding="utf-8") for f in files]
        texts = [t for t in texts if t.strip()]  # empty __init__.py files are rejected
        assert len(shardset) == len(texts)
        assert [decode(tokenizer, shardset.get(i)) for i in range(len(shardset))] == texts
        assert shardset.manifest["sources"][f"stdlib/{split}"]["documents"] == len(texts)
        assert (out / split / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()

    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    again = build_stdlib_corpus(out, vocab_size=1000, max_files=60, workers=1, progress=False)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp  # tokenizer reused
    assert again["train_manifest"] == result["train_manifest"]


def test_builtin_cli(tmp_path):
    code = strata(["prepare", "--builtin", "stdlib", "--out", str(tmp_path / "b"), "--max-files",
                   "15", "--train-tokenizer", "600", "--workers", "1", "--quiet"])
    assert code == 0
    assert len(open_shardset(tmp_path / "b" / "train")) > 0
    assert strata(["prepare", "--builtin", "stdlib", "x.jsonl", "--out", str(tmp_path / "c")]) == 2
