"""Tests for normbench.augmentations: the registry, determinism, shapes, each augmentation's
geometry, inputs left untouched, options checked, and no framework imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from normbench import augmentations
from normbench.options import Option

IMAGES = np.random.default_rng(0).integers(1, 256, (6, 5, 7, 3), dtype=np.uint8)  # no zero pixels: padding shows
CLOUDS = np.random.default_rng(1).uniform(-1, 1, (4, 50, 1, 3)).astype(np.float32)
BATCHES = {"random_crop": IMAGES, "horizontal_flip": IMAGES, "point_cloud_rotation": CLOUDS,
           "point_cloud_jitter": CLOUDS}


def _rng(seed=0):
    return np.random.default_rng(seed)


# --- every augmentation -----------------------------------------------------------------


def test_registry_lists_each_file_with_description_and_defaults():
    assert augmentations.names() == sorted(BATCHES)
    for name in augmentations.names():
        augmentation = augmentations.get(name)
        assert augmentation.name == name and augmentation.module == f"normbench.augmentations.{name}"
        assert augmentation.description and "\n" not in augmentation.description
        assert all(isinstance(option, Option) for option in augmentation.options)
    assert augmentations.get("random_crop").defaults() == {"padding": 4}
    assert augmentations.get("horizontal_flip").defaults() == {"probability": 0.5}
    assert augmentations.get("point_cloud_rotation").defaults() == {"axis": "y"}
    assert augmentations.get("point_cloud_jitter").defaults() == {"sigma": 0.01, "clip": 0.05}
    with pytest.raises(KeyError, match=r"unknown augmentation 'random_flip' .*; available: horizontal_flip, "):
        augmentations.get("random_flip")


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_deterministic_given_the_generator_and_varying_with_it(name):
    batch = BATCHES[name]
    first = augmentations.apply(name, batch, _rng(3))
    np.testing.assert_array_equal(first, augmentations.apply(name, batch, _rng(3)))
    assert not np.array_equal(first, augmentations.apply(name, batch, _rng(4)))
    # One generator, two calls: the second continues the stream (different draws).
    rng = _rng(3)
    augmentations.apply(name, batch, rng)
    assert not np.array_equal(first, augmentations.apply(name, batch, rng))


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_shape_and_dtype_kept_input_untouched(name):
    batch = BATCHES[name]
    before = batch.copy()
    readonly = batch.copy()
    readonly.flags.writeable = False  # would raise if anything wrote into the input
    out = augmentations.apply(name, readonly, _rng())
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert not np.shares_memory(out, readonly)
    np.testing.assert_array_equal(batch, before)


def test_point_augmentations_take_both_cloud_layouts():
    flat = CLOUDS[:, :, 0, :]
    for name in ("point_cloud_rotation", "point_cloud_jitter"):
        np.testing.assert_array_equal(augmentations.apply(name, flat, _rng(5)),
                                      augmentations.apply(name, CLOUDS, _rng(5))[:, :, 0, :])


@pytest.mark.parametrize("name, options, message", [
    ("random_crop", {"pading": 4}, r"augmentation 'random_crop': unknown option 'pading'; options: padding"),
    ("random_crop", {"padding": -1}, r"option 'padding': must be >= 0"),
    ("random_crop", {"padding": 1.5}, r"option 'padding': expected an integer"),
    ("horizontal_flip", {"probability": 2}, r"option 'probability': must be <= 1"),
    ("point_cloud_rotation", {"axis": "w"}, r"option 'axis': unknown value 'w'; allowed: x, y, z"),
    ("point_cloud_jitter", {"sigma": float("nan")}, r"option 'sigma': expected a finite number"),
])
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        augmentations.apply(name, BATCHES[name], _rng(), **options)


def test_wrong_batches_are_refused():
    with pytest.raises(ValueError, match=r"random_crop: expected images \(N, H, W, C\), got shape \(5, 7, 3\)"):
        augmentations.apply("random_crop", IMAGES[0], _rng())
    with pytest.raises(ValueError, match=r"point_cloud_rotation: expected point clouds"):
        augmentations.apply("point_cloud_rotation", IMAGES, _rng())
    with pytest.raises(ValueError, match=r"point_cloud_jitter: expected float coordinates, got int64"):
        augmentations.apply("point_cloud_jitter", np.zeros((2, 5, 3), dtype=np.int64), _rng())
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        augmentations.apply("horizontal_flip", IMAGES, np.random.RandomState(0))


# --- random_crop ------------------------------------------------------------------------


def test_crop_without_padding_is_the_identity():
    np.testing.assert_array_equal(augmentations.apply("random_crop", IMAGES, _rng(), padding=0), IMAGES)


def test_crop_is_a_zero_filled_shift_per_example_within_the_padding():
    padding = 2
    out = augmentations.apply("random_crop", IMAGES, _rng(7), padding=padding)
    padded = np.pad(IMAGES, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    height, width = IMAGES.shape[1:3]
    offsets = []
    for example, image in enumerate(out):
        found = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                 if np.array_equal(image, padded[example, dy:dy + height, dx:dx + width])]
        assert len(found) == 1, f"example {example} is not one shift of its input"
        offsets.append(found[0])
    # The documented draw: offsets = rng.integers(0, 2 * padding + 1, size=(N, 2)).
    assert offsets == [tuple(row) for row in _rng(7).integers(0, 2 * padding + 1, size=(len(IMAGES), 2)).tolist()]
    assert len(set(offsets)) > 1  # per example, not one offset for the batch


def test_crop_at_the_centre_offset_is_the_identity():
    class Centre:  # a stand-in generator that always draws the centre offset
        def integers(self, low, high, size):
            return np.full(size, (high - 1) // 2)

    out = augmentations.get("random_crop").function(IMAGES, Centre(), padding=3)
    np.testing.assert_array_equal(out, IMAGES)


# --- horizontal_flip --------------------------------------------------------------------


def test_flip_mirrors_the_drawn_examples_and_is_an_involution():
    out = augmentations.apply("horizontal_flip", IMAGES, _rng(11))
    flips = _rng(11).random(len(IMAGES)) < 0.5
    assert 0 < flips.sum() < len(IMAGES)
    for example in range(len(IMAGES)):
        expected = IMAGES[example, :, ::-1] if flips[example] else IMAGES[example]
        np.testing.assert_array_equal(out[example], expected)
    np.testing.assert_array_equal(augmentations.apply("horizontal_flip", out, _rng(11)), IMAGES)
    np.testing.assert_array_equal(augmentations.apply("horizontal_flip", IMAGES, _rng(), probability=1.0),
                                  IMAGES[:, :, ::-1])
    np.testing.assert_array_equal(augmentations.apply("horizontal_flip", IMAGES, _rng(), probability=0.0), IMAGES)


# --- point_cloud_rotation ---------------------------------------------------------------


@pytest.mark.parametrize("axis, index", [("y", 1), ("z", 2), ("x", 0)])
def test_rotation_keeps_norms_and_the_axis_coordinate(axis, index):
    out = augmentations.apply("point_cloud_rotation", CLOUDS, _rng(2), axis=axis)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(CLOUDS, axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(out[..., index], CLOUDS[..., index])
    assert np.abs(out - CLOUDS).max() > 0.1  # it did rotate
    # Rigid per cloud: pairwise distances kept.
    for example in range(len(CLOUDS)):
        before, after = CLOUDS[example, :, 0].astype(np.float64), out[example, :, 0].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(after[:, None] - after[None], axis=-1),
                                   np.linalg.norm(before[:, None] - before[None], axis=-1), atol=1e-5)


def test_rotation_about_y_is_pointnets_matrix():
    out = augmentations.apply("point_cloud_rotation", CLOUDS, _rng(9))
    angles = _rng(9).uniform(0, 2 * np.pi, len(CLOUDS))
    for example, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        matrix = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # PointNet's provider.rotate_point_cloud
        np.testing.assert_allclose(out[example, :, 0], CLOUDS[example, :, 0].astype(np.float64) @ matrix, atol=1e-6)
    assert len(np.unique(np.round(angles, 6))) == len(CLOUDS)  # one angle per example


# --- point_cloud_jitter -----------------------------------------------------------------


def test_jitter_is_bounded_and_has_pointnets_spread():
    clouds = np.zeros((20, 500, 1, 3), dtype=np.float64)
    out = augmentations.apply("point_cloud_jitter", clouds, _rng(4))
    noise = out - clouds
    assert np.abs(noise).max() <= 0.05
    assert 0.0095 < noise.std() < 0.0105  # sigma 0.01; clipping at 5 sigma removes almost nothing
    tight = augmentations.apply("point_cloud_jitter", clouds, _rng(4), sigma=0.1, clip=0.02)
    assert np.abs(tight).max() == pytest.approx(0.02)  # most draws clipped
    float32 = augmentations.apply("point_cloud_jitter", CLOUDS, _rng(4))
    assert np.abs(float32.astype(np.float64) - CLOUDS).max() <= 0.05 + 1e-6
    np.testing.assert_array_equal(augmentations.apply("point_cloud_jitter", CLOUDS, _rng(), sigma=0.0), CLOUDS)


# --- no framework ---------------------------------------------------------------------


def test_importing_and_using_them_loads_no_framework(tmp_path):
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        import normbench.augmentations as augmentations
        batches = {"random_crop": np.zeros((2, 4, 4, 3), np.uint8), "horizontal_flip": np.zeros((2, 4, 4, 3), np.uint8),
                   "point_cloud_rotation": np.zeros((2, 5, 1, 3), np.float32),
                   "point_cloud_jitter": np.zeros((2, 5, 1, 3), np.float32)}
        for name in augmentations.names():  # imports every plugin file
            augmentations.apply(name, batches[name], np.random.default_rng(0))
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "jax", "tensorflow"))))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
