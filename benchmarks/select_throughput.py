"""Scoring tokens/s of `strata select` (packed rows) vs one document per forward pass, CPU.

Corpus (built here): the first stdlib .py files (data_pipeline.builtin.stdlib_files) cut at
top-level `def`/`class`/decorator lines into documents, a web-like mix of short and long
documents; byte-level BPE trained on it, tokenized by `prepare`. Models: two randomly
initialized Llamas of the demo's shape (dim 256, 4 layers, 4 heads, tied, window 256), the
prior/conditional pair of CoLoR-Filter. Both methods score every target token of every
document under both models in fp32 and must agree (max |diff| printed).

- packed: `data_pipeline.select.score_documents` (first-fit packed rows of --batch-tokens,
  position_ids restarting per document/window, projection only at scored tokens).
- baseline: a plain loop, one forward pass per document (a document longer than the window:
  one pass per window, as the packed scorer cuts it), `F.cross_entropy` on its logits.

Runs are interleaved, best of --repeats. Prints a table, writes
benchmarks/results/select_throughput.json; the headline is packed / baseline tokens/s.

    .venv/bin/python benchmarks/select_throughput.py [--files 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.builtin import stdlib_files, stdlib_root  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from data_pipeline.prepare import PrepareOptions, prepare  # noqa: E402
from data_pipeline.select import ScoringModel, document_windows, score_documents  # noqa: E402
from data_pipeline.tokenizer import train_byte_level_bpe  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.spec import get_spec  # noqa: E402

TOP_LEVEL = re.compile(r"\n(?=(?:def |class |async def |@))")


def build_corpus(work: Path, files: int, vocab: int) -> Path:
    """JSONL of top-level blocks of the first `files` stdlib files -> BPE -> ShardSet."""
    texts = []
    for file in stdlib_files(stdlib_root())[:files]:
        try:
            source = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.extend(block for block in TOP_LEVEL.split(source) if block.strip())
    with open(work / "docs.jsonl", "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    train_byte_level_bpe(texts, vocab_size=vocab).save(str(work / "tokenizer.json"))
    options = PrepareOptions(tokenizer=str(work / "tokenizer.json"), workers=1, progress=False)
    prepare([str(work / "docs.jsonl")], work / "pool", options)
    return work / "pool"


class CountingModel(torch.nn.Module):
    """Wraps a model to count forward passes and token slots (padding included) it computes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.cfg, self.passes, self.slots = model, model.cfg, 0, 0

    def hidden_states(self, input_ids, position_ids=None):
        self.passes, self.slots = self.passes + 1, self.slots + input_ids.numel()
        return self.model.hidden_states(input_ids, position_ids)

    def project(self, h):
        return self.model.project(h)

    def forward(self, input_ids, position_ids=None):
        return self.project(self.hidden_states(input_ids, position_ids))


def build_model(vocab: int, window: int, seed: int) -> torch.nn.Module:
    cfg = ModelConfig(family="llama", vocab_size=vocab, dim=256, n_layers=4, n_heads=4,
                      max_seq_len=window, tie_embeddings=True)
    with torch.device("meta"):
        model = get_spec("llama").build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return CountingModel(model.eval())


def packed(shardset, models, window: int, batch_tokens: int) -> np.ndarray:
    scoring = [ScoringModel(m, window, m.cfg.vocab_size, None, hidden_states=m.hidden_states,
                            project=m.project) for m in models]
    nll, _ = score_documents(shardset, scoring, batch_tokens=batch_tokens, progress=False)
    return nll


def one_document_per_pass(shardset, models, window: int) -> np.ndarray:
    nll = np.full((len(models), len(shardset)), np.nan)
    with torch.inference_mode():
        for doc_id in range(len(shardset)):
            ids = torch.from_numpy(np.asarray(shardset.get(doc_id), dtype=np.int64))
            windows = list(document_windows(len(ids), window))
            if not windows:
                continue
            for m, model in enumerate(models):
                total = 0.0
                for start, n in windows:
                    logits = model(ids[None, start : start + n])
                    total += float(F.cross_entropy(logits[0].float(), ids[start + 1 : start + n + 1],
                                                   reduction="sum"))
                nll[m, doc_id] = total / (len(ids) - 1)
    return nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10, help="stdlib files cut into documents")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256, help="models' max_seq_len")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/select_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        shardset = open_shardset(build_corpus(Path(tmp), args.files, args.vocab))
        lengths = np.asarray(shardset.lengths)
        targets = int(np.clip(lengths - 1, 0, None).sum())
        models = [build_model(args.vocab, args.window, seed) for seed in (1, 2)]
        runs = {
            "baseline": lambda: one_document_per_pass(shardset, models, args.window),
            "packed": lambda: packed(shardset, models, args.window, args.batch_tokens),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        passes, slots, results = {}, {}, {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                for model in models:
                    model.passes = model.slots = 0
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
                passes[name], slots[name] = models[0].passes, models[0].slots
        best = {name: min(values) for name, values in times.items()}

    max_diff = float(np.nanmax(np.abs(results["packed"] - results["baseline"])))
    scored = targets * len(models)  # target tokens scored, summed over both models
    rate = {name: scored / seconds for name, seconds in best.items()}
    ratio = rate["packed"] / rate["baseline"]
    print(f"corpus: {len(lengths):,} documents from {args.files} stdlib files, {targets:,} target tokens, "
          f"length median {int(np.median(lengths))} / mean {lengths.mean():.0f} / max {lengths.max()}; "
          f"2 Llamas dim 256 x 4 layers, vocab {args.vocab}, window {args.window}, fp32, "
          f"{args.threads} threads")
    print(f"| scorer | forward passes per model | scored / computed tokens | seconds, best of {args.repeats} "
          "(all runs) | tokens/s | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    labels = {"baseline": "one document per pass", "packed": f"strata packed ({args.batch_tokens} tokens/batch)"}
    for name in runs:
        print(f"| {labels[name]} | {passes[name]:,} | {targets / slots[name]:.2f} | {best[name]:.2f} "
              f"({', '.join(f'{t:.1f}' for t in times[name])}) | {rate[name]:,.0f} | {rate[name] / rate['baseline']:.2f}x |")
    print(f"headline: packed / baseline = {ratio:.2f}x")
    print(f"max |NLL packed - NLL baseline| = {max_diff:.2e} nats")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "select_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": args.threads,
        "command": " ".join([".venv/bin/python", "benchmarks/select_throughput.py", *sys.argv[1:]]),
        "corpus": {"files": args.files, "documents": int(len(lengths)), "target_tokens": targets,
                   "median_length": int(np.median(lengths)), "mean_length": float(lengths.mean())},
        "models": {"family": "llama", "dim": 256, "n_layers": 4, "vocab": args.vocab, "window": args.window},
        "batch_tokens": args.batch_tokens, "repeats": args.repeats,
        "seconds": best, "seconds_all_runs": times, "forward_passes_per_model": passes,
        "token_slots_per_model": slots, "tokens_per_s": rate, "ratio_packed_vs_baseline": ratio,
        "max_abs_nll_diff": max_diff,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
