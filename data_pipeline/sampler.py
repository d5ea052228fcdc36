"""Which samples make up the global batch of each step: a pure function of (seed, step, config).

Each source is an endless token stream: epoch e is the source's documents in the order
`default_rng([seed, 0, source, epoch]).permutation(n_docs)`, concatenated, and epochs follow one
another with no gap. A sample is the window of seq_len + 1 tokens starting at a token offset of
that stream (the last token is only a label). For step s, a mixture (weights that may change with
s) assigns each of the global batch's slots to a source with `default_rng([seed, 1, s])`, and
each source hands out its next windows. The state is global integers: the step and one token
cursor per source. Reading the tokens and packing them into tensors is the loader's job.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

# the weight schedules live in data_pipeline.mixture; re-exported here for existing importers
from data_pipeline.mixture import FixedMixture as FixedMixture
from data_pipeline.mixture import MixtureSchedule as MixtureSchedule

_PERMUTATION_STREAM = 0  # first word after the seed in every permutation's rng key
_MIXTURE_STREAM = 1  # first word after the seed in every step's slot-assignment rng key


class SampleId(NamedTuple):
    """One training sequence: `seq_len + 1` tokens of source `source` from stream offset `offset`."""

    source: int
    offset: int


class DocumentSpan(NamedTuple):
    """Tokens [begin, end) of document `doc_id`; `begin == 0` means the span starts the document."""

    doc_id: int
    begin: int
    end: int


class DocumentStream:
    """The endless concatenation of a source's documents, epoch after epoch.

    `order_for_epoch(e)` gives the document order of epoch e (a permutation of range(n_docs)).
    The two most recent epochs' orders and offsets are cached; older ones are recomputed.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        order_for_epoch: Callable[[int], np.ndarray],
        name: str = "source",
        cached_epochs: int = 2,
    ) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or len(lengths) == 0:
            raise ValueError(
                f"{name}: needs at least one document (lengths has shape {lengths.shape})"
            )
        if (lengths <= 0).any():
            bad = int(np.flatnonzero(lengths <= 0)[0])
            raise ValueError(
                f"{name}: document {bad} has length {int(lengths[bad])}; lengths must be > 0"
            )
        self.name = name
        self.lengths = lengths
        self.n_docs = len(lengths)
        self.tokens_per_epoch = int(lengths.sum())
        self._order_for_epoch = order_for_epoch
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_epochs = cached_epochs

    def epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, starts): document ids of epoch `epoch` in stream order, and their start offsets
        within the epoch (`starts` has n_docs + 1 entries, the last = tokens_per_epoch)."""
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        order = np.asarray(self._order_for_epoch(epoch), dtype=np.int64)
        if order.shape != (self.n_docs,):
            raise ValueError(
                f"{self.name}: order of epoch {epoch} has shape {order.shape}, want ({self.n_docs},)"
            )
        starts = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(self.lengths[order], out=starts[1:])
        self._cache[epoch] = (order, starts)
        while len(self._cache) > self._cached_epochs:
            self._cache.popitem(last=False)
        return order, starts

    def spans(self, offset: int, n_tokens: int) -> list[DocumentSpan]:
        """The document pieces that make up stream tokens [offset, offset + n_tokens), in order."""
        if offset < 0 or n_tokens < 0:
            raise ValueError(f"{self.name}: bad window offset={offset} n_tokens={n_tokens}")
        epoch, within = divmod(offset, self.tokens_per_epoch)
        order, starts = self.epoch_layout(epoch)
        index = int(np.searchsorted(starts, within, side="right")) - 1
        pieces: list[DocumentSpan] = []
        remaining = n_tokens
        while remaining > 0:
            if index == self.n_docs:
                epoch, index, within = epoch + 1, 0, 0
                order, starts = self.epoch_layout(epoch)
            begin = within - int(starts[index])
            length = int(starts[index + 1] - starts[index])
            end = min(length, begin + remaining)
            pieces.append(DocumentSpan(int(order[index]), begin, end))
            remaining -= end - begin
            within = int(starts[index + 1])
            index += 1
        return pieces


def epoch_permutation(seed: int, source_index: int, epoch: int, n_docs: int) -> np.ndarray:
    """The document order of one source in one epoch, seeded by (seed, source, epoch)."""
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM, source_index, epoch])
    return rng.permutation(n_docs)


def assign_sources(seed: int, step: int, weights: np.ndarray, n_slots: int) -> np.ndarray:
    """Source index of each of the step's `n_slots` global batch slots.

    Systematic sampling: slot points (u + j) / n_slots with one uniform u per step, so source k
    gets floor or ceil of w_k * n_slots slots (exactly w_k * n_slots on average over steps);
    then the slots are shuffled so every rank sees the mixture. Pure function of its arguments.
    """
    rng = np.random.default_rng([seed, _MIXTURE_STREAM, step])
    if len(weights) == 1:
        return np.zeros(n_slots, dtype=np.int64)
    cumulative = np.cumsum(weights / weights.sum())
    points = (rng.random() + np.arange(n_slots)) / n_slots
    sources = np.minimum(np.searchsorted(cumulative, points, side="right"), len(weights) - 1)
    return sources[rng.permutation(n_slots)].astype(np.int64)


@dataclass
class SamplerState:
    """Where the sampler stands: steps drawn so far and the next stream offset of each source."""

    step: int = 0
    cursors: list[int] = field(default_factory=list)


class Sampler:
    """Global batches of SampleIds, one step at a time, from global integer state."""

    def __init__(
        self,
        lengths: Sequence[np.ndarray],
        seed: int,
        seq_len: int,
        global_batch_size: int,
        mixture: MixtureSchedule,
        names: Sequence[str] | None = None,
    ) -> None:
        if seq_len <= 0 or global_batch_size <= 0:
            raise ValueError(
                f"seq_len and global_batch_size must be > 0, got {seq_len}, {global_batch_size}"
            )
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0 (numpy seed sequences), got {seed}")
        self.names = (
            list(names) if names is not None else [f"source{k}" for k in range(len(lengths))]
        )
        if len(self.names) != len(lengths) or len(set(self.names)) != len(self.names):
            raise ValueError(f"need one distinct name per source, got {self.names}")
        self.seed = seed
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.mixture = mixture
        self.streams = []
        for k, (name, source_lengths) in enumerate(zip(self.names, lengths, strict=True)):
            n_docs = len(source_lengths)
            order = lambda epoch, k=k, n=n_docs: epoch_permutation(seed, k, epoch, n)
            self.streams.append(DocumentStream(source_lengths, order, name=name))

    def initial_state(self) -> SamplerState:
        return SamplerState(step=0, cursors=[0] * len(self.streams))

    def weights_at(self, step: int) -> np.ndarray:
        weights = np.asarray(self.mixture.weights_at(step), dtype=np.float64)
        if weights.shape != (len(self.streams),):
            raise ValueError(
                f"mixture gives {weights.shape} weights at step {step}, want {len(self.streams)}"
            )
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"mixture weights at step {step} must be finite, >= 0, not all 0: {weights}"
            )
        return weights

    def plan(self, state: SamplerState) -> tuple[list[SampleId], SamplerState]:
        """The global batch of step `state.step`, and the state after it (inputs are not mutated)."""
        sources = assign_sources(
            self.seed, state.step, self.weights_at(state.step), self.global_batch_size
        )
        cursors = list(state.cursors)
        samples = []
        for k in sources.tolist():
            samples.append(SampleId(k, cursors[k]))
            cursors[k] += self.seq_len
        return samples, SamplerState(step=state.step + 1, cursors=cursors)

    def state_at(self, step: int) -> SamplerState:
        """The state before step `step`, by replaying slot assignments from step 0 (integers only)."""
        state = self.initial_state()
        if len(self.streams) == 1:
            return SamplerState(step=step, cursors=[step * self.global_batch_size * self.seq_len])
        cursors = np.zeros(len(self.streams), dtype=np.int64)
        for s in range(step):
            counts = np.bincount(
                assign_sources(self.seed, s, self.weights_at(s), self.global_batch_size),
                minlength=len(self.streams),
            )
            cursors += counts * self.seq_len
        state.step, state.cursors = step, [int(c) for c in cursors]
        return state

    def epoch_of(self, source: int, cursor: int) -> float:
        """How many epochs of `source` a cursor has gone through (fractional)."""
        return cursor / self.streams[source].tokens_per_epoch

    def window(self, sample: SampleId) -> list[DocumentSpan]:
        """The document pieces of one sample: seq_len + 1 tokens from its offset."""
        return self.streams[sample.source].spans(sample.offset, self.seq_len + 1)


def rank_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """Rank r of W takes the contiguous slice [r*B/W, (r+1)*B/W) of the global batch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if global_batch_size % world_size:
        raise ValueError(
            f"data.global_batch_size ({global_batch_size}) must be divisible by the data-parallel "
            f"world size ({world_size})"
        )
    per_rank = global_batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def steps_per_epoch(tokens_per_epoch: int, seq_len: int, global_batch_size: int) -> float:
    """Optimizer steps in one pass over a single source (for logging and planning)."""
    return tokens_per_epoch / (seq_len * global_batch_size)
