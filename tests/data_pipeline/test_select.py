"""`strata select color-filter|miniplm`: score formulas, top-k, packed scoring, the CLI end to end.

The end-to-end models are two tiny Llamas *trained* by the engine for 3 steps each (prior on the
tiny corpus' train split, conditional on its val split, another seed), ~2 s each on CPU.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prepare_testing import corpus_texts, write_jsonl

from data_pipeline.formats import open_shardset
from data_pipeline.manifest import manifest_sha256
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.select import (
    METHODS,
    SCORES_NAME,
    Scores,
    ScoringModel,
    document_windows,
    resolve_score_dtype,
    score_documents,
    streaming_top_k,
    top_k_in_corpus_order,
)
from data_pipeline.tokenizer import train_byte_level_bpe
from engine.entry import run_training
from launch.cli import main as strata
from tests.conftest import tiny_config, tiny_model

# --------------------------------------------------------------------------- formula and top-k


def test_color_filter_keeps_global_top_n_over_tau_in_corpus_order():
    prior = np.array([3.0, 2.0, 5.0, 4.0, 1.0, 2.5, 6.0, 3.5, np.nan, 2.0])
    cond = np.array([1.0, 1.5, 4.0, 1.0, 1.0, 0.5, 5.0, 3.5, np.nan, 0.0])
    scores = Scores("color-filter", {"prior": prior, "conditional": cond}, 64, "sha", {})
    # s = L_prior - L_cond = [2, .5, 1, 3, 0, 2, 1, 0, nan, 2]
    np.testing.assert_allclose(scores.score[:8], [2, 0.5, 1, 3, 0, 2, 1, 0])
    k = METHODS["color-filter"].keep_count(len(prior), 3)
    assert k == math.floor(10 / 3) == 3
    # 3.0 (doc 3), then the three 2.0 ties: docs 0, 5, 9 -> the smaller ids 0 and 5 win
    assert top_k_in_corpus_order(scores.score, k).tolist() == [0, 3, 5]
    assert top_k_in_corpus_order(scores.score, 4).tolist() == [0, 3, 5, 9]
    # NaN (a document with no targets) ranks after every finite score, even negative ones
    assert top_k_in_corpus_order(np.array([np.nan, -5.0, -7.0]), 2).tolist() == [1, 2]
    assert METHODS["color-filter"].keep_count(10, 16) == 0
    with pytest.raises(ValueError, match="tau"):
        METHODS["color-filter"].keep_count(10, 0.5)


def test_miniplm_keeps_top_alpha_n_by_reference_minus_teacher():
    reference = np.array([4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0])
    teacher = np.array([3.0, 3.9, 1.0, 3.0, 2.0, 4.5, 1.0])
    scores = Scores("miniplm", {"reference": reference, "teacher": teacher}, 64, "sha", {})
    np.testing.assert_allclose(scores.score, [1.0, 0.1, 3.0, 1.0, 2.0, -0.5, 3.0])
    k = METHODS["miniplm"].keep_count(7, 0.5)
    assert k == 3
    assert top_k_in_corpus_order(scores.score, k).tolist() == [2, 4, 6]  # restored corpus order
    with pytest.raises(ValueError, match="alpha"):
        METHODS["miniplm"].keep_count(7, 1.5)


def test_streaming_variant_keeps_best_of_each_chunk_in_corpus_order():
    # chunks of 4 with tau 2: each keeps its best 2; the last chunk (3 docs) keeps floor(3/2) = 1
    score = np.array([0.1, 0.9, 0.5, 0.7,   # chunk 0 -> docs 1, 3
                      2.0, 3.0, 1.0, 4.0,   # chunk 1 -> docs 5, 7
                      -1.0, np.nan, -2.0])  # chunk 2 -> doc 8 (NaN ranks last)
    kept = streaming_top_k(score, chunk_docs=4, tau=2)
    assert kept.tolist() == [1, 3, 5, 7, 8]
    # the global top 5 differs: chunk 1's scores beat all of chunk 0's
    assert top_k_in_corpus_order(score, 5).tolist() == [1, 4, 5, 6, 7]
    # ties inside a chunk go to the smaller doc id; deterministic across calls
    ties = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 5.0])
    assert streaming_top_k(ties, 3, 3).tolist() == [0, 5]
    assert streaming_top_k(ties, 3, 3).tolist() == streaming_top_k(ties.copy(), 3, 3).tolist()
    # one chunk spanning the pool is the global top k
    assert streaming_top_k(score, 11, 2).tolist() == top_k_in_corpus_order(score, 5).tolist()
    with pytest.raises(ValueError, match="chunk-docs"):
        streaming_top_k(score, chunk_docs=3, tau=4)  # a chunk could keep nothing
    with pytest.raises(ValueError, match="chunk-docs"):
        streaming_top_k(score, chunk_docs=0, tau=1)


def test_windows_cover_every_target_once():
    assert list(document_windows(1, 8)) == []
    assert list(document_windows(9, 8)) == [(0, 8)]
    assert list(document_windows(10, 8)) == [(0, 8), (8, 1)]
    assert sum(n for _, n in document_windows(100, 16)) == 99


# --------------------------------------------------------------------------- packed scoring


class ArrayShardSet:
    """Random documents held in memory (the reader protocol score_documents needs)."""

    def __init__(self, lengths, vocab_size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.docs = [rng.integers(0, vocab_size, size=int(n)).astype(np.uint16) for n in lengths]

    def __len__(self) -> int:
        return len(self.docs)

    def get(self, doc_id: int) -> np.ndarray:
        return self.docs[doc_id]




def alone_nll(model: torch.nn.Module, tokens: np.ndarray, window: int) -> float:
    """Mean NLL of one document, each window in its own forward pass (no packing)."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    total, count = 0.0, 0
    for start, n in document_windows(len(ids), window):
        with torch.no_grad():
            logits = model(ids[None, start : start + n])
        nll = F.cross_entropy(logits[0].float(), ids[start + 1 : start + n + 1], reduction="sum")
        total, count = total + float(nll), count + n
    return total / count if count else float("nan")


@pytest.mark.parametrize("family", ["llama", "gla"])
def test_packed_nll_equals_scoring_each_document_alone(family):
    window = 16
    lengths = [5, 1, 17, 2, 40, 9, 16, 33, 3, 12, 7, 20]  # short, EOS-only, exactly W+1, multi-window
    data = ArrayShardSet(lengths, vocab_size=64, seed=3)
    models = [tiny_model(family, seed, max_seq_len=16) for seed in (1, 2)]
    scoring = [
        ScoringModel(lambda i, p, m=m: m(i, position_ids=p), window, 64, None) for m in models
    ]
    # 3 rows per batch: documents and windows share rows and straddle batches
    nll, used_window = score_documents(data, scoring, batch_tokens=3 * window, progress=False)
    assert used_window == window and nll.shape == (2, len(lengths))
    for m, model in enumerate(models):
        expected = [alone_nll(model, data.get(d), window) for d in range(len(lengths))]
        np.testing.assert_allclose(nll[m], expected, rtol=0, atol=1e-5, equal_nan=True)
    # projecting only scored tokens, 5 at a time (hidden_states/project), changes nothing
    split = [
        ScoringModel(lambda i, p: 1 / 0, window, 64, None, hidden_states=lambda i, p, m=m: m.hidden_states(i, p),
                     project=m.project)
        for m in models
    ]
    chunked, _ = score_documents(data, split, batch_tokens=3 * window, logits_chunk_bytes=4 * 64 * 5,
                                 progress=False)
    np.testing.assert_allclose(chunked, nll, rtol=0, atol=1e-5, equal_nan=True)
    assert np.isnan(nll[:, 1]).all() and np.isfinite(np.delete(nll, 1, axis=1)).all()
    assert not np.allclose(nll[0], nll[1], equal_nan=True)  # two different models, two scores


def test_bf16_autocast_scores_close_to_fp32_on_cpu():
    assert resolve_score_dtype("auto", "cpu") == torch.float32  # fp32 stays the CPU default
    assert resolve_score_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_score_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        resolve_score_dtype("fp16", "cpu")
    window = 16
    data = ArrayShardSet([5, 17, 40, 9, 3, 12], vocab_size=64, seed=4)
    model = tiny_model("llama", 1, max_seq_len=16)
    scoring = [ScoringModel(model, window, 64, None, hidden_states=model.hidden_states, project=model.project)]
    fp32, _ = score_documents(data, scoring, batch_tokens=2 * window, progress=False)
    bf16, _ = score_documents(data, scoring, batch_tokens=2 * window, dtype=torch.bfloat16, progress=False)
    assert not np.array_equal(bf16, fp32)  # the forward did run in bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=0.01)  # ~4.2 nats; measured diff ~1e-4
    assert model.tok_embeddings.weight.dtype == torch.float32  # weights untouched


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    """A 48-document pool in the tiny corpus' tokenizer and two trained 3-step runs."""
    root = tmp_path_factory.mktemp("select")
    write_jsonl(root / "pool.jsonl", corpus_texts(48, seed=1))
    prepare(
        [str(root / "pool.jsonl")],
        root / "pool",
        PrepareOptions(tokenizer=str(tiny_corpus / "tokenizer.json"), workers=1, progress=False),
    )
    quick = {"train.steps": 3, "checkpoint.every": 3, "logging.tensorboard": False,
             "train.eval_batches": 0, "data.prefetch": 0}
    prior, cond = root / "prior", root / "cond"
    assert run_training(tiny_config(tiny_corpus, prior, **quick)).exit_code == 0
    cond_tree = tiny_config(tiny_corpus, cond, **quick, **{"train.seed": 7})
    cond_tree["data"]["sources"] = [{"path": str(tiny_corpus / "val"), "name": "target"}]
    assert run_training(cond_tree).exit_code == 0
    return root, prior, cond


def documents(path) -> list[np.ndarray]:
    shardset = open_shardset(path)
    return [np.asarray(shardset.get(i)) for i in range(len(shardset))]


def test_cli_color_filter_writes_a_trainable_shardset_with_provenance(setup, tiny_corpus, tmp_path):
    root, prior, cond = setup
    pool, out = root / "pool", tmp_path / "selected"
    argv = ["select", "color-filter", str(pool), "--prior", str(prior), "--conditional", str(cond),
            "--tau", "4", "--out", str(out), "--batch-tokens", "512", "--device", "cpu", "--quiet"]
    assert strata(argv) == 0

    parent, child = documents(pool), documents(out)
    manifest = json.loads((out / "manifest.json").read_text())
    selection = manifest["provenance"]["selection"]
    assert len(child) == math.floor(len(parent) / 4) == 12
    assert manifest["counts"]["documents"] == 12
    assert manifest["provenance"]["parent"] == manifest_sha256(pool)
    assert manifest["provenance"]["tool"] == "strata select color-filter"
    assert selection["tau"] == 4 and selection["kept"] == 12 and selection["dropped"] == 36
    assert set(selection["models"]) == {"prior", "conditional"}
    assert selection["models"]["prior"]["checkpoint"].endswith("step_00000003")
    assert manifest["tokenizer"] == open_shardset(pool).manifest["tokenizer"]

    scores = Scores.load(out / SCORES_NAME)
    assert np.isfinite(scores.score).all() and np.ptp(scores.score) > 0
    kept = top_k_in_corpus_order(scores.score, 12)
    assert np.all(np.diff(kept) > 0)  # corpus order
    assert all(np.array_equal(c, parent[d]) for c, d in zip(child, kept, strict=True))
    with np.load(out / SCORES_NAME) as raw:
        np.testing.assert_allclose(raw["score"], raw["nll_prior"] - raw["nll_conditional"])
        assert raw["doc_id"].tolist() == list(range(48))

    # re-select from the saved scores: same set, no model given
    again = tmp_path / "again"
    assert strata(["select", "color-filter", str(pool), "--scores", str(out / SCORES_NAME),
                   "--tau", "4", "--out", str(again), "--quiet"]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(documents(again), child, strict=True))
    assert len(documents(again)) == 12
    # a looser tau from the same scores keeps a superset
    loose = tmp_path / "loose"
    assert strata(["select", "color-filter", str(pool), "--scores", str(out / SCORES_NAME),
                   "--tau", "2", "--out", str(loose), "--quiet"]) == 0
    loose_selection = json.loads((loose / "manifest.json").read_text())["provenance"]["selection"]
    assert loose_selection["kept"] == 24 and loose_selection["scores_from"].endswith(SCORES_NAME)
    # a tau that keeps nothing is an error, not an empty ShardSet
    assert strata(["select", "color-filter", str(pool), "--scores", str(out / SCORES_NAME),
                   "--tau", "100", "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert not (tmp_path / "none").exists()
    # the streaming variant: best 2 of each chunk of 8, labelled as such in the provenance
    stream = tmp_path / "stream"
    assert strata(["select", "color-filter", str(pool), "--scores", str(out / SCORES_NAME), "--tau", "4",
                   "--selection", "streaming", "--chunk-docs", "8", "--out", str(stream), "--quiet"]) == 0
    stream_selection = json.loads((stream / "manifest.json").read_text())["provenance"]["selection"]
    assert stream_selection["selection"] == "streaming" and stream_selection["chunk_docs"] == 8
    assert "variant" in stream_selection["rule"] and stream_selection["kept"] == 12
    streamed = streaming_top_k(scores.score, 8, 4)
    assert all(np.array_equal(c, parent[d]) for c, d in zip(documents(stream), streamed, strict=True))
    assert selection["selection"] == "global" and selection["dtype"] == "fp32"  # CPU default
    for bad in (["--chunk-docs", "8"], ["--selection", "streaming"], ["--selection", "streaming",
                                                                      "--chunk-docs", "3"]):
        assert strata(["select", "color-filter", str(pool), "--scores", str(out / SCORES_NAME), "--tau", "4",
                       *bad, "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()

    # the loader reads it and the trainer trains on it
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 2, "checkpoint.every": 0,
                       "logging.tensorboard": False, "train.eval_batches": 0, "data.prefetch": 0})
    tree["data"]["sources"] = [{"path": str(out), "name": "selected"}]
    result = run_training(tree)
    assert result.exit_code == 0 and result.step == 2


def test_cli_miniplm_keeps_top_half_by_reference_minus_teacher(setup, tmp_path):
    root, prior, cond = setup
    pool, out = root / "pool", tmp_path / "mini"
    assert strata(["select", "miniplm", str(pool), "--teacher", str(cond), "--reference", str(prior),
                   "--out", str(out), "--format", "wds", "--dtype", "bf16", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "wds" and manifest["counts"]["documents"] == 24
    assert manifest["provenance"]["selection"]["alpha"] == 0.5
    assert manifest["provenance"]["selection"]["dtype"] == "bf16"
    scores = Scores.load(out / SCORES_NAME)
    assert scores.dtype == "bf16"
    np.testing.assert_allclose(scores.score, scores.nll["reference"] - scores.nll["teacher"])
    parent = documents(pool)
    kept = top_k_in_corpus_order(scores.score, 24)
    assert all(np.array_equal(c, parent[d]) for c, d in zip(documents(out), kept, strict=True))
    # color-filter scores are refused by miniplm
    other = tmp_path / "other"
    assert strata(["select", "color-filter", str(pool), "--scores", str(out / SCORES_NAME),
                   "--out", str(other), "--quiet"]) == 2
    assert not other.exists()


def test_tokenizer_mismatch_is_refused_naming_both(setup, tmp_path, capsys):
    root, prior, cond = setup
    foreign = tmp_path / "foreign"
    shutil.copytree(prior, foreign)
    train_byte_level_bpe(["something else entirely"] * 30, vocab_size=300).save(
        str(foreign / "tokenizer.json")
    )
    out = tmp_path / "out"
    code = strata(["select", "color-filter", str(root / "pool"), "--prior", str(foreign),
                   "--conditional", str(cond), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "--prior" in err and str(foreign / "tokenizer.json") in err
    assert str(root / "pool" / "tokenizer.json") in err and "fingerprint" in err


def test_existing_output_is_refused_unless_overwrite(setup, tmp_path, capsys):
    root, prior, cond = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["select", "miniplm", str(root / "pool"), "--teacher", str(cond), "--reference",
            str(prior), "--alpha", "0.25", "--out", str(out), "--quiet"]
    assert strata(base) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert strata([*base, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and len(documents(out)) == 12
    assert not list(tmp_path.glob(".out.*"))  # no temp or old directories left behind
    # the input is never a valid output
    assert strata(["select", "miniplm", str(root / "pool"), "--scores", str(out / SCORES_NAME),
                   "--out", str(root / "pool"), "--overwrite", "--quiet"]) == 2
    assert (root / "pool" / "manifest.json").is_file()


def test_hf_directory_scores_like_its_strata_checkpoint(setup, tmp_path):
    from engine.export import export_hf

    root, prior, cond = setup
    hf_prior = export_hf(prior, tmp_path / "hf_prior")  # copies the run's tokenizer.json too
    outs = {}
    for name, model in (("strata", prior), ("hf", hf_prior)):
        outs[name] = tmp_path / name
        assert strata(["select", "color-filter", str(root / "pool"), "--prior", str(model),
                       "--conditional", str(cond), "--tau", "4", "--out", str(outs[name]),
                       "--quiet"]) == 0
    strata_scores, hf_scores = (Scores.load(outs[n] / SCORES_NAME) for n in ("strata", "hf"))
    np.testing.assert_allclose(hf_scores.nll["prior"], strata_scores.nll["prior"], atol=1e-5)
    assert hf_scores.models["prior"]["kind"] == "hf"
