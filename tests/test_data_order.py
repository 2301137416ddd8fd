"""Which examples each step sees: a deterministic function of the run seed alone."""

from __future__ import annotations

import numpy as np
import pytest

from normbench.data_order import BatchOrder, seed_streams, train_eval_subset

N, BATCH = 103, 10  # 10 batches per epoch, 3 examples dropped each epoch


def _order(seed, n=N, batch=BATCH):
    return BatchOrder(seed_streams(seed)[1], n, batch)


def test_same_seed_same_batches():
    a, b = _order(5), _order(5)
    for step in range(35):
        np.testing.assert_array_equal(a.indices(step), b.indices(step))


def test_each_epoch_is_a_permutation_with_the_remainder_dropped():
    order = _order(1)
    assert order.batches_per_epoch == N // BATCH == 10
    epochs = []
    for epoch in range(3):
        batches = [order.indices(epoch * 10 + i) for i in range(10)]
        assert all(len(b) == BATCH for b in batches)
        seen = np.concatenate(batches)
        assert len(np.unique(seen)) == 100  # no example twice within an epoch
        assert seen.min() >= 0 and seen.max() < N
        assert seen.dtype.kind == "i"
        epochs.append(seen)
    # A fresh shuffle per epoch: different order, and different examples left out.
    assert not np.array_equal(epochs[0], epochs[1])
    dropped = [set(range(N)) - set(e.tolist()) for e in epochs]
    assert all(len(d) == 3 for d in dropped)
    assert len({frozenset(d) for d in dropped}) > 1


def test_step_reproducible_in_isolation():
    sequential = _order(9)
    expected = {step: sequential.indices(step).copy() for step in range(45)}
    for step in (44, 0, 27, 10, 9):
        np.testing.assert_array_equal(_order(9).indices(step), expected[step])  # fresh object, that step first
    jumping = _order(9)
    for step in (31, 2, 44, 17):  # out of order on one object
        np.testing.assert_array_equal(jumping.indices(step), expected[step])


def test_different_seeds_differ():
    first = [_order(seed).indices(0) for seed in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.array_equal(first[i], first[j])


def test_batch_size_dividing_the_set_drops_nothing():
    order = _order(2, n=20, batch=5)
    np.testing.assert_array_equal(np.sort(np.concatenate([order.indices(s) for s in range(4)])), np.arange(20))


def test_seed_streams_are_independent_and_deterministic():
    init_a, data_a = seed_streams(3)
    init_b, data_b = seed_streams(3)
    np.testing.assert_array_equal(init_a.generate_state(8), init_b.generate_state(8))
    np.testing.assert_array_equal(data_a.generate_state(8), data_b.generate_state(8))
    assert not np.array_equal(init_a.generate_state(8), data_a.generate_state(8))
    assert not np.array_equal(seed_streams(4)[1].generate_state(8), data_a.generate_state(8))


@pytest.mark.parametrize("size", [1, 10, 1000, 10000])
def test_train_eval_subset_fixed_and_sorted(size):
    subset = train_eval_subset(60000, size)
    assert len(subset) == size
    assert np.all(np.diff(subset) > 0)  # sorted, no duplicates
    assert subset.min() >= 0 and subset.max() < 60000
    np.testing.assert_array_equal(subset, train_eval_subset(60000, size))  # same every call, every run


def test_train_eval_subset_is_not_a_prefix():
    subset = train_eval_subset(60000, 1000)
    assert subset.max() > 50000  # spread over the whole training set, not its first examples
    assert set(train_eval_subset(60000, 10).tolist()) <= set(subset.tolist())
