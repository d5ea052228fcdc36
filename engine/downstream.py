"""Downstream multiple-choice evaluation: each choice scored by the log-probability a causal LM
gives its tokens after the context; acc and acc_norm as lm-evaluation-harness computes them.

Owns task files (JSONL), their tokenization and scoring on one or many ranks. Not the model,
the metrics sinks or the command line: the trainer (train.eval_tasks) and `strata eval --task`
call in here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import ConfigError

TASK_FORMAT = '{"context": str, "choices": [str, ...], "label": int} per line ("query" / "gold" also accepted)'


@dataclass(frozen=True)
class TaskItem:
    """One question: the context, its candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    label: int


@dataclass
class EncodedTask:
    """A task tokenized for one tokenizer and context window, ready to score on any rank.

    `rows[i][c]` is (token ids of context + choice c, number of choice tokens at the end)."""

    path: str
    rows: list[list[tuple[list[int], int]]]
    choice_bytes: list[list[int]]
    labels: list[int]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


# -- task files ---------------------------------------------------------------------------------
def _parse_item(line: str) -> TaskItem | str:
    """The item on one JSONL line, or the reason it is unusable."""
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
    if not isinstance(context, str) or not context:
        return "context not a non-empty string"
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
    return TaskItem(context, tuple(choices), label)


def read_task(path: str | Path) -> tuple[list[TaskItem], dict[str, int]]:
    """The usable items of a task file and the unusable lines counted by reason (blank lines are
    ignored). Raises FileNotFoundError, or ValueError naming the file when no item is usable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    items, skipped = [], Counter()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            parsed = _parse_item(line)
            if isinstance(parsed, str):
                skipped[parsed] += 1
            else:
                items.append(parsed)
    if not items:
        raise ValueError(f"{path}: no usable item; expected {TASK_FORMAT}{_skipped_note(skipped)}")
    return items, dict(skipped)


def _skipped_note(skipped: dict[str, int]) -> str:
    return f" (skipped: {', '.join(f'{reason} {n}' for reason, n in sorted(skipped.items()))})" if skipped else ""


def encode_task(items: Sequence[TaskItem], tokenizer, max_seq_len: int, path: str = "",
                skipped: dict[str, int] | None = None) -> EncodedTask:
    """Tokenizes context and each choice separately (no special tokens) and concatenates the ids.

    The choice is the continuation exactly as written: with a byte-level BPE tokenizer the space
    that separates it from the context belongs at the START of the choice (context "The capital
    of France is", choice " Paris"), as in lm-evaluation-harness; a trailing space on the context
    would be tokenized alone. A row longer than `max_seq_len` loses context tokens from the left;
    the whole choice is always kept, so an item with a choice of `max_seq_len` tokens or more
    (no context token left to condition on) is skipped, as is one whose context encodes to nothing.
    """
    skipped = Counter(skipped or {})
    contexts = tokenizer.encode_batch([item.context for item in items], add_special_tokens=False)
    flat_choices = [choice for item in items for choice in item.choices]
    choice_ids = iter(tokenizer.encode_batch(flat_choices, add_special_tokens=False))
    task = EncodedTask(str(path), [], [], [])
    for item, context in zip(items, contexts, strict=True):
        continuations = [next(choice_ids).ids for _ in item.choices]
        if not context.ids:
            skipped["context encodes to no tokens"] += 1
            continue
        if max(len(c) for c in continuations) >= max_seq_len:
            skipped["choice too long for max_seq_len"] += 1
            continue
        task.rows.append([((context.ids + c)[-max_seq_len:], len(c)) for c in continuations])
        task.choice_bytes.append([len(choice.encode("utf-8")) for choice in item.choices])
        task.labels.append(item.label)
    task.skipped = dict(skipped)
    if not task.labels:
        raise ValueError(f"{path or 'task'}: no item fits a {max_seq_len}-token context{_skipped_note(task.skipped)}")
    return task


def load_task(path: str | Path, tokenizer_path: str | Path, max_seq_len: int) -> EncodedTask:
    """`read_task` + `encode_task` with the tokenizer.json at `tokenizer_path`."""
    from tokenizers import Tokenizer

    items, skipped = read_task(path)
    return encode_task(items, Tokenizer.from_file(str(tokenizer_path)), max_seq_len, str(path), skipped)


def prepare_tasks(tasks: dict[str, str], tokenizer_path: str | Path | None, max_seq_len: int,
                  field_name: str = "train.eval_tasks") -> dict[str, EncodedTask]:
    """NAME -> encoded task for NAME: PATH; a missing file, no tokenizer or an empty task is a
    ConfigError naming the field (`field_name`.NAME, or `--flag NAME` for a command-line flag)
    and the path."""
    if tasks and tokenizer_path is None:
        raise ConfigError(f"{field_name}: no tokenizer.json found (next to the data sources or the run)")
    prepared = {}
    for name, path in tasks.items():
        try:
            prepared[name] = load_task(path, tokenizer_path, max_seq_len)
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


@torch.no_grad()
def _score_rows(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], shapes: Sequence[tuple[int, int]],
                device: torch.device, autocast_dtype: torch.dtype | None) -> list[float]:
    """Summed log-prob of each row's continuation, rows taken in order by forwards of `shapes`
    (right-padded; nothing past a row's length is read, so a row scores as it would alone)."""
    scores: list[torch.Tensor] = []
    start = 0
    for n_rows, n_tokens in shapes:
        batch = rows[start : start + n_rows]
        start += n_rows
        input_ids = torch.zeros(n_rows, n_tokens, dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.as_tensor(ids)
        input_ids = input_ids.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids)
        if hasattr(logits, "full_tensor"):  # a vocab-sharded DTensor (tensor parallel)
            logits = logits.full_tensor()
        for i, (ids, n_continuation) in enumerate(batch):
            end = len(ids)
            log_probs = logits[i, end - n_continuation - 1 : end - 1].float().log_softmax(-1)
            targets = input_ids[i, end - n_continuation : end, None]
            scores.append(log_probs.gather(-1, targets).sum())
    return torch.stack(scores).tolist() if scores else []


def choice_logprobs(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], device: torch.device,
                    autocast_dtype: torch.dtype | None = None, tokens_per_forward: int = 8192) -> list[float]:
    """Summed log-prob of each (ids, continuation length) row's last tokens given the tokens
    before them, in the rows' order; many rows per forward, longest first (one process)."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    shapes = forward_shapes([[len(rows[r][0]) for r in order]], tokens_per_forward)
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
    label; acc_norm = the same with each log-prob divided by its choice's UTF-8 byte length.

    Every rank of `world_size` scores its contiguous share of the items; every rank runs the
    same forwards (shapes planned from all shares, dummy rows where a share ran out), so FSDP2
    collectives inside the model never wait on a rank that has finished; `reduce` sums counts."""
    was_training = model.training
    model.eval()
    shares = [_rank_share(len(task), r, world_size) for r in range(world_size)]
    lengths_by_rank = [sorted((len(ids) for i in share for ids, _ in task.rows[i]), reverse=True) for share in shares]
    shapes = forward_shapes(lengths_by_rank, tokens_per_forward)
    mine = [(i, c) for i in shares[rank] for c in range(len(task.rows[i]))]
    mine.sort(key=lambda ic: -len(task.rows[ic[0]][ic[1]][0]))  # the order lengths_by_rank[rank] assumed
    rows = [task.rows[i][c] for i, c in mine]
    rows += [([0], 0)] * (sum(n for n, _ in shapes) - len(rows))  # dummy rows: one pad token, nothing scored
    scores = _score_rows(model, rows, shapes, device, autocast_dtype)
    model.train(was_training)
    log_probs = {i: np.zeros(len(task.rows[i])) for i in shares[rank]}
    for (i, c), score in zip(mine, scores[: len(mine)], strict=True):  # the rest: dummy rows
        log_probs[i][c] = score
    correct = sum(int(np.argmax(lp) == task.labels[i]) for i, lp in log_probs.items())
    correct_norm = sum(int(np.argmax(lp / task.choice_bytes[i]) == task.labels[i]) for i, lp in log_probs.items())
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
