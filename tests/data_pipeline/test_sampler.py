"""The sampler: per-source epoch permutations, slot assignment by step-indexed weights, state."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.sampler import (
    DocumentStream,
    FixedMixture,
    SampleId,
    Sampler,
    SamplerState,
    assign_sources,
    epoch_permutation,
    rank_slice,
)


def _identity_stream(lengths) -> DocumentStream:
    return DocumentStream(np.asarray(lengths), lambda epoch: np.arange(len(lengths)))


def test_spans_cover_the_window_and_cross_into_the_next_epoch():
    stream = _identity_stream([3, 2, 4])  # 9 tokens per epoch
    assert stream.spans(0, 4) == [(0, 0, 3), (1, 0, 1)]
    assert stream.spans(4, 2) == [(1, 1, 2), (2, 0, 1)]
    assert stream.spans(7, 6) == [(2, 2, 4), (0, 0, 3), (1, 0, 1)]  # epoch 0 -> 1
    assert stream.spans(9 * 5 + 3, 2) == [(1, 0, 2)]  # far epochs need no history


def test_each_epoch_is_a_fresh_permutation_keyed_by_seed_source_and_epoch():
    n = 50
    orders = {e: epoch_permutation(seed=1, source_index=0, epoch=e, n_docs=n) for e in range(3)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(n))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[1], epoch_permutation(1, 0, 1, n))  # pure
    assert not np.array_equal(orders[0], epoch_permutation(1, 1, 0, n))  # other source
    assert not np.array_equal(orders[0], epoch_permutation(2, 0, 0, n))  # other seed


def test_stream_rejects_empty_and_zero_length_documents():
    with pytest.raises(ValueError, match="at least one document"):
        _identity_stream([])
    with pytest.raises(ValueError, match="document 1 has length 0"):
        _identity_stream([3, 0])


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.9, 0.1], [1 / 3, 1 / 3, 1 / 3]])
def test_slot_counts_are_floor_or_ceil_and_unbiased(weights):
    w = np.asarray(weights)
    n_slots = 7
    totals = np.zeros(len(w))
    for step in range(2000):
        sources = assign_sources(seed=3, step=step, weights=w, n_slots=n_slots)
        counts = np.bincount(sources, minlength=len(w))
        assert counts.sum() == n_slots
        assert (counts >= np.floor(w * n_slots)).all() and (counts <= np.ceil(w * n_slots)).all()
        totals += counts
    np.testing.assert_allclose(totals / totals.sum(), w, atol=0.01)


def test_slot_assignment_is_a_pure_function_of_seed_and_step():
    w = np.array([0.6, 0.4])
    a = assign_sources(seed=1, step=5, weights=w, n_slots=16)
    np.testing.assert_array_equal(a, assign_sources(seed=1, step=5, weights=w, n_slots=16))
    others = [assign_sources(seed=1, step=s, weights=w, n_slots=16) for s in range(6, 12)]
    assert any(not np.array_equal(a, o) for o in others)  # slots are shuffled per step


def test_zero_weight_source_gets_nothing():
    sources = assign_sources(seed=0, step=0, weights=np.array([0.5, 0.0, 0.5]), n_slots=64)
    assert 1 not in sources


class _SwitchAtStep:
    """Weights that change with the step (what temperature / cooldown schedules will plug in)."""

    def weights_at(self, step: int) -> np.ndarray:
        return np.array([1.0, 0.0]) if step < 5 else np.array([0.0, 1.0])


def test_weights_may_change_with_the_step():
    sampler = Sampler(
        [np.full(10, 7), np.full(10, 5)],
        seed=0,
        seq_len=4,
        global_batch_size=4,
        mixture=_SwitchAtStep(),
    )
    state = sampler.initial_state()
    seen = []
    for _ in range(8):
        samples, state = sampler.plan(state)
        seen.append({s.source for s in samples})
    assert seen == [{0}] * 5 + [{1}] * 3
    assert state.cursors == [5 * 4 * 4, 3 * 4 * 4]
    assert sampler.state_at(8) == state


def test_plan_is_pure_and_advances_cursors_by_seq_len():
    sampler = Sampler(
        [np.full(20, 9), np.full(5, 3)],
        seed=4,
        seq_len=8,
        global_batch_size=6,
        mixture=FixedMixture([2, 1]),
    )
    state = SamplerState(step=3, cursors=[40, 16])
    samples, after = sampler.plan(state)
    assert sampler.plan(state) == (samples, after)
    assert state == SamplerState(step=3, cursors=[40, 16])  # not mutated
    for k in (0, 1):
        offsets = [s.offset for s in samples if s.source == k]
        assert offsets == list(range(state.cursors[k], after.cursors[k], 8))
    assert after.step == 4 and all(isinstance(s, SampleId) for s in samples)


def test_rank_slice_is_contiguous_and_checks_divisibility():
    assert [rank_slice(8, r, 4) for r in range(4)] == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
    ]
    with pytest.raises(ValueError, match="divisible"):
        rank_slice(8, 0, 3)


def test_mixture_weights_are_validated():
    with pytest.raises(ValueError):
        FixedMixture([0.0, 0.0])
    with pytest.raises(ValueError):
        FixedMixture([1.0, -1.0])
    np.testing.assert_allclose(FixedMixture([3, 1]).weights_at(10), [0.75, 0.25])


def test_negative_seed_and_bad_scheduled_weights_are_rejected():
    with pytest.raises(ValueError, match="data.seed"):
        Sampler([np.full(3, 4)], seed=-1, seq_len=4, global_batch_size=2, mixture=FixedMixture([1]))

    class AllZero:
        def weights_at(self, step):
            return np.zeros(2)

    sampler = Sampler(
        [np.full(3, 4)] * 2, seed=0, seq_len=4, global_batch_size=2, mixture=AllZero()
    )
    with pytest.raises(ValueError, match="step 0"):
        sampler.plan(sampler.initial_state())
