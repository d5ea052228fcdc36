"""models/generate.py over the decoding protocol, for both families (GLA state, Llama KV cache)."""

from __future__ import annotations

import pytest
import torch

from models.generate import generate, sample_next
from tests.conftest import tiny_model


def build(family: str, seed: int = 0):
    return tiny_model(family, seed, vocab_size=61, max_seq_len=64).double()


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("family", ["gla", "llama"])
def test_greedy_matches_full_forward_argmax(family):
    model = build(family)
    prompt = [3, 14, 15, 9, 2, 6]
    assert generate(model, prompt, 12) == naive_greedy(model, prompt, 12)


@pytest.mark.parametrize("family", ["gla", "llama"])
def test_stops_at_eos_and_restores_mode(family):
    model = build(family, seed=1)
    model.train()
    prompt = [1, 2, 3]
    free = generate(model, prompt, 8)
    eos = free[2]
    stopped = generate(model, prompt, 8, eos_id=eos)
    assert stopped == free[: free.index(eos) + 1]
    assert model.training


def test_sampling_is_reproducible_and_top_k_restricts():
    model = build("gla")
    runs = [
        generate(model, [5, 6], 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    draws = {
        int(sample_next(logits, 2.0, top_k=2, generator=torch.Generator().manual_seed(s)))
        for s in range(50)
    }
    assert draws == {1, 2}


def test_bad_arguments():
    model = build("gla")
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, temperature=-1.0)
