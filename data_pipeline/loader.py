"""The training loader: this rank's micro-batches for each optimizer step, prepared ahead.

It owns the sampler state (global integers: step, one token cursor per source), reads the
windows the sampler picks from the ShardSets and packs them (data_pipeline/packing.py); steps
are handed out `data.prefetch` ahead by data_pipeline/prefetch.py; the mixture weights come from
data_pipeline/mixture.py over the sources' token counts. It also provides the deterministic eval
iterator. It does not open process groups or compute losses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.mixture import FixedMixture, MixtureSchedule, build_mixture
from data_pipeline.packing import IGNORE_INDEX, ShardSetReader, pack_windows, read_window
from data_pipeline.prefetch import Batch, PrefetchingLoader
from data_pipeline.sampler import (
    DocumentStream,
    SampleId,
    Sampler,
    SamplerState,
    rank_slice,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1


def source_names(cfg: DataConfig) -> list[str]:
    """Each source's label: `name`, else its directory name; must be distinct."""
    names = [s.name or os.path.basename(os.path.normpath(s.path)) for s in cfg.sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.sources: names must be distinct, {duplicates} repeat (set `name`)")
    return names


class TrainLoader(PrefetchingLoader):
    """Per optimizer step, this rank's `global_batch_size / world_size / micro_batch_size`
    micro-batches; the sequence of global batches does not depend on world size or prefetch."""

    def __init__(
        self,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        shardsets: Sequence[ShardSetReader],
        names: Sequence[str] | None = None,
        mixture: MixtureSchedule | None = None,
        total_steps: int | None = None,
    ) -> None:
        """`mixture` defaults to the one `cfg.mixture` describes, over the sources' token counts;
        `total_steps` (train.steps) is what a temperature cooldown is a fraction of."""
        if len(shardsets) == 0:
            raise ValueError("data.sources: at least one source is needed to train")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.shardsets = list(shardsets)
        self._rank_slice = rank_slice(cfg.global_batch_size, rank, world_size)
        per_rank = cfg.global_batch_size // world_size
        if per_rank % cfg.micro_batch_size:
            raise ValueError(
                f"data.micro_batch_size ({cfg.micro_batch_size}) must divide the per-rank batch "
                f"(global_batch_size {cfg.global_batch_size} / world size {world_size} = {per_rank})"
            )
        self.micro_batches_per_step = per_rank // cfg.micro_batch_size
        lengths = [np.asarray(s.lengths) for s in self.shardsets]
        if mixture is None:
            weights = [s.weight for s in cfg.sources] or [1.0] * len(shardsets)
            token_counts = [int(source_lengths.sum()) for source_lengths in lengths]
            mixture = build_mixture(cfg.mixture, token_counts, weights, total_steps)
        self.sampler = Sampler(
            lengths,
            seed=cfg.seed,
            seq_len=cfg.seq_len,
            global_batch_size=cfg.global_batch_size,
            mixture=mixture,
            names=names if names is not None else [f"source{k}" for k in range(len(shardsets))],
        )
        self._position = self.sampler.initial_state()
        self.prefetch = cfg.prefetch
        self.last_sample_ids: list[SampleId] = []
        """This rank's samples in the last step handed out (for tests and debugging)."""

    # -- producing steps -------------------------------------------------------------------
    def _prepare(self, state: SamplerState) -> tuple[list[Batch], list[SampleId], SamplerState]:
        samples, next_state = self.sampler.plan(state)
        mine = samples[self._rank_slice]
        window = self.cfg.seq_len + 1
        tokens = np.empty((len(mine), window), dtype=np.int64)
        starts = np.empty((len(mine), window), dtype=bool)
        for row, sample in enumerate(mine):
            read_window(
                self.shardsets[sample.source], self.sampler.window(sample), tokens[row], starts[row]
            )
        mbs = self.cfg.micro_batch_size
        batches = [
            pack_windows(
                tokens[i : i + mbs], starts[i : i + mbs], self.cfg.cross_document_attention
            )
            for i in range(0, len(mine), mbs)
        ]
        return batches, mine, next_state

    def _advance(self, state: SamplerState) -> SamplerState:
        return self.sampler.plan(state)[1]

    def _handed_out(self, drawn: list[SampleId]) -> None:
        self.last_sample_ids = drawn

    @property
    def step(self) -> int:
        """Optimizer steps handed out so far."""
        return self._position.step

    def epochs(self) -> dict[str, float]:
        """Epochs gone through per source (fractional), for metrics."""
        return {
            name: self.sampler.epoch_of(k, cursor)
            for k, (name, cursor) in enumerate(
                zip(self.sampler.names, self._position.cursors, strict=True)
            )
        }

    def step_metrics(self) -> dict[str, float]:
        """The weights of the last step handed out, per source (`mixture_weight/NAME`), and its
        temperature; empty for a fixed mixture (its weights are in the config)."""
        mixture = self.sampler.mixture
        if isinstance(mixture, FixedMixture):
            return {}
        step = max(self._position.step - 1, 0)
        weights = self.sampler.weights_at(step)
        metrics = {
            f"mixture_weight/{name}": float(w)
            for name, w in zip(self.sampler.names, weights, strict=True)
        }
        temperature_at = getattr(mixture, "temperature_at", None)
        if temperature_at is not None:
            metrics["mixture_temperature"] = float(temperature_at(step))
        return metrics

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Global integers only: the same on every rank, valid at any world size."""
        sources = {}
        for name, stream, cursor in zip(
            self.sampler.names, self.sampler.streams, self._position.cursors, strict=True
        ):
            sources[name] = {
                "cursor": int(cursor),
                "epoch": int(cursor // stream.tokens_per_epoch),
                "tokens_per_epoch": int(stream.tokens_per_epoch),
                "n_docs": int(stream.n_docs),
            }
        return {
            "version": STATE_VERSION,
            "step": int(self._position.step),
            "seed": int(self.cfg.seed),
            "sources": sources,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved step. Sources are matched by name: a source new to the config
        starts at its beginning; a saved source absent from the config is dropped (logged)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state: version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        if int(state["seed"]) != self.cfg.seed:
            raise ValueError(
                f"data.seed: the checkpoint was trained with seed {state['seed']}, the config says "
                f"{self.cfg.seed}; changing it would repeat and skip documents mid-epoch"
            )
        saved = state["sources"]
        cursors = []
        for name, stream in zip(self.sampler.names, self.sampler.streams, strict=True):
            if name not in saved:
                log.info(
                    "loader: source %r is new in this config; it starts at its beginning", name
                )
                cursors.append(0)
                continue
            entry = saved[name]
            if (int(entry["tokens_per_epoch"]), int(entry["n_docs"])) != (
                stream.tokens_per_epoch,
                stream.n_docs,
            ):
                raise ValueError(
                    f"data.sources[{name}]: the checkpoint saw {entry['n_docs']} documents / "
                    f"{entry['tokens_per_epoch']} tokens, the ShardSet now has {stream.n_docs} / "
                    f"{stream.tokens_per_epoch}; the data changed under the run"
                )
            cursors.append(int(entry["cursor"]))
        for name in sorted(set(saved) - set(self.sampler.names)):
            log.warning("loader: source %r of the checkpoint is not in this config; dropped", name)
        self._stop_prefetch()
        self._position = SamplerState(step=int(state["step"]), cursors=cursors)
        self.last_sample_ids = []


def build_train_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    shardsets: Sequence[ShardSetReader] | None = None,
    total_steps: int | None = None,
) -> TrainLoader:
    """The loader for rank `rank` of `world_size` data-parallel ranks; opens `cfg.sources`
    (data_pipeline.formats.open_shardset) unless ShardSet readers are passed in. `total_steps`
    (train.steps) is needed by a temperature mixture's cooldown. With `data.decomposition` set,
    the loader of data_pipeline.curriculum (one reader may be passed in, for its parent)."""
    if cfg.decomposition is not None:
        from data_pipeline.curriculum import build_decomposition_loader

        parent = shardsets[0] if shardsets else None
        return build_decomposition_loader(cfg, rank, world_size, parent)  # type: ignore[return-value]
    if shardsets is None:
        from data_pipeline.formats import open_shardset

        shardsets = [open_shardset(s.path, cache_dir=cfg.cache_dir) for s in cfg.sources]
        names = source_names(cfg)
    else:
        if cfg.sources and len(cfg.sources) != len(shardsets):
            raise ValueError(
                f"data.sources lists {len(cfg.sources)} sources but {len(shardsets)} ShardSets were given"
            )
        names = source_names(cfg) if cfg.sources else None
    return TrainLoader(cfg, rank, world_size, shardsets, names=names, total_steps=total_steps)


def eval_batches(
    shardset: ShardSetReader,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    cross_document_attention: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """The first `max_batches` batches of `shardset` packed in document order: sequence i is
    stream tokens [i*seq_len, (i+1)*seq_len + 1), no shuffling, no wrap-around, the last batch
    may be short. The same sequences whatever the world size: rank r of W gets its contiguous
    share of each batch's rows, padded to ceil(rows / W) with rows whose labels are all -100
    (so every rank runs the same number of forwards of the same shape and scores nothing twice).
    """
    if seq_len <= 0 or batch_size <= 0 or max_batches < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"eval: bad seq_len={seq_len} batch_size={batch_size} max_batches={max_batches} "
            f"rank={rank} world_size={world_size}"
        )
    stream = DocumentStream(
        np.asarray(shardset.lengths), lambda epoch: np.arange(len(shardset)), name="val"
    )
    n_sequences = min((stream.tokens_per_epoch - 1) // seq_len, max_batches * batch_size)
    for first in range(0, n_sequences, batch_size):
        rows = min(batch_size, n_sequences - first)
        per_rank = -(-rows // world_size)
        mine = range(first + rank * per_rank, first + min((rank + 1) * per_rank, rows))
        tokens = np.empty((per_rank, seq_len + 1), dtype=np.int64)
        starts = np.empty((per_rank, seq_len + 1), dtype=bool)
        for row in range(per_rank):
            sequence = mine[row] if row < len(mine) else first  # padding: any real row
            read_window(
                shardset, stream.spans(sequence * seq_len, seq_len + 1), tokens[row], starts[row]
            )
        batch = pack_windows(tokens, starts, cross_document_attention)
        batch["labels"][len(mine) :] = IGNORE_INDEX
        yield batch
