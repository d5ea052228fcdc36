"""Helpers shared by the benchmarks: synthetic batches and result tables/JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class SyntheticLoader:
    """Random tokens, generated once on the device: the step never waits for data."""

    def __init__(self, vocab: int, seq_len: int, micro_batch: int, n_micro: int, device: torch.device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.batches = []
        for _ in range(n_micro):
            tokens = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g).to(device)
            self.batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": None})

    def next_step(self):
        return self.batches

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def close(self):
        pass


def append_json(path: str | Path, record: dict) -> None:
    """Appends one result record to a JSON list file (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(record)
    path.write_text(json.dumps(history, indent=1))
