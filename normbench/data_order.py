"""Framework-free randomness: which batches a run sees, derived from its seed alone.

One integer seed feeds a NumPy SeedSequence with two independent children: one for the
initial weights, one for the batch order. Batches are consecutive slices of a fresh
permutation of the training set per epoch; the last partial batch of an epoch is
dropped, so every step sees exactly `batch_size` examples.
"""

from __future__ import annotations

import numpy as np

# The fixed training subset evaluated alongside the test set is the same for every run,
# every seed and every backend, so train curves of different runs are comparable.
TRAIN_EVAL_SUBSET_SEED = 20190101


def seed_streams(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(weights, data order) seed sequences for one run seed."""
    init, data = np.random.SeedSequence(seed).spawn(2)
    return init, data


def dropout_stream(seed: int, step: int) -> np.random.SeedSequence:
    """The seed sequence of run `seed`'s dropout masks at training step `step`: a third
    child of the run seed (spawn key 2; the weights and data-order streams above are keys 0
    and 1, so adding it changed neither), one grandchild per step."""
    return np.random.SeedSequence(seed, spawn_key=(2, step))


def augmentation_stream(seed: int, step: int) -> np.random.SeedSequence:
    """The seed sequence of run `seed`'s batch augmentations at training step `step`: the
    run seed's fourth child (spawn key 3; weights, data order and dropout are 0, 1 and 2,
    none of which it changes), one grandchild per step, as dropout's."""
    return np.random.SeedSequence(seed, spawn_key=(3, step))


class BatchOrder:
    """Indices of the training examples in each step's batch."""

    def __init__(self, data_seed: np.random.SeedSequence, num_examples: int, batch_size: int):
        self.rng = np.random.Generator(np.random.PCG64(data_seed))
        self.num_examples, self.batch_size = num_examples, batch_size
        self.batches_per_epoch = num_examples // batch_size
        self._epochs: list[np.ndarray] = []

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        while len(self._epochs) <= epoch:  # permutations are drawn in order, so any step is reproducible
            self._epochs.append(self.rng.permutation(self.num_examples))
        start = position * self.batch_size
        return self._epochs[epoch][start:start + self.batch_size]


def train_eval_subset(num_examples: int, size: int) -> np.ndarray:
    """Sorted indices of the fixed training subset used for train-split evaluation."""
    rng = np.random.Generator(np.random.PCG64(TRAIN_EVAL_SUBSET_SEED))
    return np.sort(rng.permutation(num_examples)[:size])
