"""Per-replica statistics (`replica_batch_size` of batch norm, batch renorm and the
standardization loss: moments per sub-batch, as the paper's TPU cores computed them, Appendix A.6) against
an independent float64 NumPy reference that loops over the sub-batches: batch norm's
training output and running-statistics update, the loss's value, and the gradients of a
whole network through each against central finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import auxiliary_losses, normalizations
from normbench.normalizations import Slot
from normbench.plan import resolve

EPSILON, LOG_EPSILON, DECAY = 1e-3, 1e-8, 0.8


def _sub_batches(z, size):
    return [z[start:start + size] for start in range(0, len(z), size)]


def _moments(block):
    """Per-channel mean and biased variance over every axis but the last."""
    flat = block.reshape(-1, block.shape[-1])
    mean = flat.mean(axis=0)
    return mean, ((flat - mean) ** 2).mean(axis=0)


def np_replica_batch_norm(z, scale, shift, size, epsilon=EPSILON):
    """Each sub-batch of `size` examples normalized with its own moments; also the mean over
    sub-batches of their means and biased variances (what the running statistics follow)."""
    outputs, means, variances = [], [], []
    for block in _sub_batches(z, size):
        mean, var = _moments(block)
        outputs.append((block - mean) / np.sqrt(var + epsilon) * scale + shift)
        means.append(mean)
        variances.append(var)
    return np.concatenate(outputs), np.mean(means, axis=0), np.mean(variances, axis=0)


def np_replica_std_loss(z, size, log_epsilon=LOG_EPSILON):
    """Equation (2) on each sub-batch, averaged over the sub-batches."""
    losses = []
    for block in _sub_batches(z, size):
        mean, var = _moments(block)
        losses.append(0.5 * np.sum(mean ** 2 + var - np.log(var + log_epsilon) - 1.0))
    return float(np.mean(losses))


def _tolerances(dtype):
    return (1e-10, 1e-12) if dtype == "float64" else (1e-4, 1e-5)


def _activation(rng, shape, dtype):
    # A different offset and spread per sub-batch of 4: statistics over the whole batch
    # instead of per sub-batch give a visibly different answer.
    spread = np.repeat(rng.uniform(0.5, 3.0, size=shape[0] // 4), 4).reshape((-1,) + (1,) * (len(shape) - 1))
    offset = np.repeat(rng.normal(size=shape[0] // 4) * 2, 4).reshape((-1,) + (1,) * (len(shape) - 1))
    return (rng.normal(size=shape) * spread + offset).astype(dtype).astype(np.float64)


@pytest.mark.parametrize("running_variance", ["biased", "unbiased"])
@pytest.mark.parametrize("shape", [(12, 3, 5, 6), (12, 7)], ids=["nhwc", "dense"])
def test_batch_norm_per_replica_output_and_running_statistics(engine, rng, ref, shape, running_variance):
    e = engine
    method = normalizations.get("batch_norm")(replica_batch_size=4, running_decay=DECAY, epsilon=EPSILON,
                                              running_variance=running_variance)
    slot = Slot("layer", "conv" if len(shape) == 4 else "dense", shape[1:], ())
    z = _activation(rng, shape, e.dtype)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    running = {"running_mean": rng.normal(size=shape[-1]), "running_var": rng.uniform(0.5, 2.0, size=shape[-1])}
    y, state = method.train(e.ops, ref.put_activation(e, z), e.import_tree({"scale": scale, "shift": shift}),
                            e.import_tree(running), slot)
    expected, mean, var = np_replica_batch_norm(z, scale, shift, 4)
    if running_variance == "unbiased":
        count = int(np.prod(shape[1:-1])) * 4  # values per channel in one sub-batch
        var = var * count / (count - 1)
    rtol, atol = _tolerances(e.dtype)
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=rtol, atol=atol)
    got = e.export_tree(state)
    np.testing.assert_allclose(got["running_mean"], DECAY * running["running_mean"] + (1 - DECAY) * mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["running_var"], DECAY * running["running_var"] + (1 - DECAY) * var, rtol=rtol, atol=atol)
    # Whole-batch statistics would not pass: the sub-batches differ on purpose.
    assert not np.allclose(expected, np_replica_batch_norm(z, scale, shift, shape[0])[0], rtol=1e-2)


def np_replica_batch_renorm(z, scale, shift, running_mean, running_var, size, r_max, d_max, epsilon=EPSILON):
    """Batch renorm of each sub-batch with its own moments, r and d against the shared
    running statistics; also the mean over sub-batches of their means and biased variances."""
    outputs, means, variances = [], [], []
    sigma = np.sqrt(running_var + epsilon)
    for block in _sub_batches(z, size):
        mean, var = _moments(block)
        sigma_b = np.sqrt(var + epsilon)
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mean - running_mean) / sigma, -d_max, d_max)
        outputs.append(((block - mean) / sigma_b * r + d) * scale + shift)
        means.append(mean)
        variances.append(var)
    return np.concatenate(outputs), np.mean(means, axis=0), np.mean(variances, axis=0)


@pytest.mark.parametrize("shape", [(12, 3, 5, 6), (12, 7)], ids=["nhwc", "dense"])
def test_batch_renorm_per_replica_output_and_running_statistics(engine, rng, ref, shape):
    e = engine
    # full limits from the first step (warmup_steps 0), tight enough that some r and d clip
    method = normalizations.get("batch_renorm")(replica_batch_size=4, running_decay=DECAY, epsilon=EPSILON,
                                                warmup_steps=0, r_max=1.5, d_max=0.5)
    slot = Slot("layer", "conv" if len(shape) == 4 else "dense", shape[1:], ())
    z = _activation(rng, shape, e.dtype)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    running = {"running_mean": rng.normal(size=shape[-1]), "running_var": rng.uniform(0.5, 2.0, size=shape[-1]),
               "step": np.zeros(1)}
    y, state = method.train(e.ops, ref.put_activation(e, z), e.import_tree({"scale": scale, "shift": shift}),
                            e.import_tree(running), slot)
    expected, mean, var = np_replica_batch_renorm(z, scale, shift, running["running_mean"], running["running_var"], 4,
                                                  1.5, 0.5)
    rtol, atol = _tolerances(e.dtype)
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=rtol, atol=atol)
    got = e.export_tree(state)
    np.testing.assert_allclose(got["running_mean"], DECAY * running["running_mean"] + (1 - DECAY) * mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["running_var"], DECAY * running["running_var"] + (1 - DECAY) * var, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(got["step"], [1.0])
    whole = np_replica_batch_renorm(z, scale, shift, running["running_mean"], running["running_var"], shape[0], 1.5, 0.5)
    assert not np.allclose(expected, whole[0], rtol=1e-2)
    # one replica of the whole batch is plain batch renorm
    plain = normalizations.get("batch_renorm")(running_decay=DECAY, epsilon=EPSILON, warmup_steps=0, r_max=1.5, d_max=0.5)
    y_plain, _ = plain.train(e.ops, ref.put_activation(e, z), e.import_tree({"scale": scale, "shift": shift}),
                             e.import_tree(running), slot)
    np.testing.assert_allclose(e.activation_to_numpy(y_plain), whole[0], rtol=rtol, atol=atol)


def test_an_option_added_later_leaves_earlier_run_keys_alone(spec_factory):
    """batch renorm's replica_batch_size came after mnist-norms was published: unset, it is
    not part of the resolved variant, so those runs keep their keys; set, it is."""
    plain = spec_factory(model="cnn3", batch_size=8, variants=[{"name": "r", "normalization": "batch_renorm"}])
    assert "replica_batch_size" not in dict(plain.variants[0].normalization.options)
    split = spec_factory(model="cnn3", batch_size=8, variants=[
        {"name": "r", "normalization": {"name": "batch_renorm", "replica_batch_size": 4}}])
    assert dict(split.variants[0].normalization.options)["replica_batch_size"] == 4
    assert resolve(plain, "r").method.replica_batch_size is None


@pytest.mark.parametrize("shape", [(12, 3, 5, 6), (12, 7)], ids=["nhwc", "dense"])
def test_standardization_loss_per_replica_value(engine, rng, ref, shape):
    e = engine
    loss = auxiliary_losses.get("standardization")(weight=1.0, replica_batch_size=4, log_epsilon=LOG_EPSILON)
    z = _activation(rng, shape, e.dtype)
    value = float(e.export_tree({"v": loss.value(e.ops, {"layer": ref.put_activation(e, z)})})["v"])
    rtol, _ = _tolerances(e.dtype)
    assert value == pytest.approx(np_replica_std_loss(z, 4), rel=rtol)
    assert value != pytest.approx(np_replica_std_loss(z, shape[0]), rel=1e-2)


def _network_gradients(engine, rng, ref, spec_factory, variant, normalize, std_loss_size=None):
    plan = resolve(spec_factory(model="cnn3", batch_size=8, variants=[variant]), variant["name"])
    params, state = plan.initial_parameters(seed=5)
    ref.perturb_scales_and_shifts(params, rng)
    images, labels = rng.normal(size=(8, 28, 28, 1)) + 0.5, rng.integers(0, 10, size=8)

    def objective(p):
        taps = []

        def slot(z, p_, layer):
            y = normalize(z, p_, layer)
            taps.append(y)
            return y

        total = ref.chain_objective(plan, p, images, labels, slot)
        if std_loss_size is not None:
            total += 0.5 * sum(np_replica_std_loss(y, std_loss_size) for y in taps)
        return total

    e = engine
    x, y = e.put_images(images), e.put_labels(labels)
    grads, seen = e.trainer(plan, params, state, x, y).gradients(x, y)
    decay = plan.spec.optimizer.weight_decay * sum(np.sum(v * v) for k, v in params.items() if k.endswith("/kernel")) / 2
    np.testing.assert_allclose(seen["total_loss"], objective(params) + decay, rtol=1e-11)
    # `gradients` returns the full objective's; the reference objective leaves L2 out.
    grads = {k: g - plan.spec.optimizer.weight_decay * params[k] if k.endswith("/kernel") else g for k, g in grads.items()}
    ref.check_gradients(grads, objective, params, rng, rtol=1e-5, atol=1e-8)


def test_network_gradients_through_per_replica_batch_norm(engine64, rng, ref, spec_factory):
    variant = {"name": "bn", "normalization": {"name": "batch_norm", "replica_batch_size": 4}}
    _network_gradients(engine64, rng, ref, spec_factory, variant, lambda z, p, layer: np_replica_batch_norm(
        z, p[f"{layer}/scale"], p[f"{layer}/shift"], 4)[0])


def test_network_gradients_through_the_per_replica_standardization_loss(engine64, rng, ref, spec_factory):
    variant = {"name": "std", "normalization": "none",
               "auxiliary_losses": [{"name": "standardization", "weight": 0.5, "replica_batch_size": 4}]}
    _network_gradients(engine64, rng, ref, spec_factory, variant, lambda z, p, layer: z, std_loss_size=4)
