"""Handing out a loader's steps in order, `data.prefetch` of them prepared ahead on a thread.

Owns the background thread, its bounded queue and the step-by-step hand-out shared by the
training loaders (packed mixtures in loader.py, the decomposition curriculum in curriculum.py).
A loader says how to prepare one step from a position; what a position is, is the loader's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

Batch = dict[str, torch.Tensor]
Prepared = tuple[list[Batch], Any, Any]
"""(this rank's micro-batches, what the step drew, the position after it)."""


class _Prefetcher:
    """Background thread preparing steps from a starting position into a bounded queue."""

    def __init__(self, loader: PrefetchingLoader, position: Any, depth: int) -> None:
        self._loader = loader
        self._position = position
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="strata-loader-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            position = self._position
            while not self._stop.is_set():
                item = self._loader._prepare(position)
                position = item[2]
                self._put(item)
        except BaseException as error:  # handed to the consumer, raised in next_step
            self._put(error)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> Prepared:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("loader prefetch thread died without a result") from None
                continue
            if isinstance(item, BaseException):
                raise RuntimeError("loader prefetch failed") from item
            return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class PrefetchingLoader:
    """Base of the training loaders: `next_step()` hands out the step at `self._position`.

    A subclass sets `self.prefetch` (steps ahead; 0 = prepare in the caller's thread) and
    `self._position`, defines `_prepare(position) -> Prepared` (a pure function of the position),
    `_advance(position)` (the next position, reading nothing) and `_handed_out(drawn)`, and calls
    `self._stop_prefetch()` before it moves the position.
    """

    prefetch: int
    _position: Any
    _prefetcher: _Prefetcher | None = None

    def _prepare(self, position: Any) -> Prepared:
        raise NotImplementedError

    def _advance(self, position: Any) -> Any:
        raise NotImplementedError

    def _handed_out(self, drawn: Any) -> None:
        """Called with what the step just handed out drew (for metrics and tests)."""

    def skip(self, steps: int) -> None:
        """Moves the position `steps` optimizer steps on without reading their data: those global
        batches are never handed out (after a loss spike: resume before it and skip past the data)."""
        self._stop_prefetch()
        for _ in range(steps):
            self._position = self._advance(self._position)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step (advances the position by one)."""
        if self.prefetch == 0:
            batches, drawn, position = self._prepare(self._position)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self, self._position, self.prefetch)
            batches, drawn, position = self._prefetcher.get()
        self._position = position
        self._handed_out(drawn)
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None

    def close(self) -> None:
        """Stop the background thread; the position stays where the last handed-out step left it."""
        self._stop_prefetch()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
