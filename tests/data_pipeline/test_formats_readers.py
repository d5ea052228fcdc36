"""The three formats hold the same documents and are readable by their own libraries."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
from prepare_testing import all_documents, corpus_texts, make_tokenizer, output_files, write_jsonl
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline.formats import open_shardset
from data_pipeline.prepare import PrepareOptions, prepare


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    tokenizer = make_tokenizer(root / "tokenizer.json")
    write_jsonl(root / "in.jsonl", corpus_texts(60))
    sets = {}
    for fmt in ("mds", "wds", "megatron"):
        prepare([root / "in.jsonl"], root / fmt,
                PrepareOptions(format=fmt, tokenizer=str(tokenizer), shard_size="2kb", workers=1,
                               progress=False))
        sets[fmt] = root / fmt
    return sets


def test_all_formats_hold_identical_documents(corpus):
    readers = {fmt: open_shardset(path) for fmt, path in corpus.items()}
    reference = all_documents(readers["mds"])
    assert len(reference) == 60
    for fmt, reader in readers.items():
        assert reader.format == fmt and len(reader.manifest["shards"]) > 3
        docs = all_documents(reader)
        assert all(np.array_equal(a, b) and a.dtype == np.uint16 for a, b in zip(docs, reference, strict=True))
        assert np.array_equal(reader.lengths, [len(d) for d in reference])
    with pytest.raises(IndexError):
        readers["wds"].get(60)


def test_mds_is_readable_by_streaming_dataset(corpus, tmp_path):
    from streaming import StreamingDataset

    ours = open_shardset(corpus["mds"])
    dataset = StreamingDataset(local=str(corpus["mds"]), shuffle=False, batch_size=1)
    assert len(dataset) == len(ours)
    for i in range(len(ours)):
        assert np.array_equal(dataset[i]["tokens"], ours.get(i))


def test_remote_mds_through_streaming_cache(corpus, tmp_path):
    from streaming import StreamingDataset

    local = open_shardset(corpus["mds"])
    remote = open_shardset(f"file://{corpus['mds']}", cache_dir=tmp_path / "cache")
    assert remote.root == tmp_path / "cache"
    assert all(np.array_equal(a, b) for a, b in zip(all_documents(remote), all_documents(local), strict=True))
    assert (tmp_path / "cache" / "shard.00000.mds").is_file()  # fetched on demand

    dataset = StreamingDataset(remote=str(corpus["mds"]), local=str(tmp_path / "scache"),
                               shuffle=False, batch_size=1)
    assert np.array_equal(dataset[len(local) - 1]["tokens"], local.get(len(local) - 1))

    clone = pickle.loads(pickle.dumps(remote))  # what a loader worker process receives
    assert np.array_equal(clone.get(7), local.get(7))


def test_remote_cache_follows_a_rewritten_remote(corpus, tmp_path):
    remote_dir = tmp_path / "remote"
    shutil.copytree(corpus["mds"], remote_dir)
    url = f"file://{remote_dir}"
    first = open_shardset(url, cache_dir=tmp_path / "cache")
    assert len(first) == 60 and len(first.get(0)) == first.lengths[0]
    shutil.rmtree(remote_dir)
    write_jsonl(tmp_path / "other.jsonl", ["one\n", "two\n"])
    prepare([tmp_path / "other.jsonl"], remote_dir,
            PrepareOptions(tokenizer=str(corpus["mds"] / "tokenizer.json"), workers=1, progress=False))
    second = open_shardset(url, cache_dir=tmp_path / "cache")
    assert len(second) == 2 and list(second.lengths) == [len(second.get(0)), len(second.get(1))]
    with pytest.raises(ValueError, match="must be MDS"):
        open_shardset(f"file://{corpus['wds']}", cache_dir=tmp_path / "c2")


def test_compressed_mds_reads_back(corpus, tmp_path):
    from data_pipeline.convert import convert

    convert(corpus["mds"], tmp_path / "zstd", "mds", shard_size="2kb", compression="zstd",
            progress=False)
    assert any(p.name.endswith(".mds.zstd") for p in (tmp_path / "zstd").iterdir())
    zipped = open_shardset(tmp_path / "zstd", cache_dir=tmp_path / "cache")
    plain = open_shardset(corpus["mds"])
    assert all(np.array_equal(a, b) for a, b in zip(all_documents(zipped), all_documents(plain), strict=True))


def test_megatron_is_readable_by_indexed_dataset(corpus):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    ours = open_shardset(corpus["megatron"])
    docs = []
    for prefix in ours.path_prefixes():
        dataset = IndexedDataset(prefix)
        assert dataset.index.dtype == np.uint16
        docs.extend(np.array(dataset.get(i)) for i in range(len(dataset)))  # copy: views die with it
        assert len(dataset.document_indices) == len(dataset) + 1
    assert len(docs) == len(ours)
    assert all(np.array_equal(d, ours.get(i)) for i, d in enumerate(docs))


def test_wds_is_readable_by_webdataset(corpus):
    import webdataset

    ours = open_shardset(corpus["wds"])
    dataset = webdataset.WebDataset(ours.tar_paths(), shardshuffle=False).decode()
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(len(ours))]
    assert all(np.array_equal(s["tokens.npy"], ours.get(i)) for i, s in enumerate(samples))


def test_large_vocab_uses_uint32_everywhere(tmp_path):
    vocab = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, 70_000)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "big.json"))
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(2, 70_000, size=20)) for _ in range(15)]
    write_jsonl(tmp_path / "in.jsonl", texts)
    expected = [np.array([int(w[1:]) for w in t.split()] + [1], dtype=np.uint32) for t in texts]
    for fmt in ("mds", "wds", "megatron"):
        manifest = prepare([tmp_path / "in.jsonl"], tmp_path / fmt,
                           PrepareOptions(format=fmt, tokenizer=str(tmp_path / "big.json"),
                                          workers=1, progress=False, shard_size="300b"))
        assert manifest["dtype"] == "uint32" and manifest["eos_token"] == "</s>"
        docs = all_documents(open_shardset(tmp_path / fmt))
        assert all(np.array_equal(d, e) and d.dtype == np.uint32 for d, e in zip(docs, expected, strict=True))


def test_every_format_is_byte_reproducible(corpus, tmp_path):
    """Resumability rests on this: the same documents give the same bytes (tar mtimes included)."""
    for fmt, first in corpus.items():
        manifest = json.loads((first / "manifest.json").read_text())
        again = tmp_path / fmt
        prepare([first.parent / "in.jsonl"], again,
                PrepareOptions(format=fmt, tokenizer=str(first.parent / "tokenizer.json"),
                               shard_size="2kb", workers=2, progress=False))
        assert output_files(again) == output_files(first), fmt
        assert manifest["format"] == fmt


def test_an_unreachable_remote_names_the_location(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"/nowhere: cannot fetch its manifest.json"):
        open_shardset(f"file://{tmp_path / 'nowhere'}", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"s3://strata-no-such-bucket/set: cannot fetch its manifest.json"):
        open_shardset("s3://strata-no-such-bucket/set", cache_dir=tmp_path / "cache2")
