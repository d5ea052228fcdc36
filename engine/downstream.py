"""Downstream multiple-choice evaluation as lm-evaluation-harness does it: each choice scored by the
log-probability a causal LM gives its tokens after the context (0-shot, or k solved examples
first: `fewshot_prompts`), tokenized, truncated and turned into acc / acc_norm by lm-eval's rules
(`encode_task`, `completion_length`, `score_task`).

Owns task files (JSONL), few-shot prompts, their tokenization and scoring on one or many ranks. Not
the model, the metrics sinks or the command line: the trainer (train.eval_tasks) and `strata eval
--task` call in here. Limits: acc_norm takes lm-eval's default target delimiter " " as written at
the start of a choice; a choice of no token, or of more tokens than the window, skips its item
(counted), where lm-eval scores or cuts it; few-shot examples come from the file's usable lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import ConfigError, EvalTaskConfig, as_eval_task

TASK_FORMAT = '{"context": str, "choices": [str, ...], "label": int} per line ("query" / "gold" also accepted)'
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter: after each solved example
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass(frozen=True)
class TaskItem:
    """One question: the context, its candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    line: int = 0  # 1-based line in the task file (0: not read from a file)
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the JSON line as read

    def same_document(self, other: TaskItem) -> bool:
        """Whether two items are one document, as lm-eval compares docs (`x != doc`): equal JSON
        records (every field, not only the three read), else equal context, choices and label."""
        if self.record is not None and other.record is not None:
            return self.record == other.record
        return (self.context, self.choices, self.label) == (other.context, other.choices, other.label)


@dataclass
class EncodedTask:
    """A task tokenized for one tokenizer and context window, ready to score on any rank.

    `rows[i][c]` is (token ids of context + choice c, number of choice tokens at the end); the
    model reads all but the last id. `choice_lengths[i][c]` divides choice c's log-prob for acc_norm."""

    path: str
    rows: list[list[tuple[list[int], int]]]
    choice_lengths: list[list[int]]
    labels: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    num_fewshot: int = 0  # solved examples before each item's context

    def __len__(self) -> int:
        return len(self.labels)


# -- task files ---------------------------------------------------------------------------------
def _parse_item(line: str, line_number: int = 0) -> TaskItem | str:
    """The item on one JSONL line, or the reason it is unusable. An empty context is allowed
    (the choice is then scored after the prefix token, see `encode_task`)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "invalid JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    context = record.get("context", record.get("query"))
    choices = record.get("choices")
    label = record.get("label", record.get("gold"))
    if context is None or choices is None or label is None:
        return "missing field"
    if not isinstance(context, str):
        return "context not a string"
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        return "choices not a list of non-empty strings"
    if len(choices) < 2:
        return "fewer than 2 choices"
    if isinstance(label, str) and label.strip().isdigit():  # HellaSwag stores "3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        return "label not an integer"
    if not 0 <= label < len(choices):
        return "label out of range"
    return TaskItem(context, tuple(choices), label, line_number, record)


def read_task(path: str | Path) -> tuple[list[TaskItem], dict[str, int]]:
    """The usable items of a task file and the unusable lines counted by reason (blank lines are
    ignored). Raises FileNotFoundError, or ValueError naming the file when no item is usable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    items, skipped = [], Counter()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parsed = _parse_item(line, line_number)
            if isinstance(parsed, str):
                skipped[parsed] += 1
            else:
                items.append(parsed)
    if not items:
        raise ValueError(f"{path}: no usable item; expected {TASK_FORMAT}{_skipped_note(skipped)}")
    return items, dict(skipped)


def _skipped_note(skipped: dict[str, int]) -> str:
    return f" (skipped: {', '.join(f'{reason} {n}' for reason, n in sorted(skipped.items()))})" if skipped else ""


def fewshot_prompts(items: Sequence[TaskItem], num_fewshot: int, examples: Sequence[TaskItem] | None = None,
                    seed: int = FEWSHOT_SEED, path: str = "task") -> list[TaskItem]:
    """Each item with `num_fewshot` solved examples before its context, as lm-evaluation-harness
    builds a k-shot multiple-choice prompt (ContextSampler.get_context + fewshot_context):
    `example + "\\n\\n"` for each example, then the item's context; an example is its context and
    its right choice, which in this format carries lm-eval's target delimiter (" Paris" =
    target_delimiter " " + "Paris").

    One `random.Random(seed)` draws for every item in order, `rng.sample(pool, k)`: from
    `examples` (another split), or from `items` themselves (the same split: k + 1 are drawn and
    the item is dropped, so it never shows its own answer). A drawn example that is the item's
    document is dropped in both cases, and the first k that remain are kept (fewer only when
    the file repeats a document). Every rank builds every prompt, so the prompts never depend on
    the rank or the world size (they are lm-eval's on one process). `path` names the file in
    the ValueError raised when it has too few items to draw from."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot == 0:
        return list(items)
    pool = list(items if examples is None else examples)
    draws = num_fewshot + 1 if examples is None else num_fewshot
    if len(pool) < draws:
        other = " other than the item scored" if examples is None else ""
        raise ValueError(f"{path}: {len(pool)} usable items, too few to draw {num_fewshot} few-shot examples{other} "
                         f"(needs {draws})")  # fmt: skip
    rng = random.Random(seed)
    prompts = []
    for item in items:
        shots = [example for example in rng.sample(pool, draws) if not example.same_document(item)][:num_fewshot]
        solved = "".join(example.context + example.choices[example.label] + FEWSHOT_DELIMITER for example in shots)
        prompts.append(dataclasses.replace(item, context=solved + item.context))
    return prompts


def completion_length(choice: str) -> int:
    """The length acc_norm divides a choice's log-prob by, as lm-evaluation-harness computes it:
    the number of characters (Python `len`, not UTF-8 bytes) of the choice without its target
    delimiter. lm-eval scores `delimiter + choice` but divides by `len(choice)`; here the delimiter
    is written into the choice, so a leading " " (lm-eval's default delimiter) is not counted.
    At least 1, so a choice of a lone space still divides."""
    return max(1, len(choice.removeprefix(" ")))


def encode_task(items: Sequence[TaskItem], tokenizer, max_seq_len: int, path: str = "",
                skipped: dict[str, int] | None = None, prefix_id: int | None = None) -> EncodedTask:
    """Tokenizes each (context, choice) pair as lm-evaluation-harness does (no special tokens).

    The context's trailing whitespace moves to the start of the continuation; the context without
    it and the whole string context + choice are encoded, and the continuation tokens are the
    whole encoding past as many tokens as the context alone has: `whole[len(context_ids):]`.
    The row is context_ids + those tokens, exact for tokenizers that merge across the boundary or
    mark word starts (SentencePiece's "▁"), not only for byte-level BPE. A context that encodes to
    no token (an empty one) is replaced by `prefix_id` (the EOS token; lm-eval's prefix token) and
    the continuation is then the whole encoding; without a `prefix_id` that is a ValueError naming
    the file and line.

    A row keeps at most `max_seq_len + 1` tokens (the model reads all but the last), losing
    context tokens from the left as lm-eval does; the whole choice is always kept, so an item
    with a choice of more than `max_seq_len` tokens is skipped, as is one with a choice whose
    continuation encodes to no token (counted in `skipped` by reason).
    """
    skipped = Counter(skipped or {})
    contexts = tokenizer.encode_batch([item.context.rstrip() for item in items], add_special_tokens=False)
    # context + choice is the whitespace-moved pair joined again: the string itself
    wholes = iter(tokenizer.encode_batch([item.context + c for item in items for c in item.choices], add_special_tokens=False))
    task = EncodedTask(str(path), [], [], [])
    for item, context in zip(items, contexts, strict=True):
        context_ids = context.ids
        continuations = [next(wholes).ids[len(context_ids) :] for _ in item.choices]
        if not context_ids:
            if prefix_id is None:
                raise ValueError(
                    f"{path or 'task'}:{item.line}: the context encodes to no token and the tokenizer has no EOS "
                    "token to put in its place (none of the usual EOS names is in its vocabulary)"
                )
            context_ids = [prefix_id]
        if not all(continuations):
            skipped["choice encodes to no tokens"] += 1
            continue
        if max(len(c) for c in continuations) > max_seq_len:
            skipped["choice too long for max_seq_len"] += 1
            continue
        task.rows.append([((context_ids + c)[-(max_seq_len + 1) :], len(c)) for c in continuations])
        task.choice_lengths.append([completion_length(choice) for choice in item.choices])
        task.labels.append(item.label)
    task.skipped = dict(skipped)
    if not task.labels:
        raise ValueError(f"{path or 'task'}: no item fits a {max_seq_len}-token context{_skipped_note(task.skipped)}")
    return task


def find_prefix_id(tokenizer_path: str | Path, tokenizer) -> int | None:
    """The token an empty context is replaced by: lm-eval's prefix token (the tokenizer's BOS,
    else its EOS) for a HF tokenizer_config.json beside `tokenizer_path`; else the `eos_id` of
    the ShardSet manifest beside it (what every document of the training data ends with); else
    the first usual EOS name in the vocabulary; None when there is none."""
    from data_pipeline.manifest import MANIFEST_NAME
    from data_pipeline.tokenizer import EOS_CANDIDATES

    folder = Path(tokenizer_path).parent
    if (folder / "tokenizer_config.json").is_file():
        config = _read_json(folder / "tokenizer_config.json")
        for key in ("bos_token", "eos_token"):
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return int(tokenizer.token_to_id(token))
    if (folder / MANIFEST_NAME).is_file():
        eos_id = _read_json(folder / MANIFEST_NAME).get("eos_id")
        if isinstance(eos_id, int):
            return eos_id
    ids = [tokenizer.token_to_id(name) for name in EOS_CANDIDATES]
    return next((int(i) for i in ids if i is not None), None)


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a JSON object")
    return record


def load_task(path: str | Path, tokenizer_path: str | Path, max_seq_len: int, num_fewshot: int = 0,
              fewshot_from: str | Path | None = None, seed: int = FEWSHOT_SEED) -> EncodedTask:
    """`read_task` + `fewshot_prompts` + `encode_task` with the tokenizer.json at `tokenizer_path`
    (and its prefix token). Few-shot examples come from `fewshot_from` when given (its unusable
    lines counted in `skipped` as "fewshot_from: REASON"), else from the task file itself."""
    from tokenizers import Tokenizer

    items, skipped = read_task(path)
    examples = None
    if fewshot_from is not None:
        examples, bad_examples = read_task(fewshot_from)
        skipped |= {f"fewshot_from: {reason}": n for reason, n in bad_examples.items()}
    items = fewshot_prompts(items, num_fewshot, examples, seed, str(path if examples is None else fewshot_from))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    task = encode_task(items, tokenizer, max_seq_len, str(path), skipped, find_prefix_id(tokenizer_path, tokenizer))
    task.num_fewshot = num_fewshot
    return task


def prepare_tasks(tasks: Mapping[str, str | EvalTaskConfig], tokenizer_path: str | Path | None, max_seq_len: int,
                  field_name: str = "train.eval_tasks") -> dict[str, EncodedTask]:
    """NAME -> encoded task for NAME: PATH (0-shot) or NAME: {path, num_fewshot, fewshot_from, seed};
    a missing file, no tokenizer, an empty task or one too small to draw its examples from is a
    ConfigError naming the field (`field_name`.NAME, or `--flag NAME` for a command-line flag)
    and the path."""
    if tasks and tokenizer_path is None:
        raise ConfigError(f"{field_name}: no tokenizer.json found (next to the data sources or the run)")
    prepared = {}
    for name, value in tasks.items():
        spec = as_eval_task(value)
        try:
            prepared[name] = load_task(spec.path, tokenizer_path, max_seq_len, spec.num_fewshot, spec.fewshot_from, spec.seed)
        except (OSError, ValueError) as err:
            where = f"{field_name} {name}" if field_name.startswith("--") else f"{field_name}.{name}"
            raise ConfigError(f"{where}: {err}") from None
    return prepared


# -- scoring ------------------------------------------------------------------------------------
def forward_shapes(lengths_by_rank: Sequence[Sequence[int]], tokens_per_forward: int) -> list[tuple[int, int]]:
    """(rows, tokens) of every forward, identical on all ranks given every rank's row lengths,
    each sorted longest first: a forward is as long as the longest row any rank has left and
    holds as many rows as fit `tokens_per_forward` (at least one, at most any rank has left);
    a rank short of rows fills the forward with dummy rows."""
    cursors = [0] * len(lengths_by_rank)
    shapes = []
    while True:
        left = [(lengths[c:], c) for lengths, c in zip(lengths_by_rank, cursors, strict=True)]
        if not any(rest for rest, _ in left):
            return shapes
        tokens = max(rest[0] for rest, _ in left if rest)
        rows = min(max(1, tokens_per_forward // tokens), max(len(rest) for rest, _ in left))
        shapes.append((rows, tokens))
        cursors = [c + rows for c in cursors]


def _input_length(row: tuple[list[int], int]) -> int:
    """Tokens the model reads for a row: all but the last (no prediction is needed after it)."""
    return len(row[0]) - 1


@torch.no_grad()
def _score_rows(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], shapes: Sequence[tuple[int, int]],
                device: torch.device, autocast_dtype: torch.dtype | None) -> list[float] | None:
    """Summed log-prob of each row's continuation, rows taken in order by forwards of `shapes`
    (inputs: each row but its last token, right-padded; nothing past a row's input is read, so a
    row scores as it would alone). None on a pipeline stage before the last (engine.pipeline:
    the model returns no logits there; it still runs every forward, stage to stage)."""
    scores: list[torch.Tensor] = []
    no_logits = False
    start = 0
    for n_rows, n_tokens in shapes:
        batch = rows[start : start + n_rows]
        start += n_rows
        input_ids = torch.zeros(n_rows, n_tokens, dtype=torch.long)
        next_ids = torch.zeros(n_rows, n_tokens, dtype=torch.long)  # the token each position predicts
        for i, (ids, _) in enumerate(batch):
            input_ids[i, : len(ids) - 1] = torch.as_tensor(ids[:-1])
            next_ids[i, : len(ids) - 1] = torch.as_tensor(ids[1:])
        input_ids, next_ids = input_ids.to(device), next_ids.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids)
        if logits is None:
            no_logits = True
            continue
        if hasattr(logits, "full_tensor"):  # a vocab-sharded DTensor (tensor parallel)
            logits = logits.full_tensor()
        for i, (ids, n_continuation) in enumerate(batch):
            end = len(ids) - 1  # the input's length
            log_probs = logits[i, end - n_continuation : end].float().log_softmax(-1)
            scores.append(log_probs.gather(-1, next_ids[i, end - n_continuation : end, None]).sum())
    if no_logits:
        return None
    return torch.stack(scores).tolist() if scores else []


def choice_logprobs(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], device: torch.device,
                    autocast_dtype: torch.dtype | None = None, tokens_per_forward: int = 8192) -> list[float]:
    """Summed log-prob of each (ids, continuation length) row's last tokens given the tokens
    before them, in the rows' order; many rows per forward, longest first (one process)."""
    order = sorted(range(len(rows)), key=lambda r: -_input_length(rows[r]))
    shapes = forward_shapes([[_input_length(rows[r]) for r in order]], tokens_per_forward)
    scored = _score_rows(model, [rows[r] for r in order], shapes, device, autocast_dtype)
    result = [0.0] * len(rows)
    for r, score in zip(order, scored, strict=True):
        result[r] = score
    return result


def _rank_share(n_items: int, rank: int, world_size: int) -> range:
    return range(rank * n_items // world_size, (rank + 1) * n_items // world_size)


def score_task(
    model: torch.nn.Module,
    task: EncodedTask,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    tokens_per_forward: int = 8192,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[float], float] | None = None,
) -> dict:
    """{'acc', 'acc_norm', 'items', 'skipped'}: acc = the choice of highest summed log-prob is the
    label (the first on a tie); acc_norm = the same with each log-prob divided by its choice's
    `completion_length` (characters, as lm-evaluation-harness).

    Every rank of `world_size` scores its contiguous share of the items; every rank runs the
    same forwards (shapes planned from all shares, dummy rows where a share ran out), so FSDP2
    collectives inside the model never wait on a rank that has finished; `reduce` sums counts."""
    was_training = model.training
    model.eval()
    shares = [_rank_share(len(task), r, world_size) for r in range(world_size)]
    lengths_by_rank = [sorted((_input_length(row) for i in share for row in task.rows[i]), reverse=True) for share in shares]
    shapes = forward_shapes(lengths_by_rank, tokens_per_forward)
    mine = [(i, c) for i in shares[rank] for c in range(len(task.rows[i]))]
    mine.sort(key=lambda ic: -_input_length(task.rows[ic[0]][ic[1]]))  # the order lengths_by_rank[rank] assumed
    rows = [task.rows[i][c] for i, c in mine]
    rows += [([0], 0)] * (sum(n for n, _ in shapes) - len(rows))  # dummy rows: only padding, nothing scored
    scores = _score_rows(model, rows, shapes, device, autocast_dtype)
    model.train(was_training)
    log_probs = {i: np.zeros(len(task.rows[i])) for i in shares[rank]} if scores is not None else {}
    for (i, c), score in zip(mine, (scores or [])[: len(mine)], strict=scores is not None):  # the rest: dummy rows
        log_probs[i][c] = score
    # a pipeline stage before the last counts nothing: the last stage's ranks count its items
    correct = sum(int(np.argmax(lp) == task.labels[i]) for i, lp in log_probs.items())
    correct_norm = sum(int(np.argmax(lp / task.choice_lengths[i]) == task.labels[i]) for i, lp in log_probs.items())
    items = len(log_probs)
    if reduce is not None:
        correct, correct_norm, items = (int(round(reduce(v))) for v in (correct, correct_norm, items))
    return {
        "acc": correct / items if items else math.nan,
        "acc_norm": correct_norm / items if items else math.nan,
        "items": items,
        "skipped": dict(task.skipped),
    }


def task_metrics(model: torch.nn.Module, tasks: dict[str, EncodedTask], device: torch.device,
                 autocast_dtype: torch.dtype | None = None, tokens_per_forward: int = 8192, rank: int = 0,
                 world_size: int = 1, reduce: Callable[[float], float] | None = None) -> dict[str, float]:
    """task_acc/NAME and task_acc_norm/NAME of every task (the trainer's metrics record)."""
    metrics = {}
    for name, task in sorted(tasks.items()):
        result = score_task(model, task, device, autocast_dtype, tokens_per_forward, rank, world_size, reduce)
        metrics[f"task_acc/{name}"] = result["acc"]
        metrics[f"task_acc_norm/{name}"] = result["acc_norm"]
    return metrics
