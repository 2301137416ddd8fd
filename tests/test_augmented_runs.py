"""Augmentations wired into runs: a spec's `augmentations` list is validated like any
plugin list, changes the run key only when present, and every backend trains on the same
host-augmented batch, drawn from the run's own augmentation stream.

What would go wrong without these checks: a backend that ignores the `images` it is
handed (trains on the stored batch: its trajectory equals the un-augmented one), one that
pairs them with the wrong labels (its trajectory leaves the others'), a stream shared
between runs or steps (batches repeat), or a bundled spec's hash moving (published runs
retrained instead of reused)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from normbench import augmentations, backends, parity, runner
from normbench.backends import base
from normbench import spec as spec_module
from normbench.data_order import BatchOrder, augmentation_stream, seed_streams
from normbench.plan import resolve

IMAGE_SPEC = """
name = "augmented-cnn"
model = "cnn-tiny"
dataset = "mnist"
batch_size = 16
steps = 5
eval_every = 5
train_eval_examples = 128
test_examples = 200
seeds = 2
{augmentations}

[optimizer]
name = "sgd"
learning_rate = 0.05
momentum = 0.9

[[variant]]
name = "batch_norm"
normalization = "batch_norm"
"""
AUGMENTED = 'augmentations = [{ name = "random_crop", padding = 3 }, "horizontal_flip"]'


def _spec(augmentations_line: str = AUGMENTED, **changes) -> spec_module.ExperimentSpec:
    spec = spec_module.loads(IMAGE_SPEC.format(augmentations=augmentations_line), source="augmented.toml")
    return spec.replace(**changes) if changes else spec


def _error(text: str) -> str:
    with pytest.raises(spec_module.SpecError) as info:
        spec_module.loads(IMAGE_SPEC.format(augmentations=text), source="my.toml")
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- the spec field


def test_the_field_takes_names_and_tables_in_order_and_writes_back():
    spec = _spec()
    assert [(a.name, dict(a.options)) for a in spec.augmentations] == [("random_crop", {"padding": 3}),
                                                                      ("horizontal_flip", {"probability": 0.5})]
    again = spec_module.loads(spec_module.to_toml(spec), source="again.toml")
    assert again == spec and again.hash() == spec.hash()


def test_an_absent_or_empty_list_leaves_hash_and_run_keys_as_they_were():
    plain, empty = _spec(""), _spec("augmentations = []")
    assert plain.hash() == empty.hash() and "augmentations" not in plain.to_dict()
    augmented = _spec()
    assert augmented.hash() != plain.hash()
    variant = plain.variants[0]
    assert runner.run_key(augmented, variant, 0, "torch") != runner.run_key(plain, variant, 0, "torch")
    # The bundled specs have no augmentations: their hashes (and the published runs' keys) did not move.
    assert spec_module.load("mnist-cnn").hash() == "55db8376794bdeb6"


@pytest.mark.parametrize("text, message", [
    ('augmentations = "horizontal_flip"', r"my.toml: augmentations: expected a list of augmentation names or inline tables"),
    ('augmentations = ["flip"]', r"my.toml: augmentations\[0\]: unknown augmentation 'flip'; available: horizontal_flip, "),
    ('augmentations = ["horizontal_flip", { name = "random_crop", pad = 2 }]',
     r"my.toml: augmentations\[1\].pad: unknown option of augmentation 'random_crop' \(did you mean 'padding'\?\)"),
    ('augmentations = [{ name = "random_crop", padding = -1 }]', r"my.toml: augmentations\[0\].padding: must be >= 0"),
    ('augmentations = ["point_cloud_jitter"]',
     r"my.toml: augmentations\[0\]: 'point_cloud_jitter' augments point clouds, but data set 'mnist' holds images; "
     r"use one of: horizontal_flip, random_crop"),
])
def test_bad_lists_are_named_in_one_line(text, message):
    assert re.search(message, _error(text)), _error(text)


def test_image_augmentations_are_refused_for_point_clouds():
    text = IMAGE_SPEC.format(augmentations='augmentations = ["random_crop"]').replace(
        'model = "cnn-tiny"', 'model = "pointnet-small"').replace('dataset = "mnist"', 'dataset = "mnist_point_clouds"')
    with pytest.raises(spec_module.SpecError, match=r"augmentations\[0\]: 'random_crop' augments images, but data set "
                                                    r"'mnist_point_clouds' holds point clouds; use one of: point_cloud_jitter"):
        spec_module.loads(text.replace('normalization = "batch_norm"', 'normalization = "none"'), source="pc.toml")


# ----------------------------------------------------------------------------- the batches


def test_a_steps_batch_comes_from_its_own_stream_and_the_augmentations_in_order():
    plan = resolve(_spec(), "batch_norm")
    rng = np.random.default_rng(0)
    images = rng.random((16, 28, 28, 1)).astype(np.float32)
    before = images.copy()
    batch = plan.augmented_batch(images, seed=1, step=3)
    np.testing.assert_array_equal(images, before)  # the input is left as it was
    assert batch.dtype == images.dtype and batch.shape == images.shape
    # exactly the registry's functions, in the spec's order, from the run's step stream
    expected_rng = np.random.Generator(np.random.PCG64(augmentation_stream(1, 3)))
    expected = augmentations.apply("random_crop", images, expected_rng, padding=3)
    expected = augmentations.apply("horizontal_flip", expected, expected_rng)
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(plan.augmented_batch(images, 1, 3), batch)  # any step, made alone, again
    for seed, step in ((1, 4), (0, 3)):  # another step or run: other crops and flips
        assert not np.array_equal(plan.augmented_batch(images, seed, step), batch)
    assert not resolve(_spec(""), "batch_norm").augments


def test_the_augmentation_stream_is_new_and_leaves_the_others_alone():
    from normbench.data_order import dropout_stream, seed_streams

    streams = [*seed_streams(5), dropout_stream(5, 0), augmentation_stream(5, 0), augmentation_stream(5, 1)]
    states = [tuple(s.generate_state(4)) for s in streams]
    assert len(set(states)) == len(states)


def test_a_trainer_steps_on_the_images_it_is_handed(engine):
    """`Trainer.step(images=...)` trains on those images with the labels of `indices`:
    the same update as a trainer whose placed training set is that batch."""
    dtype = engine.dtype
    plan = resolve(_spec(dtype=dtype), "batch_norm")
    data = parity._training_data(plan.spec)
    indices = np.arange(40, 56)[::-1]
    images = plan.augmented_batch(data.train_images[indices].astype(dtype), 0, 0)
    params, state = plan.initial_parameters(0)
    handed = engine.trainer(plan, params, state, engine.put_images(data.train_images.astype(dtype)[:100]),
                            engine.put_labels(data.train_labels[:100]))
    placed = engine.trainer(plan, params, state, engine.put_images(images), engine.put_labels(data.train_labels[indices]))
    first = [handed.step_and_read(indices, 0.05, images=images), placed.step_and_read(np.arange(len(indices)), 0.05)]
    second = [handed.step_and_read(indices, 0.05, images=images), placed.step_and_read(np.arange(len(indices)), 0.05)]
    for a, b in (first, second):
        assert a == pytest.approx(b, rel=1e-12 if dtype == "float64" else 1e-6)
    stored = engine.trainer(plan, params, state, engine.put_images(data.train_images.astype(dtype)[:100]),
                            engine.put_labels(data.train_labels[:100]))
    # the same step on the stored images: the augmentation mattered
    assert stored.step_and_read(indices, 0.05)["loss"] != pytest.approx(first[0]["loss"], rel=1e-4)


# ----------------------------------------------------------------------------- whole runs


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(f)]


def test_augmented_trajectories_agree_across_backends_and_differ_from_plain_ones():
    available = [b for b in backends.names() if backends.is_available(b)]
    if len(available) < 2:
        pytest.skip("needs two backends")
    spec = _spec(dtype="float64")
    rows = parity.compare_trajectory(spec, "batch_norm", available, 5, "float64")
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    augmented = parity.trajectory_outputs(spec, "batch_norm", available[0], 5, "float64")
    plain = parity.trajectory_outputs(_spec("", dtype="float64"), "batch_norm", available[0], 5, "float64")
    assert augmented["trajectory/loss"][0] != pytest.approx(plain["trajectory/loss"][0], rel=1e-9)


def test_point_cloud_augmentations_agree_across_backends():
    available = [b for b in backends.names() if backends.is_available(b)]
    if len(available) < 2:
        pytest.skip("needs two backends")
    text = IMAGE_SPEC.format(augmentations='augmentations = [{ name = "point_cloud_rotation", axis = "z" }, "point_cloud_jitter"]')
    text = (text.replace('model = "cnn-tiny"', 'model = "pointnet-small"').replace('dataset = "mnist"', 'dataset = "mnist_point_clouds"')
            .replace("batch_size = 16", "batch_size = 8").replace('normalization = "batch_norm"', 'normalization = "none"')
            .replace('name = "sgd"\nlearning_rate = 0.05\nmomentum = 0.9', 'name = "adam"\nlearning_rate = 0.001'))
    spec = spec_module.loads(text, source="pc.toml").replace(dtype="float64")
    rows = parity.compare_step(spec, "batch_norm", available, "float64") + \
        parity.compare_trajectory(spec, "batch_norm", available, 2, "float64")
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_a_sweep_of_augmented_runs_in_groups_writes_the_runs_alone_and_resumes(tmp_path, backend_name):
    # float64, so that a vectorized group's members match their runs alone to rounding
    spec = _spec(steps=4, eval_every=2, dtype="float64")
    first = runner.run_sweep(spec, [backend_name], tmp_path / "grouped", progress=False, log=lambda *_: None, group_size=2)
    alone = runner.run_sweep(spec, [backend_name], tmp_path / "alone", progress=False, log=lambda *_: None)
    vectorizes = type(backends.get_engine(backend_name)).vectorized_group is not base.Engine.vectorized_group
    assert len(first) == len(alone) == 2
    for a, b in zip(first, alone):
        rows_a, rows_b = _metrics(a.run_dir), _metrics(b.run_dir)
        assert [r["accuracy"] for r in rows_a] == [r["accuracy"] for r in rows_b]
        for name in ("cross_entropy", "std_loss"):
            np.testing.assert_allclose([float(r[name]) for r in rows_a], [float(r[name]) for r in rows_b], rtol=1e-9)
        assert json.loads((a.run_dir / "provenance.json").read_text())["group"]["vectorized"] is vectorizes
    again = runner.run_sweep(spec, [backend_name], tmp_path / "grouped", progress=False, log=lambda *_: None, group_size=2)
    assert all(r.reused for r in again)


@pytest.mark.parametrize("vectorizing_backend", backends.names())
def test_vectorized_members_train_on_their_own_augmented_batches(vectorizing_backend):
    """Each member of a vectorized group gets its own host batch: its float32 trajectory
    is its run's alone, within the parity tolerances (a member handed another's batch,
    or the stored one, leaves them by far more)."""
    if not backends.is_available(vectorizing_backend):
        pytest.skip(f"{vectorizing_backend} is not installed")
    engine = backends.get_engine(vectorizing_backend, device="cpu", dtype="float32")
    if type(engine).vectorized_group is base.Engine.vectorized_group:
        pytest.skip(f"{vectorizing_backend} steps a group's runs one by one")
    plan = resolve(_spec(), "batch_norm")
    data = parity._training_data(plan.spec)
    images, labels = data.train_images[:96].astype("float32"), data.train_labels[:96]
    seeds, steps = [0, 1, 2], 6
    orders = [BatchOrder(seed_streams(seed)[1], len(labels), plan.batch_size) for seed in seeds]

    def trajectories(vectorize):
        group = runner.make_group(engine, plan, seeds, engine.put_images(images), engine.put_labels(labels), vectorize)
        assert isinstance(group, base.VectorizedGroup) == vectorize
        pending = []
        for step in range(steps):
            indices = np.stack([order.indices(step) for order in orders])
            batches = [plan.augmented_batch(images[i], seed, step) for i, seed in zip(indices, seeds)]
            pending.append(group.step(indices, plan.learning_rate(step), None, batches))
        losses = group.read_losses(pending)
        return [{"trajectory/loss": losses[:, k, 0].astype(np.float64),
                 **{f"final/{name}": np.asarray(v, np.float64) for name, v in group.export(k)[0].items()}}
                for k in range(len(seeds))]

    alone, together = trajectories(False), trajectories(True)
    for a, b in zip(alone, together):
        rows = parity.compare_outputs({"alone": a, "vectorized": b}, "float32", "batch_norm", plan.std_metric.log_epsilon)
        assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    # and the members did train on different batches
    assert not np.allclose(alone[0]["trajectory/loss"], alone[1]["trajectory/loss"])


# ----------------------------------------------------------------------------- streamed data sets


def test_a_streamed_data_set_trains_as_the_same_data_held_in_memory(tmp_path, monkeypatch, backend_name):
    """A data set too large for memory is streamed (`Dataset.streamed`: memory maps of its
    stored arrays; image_folder's decoded cache): the runner reads every step's batch and
    every evaluation chunk from disk, scaled as held images are, and the device never gets
    a whole split. The runs' metrics equal those of the same data held in memory, with
    and without augmentation."""
    from normbench import datasets

    real_load = datasets.load

    def streamed_load(name, data_dir=None, **options):
        held = real_load(name, data_dir, **options)
        maps = {}
        for split in ("train_images", "test_images"):
            np.save(tmp_path / f"{split}.npy", getattr(held, split))
            maps[split] = np.load(tmp_path / f"{split}.npy", mmap_mode="r")
        return datasets.Dataset(held.name, maps["train_images"], held.train_labels, maps["test_images"],
                                held.test_labels, held.num_classes, held.source, held.files, streamed=True)

    placed = []

    def place(engine, data, spec):
        placed.append((data, real_place(engine, data, spec)))
        return placed[-1][1]

    real_place = runner.place_data
    monkeypatch.setattr(runner, "place_data", place)
    for augmentations_line in ("", AUGMENTED):
        spec = _spec(augmentations_line, seeds=[0])
        held = runner.run_sweep(spec, [backend_name], tmp_path / f"held{len(augmentations_line)}", progress=False,
                                log=lambda *_: None)
        with monkeypatch.context() as patch:
            patch.setattr(runner.datasets, "load", streamed_load)
            streamed = runner.run_sweep(spec, [backend_name], tmp_path / f"streamed{len(augmentations_line)}",
                                        progress=False, log=lambda *_: None)
        data, (device_train_images, _, evaluator) = placed[-1]
        assert data.streamed and isinstance(data.train_images, runner.ScaledImages)
        assert device_train_images.shape[0] == 0  # the training set stayed on disk, and so do the evaluated splits
        assert all(isinstance(images, runner._StreamedSplit) for images, _, _ in evaluator.splits.values())
        for a, b in zip(held, streamed):
            rows = [[{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(open(r.run_dir / "metrics.csv"))]
                    for r in (a, b)]
            assert rows[0] == rows[1] and len(rows[0]) > 2


def test_host_batches_are_made_a_step_ahead_and_equal_the_ones_made_in_line():
    spec = _spec(seeds=[0, 1])
    plan = resolve(spec, spec.variants[0].name)
    images = np.random.default_rng(0).random((64, 28, 28, 1)).astype(np.float32)
    orders = [BatchOrder(seed_streams(seed)[1], 64, plan.batch_size) for seed in (0, 1)]
    ahead = runner._BatchesAhead(plan, images, [0, 1], orders, steps=3)
    try:
        for step in range(3):
            indices, batches = ahead.take(step)
            assert ahead.queued is None if step == 2 else ahead.queued[0] == step + 1  # the next one is under way
            for k, seed in enumerate((0, 1)):
                np.testing.assert_array_equal(indices[k], orders[k].indices(step))
                np.testing.assert_array_equal(batches[k], plan.augmented_batch(images[indices[k]], seed, step))
    finally:
        ahead.close()
    skipping = runner._BatchesAhead(plan, images, [0], orders[:1], steps=3)
    with pytest.raises(RuntimeError, match="in order"):
        skipping.take(1)
    skipping.close()
