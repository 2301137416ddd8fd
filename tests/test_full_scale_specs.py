"""The bundled full-scale ImageNet specs (for a GPU machine with the user's ImageNet) are
the paper's experiments (Appendix A.4-A.6): its networks at their reference
configurations, its per-core batch statistics, its learning rates through the linear
scaling rule, and budgets that cover the paper's steps. Nothing here trains: no machine
running the tests has ImageNet; the streamed image folder they read is tested in
tests/test_dataset_image_folder.py and tests/test_augmented_runs.py."""

from __future__ import annotations

import pytest

from normbench import architectures, datasets
from normbench import spec as spec_module
from normbench.plan import resolve

IMAGENET = datasets.info("imagenet_folder")
FULL_SCALE = sorted(name for name in spec_module.bundled_specs() if spec_module.load(name).dataset == "imagenet_folder")
EPOCH = IMAGENET.train_examples  # examples


def _variant(spec, prefix):
    return [v for v in spec.variants if v.name.startswith(prefix)]


def test_the_three_imagenet_experiments_are_bundled():
    assert FULL_SCALE == ["inception-v2-imagenet", "mobilenet-v1-imagenet-batch-size", "resnet50-imagenet"]


@pytest.mark.parametrize("name", FULL_SCALE)
def test_reference_networks_on_imagenet_with_per_core_moments(name):
    spec = spec_module.load(name)
    for variant in spec.variants:
        arch = architectures.get(spec.model_for(variant))
        assert not arch.small and arch.input_shape == IMAGENET.image_shape and arch.num_classes == IMAGENET.num_classes
        plan = resolve(spec, variant.name)
        batch = spec.batch_size_for(variant)
        assert plan.check_batch(batch) is None
        per_core = batch // 8 if name.startswith("mobilenet") else 128  # the paper's TPU cores: 8, or 128 images each
        # Every plugin with per-replica moments takes them per core.
        for plugin in (variant.normalization, *variant.auxiliary_losses):
            if "replica_batch_size" in dict(plugin.options):
                assert plugin.option("replica_batch_size") == per_core, (variant.name, plugin.name)
        # The linear scaling rule from the paper's rate at its total batch of 1024.
        assert spec.optimizer.reference_batch_size == 1024


def test_resnet50_follows_appendix_a5():
    spec = spec_module.load("resnet50-imagenet")
    plan = resolve(spec, "batch-norm")
    steps_per_epoch = EPOCH / spec.batch_size
    peak = 0.1 * spec.batch_size / 1024
    warmup = round(5 * steps_per_epoch)
    assert plan.learning_rate(0) < peak / 1000 and plan.learning_rate(warmup) == pytest.approx(peak)
    for epoch, multiplier in ((29, 1.0), (31, 0.1), (61, 0.01), (81, 0.001)):
        assert plan.learning_rate(round(epoch * steps_per_epoch)) == pytest.approx(peak * multiplier)
    assert spec.steps == round(90 * steps_per_epoch)
    assert spec.optimizer.nesterov and spec.optimizer.momentum == 0.9
    bn = plan.variant.normalization
    assert (bn.option("scale"), bn.option("shift")) == (False, True)  # "BN added a shift parameter"
    assert _variant(spec, "standardization")[0].auxiliary_losses[0].option("weight") == 1e-6
    # The paper's 89.4K baseline steps were batches of 1024.
    assert spec.steps >= 89_400 * 1024 / spec.batch_size


def test_inception_v2_follows_appendix_a4():
    spec = spec_module.load("inception-v2-imagenet")
    plan = resolve(spec, "none")
    steps_per_epoch = EPOCH / spec.batch_size
    assert spec.optimizer.name == "rmsprop" and plan.learning_rate(0) == pytest.approx(0.006 * spec.batch_size / 1024)
    assert plan.learning_rate(round(12 * steps_per_epoch) + 1) == pytest.approx(plan.learning_rate(0) * 0.98)
    assert all(spec.steps_for(v) >= 1_972_000 for v in spec.variants)  # the paper's baseline steps
    assert _variant(spec, "standardization")[0].auxiliary_losses[0].option("weight") == 1e-5


def test_mobilenet_sweeps_the_papers_per_core_batches_with_the_same_examples():
    spec = spec_module.load("mobilenet-v1-imagenet-batch-size")
    for prefix in ("batch-norm", "group-norm", "standardization", "none"):
        variants = _variant(spec, prefix + "-b")
        assert sorted(spec.batch_size_for(v) // 8 for v in variants) == [2, 4, 8, 16, 32, 64, 128]
        examples = {round(spec.steps_for(v) * spec.batch_size_for(v), -5) for v in variants}
        assert len(examples) == 1  # every batch size sees the same number of examples
        for v in variants:
            plan, batch = resolve(spec, v.name), spec.batch_size_for(v)
            peak = 0.165 * batch / 1024
            assert plan.learning_rate(0) == pytest.approx(peak)
            # x0.94 every 3 epochs, whatever the batch size (Appendix A.6)
            three_epochs = 3 * EPOCH / batch
            assert plan.learning_rate(int(three_epochs) - 1) == pytest.approx(peak)
            assert plan.learning_rate(int(three_epochs) + 1) == pytest.approx(peak * 0.94)
            assert plan.learning_rate(int(6 * EPOCH / batch) + 1) == pytest.approx(peak * 0.94 ** 2)
    assert _variant(spec, "group-norm-b2")[0].normalization.option("groups") == 32
    assert _variant(spec, "standardization-b2")[0].auxiliary_losses[0].option("weight") == 1e-4
