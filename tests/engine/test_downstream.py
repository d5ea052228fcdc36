"""Multiple-choice evaluation (engine.downstream): batched scores equal rows scored alone, acc and
acc_norm as computed by hand, lm-eval's tokenization (joint context + choice, EOS for an empty
context, character lengths), a trained continuation wins, bad lines are counted, two FSDP2 ranks
score as one process, the trainer's record and `strata eval --task`; k-shot prompts built as
lm-eval builds them (never the item itself, from the file or `fewshot_from`, seeded), configured
as a path or a mapping."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from distributed_runs import run_ranks, run_tree
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.config import ConfigError, EvalTaskConfig, load_config
from engine.downstream import (
    FEWSHOT_SEED,
    EncodedTask,
    choice_logprobs,
    completion_length,
    encode_task,
    fewshot_prompts,
    forward_shapes,
    load_task,
    prepare_tasks,
    read_task,
    score_task,
)
from engine.report import read_metrics
from launch.cli import main
from tests.conftest import tiny_config, tiny_model

CPU = torch.device("cpu")


def alone(model: torch.nn.Module, ids: list[int], n_continuation: int) -> float:
    """The continuation's summed log-prob, the row (but its last token) in a forward of its own."""
    with torch.no_grad():
        log_probs = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    return sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids) - n_continuation, len(ids)))


def write_task(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def random_task(n_items: int, seed: int, vocab_size: int = 64) -> EncodedTask:
    """Items of 2-4 choices, rows of varied lengths (ids straight, no tokenizer)."""
    rng = np.random.default_rng(seed)
    task = EncodedTask("random", [], [], [])
    for _ in range(n_items):
        context = rng.integers(1, vocab_size, rng.integers(1, 12)).tolist()
        choices = [rng.integers(1, vocab_size, rng.integers(1, 8)).tolist() for _ in range(rng.integers(2, 5))]
        task.rows.append([(context + c, len(c)) for c in choices])
        task.choice_lengths.append([int(rng.integers(1, 30)) for _ in choices])
        task.labels.append(int(rng.integers(0, len(choices))))
    return task


@pytest.mark.parametrize("family", ["llama", "gla"])
def test_batched_scores_equal_each_row_alone(family):
    model = tiny_model(family)
    task = random_task(9, seed=1)
    rows = [row for item in task.rows for row in item]
    batched = choice_logprobs(model, rows, CPU, tokens_per_forward=5 * 19)  # several rows per forward, padded
    assert len(forward_shapes([sorted((len(ids) for ids, _ in rows), reverse=True)], 5 * 19)) < len(rows) / 2
    np.testing.assert_allclose(batched, [alone(model, ids, n) for ids, n in rows], rtol=0, atol=1e-5)
    one_by_one = choice_logprobs(model, rows, CPU, tokens_per_forward=1)  # one row per forward
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-5)


class BigramTable(torch.nn.Module):
    """A stub LM: the next-token distribution depends only on the current token (a fixed table);
    records the shape of every forward."""

    def __init__(self, probs: dict[int, dict[int, float]], vocab_size: int = 8):
        super().__init__()
        table = torch.full((vocab_size, vocab_size), 1e-6)
        for current, following in probs.items():
            for token, p in following.items():
                table[current, token] = p
        self.register_buffer("log_probs", (table / table.sum(-1, keepdim=True)).log())
        self.shapes: list[tuple[int, int]] = []

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.shapes.append(tuple(input_ids.shape))
        return self.log_probs[input_ids]


def test_acc_and_acc_norm_by_hand():
    model = BigramTable({1: {2: 0.5, 3: 0.25, 4: 0.05, 5: 0.2}, 3: {4: 0.9, 5: 0.1}, 5: {1: 1.0}})
    # item 0 and 1: choice A = token 2 (log .5 summed; 1 byte), choice B = tokens 3 4 (log .25 + log .9; 10 bytes):
    # A has the higher sum, B the higher sum per byte. Item 2: token 2 vs token 4 after "5 1", 1 byte each.
    rows = [([1, 2], 1), ([1, 3, 4], 2)]
    task = EncodedTask("hand", [rows, rows, [([5, 1, 2], 1), ([5, 1, 4], 1)]], [[1, 10], [1, 10], [1, 1]], [1, 0, 0])
    log_probs = choice_logprobs(model, [row for item in task.rows for row in item], CPU)
    by_hand = [math.log(0.5), math.log(0.25) + math.log(0.9)] * 2 + [math.log(0.5), math.log(0.05)]
    np.testing.assert_allclose(log_probs, by_hand, rtol=1e-5)
    # acc: A wins items 0 and 1, token 2 wins item 2; acc_norm: B wins items 0 and 1, token 2 item 2
    for labels, acc, acc_norm in (([1, 0, 0], 2 / 3, 2 / 3), ([0, 0, 0], 1.0, 1 / 3), ([1, 1, 0], 1 / 3, 1.0)):
        task.labels = labels
        assert score_task(model, task, CPU) == {"acc": acc, "acc_norm": acc_norm, "items": 3, "skipped": {}}


def random_bigram(seed: int = 0, vocab_size: int = 64) -> BigramTable:
    model = BigramTable({}, vocab_size)
    model.log_probs.copy_(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)).log_softmax(-1))
    return model


def test_ranks_run_the_same_forwards_and_their_counts_add_up():
    task = random_task(7, seed=2)  # 7 items on 3 ranks: shares of 2, 2, 3 (different row counts)
    one = score_task(random_bigram(), task, CPU, tokens_per_forward=40)
    correct, correct_norm, items, shapes = 0.0, 0.0, 0, []
    for rank in range(3):
        model = random_bigram()
        share = score_task(model, task, CPU, tokens_per_forward=40, rank=rank, world_size=3)
        correct, correct_norm = correct + share["acc"] * share["items"], correct_norm + share["acc_norm"] * share["items"]
        items += share["items"]
        shapes.append(model.shapes)
    assert shapes[0] == shapes[1] == shapes[2] and len(shapes[0]) > 1  # lockstep: FSDP2 collectives never wait
    assert all(rows * tokens <= 40 or rows == 1 for rows, tokens in shapes[0])  # the token budget holds
    assert items == one["items"] == 7
    assert correct / 7 == pytest.approx(one["acc"]) and correct_norm / 7 == pytest.approx(one["acc_norm"])
    assert 0 < one["acc"] < 1  # a random table: a mixed result, not a degenerate one


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_corpus / "tokenizer.json"))


def test_bad_lines_are_counted_by_reason(tmp_path, tokenizer, tiny_corpus):
    good = {"context": "x = 1", "choices": [" + 1", " - 1"], "label": 1}
    lines = [
        json.dumps(good),
        json.dumps({"query": "y =", "choices": [" 2", " 3", " 4"], "gold": "2"}),  # aliases, HellaSwag's "2"
        "{not json",
        "[1, 2]",
        json.dumps({"context": "x", "choices": [" a", " b"]}),
        json.dumps({"context": "x", "choices": [" a"], "label": 0}),
        json.dumps({"context": "x", "choices": [" a", " b"], "label": 2}),
        json.dumps({"context": "x", "choices": [" a", ""], "label": 0}),
        json.dumps({"context": "x", "choices": [" a", " b"], "label": 1.5}),
        "",
        json.dumps({"context": "x", "choices": [" a" * 40, " b"], "label": 0}),  # a choice longer than the window
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items, skipped = read_task(path)
    assert [(i.context, i.label, len(i.choices)) for i in items] == [("x = 1", 1, 2), ("y =", 2, 3), ("x", 0, 2)]
    assert skipped == {
        "invalid JSON": 1,
        "not a JSON object": 1,
        "missing field": 1,
        "fewer than 2 choices": 1,
        "label out of range": 1,
        "choices not a list of non-empty strings": 1,
        "label not an integer": 1,
    }
    task = load_task(path, tiny_corpus / "tokenizer.json", max_seq_len=16)
    assert len(task) == 2 and task.skipped == {**skipped, "choice too long for max_seq_len": 1}
    assert task.choice_lengths[1] == [1, 1, 1]  # " 2": lm-eval's len("2"), the delimiter " " not counted
    write_task(bad := tmp_path / "bad.jsonl", [{"context": "x"}])
    with pytest.raises(ValueError, match=f"{bad}: no usable item.*missing field 1"):
        read_task(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such task file"):
        read_task(tmp_path / "nope.jsonl")


def test_rows_keep_the_whole_choice_and_lose_context_from_the_left(tokenizer):
    context = "import os\n" * 19 + "import os"  # no trailing whitespace to move onto the choice
    (item,) = read_task_items([{"context": context, "choices": [" print", " os.path"], "label": 0}])
    task = encode_task([item], tokenizer, max_seq_len=12)
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    for (ids, n), choice in zip(task.rows[0], item.choices, strict=True):
        choice_ids = tokenizer.encode(choice, add_special_tokens=False).ids  # byte-level BPE: joint == apart
        assert n == len(choice_ids) and ids[-n:] == choice_ids  # the whole choice
        # lm-eval's window: max_seq_len + 1 tokens, the model reads all but the last
        assert len(ids) == 13 and ids[:-n] == context_ids[-(13 - n) :]
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), max_seq_len=12)
    np.testing.assert_allclose(choice_logprobs(model, task.rows[0], CPU), [alone(model, *row) for row in task.rows[0]],
                               rtol=0, atol=1e-5)  # fmt: skip


def metaspace_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """A SentencePiece-style BPE ("▁" marks a word start, prepended to the first word) on which
    context and choice tokenized apart differ from the two tokenized together."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = "the capital of france is paris. the capital of italy is rome. paris is a city."
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=special_tokens, show_progress=False)
    tokenizer.train_from_iterator([text] * 20, trainer=trainer)
    return tokenizer


JOINT_ITEMS = [
    {"context": "the capital of france is ", "choices": ["paris", "rome"], "label": 0},  # a trailing space
    {"context": "the cap", "choices": ["ital of italy", "ital is rome"], "label": 0},  # the boundary splits a word
    {"context": "paris is", "choices": [" a city.", " rome."], "label": 0},
]


def test_continuation_tokens_come_from_the_joint_encoding():
    tokenizer = metaspace_tokenizer([])
    items = read_task_items(JOINT_ITEMS)
    task = encode_task(items, tokenizer, max_seq_len=64)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def lm_eval_row(context: str, choice: str) -> tuple[list[int], int]:  # row by row, lm-eval's rule
        stripped = context.rstrip()
        context_ids, whole = encode(stripped), encode(stripped + context[len(stripped) :] + choice)
        return context_ids + whole[len(context_ids) :], len(whole) - len(context_ids)

    assert task.rows == [[lm_eval_row(item.context, c) for c in item.choices] for item in items]  # batched == one by one
    apart = [[encode(item.context) + encode(c) for c in item.choices] for item in items]
    differ = [(i, c) for i, item in enumerate(task.rows) for c, (ids, _) in enumerate(item) if ids != apart[i][c]]
    assert (0, 0) in differ and (1, 0) in differ  # tokenizing apart would have been wrong here
    # "the capital of france is " + "paris": the space is the "▁" of "▁paris", not a token of its own
    (ids, n), _ = task.rows[0]
    assert tokenizer.id_to_token(ids[-1]) == "▁paris" and n == 1 and tokenizer.token_to_id("▁") not in ids
    # "the cap" + "ital of italy": the context's own tokens, then the whole string's past as many
    whole = encode("the capital of italy")  # ▁the ▁capital ▁of ▁italy
    assert encode("the cap") == whole[:1] + [tokenizer.token_to_id("▁cap")]
    assert task.rows[1][0] == (encode("the cap") + whole[2:], len(whole) - 2)
    # the rows score batched as each alone
    rows = [row for item in task.rows for row in item]
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    np.testing.assert_allclose(choice_logprobs(model, rows, CPU, tokens_per_forward=30),
                               [alone(model, *row) for row in rows], rtol=0, atol=1e-5)  # fmt: skip


def test_an_empty_context_is_scored_after_the_eos_token(tmp_path, tiny_corpus):
    shardset_tokenizer = tiny_corpus / "train" / "tokenizer.json"  # beside the ShardSet manifest and its eos_id
    eos_id = json.loads((tiny_corpus / "train" / "manifest.json").read_text())["eos_id"]
    byte_level = Tokenizer.from_file(str(shardset_tokenizer))
    path = write_task(tmp_path / "empty.jsonl", [
        {"context": "x = 1", "choices": [" + 1", " - 1"], "label": 0},
        {"context": "", "choices": ["import os", "x"], "label": 0},
    ])  # fmt: skip
    task = load_task(path, shardset_tokenizer, max_seq_len=32)
    assert len(task) == 2 and task.skipped == {}
    for (ids, n), choice in zip(task.rows[1], ["import os", "x"], strict=True):
        assert ids == [eos_id] + byte_level.encode(choice, add_special_tokens=False).ids and n == len(ids) - 1
    # a HF tokenizer_config.json names lm-eval's prefix token: its BOS, else its EOS
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    metaspace = metaspace_tokenizer(["<s>", "</s>"])
    metaspace.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert load_task(path, hf_dir / "tokenizer.json", 32).rows[1][0][0][0] == metaspace.token_to_id("<s>")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_task(path, hf_dir / "tokenizer.json", 32).rows[1][0][0][0] == metaspace.token_to_id("</s>")
    # no EOS anywhere: an error naming the file and the line (a blank line counts)
    metaspace_tokenizer([]).save(str(tmp_path / "tokenizer.json"))
    path.write_text(path.read_text().replace("\n", "\n\n", 1))
    with pytest.raises(ValueError, match=f"{path}:3: the context encodes to no token and the tokenizer has no EOS"):
        load_task(path, tmp_path / "tokenizer.json", 32)
    with pytest.raises(ConfigError, match=rf"train\.eval_tasks\.mc: {path}:3: "):
        prepare_tasks({"mc": str(path)}, tmp_path / "tokenizer.json", 32)


class FixedTokenizer:
    """A tokenizer of a fixed table: text -> ids."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list:
        return [SimpleNamespace(ids=self.table[text]) for text in texts]


def test_acc_norm_divides_by_the_choice_length_lm_eval_uses():
    # lm-eval: completion_len = len(choice) in characters, the target delimiter " " not counted
    assert [completion_length(c) for c in [" Paris", "Paris", " café", "  x", " ", "日本"]] == [5, 5, 4, 2, 1, 2]
    model = BigramTable({1: {2: 0.5, 3: 0.3}, 3: {4: 0.6}})
    # choice A " é" = token 2 (log .5), choice B " abc" = tokens 3 4 (log .3 + log .6 = log .18):
    # per UTF-8 byte with the space (3 and 4) A would win (-.23 > -.43); per character without it
    # (1 and 3), as lm-eval, B wins (-.57 > -.69)
    tokenizer = FixedTokenizer({"q": [1], "q é": [1, 2], "q abc": [1, 3, 4]})
    (item,) = read_task_items([{"context": "q", "choices": [" é", " abc"], "label": 1}])
    task = encode_task([item], tokenizer, max_seq_len=8)
    assert task.rows == [[([1, 2], 1), ([1, 3, 4], 2)]] and task.choice_lengths == [[1, 3]]
    assert score_task(model, task, CPU) == {"acc": 0.0, "acc_norm": 1.0, "items": 1, "skipped": {}}


def read_task_items(records: list[dict]) -> list:
    from engine.downstream import _parse_item

    return [_parse_item(json.dumps(r)) for r in records]


LEARNED_ITEMS = [  # the right choice continues "the quick brown fox jumps over the lazy dog. "
    {"context": "the quick brown", "choices": [" dog jumps", " fox jumps", " lazy over"], "label": 1},
    {"context": "over the", "choices": [" lazy dog.", " brown fox", " quick the"], "label": 0},
    {"context": "the lazy dog. the", "choices": [" lazy", " fox", " quick brown"], "label": 2},
    {"context": "fox", "choices": [" over the", " the quick", " jumps over"], "label": 2},
]


def test_the_continuation_the_model_learned_is_the_answer(tokenizer, tmp_path, tiny_corpus):
    text = "the quick brown fox jumps over the lazy dog. "
    stream = torch.tensor(tokenizer.encode(text * 40, add_special_tokens=False).ids)
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64)
    task = load_task(write_task(tmp_path / "learned.jsonl", LEARNED_ITEMS), tiny_corpus / "tokenizer.json", 64)
    assert score_task(model, task, CPU)["acc"] < 0.5  # untrained
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):  # memorize the sentence: every window of it, next token
        starts = torch.arange(8) * 3 + step % 3
        windows = torch.stack([stream[s : s + 33] for s in starts.tolist()])
        logits = model(windows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert score_task(model, task, CPU) == {"acc": 1.0, "acc_norm": 1.0, "items": 4, "skipped": {}}
    assert model.training  # the mode is given back


def test_config_errors_name_the_field(tiny_corpus, tmp_path, capsys):
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"train.eval_tasks": {"a/b": "x.jsonl"}})
    with pytest.raises(ConfigError, match=r"train\.eval_tasks: task name 'a/b'"):
        load_config(tree)
    missing = tmp_path / "missing.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_corpus, tmp_path / "run", **{"train.eval_tasks": {"mc": str(missing)}})))
    assert main(["train", str(config)]) == 2
    assert f"config error: train.eval_tasks.mc: {missing}: no such task file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


TASK_ITEMS = [  # 7 items: shares of 3 and 4 on two ranks; varied lengths
    {"context": "import os\nimport", "choices": [" sys", " os.path", " re"], "label": 0},
    {"context": "def f(self", "choices": ["):", ", x):", "): return None"], "label": 0},
    {"context": "for i in", "choices": [" range(10):", " x", " self.items():\n    pass"], "label": 0},
    {"context": "return", "choices": [" None", " self", " True"], "label": 1},
    {"context": "class A", "choices": [":", "(object):", "(Exception):\n    pass"], "label": 1},
    {"context": "if x is", "choices": [" None:", " not None:"], "label": 0},
    {"context": "    raise", "choices": [" ValueError(", " TypeError(", " KeyError"], "label": 2},
]


@pytest.fixture(scope="module")
def fsdp_run(tiny_corpus, tmp_path_factory):
    """2 FSDP2 ranks (gloo), no val set: train.eval_tasks only, evaluated after steps 1 and 2."""
    root = tmp_path_factory.mktemp("downstream")
    task = write_task(root / "mc.jsonl", TASK_ITEMS)
    run_dir = root / "run"
    tasks = {"mc": str(task), "mc_2shot": {"path": str(task), "num_fewshot": 2}}
    tree = run_tree(tiny_corpus, run_dir, steps=2, **{
        "data.val_path": None, "train.eval_tasks": tasks, "train.eval_every": 1, "parallel.dp_shard": 2,
    })  # fmt: skip
    run_ranks(2, run_dir, tree)
    return run_dir, task


def test_two_fsdp_ranks_log_the_task_accuracy_one_process_gets(fsdp_run, capsys):
    run_dir, task = fsdp_run
    records = [r for r in read_metrics(run_dir / "metrics.jsonl").records if "task_acc/mc" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["task_acc/mc"] <= 1 and 0 <= r["task_acc_norm/mc"] <= 1 for r in records)
    # `strata eval` in one process, on the tasks of the run's config (it has no val set)
    assert main(["eval", str(run_dir), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["step"] == 2 and row["results"] == {}
    assert row["tasks"]["mc"]["items"] == len(TASK_ITEMS)
    assert row["tasks"]["mc"]["acc"] == records[-1]["task_acc/mc"]
    assert row["tasks"]["mc"]["acc_norm"] == records[-1]["task_acc_norm/mc"]


def test_strata_eval_task_flag(fsdp_run, tmp_path, capsys):
    run_dir, task = fsdp_run
    assert main(["eval", str(run_dir), "--task", f"again={task}", "--batch-size", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert list(row["tasks"]) == ["again"] and row["tasks"]["again"]["items"] == len(TASK_ITEMS)
    assert main(["eval", str(run_dir), "--task", f"again={task}"]) == 0
    out = capsys.readouterr().out
    assert "task acc / acc_norm" in out and "again" in out
    assert main(["eval", str(run_dir), "--task", f"x={tmp_path / 'nope.jsonl'}"]) == 2
    assert f"--task x: {tmp_path / 'nope.jsonl'}: no such task file" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--task", f"x={task}", "--task", f"x={task}"]) == 2
    assert "given twice" in capsys.readouterr().err


# -- few-shot prompts ---------------------------------------------------------------------------
QA_ITEMS = [
    {"context": "Q: capital of France?\nA:", "choices": [" Paris", " Rome"], "label": 0},
    {"context": "Q: 2 + 2?\nA:", "choices": [" 3", " 4"], "label": 1},
    {"context": "Q: color of the sky?\nA:", "choices": [" blue", " green"], "label": 0},
    {"context": "Q: opposite of hot?\nA:", "choices": [" warm", " cold"], "label": 1},
]


def test_a_two_shot_prompt_is_lm_evals(tmp_path):
    # lm-eval, fewshot_split == test_split: one random.Random(1234) draws k + 1 = 3 docs for each doc
    # in order (indices [3, 0, 2], [0, 2, 3], [0, 3, 1], [1, 0, 2]), drops the doc itself, keeps the
    # first 2; each example is text + " " + gold choice + "\n\n", then the doc's own text
    items, _ = read_task(write_task(tmp_path / "qa.jsonl", QA_ITEMS))
    prompts = fewshot_prompts(items, 2)
    assert [p.context for p in prompts] == [
        "Q: opposite of hot?\nA: cold\n\nQ: color of the sky?\nA: blue\n\nQ: capital of France?\nA:",
        "Q: capital of France?\nA: Paris\n\nQ: color of the sky?\nA: blue\n\nQ: 2 + 2?\nA:",
        "Q: capital of France?\nA: Paris\n\nQ: opposite of hot?\nA: cold\n\nQ: color of the sky?\nA:",
        "Q: 2 + 2?\nA: 4\n\nQ: capital of France?\nA: Paris\n\nQ: opposite of hot?\nA:",
    ]
    assert [(p.choices, p.label, p.line) for p in prompts] == [(i.choices, i.label, i.line) for i in items]
    assert FEWSHOT_SEED == 1234 and fewshot_prompts(items, 2, seed=1234) == prompts  # deterministic
    assert fewshot_prompts(items, 2, seed=7) != prompts and fewshot_prompts(items, 0) == items


def solved(record: dict) -> str:
    return record["context"] + record["choices"][record["label"]] + "\n\n"


def test_an_item_is_never_among_its_own_examples(tmp_path):
    records = [{"context": f"q{i}?", "choices": [f" a{i}", f" b{i}"], "label": i % 2} for i in range(6)]
    path = write_task(tmp_path / "six.jsonl", records)
    items, _ = read_task(path)
    for seed in range(5):  # k = 5 of 6: every other item, never the item
        for record, prompt in zip(records, fewshot_prompts(items, 5, seed=seed), strict=True):
            assert prompt.context.endswith("\n\n" + record["context"]) and solved(record) not in prompt.context
            assert all(solved(other) in prompt.context for other in records if other is not record)
    with pytest.raises(ValueError, match=f"{path}: 6 usable items, too few to draw 6 few-shot examples other than "
                                         "the item scored"):  # fmt: skip
        fewshot_prompts(items, 6, path=str(path))
    # a line repeated is one document (lm-eval compares docs): neither copy shows its answer to the other
    lines = records[:4] + records[:1]
    items, _ = read_task(write_task(tmp_path / "twice.jsonl", lines))
    counts = []
    for seed in range(10):
        for record, prompt in zip(lines, fewshot_prompts(items, 3, seed=seed), strict=True):
            shown = sum(prompt.context.count(solved(r)) for r in records[:4])  # another repeated line: twice
            assert solved(record) not in prompt.context and shown == prompt.context.count("\n\n")
            counts.append(shown)
    assert max(counts) == 3 and min(counts) == 2  # both copies drawn for q0: 4 drawn, 2 dropped, as lm-eval


def test_examples_come_from_fewshot_from_when_given(tmp_path, tiny_corpus, tokenizer):
    test = write_task(tmp_path / "test.jsonl", QA_ITEMS)
    train_records = [{"context": f"Q: {w}?\nA:", "choices": [" yes", " no"], "label": i % 2} for i, w in enumerate("xyz")]
    train = tmp_path / "train.jsonl"
    train.write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in train_records))
    items, _ = read_task(test)
    examples, skipped = read_task(train)
    rng = random.Random(1234)  # lm-eval, another split: k drawn, not k + 1
    expected = ["".join(solved(train_records[e.line - 2]) for e in rng.sample(examples, 2)) + r["context"] for r in QA_ITEMS]
    assert [p.context for p in fewshot_prompts(items, 2, examples)] == expected
    task = load_task(test, tiny_corpus / "tokenizer.json", 64, num_fewshot=2, fewshot_from=train)
    assert task.num_fewshot == 2 and len(task) == 4 and task.skipped == {"fewshot_from: invalid JSON": 1}
    assert task.rows == encode_task(fewshot_prompts(items, 2, examples), tokenizer, 64).rows
    # the whole prompt is truncated from the left, the choice kept (encode_task's rule)
    short = load_task(test, tiny_corpus / "tokenizer.json", 8, num_fewshot=2, fewshot_from=train)
    assert all(len(ids) == 9 for item in short.rows for ids, _ in item)
    assert [[ids[-n:] for ids, n in item] for item in short.rows] == [[ids[-n:] for ids, n in item] for item in task.rows]
    with pytest.raises(ValueError, match=f"{train}: 3 usable items, too few to draw 4 few-shot examples \\(needs 4\\)"):
        load_task(test, tiny_corpus / "tokenizer.json", 64, num_fewshot=4, fewshot_from=train)
    with pytest.raises(ConfigError, match=rf"train\.eval_tasks\.qa: {test}: 4 usable items, too few to draw 4 "):
        prepare_tasks({"qa": EvalTaskConfig(path=str(test), num_fewshot=4)}, tiny_corpus / "tokenizer.json", 64)


def test_eval_tasks_take_a_path_or_a_few_shot_mapping(tiny_corpus, tmp_path, capsys):
    tasks = {"plain": "a.jsonl", "hs": {"path": "b.jsonl", "num_fewshot": 5, "fewshot_from": "c.jsonl"}}
    cfg = load_config(tiny_config(tiny_corpus, tmp_path / "run", **{"train.eval_tasks": tasks}))
    assert cfg.train.eval_tasks["plain"] == "a.jsonl"  # a plain path stays one (0-shot)
    assert cfg.train.eval_tasks["hs"] == EvalTaskConfig(path="b.jsonl", num_fewshot=5, fewshot_from="c.jsonl", seed=1234)
    assert load_config(cfg.model_dump()).train.eval_tasks == cfg.train.eval_tasks  # the run's config.yaml reads back
    for value, error in [
        ({"path": "b.jsonl", "num_fewshot": -1}, r"hs\.num_fewshot: Input should be greater than or equal to 0"),
        ({"path": "b.jsonl", "shots": 5}, r"hs\.shots: unknown key"),
        ({"num_fewshot": 5}, r"hs\.path: Field required"),
        (5, r"hs: expected a task file path or a mapping \{path, num_fewshot, fewshot_from, seed\}"),
    ]:
        with pytest.raises(ConfigError, match=rf"^train\.eval_tasks\.{error}$"):
            load_config(tiny_config(tiny_corpus, tmp_path / "run", **{"train.eval_tasks": {"hs": value}}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_corpus, tmp_path / "run", **{"train.eval_tasks": tasks})))
    assert main(["train", str(config), "--set", "train.eval_tasks.hs.num_fewshot=-2"]) == 2
    assert "config error: train.eval_tasks.hs.num_fewshot: Input should be greater than" in capsys.readouterr().err
    assert main(["doctor", str(config), "--json"]) == 1  # preflight names both missing files
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"] if c["area"] == "data"}
    assert checks["task hs"]["detail"] == "b.jsonl" and checks["task hs fewshot_from"]["detail"] == "c.jsonl"
    assert checks["task hs fewshot_from"]["status"] == "failure"


def test_two_fsdp_ranks_score_the_few_shot_prompts_one_process_builds(fsdp_run, tmp_path, capsys):
    run_dir, task = fsdp_run  # train.eval_tasks.mc_2shot: {path: mc.jsonl, num_fewshot: 2}
    last = [r for r in read_metrics(run_dir / "metrics.jsonl").records if "task_acc/mc_2shot" in r][-1]
    assert main(["eval", str(run_dir), "--json"]) == 0  # the run's config, one process
    (row,) = json.loads(capsys.readouterr().out)
    assert row["tasks"]["mc"]["num_fewshot"] == 0 and row["tasks"]["mc_2shot"]["num_fewshot"] == 2
    assert row["tasks"]["mc_2shot"]["acc"] == last["task_acc/mc_2shot"]
    assert row["tasks"]["mc_2shot"]["acc_norm"] == last["task_acc_norm/mc_2shot"]
    # the same prompts from the command line (seed 1234 by default), batched differently
    assert main(["eval", str(run_dir), "--task", f"again={task}", "--num-fewshot", "2", "--batch-size", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["tasks"]["again"]["num_fewshot"] == 2 and row["tasks"]["again"]["items"] == len(TASK_ITEMS)
    assert (row["tasks"]["again"]["acc"], row["tasks"]["again"]["acc_norm"]) == (last["task_acc/mc_2shot"],
                                                                                 last["task_acc_norm/mc_2shot"])  # fmt: skip
    other = write_task(tmp_path / "other.jsonl", QA_ITEMS)
    assert main(["eval", str(run_dir), "--task", f"again={task}", "--num-fewshot", "3", "--fewshot-from", str(other)]) == 0
    assert "again (3-shot)" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--task", f"again={task}", "--num-fewshot", "5", "--fewshot-from", str(other)]) == 2
    assert f"--task again: {other}: 4 usable items, too few to draw 5 few-shot examples" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--num-fewshot", "1", "--fewshot-from", str(other)]) == 2  # the run's 2 tasks
    assert "--fewshot-from: one file for 2 tasks" in capsys.readouterr().err
