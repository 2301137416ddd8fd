"""Cross-backend numerical agreement: the same program, weights and batches on every backend.

Two checks, each run for every pair of backends:

- `compare_step`: one training-mode forward/backward pass from the canonical initial
  weights (`TrainingProgram.initial_parameters`) on one batch. Compares the logits,
  every hidden layer's pre-activation and its per-channel mean and variance, the
  standardization loss, the cross entropy, the total loss, every gradient and the
  updated batch-norm running statistics (the keys of `Trainer.gradients`). A pair whose
  gradients fail at ReLU ties is compared again without the examples holding them
  (`recheck_step_ties`); float32 bounds grow with the network's depth (`tolerance`). A
  float32 pair still failing is held to the step's own conditioning, and the same step
  is then compared in float64 too (`recheck_step_conditioning`).
- `compare_trajectory`: K optimizer steps on the batches a real run would see
  (`BatchOrder` from the run seed's data stream, learning rates from the program's
  schedule), comparing the three losses at every step, then the final parameters and
  batch-norm state. A pair that fails is re-run in lockstep, restarting one side from
  the other's state after each ReLU tie (see "ties along a trajectory" below). A
  trajectory whose loss turns non-finite (a spec that trains unstably) must do so at the
  same step everywhere and is compared over the steps before (see "divergence" below).

Relative error. For a quantity with values `a` (first backend) and `b` (second), the
relative error is ``max|a - b| / max(magnitude, tiny)``: one number per quantity, the
worst element divided by the quantity's magnitude (not element by element, which blows
up on entries that are zero up to rounding). The magnitude is ``max(max|a|, max|b|)``
except where that is itself a rounding residue:

- ``mean/<layer>``: the root mean square of the layer's values, ``max_c sqrt(mean_c^2 +
  var_c)``. After batch norm the per-channel means are zero up to rounding, so their
  own size says nothing; the error of a mean scales with the values averaged.
- ``gradient/<layer>/<parameter>``: the largest gradient of the layer. An offset's
  gradient can be zero in real arithmetic (a batch norm downstream cancels any shift
  common to the batch), and its rounding then scales with the layer's other gradients.
- ``<loss>_loss``, an auxiliary loss's value: the magnitude its plugin declares
  (`AuxiliaryLoss.parity_magnitude`), where its terms cancel; the standardization loss
  declares the summed magnitudes of equation (2)'s terms, whose own value is ~0 for any
  batch-normalized layer.

Trajectory losses are compared step by step with the same rule per step (scalars:
``|a - b| / max(|a|, |b|)``); the row reports the worst step. A difference no larger
than two of the precision's smallest normal numbers (`underflow_floor`) is underflow, not
a formula difference, and counts as none.

Framework-neutral: backends are reached only through `normbench.backends`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict

import numpy as np

from normbench import auxiliary_losses
from normbench import backends as backend_registry
from normbench import datasets
from normbench.data_order import BatchOrder, seed_streams
from normbench.plan import resolve
from normbench.runner import LoadedData, load_data
from normbench.spec import ExperimentSpec

TINY = np.finfo(np.float64).tiny

# ----------------------------------------------------------------------------- tolerances

# float64: every backend computes the same formulas in double precision, so differences
# are reduction order only: measured <= 7e-14 (torch-jax and jax-tensorflow over cnn3 and
# mlp3, all four normalizations; the worst is the ill-conditioned bias gradient described
# under "gradient" below; PyTorch computes batch norm in float64 with the composed formula,
# see backends/torch/ops.py, as its fused kernel alone reached 8e-13). A real formula
# difference (an epsilon, a biased vs unbiased variance, a padding offset) shows up at
# >= 1e-6, far above 1e-9.
FLOAT64_TOLERANCE = 1e-9

# float32 tolerances per kind of quantity (relative error as defined above): 10x the
# largest error measured, rounded up to 1, 2 or 5 x 10^k. Measured on CPU between torch
# and jax over models cnn3, mlp3, cnn-tiny and mlp-tiny, all four normalizations, seeds
# 0-2, batch 128 (and the tiny optimizer specs of tests/test_parity.py), and between
# jax and tensorflow over cnn3 and mlp3, seeds 0-2. PyTorch ran with its batch norm
# written out as the two-pass formula and with oneDNN off. Deliberately not absorbed:
# PyTorch's fused CPU batch norm (F.batch_norm) is ~1e-3 off float64 on cnn3 (see the
# xfail note in tests/test_parity.py); oneDNN's convolution weight gradients are up to
# 3e-4 off float64 (serial float32 accumulation over batch x positions), inside the
# gradient tolerance below but not what set it.
FLOAT32_TOLERANCES = {
    # single step
    "logits": 1e-5,                # measured 8.8e-7
    "preactivation": 2e-5,         # measured 1.0e-6 (jax-tensorflow)
    "mean": 5e-6,                  # measured 3.0e-7 (relative to the layer's RMS)
    "var": 1e-5,                   # measured 7.2e-7
    "cross_entropy": 5e-6,         # measured 2.1e-7
    "total_loss": 5e-6,            # measured 2.1e-7
    "state": 5e-6,                 # measured 4.1e-7 (running means relative to the running RMS, see _magnitude)
    # The value of an auxiliary loss (`<name>_loss`) whose plugin sets no
    # `parity_float32_tolerance`. Measured for the decorrelation loss, with log det from a
    # QR (Ops.log_det_gram): 8.5e-8 on cnn3, 3.7e-7 on cnn3 after batch norm (a float32
    # Cholesky of the covariance gave 4.5e-6 and 5e-4).
    "auxiliary_loss": 5e-5,
    # Measured 2.2e-4 on the bias gradient of cnn3's last layer under the standardization
    # loss: d/db of the variance term is (1 - 1/var) * sum(z - mean) / n, exactly 0 in
    # real arithmetic, so it is rounding noise amplified by 1/var ~ 2000 (each backend is
    # ~1e-4 off float64 there). Every other gradient: <= 8.8e-6. Since the written-out
    # moment gradients keep the centring mean's term (Ops.channel_moments), `normbench
    # parity mnist-cnn --steps 2` gives JAX and TensorFlow <= 6.7e-7 off float64 on every
    # standardization-loss gradient (TensorFlow 1.5e-6 before); PyTorch stayed 1.9e-4 off
    # on conv1's bias. That was oneDNN's bias gradient inside the convolution's backward
    # (its sum over 128 x 14 x 14 terms per channel, which the loss makes large and
    # cancelling): the same step with the bias added after F.conv2d, its gradient summed
    # by torch, was 2.0e-7 off (conv2's bias 4.1e-6 -> 2.4e-7). conv1, one input channel,
    # now takes its kernel and bias gradients outside oneDNN's backward for speed
    # (backends/torch/ops.py, `_OneChannelConvolution`), and PyTorch's worst is conv2's
    # bias, 4.4e-6, still oneDNN's fused sum: PyTorch users write the bias inside the
    # convolution, and so does the backend; the bound covers it. A gradient row that fails
    # alone with "pre-activation(s) on opposite sides of 0" in its detail is a ReLU flip (a
    # value within rounding of 0 lands on the other side), not a formula difference.
    "gradient": 5e-3,
    # Trajectories (50 steps), measured over cnn3 and mlp3, all normalizations, seeds 0-2,
    # for every pair of torch (as shipped, and with the two-pass batch norm), jax and
    # tensorflow. Rounding differences feed back through the updates; two discrete
    # effects dominate: a ReLU flip (over 50 steps x ~10^6 pre-activations one happens
    # now and then; cnn3, batch_norm_shift, seed 1, step 37: one flip moved a shift
    # gradient by 6e-3) and oneDNN's float32 convolution weight gradients (torch and
    # tensorflow on CPU; up to 3e-4 off float64 in single steps).
    "trajectory_loss": 5e-3,       # measured 3.1e-4 (jax-tensorflow; 4.2e-4 with torch's fused batch norm)
    "final_params": 2e-2,          # kernels and scales: measured 1.9e-3
    # Biases and batch-norm shifts start at 0 and after 50 steps at lr 1e-3 are ~1e-3 in
    # size: their relative error is that of a sum of 50 small, nearly cancelling batch
    # gradient sums, where one flip or oneDNN spike moves them by ~1e-5 absolute.
    "final_offsets": 2e-1,         # measured 2.0e-2 (jax-tensorflow; 6.2e-2 with torch's fused batch norm)
    "final_state": 2e-2,           # measured 1.5e-3 (running means start at 0 too)
}


# float32 against float64 (rows '<backend>-float64', see compare_with_reference). A pair
# differs by at most the sum of its two sides' drifts, and the drift has the same sources
# (rounding, ReLU flips, oneDNN's weight gradients), so the bounds are the pairs' own.
# Measured on CPU, every backend against TensorFlow's float64 run, seed 0, 50 steps:
# mnist-cnn and mnist-mlp (3 variants each) and cnn3 batch_norm_shift with RMSProp at
# batch 32 (the largest values are in the comments; each is >= 10x below its bound);
# tests/test_parity_optimizers.py holds every optimizer and schedule to them.
FLOAT32_DRIFT_TOLERANCES = {
    "logits": FLOAT32_TOLERANCES["logits"],                      # measured 9.5e-7
    "preactivation": FLOAT32_TOLERANCES["preactivation"],        # measured 9.1e-7
    "mean": FLOAT32_TOLERANCES["mean"],                          # measured 3.8e-7
    "var": FLOAT32_TOLERANCES["var"],                            # measured 5.1e-7
    "auxiliary_loss": FLOAT32_TOLERANCES["auxiliary_loss"],
    "cross_entropy": FLOAT32_TOLERANCES["cross_entropy"],        # measured 9.7e-8
    "total_loss": FLOAT32_TOLERANCES["total_loss"],              # measured 1.0e-7
    "state": FLOAT32_TOLERANCES["state"],                        # measured 1.1e-6
    "gradient": FLOAT32_TOLERANCES["gradient"],                  # measured 6.5e-6 (conv3/bias, standardization loss)
    "trajectory_loss": FLOAT32_TOLERANCES["trajectory_loss"],    # measured 2.5e-7
    "final_params": FLOAT32_TOLERANCES["final_params"],          # measured 6.2e-6
    # Larger than between backends (8.6e-7): every float32 backend starts from the same
    # rounded weights and images, an error the pairs share and do not see.
    "final_offsets": FLOAT32_TOLERANCES["final_offsets"],        # measured 1.5e-4 (mnist-cnn, none, conv1/bias)
    "final_state": FLOAT32_TOLERANCES["final_state"],            # measured 1.3e-6
}


def quantity_kind(quantity: str) -> str:
    """The tolerance class of a quantity name: 'gradient/conv1/kernel' -> 'gradient'."""
    head = quantity.split("/", 1)[0]
    if head == "final":
        return "final_offsets" if quantity.endswith(("/bias", "/shift")) else "final_params"
    if head.endswith("_loss") and head not in FLOAT32_TOLERANCES:
        return "auxiliary_loss"  # an auxiliary loss's value: the plugin's name + "_loss"
    return {"trajectory": "trajectory_loss"}.get(head, head)


def _auxiliary_loss(quantity: str):
    """The auxiliary-loss plugin whose value `quantity` ('<name>_loss') is, or None."""
    name = quantity[: -len("_loss")] if quantity.endswith("_loss") else None
    return auxiliary_losses.get(name) if name in auxiliary_losses.names() else None


def _float32_bound(quantity: str, table: dict[str, float]) -> float:
    kind = quantity_kind(quantity)
    if kind == "auxiliary_loss":
        plugin = _auxiliary_loss(quantity)
        if plugin is not None and plugin.parity_float32_tolerance is not None:
            return plugin.parity_float32_tolerance
    return table[kind]


# Depth. The float32 single-step bounds were measured on networks 4 layers deep (cnn3 and
# mlp3: three hidden layers and the head). Each convolution or dense layer on the way adds
# its own rounding to what flows through it, so a deeper network's single step is held to
# the bound times depth / 4 (never less than the bound): inception-v2-small, 35 layers deep,
# measured 1.2e-5 on its logits and 2.1e-5 on its pre-activations in float32, against 1e-5
# and 2e-5 calibrated on cnn3 (8.8e-7 and 1.0e-6 there). Trajectory bounds are not scaled:
# they have the trajectory's own conditioning (below).
CALIBRATION_DEPTH = 4
TRAJECTORY_KINDS = ("trajectory_loss", "final_params", "final_offsets", "final_state")


def _depth_factor(quantity: str, depth: int) -> float:
    return 1.0 if quantity_kind(quantity) in TRAJECTORY_KINDS else max(1.0, depth / CALIBRATION_DEPTH)


def tolerance(quantity: str, dtype: str, depth: int = CALIBRATION_DEPTH) -> float:
    """The bound of `quantity` in `dtype`, for a network `depth` layers deep (`Architecture.depth`)."""
    if dtype == "float64":
        return FLOAT64_TOLERANCE
    return _float32_bound(quantity, FLOAT32_TOLERANCES) * _depth_factor(quantity, depth)


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One quantity compared between two backends."""
    pair: str  # "torch-jax"
    variant: str
    quantity: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool
    detail: str = ""  # where the worst difference sits (trajectory: the step)


def _pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def _magnitude(name: str, a: np.ndarray, b: np.ndarray, outs_a: dict, outs_b: dict, log_epsilon: float) -> float:
    if name.startswith(("state/", "final_state/")) and name.endswith("/running_mean"):
        # Like `mean/`: a running mean near zero (weight standardization makes each kernel
        # sum to zero) is measured against the running RMS, sqrt(mean^2 + var).
        var_name = name[: -len("running_mean")] + "running_var"
        rms = [np.sqrt(o[name] ** 2 + np.abs(o[var_name])) for o in (outs_a, outs_b) if var_name in o and name in o]
        return float(max(np.max(np.abs(a)), np.max(np.abs(b)), *(np.max(r) for r in rms)))
    if name.startswith("gradient/"):
        # A gradient is measured against the largest gradient of its layer. An offset's
        # gradient sums one term per example and position, and where a normalization
        # downstream removes any shift common to the batch the sum is zero in real
        # arithmetic (PointNet: conv5's max-pooled features feed fc1's batch norm, so
        # conv5's shift gradient is 4e-14 in float64 from any start), leaving a rounding
        # residue of the layer's gradient terms, not of its own size.
        layer = name.rpartition("/")[0] + "/"
        return float(max(np.max(np.abs(a)), np.max(np.abs(b)),
                         *(np.max(np.abs(o[k])) for o in (outs_a, outs_b) for k in o
                           if k.startswith(layer) and np.size(o[k]))))
    if name.startswith("mean/"):
        layer = name[len("mean/"):]
        rms = [np.sqrt(o[f"mean/{layer}"] ** 2 + o[f"var/{layer}"]) for o in (outs_a, outs_b) if f"var/{layer}" in o]
        return float(max(np.max(np.abs(a)), np.max(np.abs(b)), *(np.max(r) for r in rms)))
    plugin = _auxiliary_loss(name)
    if plugin is not None:
        declared = [plugin.parity_magnitude({k[len("mean/"):]: (o[k], o["var/" + k[len("mean/"):]])
                                             for k in o if k.startswith("mean/")}, log_epsilon) for o in (outs_a, outs_b)]
        return max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), *(d for d in declared if d is not None))
    return float(max(np.max(np.abs(a)), np.max(np.abs(b)))) if a.size else 0.0


# Underflow. Where a network's signal has vanished (plain MobileNet-v1 at initialization:
# conv_dw_13's pre-activations are ~1e-17, their variance ~1e-34), the squares a variance
# sums fall below float32's smallest normal number, 1.2e-38, and keep no relative
# precision there (or are flushed to zero, as oneDNN and XLA may do): backends then
# differ by ~8e-39 on a variance of 7e-35, a relative 1e-4 that says nothing about the
# formula. So a difference of at most `underflow` (two smallest normals of the compared
# precision, one lost by each side) counts as none; the row still shows it as max_abs.
def underflow_floor(dtype: str) -> float:
    """The largest difference between two values of `dtype` that underflow alone explains."""
    return 2 * float(np.finfo(np.dtype(dtype)).tiny)


def _compare_arrays(name, a, b, outs_a, outs_b, log_epsilon, underflow: float = 0.0) -> tuple[float, float]:
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    difference = np.abs(a - b)
    max_abs = float(np.max(difference))
    if not np.isfinite(max_abs):
        return float("inf"), float("inf")
    counted = float(np.max(np.where(difference <= underflow, 0.0, difference)))
    return max_abs, counted / max(_magnitude(name, a, b, outs_a, outs_b, log_epsilon), TINY)


def _flipped_layers(outs_a: dict, outs_b: dict):
    """(layer, a, b, mask of pre-activations on opposite sides of 0) for every layer whose
    pre-activations both sides report with the same shape."""
    for key in outs_a:
        if key.startswith("preactivation/") and key in outs_b and outs_a[key].shape == outs_b[key].shape:
            a, b = outs_a[key], outs_b[key]
            yield key[len("preactivation/"):], a, b, (a > 0) != (b > 0)


def _relu_flips(outs_a: dict, outs_b: dict) -> int:
    """Pre-activations on opposite sides of 0 in the two backends: each flips one ReLU
    derivative, a discrete change float32 rounding can cause for values within ~1e-7 of 0."""
    return sum(int(np.sum(flipped)) for _, _, _, flipped in _flipped_layers(outs_a, outs_b))


def compare_outputs(outputs: dict[str, dict[str, np.ndarray]], dtype: str, variant: str, log_epsilon: float,
                    depth: int = CALIBRATION_DEPTH) -> list[Row]:
    """Rows for every pair of backends in `outputs` (backend -> quantity -> array), in
    the given order. A quantity missing from one backend, a shape mismatch or a
    non-finite value is a failing row (infinite error)."""
    rows = []
    for a_name, b_name in itertools.combinations(outputs, 2):
        rows += _compare_pair((a_name, b_name), outputs[a_name], outputs[b_name], variant, log_epsilon,
                              lambda name: tolerance(name, dtype, depth), underflow_floor(dtype))
    return rows


def _compare_pair(names: tuple[str, str], outs_a: dict, outs_b: dict, variant: str, log_epsilon: float,
                  tolerance_of, underflow: float = 0.0) -> list[Row]:
    """Rows comparing every quantity of `outs_a` with `outs_b`; `tolerance_of(quantity)`
    gives the bound, `underflow` the differences that count as none (`underflow_floor`)."""
    rows = []
    pair = _pair_name(*names)
    flips = _relu_flips(outs_a, outs_b)
    # The total loss sums every auxiliary loss: it is held to the loosest bound among its
    # terms, since each term's rounding reaches the total (5e-6 is the bound of a total
    # made of cross entropy and the standardization loss alone).
    auxiliary = [tolerance_of(q) for q in outs_a if quantity_kind(q) == "auxiliary_loss"]
    for name in sorted(set(outs_a) | set(outs_b)):
        tol = max([tolerance_of(name), *auxiliary]) if name == "total_loss" else tolerance_of(name)
        if name not in outs_a or name not in outs_b:
            missing = names[1] if name in outs_a else names[0]
            rows.append(Row(pair, variant, name, float("inf"), float("inf"), tol, False, f"missing in {missing}"))
            continue
        a, b = np.asarray(outs_a[name], np.float64), np.asarray(outs_b[name], np.float64)
        if name.startswith("trajectory/"):
            rows.append(_compare_series(pair, variant, name, a, b, tol))
            continue
        max_abs, max_rel = _compare_arrays(name, a, b, outs_a, outs_b, log_epsilon, underflow)
        detail = f"{flips} pre-activation(s) on opposite sides of 0" if flips and name.startswith("gradient/") else ""
        rows.append(Row(pair, variant, name, max_abs, max_rel, tol, bool(max_rel <= tol), detail))
    return rows


def _compare_series(pair, variant, name, a, b, tol) -> Row:
    """Per-step comparison of a loss series; every step must be within tolerance (`tol`:
    one bound, or one per step). The row reports the step closest to (or furthest past)
    its bound."""
    if a.shape != b.shape:
        return Row(pair, variant, name, float("inf"), float("inf"), float(np.max(tol)), False,
                   f"lengths {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.maximum(np.abs(a), np.abs(b)), TINY)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    tol = np.broadcast_to(np.asarray(tol, np.float64), rel.shape)
    worst = int(np.argmax(rel / tol))
    return Row(pair, variant, name, float(np.max(diff)), float(rel[worst]), float(tol[worst]), bool(np.all(rel <= tol)),
               f"worst at step {worst + 1} of {len(a)}")


# ----------------------------------------------------------------------------- running one backend

_DATA: dict[tuple[str, str | None], LoadedData] = {}


def _training_data(spec: ExperimentSpec, data_dir: str | None = None) -> LoadedData:
    """The data set scaled in float64 (cached). Casting it to float32 gives exactly the
    arrays `load_data` makes for a float32 spec (scale in float64, round once)."""
    key = (spec.dataset, data_dir)
    if key not in _DATA:
        _DATA[key] = load_data(spec if spec.dtype == "float64" else spec.replace(dtype="float64"), data_dir)
    return _DATA[key]


def first_batch(spec: ExperimentSpec, seed: int, variant_name: str | None = None) -> np.ndarray:
    """Indices of the first training batch of run `seed` (of the variant, where it sets its own batch size)."""
    return _batch_order(spec, seed, variant_name).indices(0)


def _batch_order(spec: ExperimentSpec, seed: int, variant_name: str | None) -> BatchOrder:
    train_examples = datasets.info(spec.dataset).train_examples
    batch_size = spec.batch_size if variant_name is None else spec.batch_size_for(spec.variant(variant_name))
    return BatchOrder(seed_streams(seed)[1], train_examples, batch_size)


def step_outputs(spec: ExperimentSpec, variant_name: str, backend: str, dtype: str, seed: int = 0,
                 batch_indices: np.ndarray | None = None, device: str | None = None,
                 start_perturbed_at: str | None = None) -> dict[str, np.ndarray]:
    """Every single-step quantity of one backend, canonical float64 NumPy, keyed by name:
    'gradient/<param>' plus the intermediates of `Trainer.gradients`. With
    `start_perturbed_at` (a dtype), the initial parameters and the batch's images first
    move by one rounding of that dtype (see "conditioning of a single step")."""
    program = resolve(spec, variant_name)
    data = _training_data(spec)
    indices = first_batch(spec, seed, variant_name) if batch_indices is None else np.asarray(batch_indices)
    images, labels = _batch_images(program, data, indices, dtype, seed, 0), data.train_labels[indices]
    params, state = program.initial_parameters(seed)
    if start_perturbed_at is not None:
        params = {k: _one_rounding(v, start_perturbed_at) for k, v in params.items()}
        images = _one_rounding(images, start_perturbed_at).astype(dtype)
    engine = backend_registry.get_engine(backend, device=device, dtype=dtype)
    x, y = engine.put_images(images), engine.put_labels(labels)
    trainer = engine.trainer(program, params, state, x, y)
    grads, intermediates = trainer.gradients(x, y, program.dropout_masks(seed, 0, len(indices)))
    out = {f"gradient/{k}": np.asarray(v, np.float64) for k, v in grads.items()}
    out.update({k: np.asarray(v, np.float64) for k, v in intermediates.items()})
    return out


def _batch_images(program, data: LoadedData, batch: np.ndarray, dtype: str, seed: int, step: int) -> np.ndarray:
    """The images of training step `step`'s `batch` of run `seed`, in `dtype`, as the run
    trains on them: augmented where the spec augments (the same batch for every backend)."""
    images = data.train_images[batch].astype(dtype)
    return program.augmented_batch(images, seed, step) if program.augments else images


def _trajectory_inputs(spec: ExperimentSpec, variant_name: str, steps: int, seed: int):
    """(data, batches, used): the batches `steps` steps of run `seed` take, and the sorted
    indices of the examples they visit (only those go to the device; a batch's indices
    are remapped into that subset with `np.searchsorted(used, batch)`)."""
    data = _training_data(spec)
    order = _batch_order(spec, seed, variant_name)
    batches = [order.indices(t) for t in range(steps)]
    return data, batches, np.unique(np.concatenate(batches))


def _one_rounding_of_floats(array, precision: str):
    """`_one_rounding` of a floating-point array; anything else (a step count) as it is."""
    array = np.asarray(array)
    return _one_rounding(array, precision) if np.issubdtype(array.dtype, np.floating) else array


def _one_rounding(array: np.ndarray, precision: str) -> np.ndarray:
    """`array` moved by about one rounding error of `precision`: rounded to float32, or in
    float64 each nonzero value stepped one ulp away from zero."""
    array = np.asarray(array)
    if precision == "float64":
        return np.where(array != 0, np.nextafter(array, np.copysign(np.inf, array)), array)
    return array.astype(precision)


def _trainer(program, data: LoadedData, used: np.ndarray, backend: str, dtype: str, seed: int, device: str | None,
             start_perturbed_at: str | None = None):
    """A trainer at the run's initial state; with `start_perturbed_at` (a dtype), the
    initial parameters and the images first move by one rounding of that dtype (see
    "conditioning of a trajectory")."""
    engine = backend_registry.get_engine(backend, device=device, dtype=dtype)
    params, state = program.initial_parameters(seed)
    images = data.train_images[used]
    if start_perturbed_at is not None:
        params = {k: _one_rounding(v, start_perturbed_at) for k, v in params.items()}
        images = _one_rounding(images, start_perturbed_at)
    return engine.trainer(program, params, state, engine.put_images(images.astype(dtype)),
                          engine.put_labels(data.train_labels[used]))


def _state_outputs(trainer) -> dict[str, np.ndarray]:
    params, state = trainer.export()
    out = {f"final/{k}": np.asarray(v, np.float64) for k, v in params.items()}
    out.update({f"final_state/{k}": np.asarray(v, np.float64) for k, v in state.items()})
    return out


def _final_outputs(program, trainer, step_losses: list) -> dict[str, np.ndarray]:
    losses = trainer.read_losses(step_losses).astype(np.float64)
    out = {f"trajectory/{name}": losses[:, k] for k, name in enumerate(program.step_loss_names)}
    out.update(_state_outputs(trainer))
    return out


def trajectory_outputs(spec: ExperimentSpec, variant_name: str, backend: str, steps: int, dtype: str, seed: int = 0,
                       device: str | None = None, start_perturbed_at: str | None = None) -> dict[str, np.ndarray]:
    """`steps` training steps of one backend as a real run of `seed` takes them.
    Returns 'trajectory/<loss>' (one value per step), 'final/<param>' and
    'final_state/<name>', canonical float64 NumPy."""
    program = resolve(spec, variant_name)
    data, batches, used = _trajectory_inputs(spec, variant_name, steps, seed)
    trainer = _trainer(program, data, used, backend, dtype, seed, device, start_perturbed_at)

    def augmented(batch, t):  # `Trainer.step`'s images: None where it gathers the placed ones
        if not program.augments:
            return None
        images = _batch_images(program, data, batch, dtype, seed, t)
        # moved by one rounding with the placed images, where those are
        return images if start_perturbed_at is None else _one_rounding(images, start_perturbed_at).astype(dtype)

    step_losses = [trainer.step(np.searchsorted(used, batch), program.learning_rate(t),
                                program.dropout_masks(seed, t, len(batch)), augmented(batch, t))
                   for t, batch in enumerate(batches)]
    return _final_outputs(program, trainer, step_losses)


# ----------------------------------------------------------------------------- ties along a trajectory
#
# ReLU is not differentiable at 0. A pre-activation within rounding of 0 (a tie) may land
# on either side in float32, and each side is an exact gradient of a valid computation,
# yet the two updates differ by that unit's whole contribution; through an adaptive
# optimizer the two paths then separate like any chaotic system, so the free-running
# trajectories compared above stop saying anything about the formulas. Found on an Intel
# Xeon with AVX-512: cnn3, batch_norm_shift, RMSProp (decay 0.95, momentum 0.5, epsilon
# 1e-6), batch 32, seed 0. At update 6 one conv2 pre-activation is 2.2e-7 from 0 in
# float64 and PyTorch's float32 (its fused batch norm) puts it on the other side; that
# moves conv2's shift gradient by 2% and the loss trajectories, within 2e-7 until then,
# are 7.5e-3 apart by step 23. JAX and TensorFlow happened to round it to the float64 side.
#
# So a failing trajectory comparison is re-run in lockstep: both sides step together,
# and before every update each computes the batch's pre-activations (`Trainer.gradients`).
# Where their ReLU decisions differ at pre-activations that agree within the pre-activation
# tolerance, the flip is a tie: both take the update, its losses are compared, and then
# the second side restarts from the first's state (parameters, running statistics and
# optimizer slots), so every later step is again compared from a common point. A flip at
# pre-activations that disagree beyond tolerance is not a tie: nothing is restarted and the
# comparison fails as before. Every step is still compared; the report lists the ties.
# Not covered: max-pool windows whose largest entries tie (no such case has been seen).


@dataclasses.dataclass(frozen=True)
class Tie:
    """ReLU ties at one update of a lockstep trajectory."""
    step: int               # 1-based number of the update the flips went into
    flips: dict[str, int]   # layer -> pre-activations on opposite sides of 0
    largest: float          # largest |z| among them, relative to that layer's largest |z|

    def describe(self) -> str:
        layers = ", ".join(f"{layer} x{count}" for layer, count in self.flips.items())
        return f"step {self.step}: {layers}, |z| <= {self.largest:.1e} of the layer's max"


def relu_ties(outs_a: dict, outs_b: dict, preactivation_tolerance) -> dict[str, int] | None:
    """Layer -> ReLU flips between two sides' pre-activations of the same batch, when every
    layer with a flip agrees within `preactivation_tolerance` (relative to its largest
    |z|; a number, or a function of the layer's name): then each flip is a tie. None when
    a flipped layer disagrees beyond it (the flip is a real difference). {} when nothing
    flips."""
    bound = preactivation_tolerance if callable(preactivation_tolerance) else lambda layer: preactivation_tolerance
    flips = {}
    for layer, a, b, flipped in _flipped_layers(outs_a, outs_b):
        if flipped.any():
            if float(np.max(np.abs(a - b))) / _largest_magnitude(a, b) > bound(layer):
                return None
            flips[layer] = int(np.sum(flipped))
    return flips


def _largest_magnitude(a: np.ndarray, b: np.ndarray) -> float:
    return max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), TINY)


def _largest_flipped(outs_a: dict, outs_b: dict, layers) -> float:
    """The largest |z| among the flipped pre-activations of `layers`, relative to its layer's largest |z|."""
    return max((float(np.max(np.maximum(np.abs(a[flipped]), np.abs(b[flipped])))) / _largest_magnitude(a, b)
                for layer, a, b, flipped in _flipped_layers(outs_a, outs_b) if layer in layers), default=0.0)


def lockstep_outputs(spec: ExperimentSpec, variant_name: str, first: tuple[str, str], second: tuple[str, str],
                     steps: int, seed: int = 0, device: str | None = None, every_step: bool = False,
                     probe: tuple[str, str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Tie], list["Update"]]:
    """`trajectory_outputs` of two sides, each a (backend, dtype), run side by side with
    ReLU ties re-anchored (see above): (first's outputs, second's outputs, the ties, []).
    With `every_step`, the second side restarts from the first's state after every update
    (see "shadowing a chaotic trajectory"), and the last item lists every `Update`: its two
    resulting states, taken before the restart, with the common state it started from,
    each side's gradients there and the ReLU ties between the two sides' forward passes.
    With `probe` (backend, dtype) as well, that backend takes every update in float64 twice,
    from the common state and from it moved by one rounding of dtype (`Update.probe`, the
    update's own conditioning)."""
    program = resolve(spec, variant_name)
    data, batches, used = _trajectory_inputs(spec, variant_name, steps, seed)
    sides = [(_trainer(program, data, used, backend, dtype, seed, device), dtype) for backend, dtype in (first, second)]
    probes = ([_trainer(program, data, used, probe[0], REFERENCE_DTYPE, seed, device) for _ in range(2)]
              if every_step and probe is not None else [])
    depth = program.arch.depth
    tolerance_of_preactivation = max(tolerance("preactivation", first[1], depth), tolerance("preactivation", second[1], depth))
    losses: list[list] = [[], []]
    ties, updates = [], []
    for t, batch in enumerate(batches):
        indices, masks = np.searchsorted(used, batch), program.dropout_masks(seed, t, len(batch))
        # This step's images per side's dtype, made (and augmented) once for the gradients and the update.
        images = {dtype: _batch_images(program, data, batch, dtype, seed, t)
                  for dtype in dict.fromkeys([*(d for _, d in sides), *([REFERENCE_DTYPE] if probes else [])])}
        if every_step:  # the common start of this update, each side's gradients there, and their ties
            start = _state_outputs(sides[0][0])
            if probes:
                common = (*sides[0][0].export(), sides[0][0].export_optimizer_state())
                probes[0].load_state(*common)
                probes[1].load_state(*({k: _one_rounding_of_floats(v, probe[1]) for k, v in tree.items()} for tree in common))
                probed = [trainer.gradients(trainer.engine.put_images(images[REFERENCE_DTYPE]),
                                            trainer.engine.put_labels(data.train_labels[batch]), masks) for trainer in probes]
                probe_gradients = tuple(grads for grads, _ in probed)
            inspected = [trainer.gradients(trainer.engine.put_images(images[dtype]),
                                           trainer.engine.put_labels(data.train_labels[batch]), masks)
                         for trainer, dtype in sides]
            gradients = [grads for grads, _ in inspected]
            tie_bound = tolerance_of_preactivation
            if probes:  # a tie within this update's own conditioning is a tie too (see "shadowing")
                tie_bound = _conditioned_tie_bound(tolerance_of_preactivation, *(seen for _, seen in probed),
                                                   program.std_metric.log_epsilon,
                                                   1 if REFERENCE_DTYPE in (first[1], second[1]) else 2)
            update_ties = relu_ties(*(seen for _, seen in inspected), tie_bound) or {}
        seen = []
        for trainer, dtype in sides if not every_step else ():  # shadowing restarts after every update anyway
            engine = trainer.engine
            seen.append(trainer.gradients(engine.put_images(images[dtype]), engine.put_labels(data.train_labels[batch]), masks)[1])
        flips = relu_ties(*seen, tolerance_of_preactivation) if seen else {}
        for k, (trainer, dtype) in enumerate(sides):
            losses[k].append(trainer.step(indices, program.learning_rate(t), masks, images[dtype] if program.augments else None))
        for trainer in probes:
            trainer.step(indices, program.learning_rate(t), masks, images[REFERENCE_DTYPE] if program.augments else None)
        if flips:
            ties.append(Tie(t + 1, flips, _largest_flipped(*seen, flips)))
        if every_step:
            updates.append(Update(*(_state_outputs(trainer) for trainer, _ in sides), start, *gradients, update_ties,
                                  tuple(_state_outputs(trainer) for trainer in probes) or None,
                                  probe_gradients if probes else None))
        if flips or every_step:
            anchor = sides[0][0]
            sides[1][0].load_state(*anchor.export(), anchor.export_optimizer_state())
    first_out, second_out = (_final_outputs(program, trainer, steps_losses) for (trainer, _), steps_losses in zip(sides, losses))
    return first_out, second_out, ties, updates


# ----------------------------------------------------------------------------- comparisons


def compare_step(spec: ExperimentSpec, variant_name: str, backends: list[str], dtype: str, seed: int = 0,
                 batch_indices: np.ndarray | None = None, device: str | None = None,
                 reference_backend: str | None = None) -> list[Row]:
    """One forward/backward pass from identical weights on one batch (default: the first
    batch of run `seed`), compared for every pair of `backends`; with `reference_backend`
    (float32 only), each backend also against that backend's float64 pass."""
    program = resolve(spec, variant_name)
    log_epsilon, depth = program.std_metric.log_epsilon, program.arch.depth
    outputs = {b: step_outputs(spec, variant_name, b, dtype, seed, batch_indices, device) for b in backends}
    rows = compare_outputs(outputs, dtype, variant_name, log_epsilon, depth)
    reference = None
    if reference_backend is not None and dtype != REFERENCE_DTYPE:
        reference = step_outputs(spec, variant_name, reference_backend, REFERENCE_DTYPE, seed, batch_indices, device)
        rows += compare_with_reference(outputs, reference, variant_name, log_epsilon, depth)
    rows = recheck_step_ties(rows, outputs, reference, spec, variant_name, dtype, seed, device, reference_backend,
                             first_batch(spec, seed, variant_name) if batch_indices is None else np.asarray(batch_indices))
    if reference is None:
        return rows
    return recheck_step_conditioning(rows, outputs, reference, spec, variant_name, dtype, seed, batch_indices, device,
                                     reference_backend)


# A tie inside the single step. A pre-activation within rounding of 0 that two backends put
# on opposite sides of a ReLU changes that unit's gradient contribution entirely, and both
# are exact gradients of a valid computation (see "ties along a trajectory"). Found on
# inception-v2-small with batch norm in float32: two such units moved gradients by 7.7e-2.
# So a pair whose gradients fail with ReLU ties (and only ties) between its two sides is
# compared again on the same batch without the examples that hold the tied units, a
# single step as valid as the first; the rows say which examples were left out and why.
# A flip on pre-activations that disagree beyond tolerance is no tie and fails as it is.
TIE_RECHECKS = 3  # a reduced batch may meet a new tie; give up after this many
TIE_NOTE = "re-compared without example(s)"


def _tied_examples(outs_a: dict, outs_b: dict) -> set[int]:
    """Batch positions holding a pre-activation the two sides put on opposite sides of 0."""
    return {int(i) for _, _, _, flipped in _flipped_layers(outs_a, outs_b)
            for i in np.flatnonzero(flipped.reshape(flipped.shape[0], -1).any(axis=1))}


def _replica_size(program) -> int:
    """The examples whose statistics go together: the least common multiple of every
    `replica_batch_size` the variant's method and losses set (1 without any)."""
    sizes = [getattr(p, "replica_batch_size", None) for p in (program.method, *program.losses)]
    return math.lcm(1, *(n for n in sizes if n))


def _whole_blocks(tied: list[int], size: int, block: int) -> list[int] | None:
    """The batch positions to leave out for the `tied` ones: each one's whole aligned block
    of `block` examples (its replica), so the other replicas keep their own examples and
    statistics. smoke-mobilenet-v1's batch norm with replicas of 4 could not drop one tied
    example (a batch of 15 has no replicas of 4) and its tie failed the gradient row. None
    when nothing would be left."""
    blocks = {i // block for i in tied}
    positions = [i for i in range(size) if i // block in blocks]
    return positions if len(positions) < size else None


def recheck_step_ties(rows: list[Row], outputs: dict, reference: dict | None, spec: ExperimentSpec, variant_name: str,
                      dtype: str, seed: int, device: str | None, reference_backend: str | None,
                      batch: np.ndarray) -> list[Row]:
    """`rows` of one single step, with every pair whose gradients fail at ReLU ties
    re-compared on the batch without the tied examples (up to TIE_RECHECKS times)."""
    program = resolve(spec, variant_name)
    log_epsilon, depth = program.std_metric.log_epsilon, program.arch.depth
    sides = {_pair_name(a, b): (a, b) for a, b in itertools.combinations(outputs, 2)}
    if reference is not None:
        sides.update({reference_pair(b): (b, None) for b in outputs})
    failing = [p for p in dict.fromkeys(r.pair for r in rows if not r.ok and r.quantity.startswith("gradient/"))
               if p in sides]
    for pair in failing:
        a, b = sides[pair]
        names = (a, b if b is not None else REFERENCE_DTYPE)
        tolerance_of = (lambda q: tolerance(q, dtype, depth)) if b is not None else (lambda q: drift_tolerance(q, depth))
        outs_a, outs_b, kept, left_out = outputs[a], outputs[b] if b is not None else reference, batch, []
        for _ in range(TIE_RECHECKS):
            if relu_ties(outs_a, outs_b, tolerance("preactivation", dtype, depth)) in (None, {}):
                break  # a real difference, or no flip at all: nothing to re-compare
            tied = _whole_blocks(sorted(_tied_examples(outs_a, outs_b)), len(kept), _replica_size(program))
            if tied is None or program.check_batch(len(kept) - len(tied)):
                break  # no reduced batch can run this method
            left_out += [int(kept[i]) for i in tied]
            kept = np.delete(kept, tied)
            outs_a = step_outputs(spec, variant_name, a, dtype, seed, kept, device)
            outs_b = (step_outputs(spec, variant_name, b, dtype, seed, kept, device) if b is not None else
                      step_outputs(spec, variant_name, reference_backend, REFERENCE_DTYPE, seed, kept, device))
            redone = _compare_pair(names, outs_a, outs_b, variant_name, log_epsilon, tolerance_of, underflow_floor(dtype))
            note = (f"{TIE_NOTE} {left_out} of the batch, which held ReLU ties "
                    f"(pre-activations within rounding of 0 on opposite sides)")
            rows = [r for r in rows if r.pair != pair] + [
                dataclasses.replace(r, detail="; ".join(x for x in (r.detail, note) if x)) for r in redone]
            if all(r.ok for r in redone):
                break
    return rows


# ----------------------------------------------------------------------------- conditioning of a single step
#
# A single step can be ill-conditioned too: float32 then computes it no better than its
# inputs' own rounding allows, every backend alike. Found on mobilenet-v1-small with
# instance norm at batch 8 on 28 x 28 images: from conv_dw_6 on, its maps are 2 x 2, and
# instance norm over 4 positions divides by a spread that is often tiny, so each layer
# roughly doubles what reaches it. In float32 every backend's conv_pw_13 pre-activations
# were 1.2e-3 to 2.2e-3 off float64 (bound 1e-4) and the pairs up to 2.8e-3 apart, while
# JAX's float64 pass from the start rounded once to float32 (weights and images) already
# moved them by 3.7e-4; logits 0.9-1.5e-4 off float64, rounded start 1.6e-5. A start
# rounding is one perturbation, and float32 rounds again in every layer: the float32
# errors were 3 to 9 times the rounded start's. So where a single-step row of a
# float32 pair still fails after the tie re-check, the reference backend computes the
# step once more in float64 from the start one float32 rounding away; each side of a
# pair may then be off by `CONDITIONING_FACTOR` times what that moved the quantity, times
# the network's depth factor (every layer's own rounding: `_depth_factor`), a backend
# pair by the sum of its two sides. Bounds are never raised past
# CONDITIONING_FACTOR x CONDITIONING_LIMIT, and the formulas stay held where rounding
# cannot hide them: every backend computes the same step in float64 and those pairs are
# added at the float64 bound (rows '<a>-<b> in float64').


def _conditioned_bound(base: float, moved: float, sides: int, depth_factor: float = 1.0) -> float:
    """`base`, or `sides` x CONDITIONING_FACTOR x `depth_factor` times what a probe `moved`
    the quantity where that is larger, never above CONDITIONING_FACTOR x CONDITIONING_LIMIT
    (a bound raised further holds nothing)."""
    return max(base, min(sides * CONDITIONING_FACTOR * depth_factor * moved, CONDITIONING_FACTOR * CONDITIONING_LIMIT))


def _moved_by_rounding(reference: dict, rounded: dict, log_epsilon: float):
    """quantity -> the relative change between the float64 step (or update) from the exact
    start (`reference`) and from the start one rounding away (`rounded`)."""
    def moved(name):
        if name not in reference or name not in rounded:
            return 0.0
        a, b = np.asarray(reference[name], np.float64), np.asarray(rounded[name], np.float64)
        return _compare_arrays(name, a, b, reference, rounded, log_epsilon)[1] if a.shape == b.shape else 0.0
    return moved


def recheck_step_conditioning(rows: list[Row], outputs: dict, reference: dict, spec: ExperimentSpec, variant_name: str,
                              dtype: str, seed: int, batch_indices: np.ndarray | None, device: str | None,
                              reference_backend: str) -> list[Row]:
    """`rows` of one float32 step (`outputs`: backend -> quantities; `reference`: the
    reference backend's float64 step), with every pair still failing on the whole batch
    re-compared against the step's own conditioning (see above), plus the float64 pairs
    whenever a bound was raised."""
    program = resolve(spec, variant_name)
    log_epsilon, depth = program.std_metric.log_epsilon, program.arch.depth
    sides = {_pair_name(a, b): (a, b) for a, b in itertools.combinations(outputs, 2)}
    sides.update({reference_pair(b): (b, None) for b in outputs})
    # A pair re-compared on a reduced batch (ReLU ties) is left as it is: the probe below
    # is of the whole batch.
    failing = [p for p in dict.fromkeys(r.pair for r in rows if not r.ok) if p in sides
               and not any(r.pair == p and TIE_NOTE in r.detail for r in rows)]
    if not failing:
        return rows
    rounded = step_outputs(spec, variant_name, reference_backend, REFERENCE_DTYPE, seed, batch_indices, device,
                           start_perturbed_at=dtype)
    moved = _moved_by_rounding(reference, rounded, log_epsilon)
    ceiling = CONDITIONING_FACTOR * CONDITIONING_LIMIT
    raised = False
    for pair in failing:
        a, b = sides[pair]
        base = (lambda q: tolerance(q, dtype, depth)) if b is not None else (lambda q: drift_tolerance(q, depth))
        failed = {r.quantity for r in rows if r.pair == pair and not r.ok}
        conditioned = _failing_conditioned(base, moved, failed, 2 if b is not None else 1,
                                           lambda q: _depth_factor(q, depth))
        names = (a, b if b is not None else REFERENCE_DTYPE)
        outs_b = outputs[b] if b is not None else reference
        redone = _compare_pair(names, outputs[a], outs_b, variant_name, log_epsilon, conditioned, underflow_floor(dtype))
        noted = []
        for r in redone:
            note = ""
            if r.tolerance > base(r.quantity):
                raised = True
                note = (f"bound {r.tolerance:.1e}: the step's own conditioning (float64 from a start one {dtype} "
                        f"rounding away moves it by {moved(r.quantity):.1e}; see parity.py)")
                if r.tolerance >= ceiling and not r.ok:
                    note += f"; beyond what {dtype} can check: compare with --dtype {REFERENCE_DTYPE}"
            noted.append(dataclasses.replace(r, detail="; ".join(x for x in (r.detail, note) if x)))
        rows = [r for r in rows if r.pair != pair] + noted
    if raised:
        rows += step_formula_rows(spec, variant_name, list(outputs), seed, batch_indices, device, reference_backend,
                                  reference)
    return rows


def step_formula_rows(spec: ExperimentSpec, variant_name: str, backends: list[str], seed: int,
                      batch_indices: np.ndarray | None, device: str | None, reference_backend: str,
                      reference: dict) -> list[Row]:
    """Every pair of `backends` on the same single step in float64, at the float64 bound
    (rows '<a>-<b> in float64'): `reference` is `reference_backend`'s step, already run."""
    program = resolve(spec, variant_name)
    computed = {b: reference if b == reference_backend else
                step_outputs(spec, variant_name, b, REFERENCE_DTYPE, seed, batch_indices, device) for b in backends}
    rows = compare_outputs(computed, REFERENCE_DTYPE, variant_name, program.std_metric.log_epsilon, program.arch.depth)
    return [dataclasses.replace(r, pair=f"{r.pair} in {REFERENCE_DTYPE}") for r in rows]


def compare_trajectory(spec: ExperimentSpec, variant_name: str, backends: list[str], steps: int, dtype: str,
                       seed: int = 0, device: str | None = None, reference_backend: str | None = None) -> list[Row]:
    """`steps` identical training steps on every backend: losses at every step, final
    parameters and batch-norm state, compared for every pair of `backends`; with
    `reference_backend` (float32 only), each backend also against that backend's float64
    run. Failing rows are re-checked across ReLU ties and against the trajectory's own
    conditioning (`recheck_trajectories`). A trajectory whose loss turns non-finite must
    do so alike everywhere (`divergence_rows`) and is compared over the steps before."""
    outputs = {b: trajectory_outputs(spec, variant_name, b, steps, dtype, seed, device) for b in backends}
    reference = None
    if reference_backend is not None and dtype != REFERENCE_DTYPE:
        reference = trajectory_outputs(spec, variant_name, reference_backend, steps, REFERENCE_DTYPE, seed, device)
    onset = _first_onset([*outputs.values(), *([] if reference is None else [reference])])
    if onset is not None:  # the training diverges: see "divergence" below
        rows = divergence_rows(outputs, reference, variant_name, dtype)
        if onset > 1:
            note = f"compared over steps 1-{onset - 1}, before the first non-finite loss"
            rows += [dataclasses.replace(r, detail="; ".join(x for x in (r.detail, note) if x))
                     for r in compare_trajectory(spec, variant_name, backends, onset - 1, dtype, seed, device,
                                                 reference_backend)]
        return rows
    log_epsilon = resolve(spec, variant_name).std_metric.log_epsilon
    rows = compare_outputs(outputs, dtype, variant_name, log_epsilon)
    if reference is not None:
        rows += compare_with_reference(outputs, reference, variant_name, log_epsilon)
        return recheck_trajectories(rows, spec, variant_name, backends, steps, dtype, seed, device, reference_backend,
                                    reference_outputs=reference)
    return recheck_trajectories(rows, spec, variant_name, backends, steps, dtype, seed, device, reference_backend)


# ----------------------------------------------------------------------------- divergence
#
# A spec may train unstably: a learning rate or a loss weight too large for the network
# makes the loss grow step by step until it overflows, and a run of it is recorded as
# diverged (normbench.runner). The backends must then diverge together: every one's loss
# becomes non-finite at the same step. Against the float64 reference, float32 overflows
# first, so there the float32 side must stop at a step where float64's loss has left
# float32's range; a float32 loss that turns non-finite while float64's is representable
# is a formula failing (an overflow or a log of zero the exact computation does not have).
# The steps before the first non-finite loss anywhere are compared as any trajectory is,
# by running every computation again for that many steps: the final parameters of a
# diverged run hold nothing left to compare.

DIVERGENCE = "divergence"  # the rows' quantity


def non_finite_onset(outs: dict) -> int | None:
    """The 1-based step at which one of `outs`' trajectory losses is first not finite;
    None if every one is finite at every step."""
    series = np.stack([np.asarray(v, np.float64) for k, v in outs.items() if k.startswith("trajectory/")])
    bad = np.flatnonzero(~np.isfinite(series).all(axis=0))
    return int(bad[0]) + 1 if bad.size else None


def _first_onset(computations: list[dict]) -> int | None:
    onsets = [k for k in map(non_finite_onset, computations) if k is not None]
    return min(onsets) if onsets else None


def _onset_text(name: str, onset: int | None, steps: int) -> str:
    return f"{name} non-finite from step {onset}" if onset else f"{name} finite through step {steps}"


def divergence_rows(outputs: dict[str, dict[str, np.ndarray]], reference: dict[str, np.ndarray] | None,
                    variant: str, dtype: str = "float32") -> list[Row]:
    """Rows 'divergence' for a trajectory whose loss is not finite somewhere: every pair
    of `outputs` (backend -> trajectory quantities, computed in `dtype`) must turn
    non-finite at the same step, and each backend against `reference` (the float64 run,
    if any) as described above.
    A row's errors are 0 where it holds and infinite where it does not."""
    steps = len(next(v for k, v in next(iter(outputs.values())).items() if k.startswith("trajectory/")))
    onsets = {name: non_finite_onset(outs) for name, outs in outputs.items()}

    def row(pair, ok, detail):
        return Row(pair, variant, DIVERGENCE, 0.0 if ok else math.inf, 0.0 if ok else math.inf, 0.0, ok, detail)

    rows = [row(_pair_name(a, b), onsets[a] == onsets[b],
                f"{_onset_text(a, onsets[a], steps)}, {_onset_text(b, onsets[b], steps)}")
            for a, b in itertools.combinations(outputs, 2)]
    if reference is None:
        return rows
    exact = non_finite_onset(reference)
    representable = float(np.finfo(np.dtype(dtype)).max)
    for name, onset in onsets.items():
        both = f"{_onset_text(name, onset, steps)}, {_onset_text(REFERENCE_DTYPE, exact, steps)}"
        if onset is None or (exact is not None and exact <= onset):
            rows.append(row(reference_pair(name), onset == exact, both))
            continue
        largest = max(abs(float(v[onset - 1])) for k, v in reference.items() if k.startswith("trajectory/"))
        beyond = largest > representable
        rows.append(row(reference_pair(name), beyond,
                        f"{name} non-finite from step {onset}, where the {REFERENCE_DTYPE} loss is {largest:.2g}, "
                        + (f"beyond {dtype}'s range" if beyond else f"within {dtype}'s range: not an overflow")))
    return rows


def recheck_trajectories(rows: list[Row], spec: ExperimentSpec, variant_name: str, backends: list[str], steps: int,
                         dtype: str, seed: int = 0, device: str | None = None,
                         reference_backend: str | None = None,
                         reference_outputs: dict[str, np.ndarray] | None = None) -> list[Row]:
    """`rows` of free-running trajectory comparisons, with every failing pair's rows
    replaced by those of its lockstep re-run across ReLU ties (`lockstep_outputs`); rows
    still failing then are held to the trajectory's own conditioning
    (`conditioning_outputs`, run once by the reference backend; `reference_outputs`, that
    backend's exact float64 trajectory when the caller already has it, is reused), and a
    pair still failing, or passing only because its bound rose past CONDITIONING_LIMIT,
    is shadowed (`_shadowed_rows`). Each replaced row's detail says which was done. Pairs
    that passed are kept as they are."""
    program = resolve(spec, variant_name)
    log_epsilon, depth = program.std_metric.log_epsilon, program.arch.depth
    # pair -> (first side, second side, row names, tolerances, whether the rows list the
    # second side first). A drift row compares a backend with float64: the float64 run is
    # the anchor (first), the backend is named first. (Trajectory bounds do not scale with
    # depth; the depth is there for the gradient bound of undetermined elements.)
    sides = {_pair_name(a, b): ((a, dtype), (b, dtype), (a, b), lambda q: tolerance(q, dtype, depth), False)
             for a, b in itertools.combinations(backends, 2)}
    if reference_backend is not None:
        sides.update({reference_pair(b): ((reference_backend, REFERENCE_DTYPE), (b, dtype), (b, REFERENCE_DTYPE),
                                          lambda q: drift_tolerance(q, depth), True) for b in backends})
    failing = [pair for pair in dict.fromkeys(r.pair for r in rows if not r.ok) if pair in sides]
    conditioning = None
    for pair in failing:
        first, second, names, tolerance_of, second_named_first = sides[pair]
        order = (lambda a, b: (b, a)) if second_named_first else (lambda a, b: (a, b))
        first_out, second_out, ties, _ = lockstep_outputs(spec, variant_name, first, second, steps, seed, device)
        outs = order(first_out, second_out)
        note = ("lockstep re-run, ReLU ties re-anchored at " + "; ".join(t.describe() for t in ties) if ties
                else "lockstep re-run: no ReLU tie found")
        redone = _compare_pair(names, *outs, variant_name, log_epsilon, tolerance_of, underflow_floor(dtype))
        if not all(r.ok for r in redone):
            if conditioning is None:
                conditioning = conditioning_outputs(spec, variant_name, reference_backend or choose_reference_backend(backends),
                                                    steps, dtype, seed, device, exact=reference_outputs)
            conditioned = _conditioned(tolerance_of, *conditioning, log_epsilon)
            redone = [dataclasses.replace(r, detail="; ".join(x for x in (r.detail, _raised_note(r, tolerance_of)) if x))
                      for r in _compare_pair(names, *outs, variant_name, log_epsilon, conditioned, underflow_floor(dtype))]
        vacuous = any(r.tolerance > max(tolerance_of(r.quantity), CONDITIONING_FACTOR * CONDITIONING_LIMIT) for r in redone)
        if not all(r.ok for r in redone) or vacuous:
            probe = (reference_backend or choose_reference_backend(backends), dtype)
            first_out, second_out, _, updates = lockstep_outputs(spec, variant_name, first, second, steps, seed, device,
                                                                 every_step=True, probe=probe)
            redone = _shadowed_rows(names, order(first_out, second_out),
                                    [u.swapped() if second_named_first else u for u in updates], variant_name,
                                    log_epsilon, tolerance_of, tolerance_of("gradient"), underflow_floor(dtype),
                                    sides=1 if second_named_first else 2)
            note = SHADOWED_NOTE
        redone = [dataclasses.replace(r, detail="; ".join(x for x in (r.detail, note) if x)) for r in redone]
        rows = [r for r in rows if r.pair != pair] + redone
    return rows


def _raised_note(row: Row, tolerance_of) -> str:
    base = tolerance_of(row.quantity)
    if row.tolerance <= base:
        return ""
    return (f"bound {row.tolerance:.1e} = {CONDITIONING_FACTOR}x the trajectory's own conditioning "
            f"(float64 from a start one rounding away moves it by {row.tolerance / CONDITIONING_FACTOR:.1e})")


# ----------------------------------------------------------------------------- conditioning of a trajectory
#
# Some trajectories amplify any perturbation, exact arithmetic or not: a run can then be
# as far from another as it is from itself started one rounding error away, and no fixed
# tolerance separates that from a formula difference. Found on mlp3 with the decorrelation
# loss (batch 128, SGD at 1e-3; the gradient of the log det of a 100 x 100 covariance of
# 128 examples is ill-conditioned): the float64 backends agree to 1e-15 at step 1 and the
# gap doubles every 2-3 steps, to 7e-6 on the loss by step 50 (1e-3 on dense1's kernel);
# in float32 every backend ends 1.7-2.0e-2 from float64 on that kernel, and so does
# TensorFlow's float64 run started from the float32-rounded weights and images (1.9e-2).
# So a trajectory quantity that still fails after the lockstep re-run is measured against
# its conditioning: the reference backend runs float64 twice, from the exact start and
# from a start moved by one rounding of the compared dtype (rounded to float32; in float64,
# one ulp), and the quantity's bound becomes the larger of its calibrated tolerance and
# `CONDITIONING_FACTOR` times that difference (per step for a loss series, against the
# running maximum up to that step, so early steps stay tightly held). Single-step
# quantities are not relaxed here: a single step has its own probe ("conditioning of a
# single step"), which also holds its formulas at 1e-9 in float64.

CONDITIONING_FACTOR = 10  # the calibrated tolerances' own margin over what was measured
# A start one rounding away that moves a quantity by more than this (relative) means the
# trajectory has forgotten its start: a bound raised that far holds nothing, so the pair is
# shadowed instead (below). smoke-mobilenet-v1's per-replica batch norm in float64: its
# probe moved a batch-norm shift by 0.7, which raised that shift's bound to 7.
CONDITIONING_LIMIT = 0.01


def conditioning_outputs(spec: ExperimentSpec, variant_name: str, backend: str, steps: int, dtype: str, seed: int = 0,
                         device: str | None = None, exact: dict[str, np.ndarray] | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`backend`'s float64 trajectory from the exact start (`exact`, if already run) and
    from the start moved by one rounding of `dtype`: the two whose difference measures the
    trajectory's conditioning."""
    if exact is None:
        exact = trajectory_outputs(spec, variant_name, backend, steps, REFERENCE_DTYPE, seed, device)
    return exact, trajectory_outputs(spec, variant_name, backend, steps, REFERENCE_DTYPE, seed, device,
                                     start_perturbed_at=dtype)


def _conditioned(tolerance_of, exact: dict, rounded: dict, log_epsilon: float):
    """`tolerance_of` with each trajectory quantity's bound raised to `CONDITIONING_FACTOR`
    times the difference between the `exact` and `rounded`-start float64 runs (loss
    series: per step, against the running maximum of that difference)."""
    def bound(name):
        base = tolerance_of(name)
        if name not in exact or name not in rounded or not name.startswith(("trajectory/", "final/", "final_state/")):
            return base
        a, b = np.asarray(exact[name], np.float64), np.asarray(rounded[name], np.float64)
        if a.shape != b.shape:
            return base
        if name.startswith("trajectory/"):
            relative = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), TINY)
            return np.maximum(base, CONDITIONING_FACTOR * np.maximum.accumulate(relative))
        return max(base, CONDITIONING_FACTOR * _compare_arrays(name, a, b, exact, rounded, log_epsilon)[1])
    return bound


# ----------------------------------------------------------------------------- shadowing a chaotic trajectory
#
# One rounding-sized start perturbation is a single sample of how a chaotic trajectory
# spreads, and samples differ by orders of magnitude while the spread grows; once the
# spread is O(1), a bound raised to it holds nothing (CONDITIONING_LIMIT). Found on
# smoke-mobilenet-v1 with per-replica batch norm (4 examples per replica, 2 x 2 final maps,
# SGD at 0.05 with momentum 0.9): in float64 the loss gap of every pair, and of JAX's own
# run started one ulp away, grows about tenfold per step from 1e-16 to O(0.1) by step 15;
# at step 13 PyTorch was 8e-3 from the others while TensorFlow's one-ulp probe had moved
# only 6e-4, and JAX's own one-ulp probe moved 4e-2. So a pair still failing against its
# conditioning, or passing only against a bound raised past CONDITIONING_LIMIT, is
# shadowed: run once more in lockstep with the second side restarted from the first's
# state after every update, each update's two resulting states compared at the calibrated
# (unraised) bounds and each step's losses computed from a common state.
# Every one of the trajectory's updates is then held as tightly as a single step, along
# the path a real run takes; what it gives up is only the claim that errors do not grow,
# which for a chaotic trajectory no implementation can make. An update whose forward pass
# holds a ReLU tie between the two sides (found as the lockstep re-run finds them) has its
# losses compared but not its parameters, as the lockstep re-run never compares them: each
# side took the exact update of a valid gradient, and a tie can move a gradient by a whole
# example's contribution (found on mobilenet-v1-small with batch norm over replicas of 4
# and RMSProp: two tied units at update 1 moved a conv_dw_9 kernel gradient by 5% of the
# layer's largest, and its step by 3% of the kernel). Ties are counted in the rows' detail.
# An update can be as ill-conditioned as a single step ("conditioning of a single step"):
# on mobilenet-v1-small with instance norm (2 x 2 maps) and Adam, JAX's float32 updates
# left float64's by 3e-2 on conv_dw_13's kernel (bound 2e-2). So the reference backend
# also takes every shadowed update in float64 twice, from the common state and from it
# moved by one rounding (`Update.probe`), and a quantity that fails its calibrated bound
# at an update is held to that update's own conditioning, as a single step is (one side
# against float64: once; two backends: twice), capped alike. The probe's gradients at
# the two starts likewise set the gradient bound of that update's undetermined elements
# (at the first step there, float32 gradients were up to 3% of the layer's largest off
# float64, and the probe's moved 1.2%), and its pre-activations the bound within which a
# flip between the sides is a ReLU tie: JAX's float32 pass there was 1e-3 off float64 on
# deep pre-activations (bound 1e-4), so its flips at updates 1, 2 and 5 were taken for
# real differences and those updates' parameters compared (conv_pw_5's shift 35% apart
# at update 5). With the three probes the spec's variant passes, 1945 of 1945.

SHADOWED_NOTE = "shadowed: every update compared from a common state (the trajectory is chaotic, see parity.py)"


@dataclasses.dataclass(frozen=True)
class Update:
    """One update of a shadowed pair: each side's state after it ('final/<param>',
    'final_state/<name>'), the common state both started from, and each side's gradients
    there (canonical parameter names)."""
    first: dict
    second: dict
    start: dict
    first_gradients: dict
    second_gradients: dict
    ties: dict = dataclasses.field(default_factory=dict)  # layer -> ReLU ties between the sides (`relu_ties`)
    # The probe's two float64 states after the update, from the common state and from it
    # moved by one rounding (`lockstep_outputs`); None where no probe ran.
    probe: tuple[dict, dict] | None = None
    probe_gradients: tuple[dict, dict] | None = None  # the probe's gradients at those two starts

    def swapped(self) -> "Update":
        return dataclasses.replace(self, first=self.second, second=self.first,
                                   first_gradients=self.second_gradients, second_gradients=self.first_gradients)


# Undetermined gradients. An optimizer that divides each gradient element by its own
# running RMS (Adam; RMSProp with a small epsilon) steps by about the learning rate in the
# direction of the element's sign, however small the element. Where rounding decides that
# sign, or the element's size next to epsilon, the step is rounding too: each side takes
# the exact step of a valid gradient, and where the parameter itself is a few steps in size
# (a zero-initialized kernel or shift early on) the two differ by O(1) of it. Found on
# smoke-pointnet with batch norm, Adam at 1e-3, float32 against float64: 3 of the feature
# transform's 16384 zero-initialized kernel elements (gradients <= 3.2e-4 of the layer's
# largest) stepped opposite ways at update 1 (relative error 2.0), and the shifts of the
# layers whose outputs reach a later batch norm only through max pooling, whose gradients
# are 0 in real arithmetic and rounding residue in any precision, were O(1) apart at every
# update. So in a shadowed update an element is undetermined, left out of that update's
# comparison and counted in the row's detail, when its gradient is within the gradient
# bound of 0 (relative to its layer's largest, as single steps compare gradients: nothing
# larger can be left out) and the two sides' gradients differ by more than the parameter's
# own bound, relative to the element. A determined gradient whose step differs still fails.


def undetermined_elements(update: Update, gradient_tolerance_of, tolerance_of) -> dict[str, np.ndarray]:
    """'final/<param>' -> mask of the elements of that parameter whose gradient the two
    sides of `update` do not determine (see above; `gradient_tolerance_of(param)`, the
    gradient bound); only parameters that have any."""
    masks, largest_of_layer = {}, {}
    for name, first in update.first_gradients.items():
        key, second = f"final/{name}", update.second_gradients.get(name)
        if key not in update.first or key not in update.second or second is None or not np.size(first):
            continue
        layer = name.rpartition("/")[0] + "/"
        if layer not in largest_of_layer:  # once per layer, not once per parameter
            largest_of_layer[layer] = max(float(np.max(np.abs(g))) for k, g in update.first_gradients.items()
                                          if k.startswith(layer) and np.size(g))
        largest = largest_of_layer[layer]
        undetermined = ((np.abs(first) <= gradient_tolerance_of(name) * largest)
                        & (np.abs(first - second) > tolerance_of(key) * np.abs(first)))
        if undetermined.any():
            masks[key] = undetermined
    return masks


def _shadowed_rows(names: tuple[str, str], outs: tuple[dict, dict], updates: list[Update], variant: str,
                   log_epsilon: float, tolerance_of, gradient_tolerance: float = 0.0, underflow: float = 0.0,
                   sides: int = 2) -> list[Row]:
    """Rows of a shadowed pair: its loss series as compared (each step from a common
    state) and, per parameter or state, the worst of its updates (by error over bound),
    elements with undetermined gradients (`undetermined_elements`) and updates at ReLU
    ties left out. An update's quantity that fails its bound is held to the update's own
    conditioning where the update has a probe (`_failing_conditioned`; `sides`: 1 where
    one side is the float64 computation, 2 for two backends)."""
    rows = [r for r in _compare_pair(names, *outs, variant, log_epsilon, tolerance_of, underflow)
            if r.quantity.startswith("trajectory/")]
    worst: dict[str, Row] = {}
    left_out: dict[str, list[str]] = {}
    at_ties = [f"{step} ({', '.join(f'{layer} x{n}' for layer, n in u.ties.items())})"
               for step, u in enumerate(updates, start=1) if u.ties]
    for step, update in enumerate(updates, start=1):
        if update.ties:  # each side took the exact update of a valid gradient (see above)
            continue
        second = dict(update.second)
        gradient_tolerance_of = _update_gradient_bound(update, gradient_tolerance, log_epsilon, sides)
        for key, undetermined in undetermined_elements(update, gradient_tolerance_of, tolerance_of).items():
            second[key] = np.where(undetermined, update.first[key], second[key])
            left_out.setdefault(key, []).append(f"{int(undetermined.sum())} of {undetermined.size} at update {step}")
        compared = _compare_pair(names, update.first, second, variant, log_epsilon, tolerance_of, underflow)
        failed = {r.quantity for r in compared if not r.ok}
        moved = _moved_by_rounding(*update.probe, log_epsilon) if update.probe is not None else None
        if failed and moved is not None:
            compared = _compare_pair(names, update.first, second, variant, log_epsilon,
                                     _failing_conditioned(tolerance_of, moved, failed, sides), underflow)
        for r in compared:
            ratio = r.max_rel / r.tolerance if r.tolerance else float("inf")
            if r.quantity not in worst or not ratio <= worst[r.quantity].max_rel / worst[r.quantity].tolerance:
                raised = (f"; bound {r.tolerance:.1e}: the update's own conditioning (float64 from the common state "
                          f"one rounding away moves it by {moved(r.quantity):.1e})"
                          if r.tolerance > tolerance_of(r.quantity) else "")
                worst[r.quantity] = dataclasses.replace(r, detail=f"worst at update {step} of {len(updates)}{raised}")
    rows += [dataclasses.replace(worst[q], detail=worst[q].detail + (
        f"; undetermined gradients left out: {_summarized(left_out[q])}" if q in left_out else "")) for q in sorted(worst)]
    if not at_ties:
        return rows
    note = f"updates at ReLU ties, parameters not compared: {_summarized(at_ties)}"
    return [dataclasses.replace(r, detail="; ".join(x for x in (r.detail, note) if x)) for r in rows]


def _conditioned_tie_bound(base: float, exact: dict, rounded: dict, log_epsilon: float, sides: int):
    """layer -> the pre-activation bound within which a flip is a ReLU tie at a shadowed
    update: `base`, or `sides` x CONDITIONING_FACTOR times what the probe's float64 pass
    from the common state one rounding away moved the layer's pre-activations, capped."""
    moved = _moved_by_rounding(exact, rounded, log_epsilon)
    return lambda layer: _conditioned_bound(base, moved(f"preactivation/{layer}"), sides)


def _update_gradient_bound(update: Update, gradient_tolerance: float, log_epsilon: float, sides: int):
    """param -> the gradient bound of `update`'s undetermined elements: `gradient_tolerance`,
    or where the probe's float64 gradients at the common state and one rounding away differ
    by more (relative to the layer's largest), `sides` x CONDITIONING_FACTOR times that,
    capped as a single step's: a gradient rounding can move that far is not determined."""
    if update.probe_gradients is None:
        return lambda name: gradient_tolerance
    exact, rounded = ({f"gradient/{k}": np.asarray(v, np.float64) for k, v in g.items()} for g in update.probe_gradients)
    moved = _moved_by_rounding(exact, rounded, log_epsilon)
    return lambda name: _conditioned_bound(gradient_tolerance, moved(f"gradient/{name}"), sides)


def _failing_conditioned(tolerance_of, moved, failed: set, sides: int, depth_factor=lambda q: 1.0):
    """`tolerance_of`, with each quantity in `failed` (only what fails is measured against
    the conditioning) held to `_conditioned_bound` of what the probe `moved` it by."""
    def bound(q):
        base = tolerance_of(q)
        return base if q not in failed else _conditioned_bound(base, moved(q), sides, depth_factor(q))
    return bound


def _summarized(counts: list[str], shown: int = 3) -> str:
    return ", ".join(counts[:shown]) + (f" and at {len(counts) - shown} more updates" if len(counts) > shown else "")


# ----------------------------------------------------------------------------- drift from float64
#
# A failing pair says that two backends disagree, not which one is off. So in float32
# every backend is also compared with the same computation in float64 (run once, by one
# backend: in float64 all backends agree to ~1e-13, see FLOAT64_TOLERANCE, so it stands
# for the exact result). Those rows have the pair "<backend>-float64"; the one that fails
# names the backend that left the exact computation. Example: cnn3, batch_norm_shift,
# RMSProp (decay 0.95, momentum 0.5, epsilon 1e-6), batch 32, before TensorFlow summed
# its per-channel gradients in two stages (backends/tensorflow/ops.py): torch-float64 and
# jax-float64 2e-7, tensorflow-float64 3.6e-2 on the loss trajectory.

REFERENCE_DTYPE = "float64"

# Which backend runs the float64 reference when several are compared: any would do, so the
# fastest in float64 on CPU goes first. cnn3, batch 128, 20 steps on the 2-core reference
# machine: TensorFlow 3-4 s, JAX 11-13 s, PyTorch 36 s. Backends not listed come last.
REFERENCE_PREFERENCE = ("tensorflow", "jax", "torch")


def choose_reference_backend(backends: list[str]) -> str:
    """The backend of `backends` that computes the float64 reference."""
    rank = {name: k for k, name in enumerate(REFERENCE_PREFERENCE)}
    return min(backends, key=lambda b: rank.get(b, len(rank)))


def reference_pair(backend: str) -> str:
    """The `Row.pair` of a backend's float32 quantities compared with float64 ones."""
    return _pair_name(backend, REFERENCE_DTYPE)


def drift_tolerance(quantity: str, depth: int = CALIBRATION_DEPTH) -> float:
    """Tolerance of a float32 quantity against float64, for a network `depth` layers deep."""
    return _float32_bound(quantity, FLOAT32_DRIFT_TOLERANCES) * _depth_factor(quantity, depth)


def compare_with_reference(outputs: dict[str, dict[str, np.ndarray]], reference: dict[str, np.ndarray], variant: str,
                           log_epsilon: float, depth: int = CALIBRATION_DEPTH) -> list[Row]:
    """Rows '<backend>-float64' for every backend in `outputs` (backend -> float32
    quantity -> array): its quantities against `reference`, the same quantities computed
    in float64 (by any backend), with `drift_tolerance`."""
    rows = []
    for name, outs in outputs.items():
        rows += _compare_pair((name, REFERENCE_DTYPE), outs, reference, variant, log_epsilon,
                              lambda q: drift_tolerance(q, depth), underflow_floor("float32"))
    return rows


def drifted_backends(rows: list[Row]) -> list[str]:
    """Backends with a failing '<backend>-float64' row, in row order."""
    suffix = "-" + REFERENCE_DTYPE
    return list(dict.fromkeys(r.pair[: -len(suffix)] for r in rows if not r.ok and r.pair.endswith(suffix)))


# ----------------------------------------------------------------------------- reporting


def _collapsed(quantity: str) -> str:
    """Table grouping: per-layer and per-parameter quantities by tolerance class
    ('gradient/conv1/kernel' -> 'gradient'); each trajectory loss on its own."""
    return quantity if quantity.startswith("trajectory/") else quantity_kind(quantity)


def format_table(rows: list[Row]) -> str:
    """A Markdown table: per variant, backend pair and quantity (per-layer and
    per-parameter quantities collapsed to their kind), the largest absolute and relative
    difference, the tolerance and PASS/FAIL; `worst` names the element that set it."""
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.variant, row.pair, _collapsed(row.quantity))].append(row)
    header = ["variant", "pair", "quantity", "max abs", "max rel", "tolerance", "result", "worst"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for (variant, pair, quantity), group in groups.items():
        worst = max(group, key=lambda r: (not r.ok, r.max_rel / r.tolerance if r.tolerance else r.max_rel))
        where = worst.quantity if worst.quantity != quantity else ""
        where = "; ".join(x for x in (where, worst.detail) if x)
        cells = [variant, pair, quantity, f"{max(r.max_abs for r in group):.2e}", f"{worst.max_rel:.2e}",
                 f"{worst.tolerance:.0e}", "PASS" if all(r.ok for r in group) else "FAIL", where]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_parity(spec: ExperimentSpec, steps: int, dtype: str, backends: list[str] | None = None, seed: int | None = None,
               device: str | None = None, float64_reference: bool = True) -> tuple[bool, str]:
    """Every variant of `spec` on every backend (default: all available): one compared
    step on the first batch of the first seed, then `steps` compared training steps. In
    float32 with `float64_reference`, every backend is also compared with one backend's
    float64 step and trajectory (`choose_reference_backend`; rows '<backend>-float64').
    Returns (all quantities within tolerance, a report: provenance and the table)."""
    chosen = [backend_registry.canonical_name(b) for b in (backends or backend_registry.available())]
    if len(chosen) < 2:
        return False, f"parity needs at least two backends; available: {', '.join(chosen) or 'none'}"
    seed = spec.seeds[0] if seed is None else seed
    engines = {b: backend_registry.get_engine(b, device=device, dtype=dtype) for b in chosen}  # fail early
    reference = choose_reference_backend(chosen) if float64_reference and dtype != REFERENCE_DTYPE else None
    rows: list[Row] = []
    for variant in spec.variants:
        rows += compare_step(spec, variant.name, chosen, dtype, seed, device=device, reference_backend=reference)
        if steps > 0:
            rows += compare_trajectory(spec, variant.name, chosen, steps, dtype, seed, device=device,
                                       reference_backend=reference)
    failed = [r for r in rows if not r.ok]
    lines = [f"parity: spec {spec.name} (hash {spec.hash()}), model {spec.model}, dtype {dtype}, seed {seed}, "
             f"batch {', '.join(str(b) for b in dict.fromkeys(spec.batch_size_for(v) for v in spec.variants))}, "
             f"1 step + {steps}-step trajectories"
             + (f"; each backend also against {reference}'s {REFERENCE_DTYPE} (rows <backend>-{REFERENCE_DTYPE})"
                if reference else "")]
    for name, engine in engines.items():
        versions = ", ".join(f"{k} {v}" for k, v in engine.versions().items())
        lines.append(f"  {name}: {versions}; {engine.device_description()}")
    lines += ["", format_table(rows), ""]
    lines.append(f"{len(rows) - len(failed)} of {len(rows)} quantities within tolerance"
                 + (f"; FAILED: {', '.join(sorted({f'{r.variant}:{r.pair}:{r.quantity}' for r in failed}))}" if failed else ""))
    relocked = list(dict.fromkeys(r.pair for r in rows if "lockstep re-run" in r.detail))
    if relocked:
        lines.append(f"free-running trajectories failed and were re-run in lockstep across ReLU ties: {', '.join(relocked)}")
    drifted = drifted_backends(rows)
    if drifted:
        lines.append(f"left the {REFERENCE_DTYPE} computation beyond tolerance: {', '.join(drifted)}")
    diverged = list(dict.fromkeys(r.variant for r in rows if r.quantity == DIVERGENCE))
    if diverged:
        lines.append(f"the training diverges within {steps} steps (a non-finite loss; rows '{DIVERGENCE}'): "
                     f"{', '.join(diverged)}; compared over the steps before it. A smaller learning rate or "
                     "auxiliary-loss weight compares every step")
    return not failed, "\n".join(lines)
