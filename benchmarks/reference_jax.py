"""A hand-written JAX training step for the paper's models: the yardstick for normbench's
JAX overhead ("normbench step time / hand-written step time").

Written directly in jax.numpy with the hyperparameters of the bundled mnist-cnn /
mnist-mlp specs; only the data (MNIST as the runner scales it), the initial weights and
the batch order come from normbench, so both sides do the same arithmetic on the same
batches. Like normbench, batches are gathered on the device from the resident training
set and only the indices cross the host boundary each step.

    make_reference_step(model, normalization, batch_size=128, device=None) -> (step, synchronize)

Run as a script to measure the ratio side by side in one process (alternating rounds,
medians, compile times separately). It prints two ratios: against the loop as written
(nothing read back, so the host queues step i+1 while step i runs) and against the same
loop reading its loss each step, as `Trainer.step` must (it returns Python floats, and
the runner synchronizes around every step); their gap is the price of that
synchronization, not of normbench's code:

    nice -n 10 python benchmarks/reference_jax.py [--models cnn3,mlp3] [--steps 20] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LEARNING_RATE = 1e-3     # plain SGD (paper)
WEIGHT_DECAY = 4e-5      # 0.5 * wd * sum(kernel^2) (paper)
BN_EPSILON = 1e-3        # variance epsilon
BN_DECAY = 0.99          # running = decay * running + (1 - decay) * batch
LOG_EPSILON = 1e-8       # log(var + eps) in equation (2)
STD_LOSS_WEIGHT = 1.0    # (paper)
NORMALIZATIONS = ("none", "batch_norm_shift", "batch_norm_scale_shift", "standardization_loss")
# (name, kind, stride, pads): the paper's models with TensorFlow SAME padding made explicit.
LAYERS = {
    "cnn3": [("conv1", "conv", 2, ((1, 2), (1, 2))), ("conv2", "conv", 2, ((1, 2), (1, 2))),
             ("conv3", "conv", 2, ((2, 2), (2, 2)))],
    "mlp3": [("dense1", "dense", None, None), ("dense2", "dense", None, None), ("dense3", "dense", None, None)],
}
HIGHEST = lax.Precision.HIGHEST


def _initial(model: str, normalization: str, seed: int = 0):
    from normbench import spec as specs
    from normbench.identity import legacy_columns
    from normbench.plan import resolve

    # normbench's own initial weights (the bundled spec's variant of this method), so both sides start alike.
    spec = specs.load({"cnn3": "mnist-cnn", "mlp3": "mnist-mlp"}[model])
    variant = next(v for v in spec.variants if (legacy_columns(v) or ("",))[0] == normalization)
    params, state = resolve(spec, variant).initial_parameters(seed)
    return ({k: np.float32(v) for k, v in params.items()}, {k: np.float32(v) for k, v in state.items()})


def _loss(params, state, images, labels, model, normalization):
    bn = normalization.startswith("batch_norm")
    x, new_state, std_loss = images, {}, 0.0
    for name, kind, stride, pads in LAYERS[model]:
        if kind == "conv":
            z = lax.conv_general_dilated(x, params[f"{name}/kernel"], (stride, stride), pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        else:
            z = jnp.dot(x.reshape(x.shape[0], -1), params[f"{name}/kernel"], precision=HIGHEST)
        axes = tuple(range(z.ndim - 1))
        if bn:
            mean = jnp.mean(z, axes)
            var = jnp.mean(jnp.square(z - mean), axes)
            for stat, value in (("mean", mean), ("var", var)):
                key = f"{name}/running_{stat}"
                new_state[key] = BN_DECAY * state[key] + (1 - BN_DECAY) * lax.stop_gradient(value)
            z = (z - mean) * lax.rsqrt(var + BN_EPSILON)
            if f"{name}/scale" in params:
                z = z * params[f"{name}/scale"]
            z = z + params[f"{name}/shift"]
        else:
            z = z + params[f"{name}/bias"]
        if normalization == "standardization_loss":
            mean = jnp.mean(z, axes)
            var = jnp.mean(jnp.square(z - mean), axes)
            std_loss = std_loss + 0.5 * jnp.sum(mean * mean + var - jnp.log(var + LOG_EPSILON) - 1.0)
        x = jax.nn.relu(z)
    logits = jnp.dot(x.reshape(x.shape[0], -1), params["logits/kernel"], precision=HIGHEST) + params["logits/bias"]
    log_probs = jax.nn.log_softmax(logits)
    cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    decay = 0.5 * WEIGHT_DECAY * sum(jnp.sum(jnp.square(v)) for k, v in params.items() if k.endswith("/kernel"))
    return cross_entropy + decay + STD_LOSS_WEIGHT * std_loss, new_state


def _train_step(params, state, train_images, train_labels, indices, *, model, normalization):
    (loss, state), grads = jax.value_and_grad(_loss, has_aux=True)(
        params, state, train_images[indices], train_labels[indices], model, normalization)
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), state, loss


_DATA = {}


def _data():
    if "mnist" not in _DATA:
        from normbench import spec
        from normbench.runner import load_data

        data = load_data(spec.load("mnist-cnn"))
        _DATA["mnist"] = (data.train_images, data.train_labels.astype(np.int32))
    return _DATA["mnist"]


def make_reference_step(model: str, normalization: str, batch_size: int = 128, device=None, seed: int = 0,
                        read_loss: bool = False):
    """(step(i), synchronize()) for a hand-written SGD loop; step(i) trains on the i-th
    batch of run `seed`'s batch order. By default nothing is read back (the fastest a
    loop can be); `read_loss=True` converts each step's loss to a Python float, as
    normbench's `Trainer.step` must. `device`: a jax Device, or None for the default.
    `step.compile_seconds` holds the compile time."""
    from normbench.data_order import BatchOrder, seed_streams

    device = device or jax.devices()[0]
    images, labels = _data()
    images, labels = jax.device_put(images, device), jax.device_put(labels, device)
    params, state = _initial(model, normalization, seed)
    holder = {"params": jax.device_put(params, device), "state": jax.device_put(state, device)}
    order = BatchOrder(seed_streams(seed)[1], int(labels.shape[0]), batch_size)
    jitted = jax.jit(lambda p, s, x, y, i: _train_step(p, s, x, y, i, model=model, normalization=normalization),
                     donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = jitted.lower(holder["params"], holder["state"], images, labels,
                            jax.device_put(np.zeros(batch_size, np.int32), device)).compile()
    compile_seconds = time.perf_counter() - start

    def step(i: int) -> None:
        indices = jax.device_put(np.asarray(order.indices(i), np.int32), device)
        holder["params"], holder["state"], loss = compiled(holder["params"], holder["state"], images, labels, indices)
        if read_loss:
            float(loss)

    def synchronize() -> None:
        jax.block_until_ready((holder["params"], holder["state"]))

    step.compile_seconds = compile_seconds
    return step, synchronize


def _make_normbench_step(model: str, normalization: str, batch_size: int = 128, seed: int = 0):
    from normbench import backends, spec
    from normbench.data_order import BatchOrder, seed_streams
    from normbench.program import TrainingProgram

    base = spec.load("mnist-cnn" if model.startswith("cnn") else "mnist-mlp")
    weight = STD_LOSS_WEIGHT if normalization == "standardization_loss" else 0.0
    s = base.replace(model=model, batch_size=batch_size, variants=[
        {"name": normalization, "normalization": normalization, "standardization_loss_weight": weight, "steps": None}])
    program = TrainingProgram(s, s.variants[0])
    engine = backends.get_engine("jax")
    images, labels = _data()
    params, state = program.initial_parameters(seed)
    trainer = engine.trainer(program, params, state, engine.put_images(images), engine.put_labels(labels))
    order = BatchOrder(seed_streams(seed)[1], len(labels), batch_size)
    compile_seconds = trainer.compile(batch_size)

    def step(i: int) -> None:
        trainer.step(order.indices(i), program.learning_rate(i))

    step.compile_seconds = compile_seconds
    return step, engine.synchronize


def _time_steps(step, synchronize, first: int, count: int) -> float:
    synchronize()
    start = time.perf_counter()
    for i in range(first, first + count):
        step(i)
    synchronize()
    return (time.perf_counter() - start) / count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn3,mlp3")
    parser.add_argument("--normalizations", default=",".join(NORMALIZATIONS))
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per side (alternating); the median is reported")
    args = parser.parse_args(argv)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; commit {commit}; "
          f"{args.rounds} alternating rounds of {args.steps} steps, batch 128, after 5 warm-up steps")
    print("| model | normalization | normbench ms/step | hand-written ms/step | ratio | hand-written + loss read ms/step "
          "| ratio | compile normbench s | compile hand-written s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for normalization in args.normalizations.split(","):
            sides = {"normbench": _make_normbench_step(model, normalization),
                     "reference": make_reference_step(model, normalization),
                     "reference_read": make_reference_step(model, normalization, read_loss=True)}
            times = {name: [] for name in sides}
            for name, (step, sync) in sides.items():
                _time_steps(step, sync, 0, 5)  # warm-up
            position = 5
            for _ in range(args.rounds):  # alternate, so load changes hit both sides alike
                for name, (step, sync) in sides.items():
                    times[name].append(_time_steps(step, sync, position, args.steps))
                position += args.steps
            nb, ref, read = (statistics.median(times[k]) for k in ("normbench", "reference", "reference_read"))
            print(f"| {model} | {normalization} | {1e3 * nb:.2f} | {1e3 * ref:.2f} | {nb / ref:.3f} | {1e3 * read:.2f} | "
                  f"{nb / read:.3f} | {sides['normbench'][0].compile_seconds:.2f} | {sides['reference'][0].compile_seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
