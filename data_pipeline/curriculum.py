"""Variable sequence-length curriculum over a dataset decomposition (METHODS.md §3, Algorithm 1).

`CurriculumSampler`: which chunks make up each step, a pure function of (seed, step). Each epoch,
bucket i's chunks are shuffled (seeded by (seed, bucket, epoch)) and cut into batches of
b_i = tokens_per_step / 2^i chunks; each bucket's batches are split into `cycles` cycles, and
within a cycle each step picks a bucket with odds o_i among the buckets that still have batches
in that cycle (seeded by (seed, epoch, cycle)). `DecompositionLoader`: this rank's micro-batches
of those chunks, one document per row, no packing. The chunking itself is data_pipeline/decompose.py.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.decompose import Decomposition, open_decomposition
from data_pipeline.packing import IGNORE_INDEX, ShardSetReader
from data_pipeline.prefetch import Batch, PrefetchingLoader
from data_pipeline.sampler import rank_slice

log = logging.getLogger(__name__)

STATE_VERSION = "decomposition-v1"
_PERMUTATION_STREAM = 2  # first word after the seed in a bucket permutation's rng key
_CYCLE_STREAM = 3  # first word after the seed in a cycle's bucket-order rng key


def curriculum_odds(curriculum: str, n_buckets: int) -> np.ndarray:
    """Odds per bucket, shortest bucket first (paper: Uniform, Grow-Linear 6:...:1, Grow-P2 32:...:1)."""
    if curriculum == "uniform":
        return np.ones(n_buckets)
    if curriculum == "grow_linear":
        return np.arange(n_buckets, 0, -1, dtype=np.float64)
    if curriculum == "grow_p2":
        return np.exp2(np.arange(n_buckets - 1, -1, -1, dtype=np.float64))
    raise ValueError(
        f"data.decomposition.curriculum: {curriculum!r}, want uniform|grow_linear|grow_p2"
    )


def cycle_order(rng: np.random.Generator, batches: np.ndarray, odds: np.ndarray) -> np.ndarray:
    """Bucket position of each step of one cycle: each step picks bucket k with probability
    odds[k] / sum of the odds of buckets with batches left, until `batches` are all used."""
    remaining = np.array(batches, dtype=np.int64)
    order = np.empty(int(remaining.sum()), dtype=np.int64)
    draws = rng.random(len(order))
    active = odds * (remaining > 0)
    for t, u in enumerate(draws):
        cumulative = np.cumsum(active)
        k = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), len(odds) - 1)
        while active[k] == 0:  # u * total landed on a float edge: step back to a live bucket
            k -= 1
        order[t] = k
        remaining[k] -= 1
        if remaining[k] == 0:
            active[k] = 0.0
    return order


class StepPlan(NamedTuple):
    """The global batch of one step: `chunks` (indices into the decomposition) of length 2^log2_len."""

    step: int
    epoch: int
    cycle: int
    log2_len: int
    chunks: np.ndarray


class CurriculumSampler:
    """Global batches of decomposition chunks; state is the step number alone."""

    def __init__(
        self,
        decomposition: Decomposition,
        seed: int,
        tokens_per_step: int,
        cycles: int = 8,
        curriculum: str = "grow_p2",
    ) -> None:
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0 (numpy seed sequences), got {seed}")
        if cycles < 1:
            raise ValueError(f"data.decomposition.cycles must be >= 1, got {cycles}")
        longest = 1 << decomposition.max_log2
        if tokens_per_step % longest:
            raise ValueError(
                f"data.decomposition.tokens_per_step ({tokens_per_step}) must be a multiple of the "
                f"longest bucket length 2^{decomposition.max_log2} = {longest}"
            )
        self.seed, self.cycles, self.curriculum = seed, cycles, curriculum
        self.tokens_per_step = tokens_per_step
        self.log2_lens = np.array(list(decomposition.buckets), dtype=np.int64)
        self.odds = curriculum_odds(curriculum, len(self.log2_lens))
        self.batch_rows = tokens_per_step >> self.log2_lens
        self.chunks_of = [np.flatnonzero(decomposition.log2_len == i) for i in self.log2_lens]
        self.chunk_counts = np.array([len(c) for c in self.chunks_of], dtype=np.int64)
        self.batches_per_epoch = self.chunk_counts // self.batch_rows
        if self.batches_per_epoch.sum() == 0:
            raise ValueError(
                f"data.decomposition.tokens_per_step ({tokens_per_step}): no bucket has enough "
                f"chunks for one batch (chunks per bucket {dict(zip(self.log2_lens.tolist(), self.chunk_counts.tolist(), strict=True))})"
            )
        c = np.arange(cycles + 1)
        bounds = (c[None, :] * self.batches_per_epoch[:, None]) // cycles  # [bucket, cycle + 1]
        self.cycle_first_batch = bounds[:, :-1]
        self.batches_per_cycle = np.diff(bounds, axis=1)
        self.cycle_starts = np.concatenate([[0], np.cumsum(self.batches_per_cycle.sum(axis=0))])
        self.steps_per_epoch = int(self.cycle_starts[-1])
        self._orders: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def used_log2_lens(self) -> list[int]:
        """Buckets that give at least one batch per epoch."""
        return [int(i) for i, n in zip(self.log2_lens, self.batches_per_epoch, strict=True) if n]

    def _cycle(self, epoch: int, cycle: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket position per step, how many earlier steps of the cycle used that bucket)."""
        key = (epoch, cycle)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, _CYCLE_STREAM, epoch, cycle])
            order = cycle_order(rng, self.batches_per_cycle[:, cycle], self.odds)
            nth = np.empty_like(order)
            for k in range(len(self.odds)):
                where = np.flatnonzero(order == k)
                nth[where] = np.arange(len(where))
            self._orders[key] = (order, nth)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[key]

    def _permutation(self, bucket: int, epoch: int) -> np.ndarray:
        key = (bucket, epoch)
        if key not in self._permutations:
            rng = np.random.default_rng(
                [self.seed, _PERMUTATION_STREAM, int(self.log2_lens[bucket]), epoch]
            )
            self._permutations[key] = self.chunks_of[bucket][
                rng.permutation(self.chunk_counts[bucket])
            ]
            while len(self._permutations) > 2 * len(self.log2_lens):
                self._permutations.popitem(last=False)
        return self._permutations[key]

    def plan(self, step: int) -> StepPlan:
        """The global batch of step `step` (epochs repeat with fresh shuffles)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        cycle = int(np.searchsorted(self.cycle_starts, within, side="right")) - 1
        order, nth = self._cycle(epoch, cycle)
        position = within - int(self.cycle_starts[cycle])
        bucket = int(order[position])
        batch = int(self.cycle_first_batch[bucket, cycle] + nth[position])
        rows = int(self.batch_rows[bucket])
        chunks = self._permutation(bucket, epoch)[batch * rows : (batch + 1) * rows]
        return StepPlan(step, epoch, cycle, int(self.log2_lens[bucket]), chunks)


def read_chunks(
    shardset: ShardSetReader, decomposition: Decomposition, chunks: np.ndarray, log2_len: int
) -> Batch:
    """One row per chunk: input_ids = its 2^i tokens, labels = the document's next tokens (-100
    past the document's end). No position_ids: each row is one piece of one document, so the
    model takes its plain causal path (positions 0..2^i-1; no document mask to build)."""
    length = 1 << log2_len
    input_ids = np.empty((len(chunks), length), dtype=np.int64)
    labels = np.full((len(chunks), length), IGNORE_INDEX, dtype=np.int64)
    for row, chunk in enumerate(chunks.tolist()):
        doc_id, begin = int(decomposition.doc_id[chunk]), int(decomposition.begin[chunk])
        window = shardset.get(doc_id)[begin : begin + length + 1]
        if len(window) < length:
            raise ValueError(
                f"document {doc_id} has {begin + len(window)} tokens but the decomposition needs "
                f"{begin + length}; the ShardSet does not match the decomposition"
            )
        input_ids[row] = window[:length]
        labels[row, : len(window) - 1] = window[1:]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


class DecompositionLoader(PrefetchingLoader):
    """Per optimizer step, this rank's micro-batches of one bucket's chunks: rank r takes its
    rank_slice of the b_i chunks, in micro-batches of micro_batch_tokens / 2^i rows (>= 1).
    The global batches do not depend on world size, prefetch or where a run was resumed."""

    def __init__(
        self,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        shardset: ShardSetReader,
        decomposition: Decomposition,
    ) -> None:
        settings = cfg.decomposition
        if settings is None:
            raise ValueError("data.decomposition is not set")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shardset, self.decomposition = shardset, decomposition
        self.tokens_per_step = settings.tokens_per_step or cfg.global_batch_size * cfg.seq_len
        self.micro_batch_tokens = settings.micro_batch_tokens or cfg.micro_batch_size * cfg.seq_len
        self.sampler = CurriculumSampler(
            decomposition, cfg.seed, self.tokens_per_step, settings.cycles, settings.curriculum
        )
        for log2_len in self.sampler.used_log2_lens:
            rows = self.tokens_per_step >> log2_len
            if rows % world_size:
                raise ValueError(
                    f"data.decomposition.tokens_per_step ({self.tokens_per_step}): bucket 2^{log2_len} "
                    f"gives {rows} chunks per step, not divisible by the data-parallel world size "
                    f"({world_size})"
                )
            if (rows // world_size) % self._micro_rows(log2_len):
                raise ValueError(
                    f"data.decomposition.micro_batch_tokens ({self.micro_batch_tokens}): "
                    f"{self._micro_rows(log2_len)} rows of 2^{log2_len} per micro-batch do not divide "
                    f"the {rows // world_size} rows per rank (tokens_per_step {self.tokens_per_step} / "
                    f"world size {world_size})"
                )
        self._check_against_shardset()
        self._position = 0  # the step
        self.prefetch = cfg.prefetch
        self.last_plan: StepPlan | None = None
        """The global plan of the last step handed out (for metrics, tests and debugging)."""

    def _micro_rows(self, log2_len: int) -> int:
        """Rows per micro-batch: micro_batch_tokens / 2^i, at least 1, at most the rank's rows."""
        per_rank = (self.tokens_per_step >> log2_len) // self.world_size
        return max(1, min(self.micro_batch_tokens >> log2_len, per_rank))

    def _check_against_shardset(self) -> None:
        lengths = np.asarray(self.shardset.lengths, dtype=np.int64)
        d = self.decomposition
        if len(d) == 0:
            return
        if int(d.doc_id.max()) >= len(lengths):
            raise ValueError(
                f"data.decomposition: chunks name document {int(d.doc_id.max())} but the ShardSet has "
                f"{len(lengths)} documents; it is not this decomposition's parent"
            )
        ends = d.begin + np.left_shift(1, d.log2_len.astype(np.int64))
        if (ends > lengths[d.doc_id]).any():
            raise ValueError(
                "data.decomposition: chunks reach past their documents' ends; the ShardSet is not "
                "this decomposition's parent"
            )

    @property
    def longest_sequence(self) -> int:
        """The longest row this loader hands out (the model's max_seq_len must cover it)."""
        return 1 << max(self.sampler.used_log2_lens)

    # -- producing steps -------------------------------------------------------------------
    def _prepare(self, step: int) -> tuple[list[Batch], StepPlan, int]:
        plan = self.sampler.plan(step)
        mine = plan.chunks[rank_slice(len(plan.chunks), self.rank, self.world_size)]
        rows = self._micro_rows(plan.log2_len)
        batches = [
            read_chunks(self.shardset, self.decomposition, mine[i : i + rows], plan.log2_len)
            for i in range(0, len(mine), rows)
        ]
        return batches, plan, step + 1

    def _advance(self, step: int) -> int:
        return step + 1

    def _handed_out(self, drawn: StepPlan) -> None:
        self.last_plan = drawn

    @property
    def step(self) -> int:
        return self._position

    def step_metrics(self) -> dict[str, float]:
        """Sequence length, curriculum cycle and epoch of the last step handed out."""
        if self.last_plan is None:
            return {}
        return {
            "seq_len": float(1 << self.last_plan.log2_len),
            "curriculum_cycle": float(self.last_plan.cycle),
            "epoch": self._position / self.sampler.steps_per_epoch,
        }

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Global integers only: the step, plus what must not change under a resumed run."""
        return {
            "version": STATE_VERSION,
            "step": int(self._position),
            "seed": int(self.cfg.seed),
            "tokens_per_step": int(self.tokens_per_step),
            "cycles": int(self.sampler.cycles),
            "curriculum": self.sampler.curriculum,
            "chunks_per_bucket": {
                str(i): int(n)
                for i, n in zip(self.sampler.log2_lens, self.sampler.chunk_counts, strict=True)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved step; refuses a change that would remap steps to chunks."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state: version {state.get('version')!r}, expected {STATE_VERSION!r} "
                "(was the checkpoint trained without data.decomposition?)"
            )
        mine = self.state_dict()
        for key, field in (
            ("seed", "data.seed"),
            ("tokens_per_step", "data.decomposition.tokens_per_step"),
            ("cycles", "data.decomposition.cycles"),
            ("curriculum", "data.decomposition.curriculum"),
            ("chunks_per_bucket", "data.decomposition.path"),
        ):
            if state[key] != mine[key]:
                raise ValueError(
                    f"{field}: the checkpoint was trained with {key}={state[key]!r}, the run now has "
                    f"{mine[key]!r}; resuming would repeat and skip chunks"
                )
        self.close()
        self._position = int(state["step"])
        self.last_plan = None


def build_decomposition_loader(
    cfg: DataConfig, rank: int, world_size: int, shardset: ShardSetReader | None = None
) -> DecompositionLoader:
    """Opens `data.decomposition.path` and, unless a reader is passed in, its parent ShardSet
    (refused if the parent's manifest changed since decomposition)."""
    if cfg.decomposition is None:
        raise ValueError("data.decomposition is not set")
    index = open_decomposition(cfg.decomposition.path, check_parent=shardset is None)
    if shardset is None:
        from data_pipeline.formats import open_shardset

        shardset = open_shardset(index.parent, cache_dir=cfg.cache_dir)
    return DecompositionLoader(cfg, rank, world_size, shardset, index.decomposition)
