"""Tests for normbench.parity: every pair of available backends computes the same numbers.

Parametrized over backend pairs (ids like "torch-jax"); a pair with a backend that is
not available (adapter not written yet, or framework not installed) is skipped with
the reason, so a new backend is picked up as soon as `backends.is_available` says so.
Each backend's outputs are computed once per (model, variant, dtype) in a module-scoped
cache and shared by the pairwise tests; an exception in a backend is cached too and
fails every test that needs that backend.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import pytest

from normbench import backends, parity
from normbench import spec as spec_module
from normbench.plan import resolve as TrainingProgram

PAIRS = list(itertools.combinations(backends.names(), 2))  # torch-jax, torch-tensorflow, jax-tensorflow
PAIR_IDS = [f"{a}-{b}" for a, b in PAIRS]
MODELS = ("cnn3", "mlp3")
NORMALIZATIONS = ("none", "batch_norm_shift", "batch_norm_scale_shift", "standardization_loss")  # the legacy names
SEED = 0
TRAJECTORY_STEPS = 50
FLOAT64_BATCH = 64  # float64 single steps use the first 64 examples of the first batch (float64 CPU convs are slow)
OPTIMIZER_STEPS = 10

# The paper's setup (bundled mnist-cnn: batch 128, SGD lr 1e-3, weight decay 4e-5, batch
# norm decay 0.99 / epsilon 1e-3), with one variant per normalization.
_VARIANTS = [{"name": n, "normalization": n, "standardization_loss_weight": 1.0 if n == "standardization_loss" else 0.0,
              "steps": None} for n in NORMALIZATIONS]


@functools.lru_cache(maxsize=None)
def _paper_spec(model: str) -> spec_module.ExperimentSpec:
    return spec_module.load("mnist-cnn").replace(name=f"parity-{model}", model=model, variants=_VARIANTS)


# A tiny model with each optimizer and a warm-up + step-decay schedule (every update
# formula and the host-side learning-rate path), in float32 and float64.
_OPTIMIZER_TABLES = {
    "sgd_nesterov": 'name = "sgd"\nlearning_rate = 0.05\nmomentum = 0.9\nnesterov = true\nweight_decay = 4e-5',
    "rmsprop": 'name = "rmsprop"\nlearning_rate = 1e-3\ndecay = 0.9\nmomentum = 0.5\nweight_decay = 4e-5',
    "adam": 'name = "adam"\nlearning_rate = 1e-3\nweight_decay = 4e-5',
}
_TINY_SPEC = """
name = "parity-{name}"
model = "cnn-tiny"
dataset = "mnist"
batch_size = 32
steps = {steps}
eval_every = {steps}
train_eval_examples = 1000
seeds = 1

[optimizer]
{optimizer}

[schedule]
name = "step_decay"
warmup_steps = 3
decay_rate = 0.5
decay_every = 3

[[variant]]
name = "batch_norm_scale_shift"  # kernels, scales and shifts: every kind of parameter but biases
normalization = "batch_norm_scale_shift"
"""


@functools.lru_cache(maxsize=None)
def _tiny_spec(optimizer: str) -> spec_module.ExperimentSpec:
    text = _TINY_SPEC.format(name=optimizer, steps=OPTIMIZER_STEPS, optimizer=_OPTIMIZER_TABLES[optimizer])
    return spec_module.loads(text, source=f"<parity-{optimizer}>")


def _require(*names: str) -> None:
    for name in names:
        if not backends.is_available(name):
            pytest.skip(f"backend {name!r} is not available here (adapter not implemented or framework not installed)")


def _any_backend() -> str:
    """The fastest installed backend for a test that needs one, any one (skips without)."""
    backend = next((b for b in ("jax", "tensorflow", "torch") if backends.is_available(b)), None)
    if backend is None:
        pytest.skip("no backend available")
    return backend


class _Cache:
    """Each backend's outputs, computed once per key; exceptions are remembered and re-raised."""

    def __init__(self):
        self.values: dict[tuple, object] = {}

    def get(self, key: tuple, compute):
        if key not in self.values:
            try:
                self.values[key] = compute()
            except Exception as exc:  # noqa: BLE001 - re-raised for every test that needs it
                self.values[key] = exc
        value = self.values[key]
        if isinstance(value, Exception):
            raise value
        return value


@pytest.fixture(scope="module")
def cache() -> _Cache:
    return _Cache()


def _step(cache, backend, model, normalization, dtype):
    spec = _paper_spec(model)
    batch = parity.first_batch(spec, SEED)
    if dtype == "float64":
        batch = batch[:FLOAT64_BATCH]
    return cache.get(("step", backend, model, normalization, dtype),
                     lambda: parity.step_outputs(spec, normalization, backend, dtype, SEED, batch))


def _trajectory(cache, backend, spec, variant, steps, dtype="float32"):
    return cache.get(("trajectory", backend, spec.name, variant, steps, dtype),
                     lambda: parity.trajectory_outputs(spec, variant, backend, steps, dtype, SEED))


def _assert_agree(outputs: dict, dtype: str, spec, variant: str, trajectory_steps: int | None = None) -> None:
    """Every quantity of `outputs` within the dtype's tolerance; trajectories
    (`trajectory_steps`) as `normbench parity` compares them: across ReLU ties, and held
    to the trajectory's own conditioning where it is chaotic."""
    rows = parity.compare_outputs(outputs, dtype, variant, TrainingProgram(spec, variant).std_metric.log_epsilon)
    if trajectory_steps is not None:
        rows = parity.recheck_trajectories(rows, spec, variant, list(outputs), trajectory_steps, dtype, SEED)
    assert rows, "nothing was compared"
    failed = [r for r in rows if not r.ok]
    assert not failed, f"{len(failed)} of {len(rows)} quantities exceed the {dtype} tolerance:\n" + parity.format_table(failed)


def _expected_step_quantities(spec, normalization) -> set[str]:
    program = TrainingProgram(spec, spec.variant(normalization))
    params, state = program.initial_parameters(SEED)
    layers = [slot.layer for slot in program.arch.slots]
    return ({f"gradient/{k}" for k in params} | {f"state/{k}" for k in state}
            | {"logits", "total_loss", "cross_entropy"} | {f"{loss.name}_loss" for loss in program.losses}
            | {f"{kind}/{layer}" for kind in ("preactivation", "mean", "var") for layer in layers})


# ----------------------------------------------------------------------------- single step


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("backend", backends.names())
def test_step_outputs_cover_every_quantity(cache, backend, model, normalization):
    _require(backend)
    spec = _paper_spec(model)
    outputs = _step(cache, backend, model, normalization, "float32")
    assert set(outputs) == _expected_step_quantities(spec, normalization)
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_single_step_float64(cache, pair, model, normalization):
    _require(*pair)
    outputs = {b: _step(cache, b, model, normalization, "float64") for b in pair}
    _assert_agree(outputs, "float64", _paper_spec(model), normalization)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_single_step_float32(cache, pair, model, normalization):
    _require(*pair)
    outputs = {b: _step(cache, b, model, normalization, "float32") for b in pair}
    _assert_agree(outputs, "float32", _paper_spec(model), normalization)


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_trajectory_float32(cache, pair, model, normalization):
    _require(*pair)
    spec = _paper_spec(model)
    outputs = {b: _trajectory(cache, b, spec, normalization, TRAJECTORY_STEPS) for b in pair}
    for b, out in outputs.items():  # the comparison below assumes every step was recorded
        assert out["trajectory/loss"].shape == (TRAJECTORY_STEPS,), b
    _assert_agree(outputs, "float32", spec, normalization, TRAJECTORY_STEPS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", list(_OPTIMIZER_TABLES))
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_optimizers_and_schedule(cache, pair, optimizer, dtype):
    _require(*pair)
    spec = _tiny_spec(optimizer)
    variant = spec.variants[0].name
    outputs = {b: _trajectory(cache, b, spec, variant, OPTIMIZER_STEPS, dtype) for b in pair}
    _assert_agree(outputs, dtype, spec, variant, OPTIMIZER_STEPS)


# ----------------------------------------------------------------------------- the harness itself


def test_relative_error_definitions():
    a = {"mean/l": np.array([1e-8, -2e-8]), "var/l": np.array([4.0, 1.0]), "standardization_loss": np.array(1e-6),
         "logits": np.array([[1.0, -3.0]])}
    b = {"mean/l": np.array([2e-8, -2e-8]), "var/l": np.array([4.0, 1.0]), "standardization_loss": np.array(2e-6),
         "logits": np.array([[1.0, -2.9]])}
    rows = {r.quantity: r for r in parity.compare_outputs({"x": a, "y": b}, "float32", "v", log_epsilon=1e-8)}
    assert rows["mean/l"].max_rel == pytest.approx(1e-8 / 2.0)  # relative to the layer's RMS (sqrt(4))
    assert rows["logits"].max_rel == pytest.approx(0.1 / 3.0)  # worst element / largest magnitude
    # equation (2)'s terms: 0.5 * sum(m^2 + v + |log v| + 1) = 0.5 * (4 + log 4 + 1 + 1 + 0 + 1)
    assert rows["standardization_loss"].max_rel == pytest.approx(1e-6 / (0.5 * (7 + np.log(4))), rel=1e-6)
    assert not rows["logits"].ok and rows["mean/l"].ok


def test_differences_within_underflow_count_as_none():
    # plain MobileNet-v1 at initialization, conv_dw_13: a variance of ~7e-35 whose squared
    # terms fall below float32's smallest normal; the backends differ by 8.3e-39 there
    tiny = float(np.finfo(np.float32).tiny)
    a = {"var/l": np.array([6.771117e-35, 3.6e-35])}
    b = {"var/l": np.array([6.771117e-35 + 8.3e-39, 3.6e-35])}
    row = parity.compare_outputs({"x": a, "y": b}, "float32", "v", log_epsilon=1e-8)[0]
    assert row.ok and row.max_rel == 0.0 and row.max_abs == pytest.approx(8.3e-39)
    assert parity.underflow_floor("float32") == 2 * tiny
    # float64 has no such floor at this size: the same difference fails there
    assert not parity.compare_outputs({"x": a, "y": b}, "float64", "v", log_epsilon=1e-8)[0].ok
    # a difference above the floor is measured in full, the elements within it included
    b["var/l"] = np.array([6.771117e-35 + 8.3e-39, 3.6e-35 * (1 + 1e-3)])
    row = parity.compare_outputs({"x": a, "y": b}, "float32", "v", log_epsilon=1e-8)[0]
    assert not row.ok and row.max_rel == pytest.approx(3.6e-38 / 6.771117e-35, rel=1e-3)
    # and so is a larger variance's real difference in float32 against float64
    rows = parity.compare_with_reference({"x": {"var/l": np.array([1.0, 2.0])}}, {"var/l": np.array([1.0, 2.01])}, "v", 1e-8)
    assert not rows[0].ok


def test_a_gradient_is_measured_against_its_layers_largest():
    # PointNet's conv5 shift gradient: zero in real arithmetic, 4e-14 of rounding either way
    a = {"gradient/conv5/shift": np.array([3e-14, -1e-14]), "gradient/conv5/kernel": np.array([[0.5, -2.0]]),
         "gradient/fc1/kernel": np.array([100.0])}
    b = {"gradient/conv5/shift": np.array([-1e-14, 1e-14]), "gradient/conv5/kernel": np.array([[0.5, -2.0]]),
         "gradient/fc1/kernel": np.array([100.0])}
    rows = {r.quantity: r for r in parity.compare_outputs({"x": a, "y": b}, "float64", "v", log_epsilon=1e-8)}
    assert rows["gradient/conv5/shift"].max_rel == pytest.approx(4e-14 / 2.0)  # not fc1's 100, not its own 3e-14
    assert rows["gradient/conv5/shift"].ok
    # a real difference in an offset's gradient still fails against its layer's scale
    b["gradient/conv5/shift"] = np.array([1e-6, 0.0])
    rows = {r.quantity: r for r in parity.compare_outputs({"x": a, "y": b}, "float64", "v", log_epsilon=1e-8)}
    assert not rows["gradient/conv5/shift"].ok


def test_missing_or_non_finite_quantities_fail():
    rows = parity.compare_outputs({"x": {"logits": np.ones(3), "var/l": np.ones(2)},
                                   "y": {"logits": np.array([1.0, np.nan, 1.0])}}, "float64", "v", 1e-8)
    assert {r.quantity: r.ok for r in rows} == {"logits": False, "var/l": False}


def test_trajectory_rows_check_every_step():
    a = {"trajectory/loss": np.array([2.0, 2.0, 2.0])}
    b = {"trajectory/loss": np.array([2.0, 2.0 * (1 + 1e-1), 2.0])}
    (row,) = parity.compare_outputs({"x": a, "y": b}, "float32", "v", 1e-8)
    assert not row.ok and row.detail == "worst at step 2 of 3"
    assert row.max_rel == pytest.approx(1e-1 / (1 + 1e-1))


def _losses(*values):
    return {"trajectory/loss": np.array(values, np.float64), "trajectory/cross_entropy": np.ones(len(values))}


def test_a_divergence_every_backend_shares_agrees_and_a_lone_one_does_not():
    outputs = {"x": _losses(2.0, 1e30, np.nan, np.nan), "y": _losses(2.0, 1e30, np.inf, np.nan),
               "z": _losses(2.0, 1e30, 1e33, np.nan)}
    rows = {r.pair: r for r in parity.divergence_rows(outputs, None, "v")}
    assert rows["x-y"].ok and rows["x-y"].detail == "x non-finite from step 3, y non-finite from step 3"
    assert not rows["x-z"].ok and not rows["y-z"].ok and "z non-finite from step 4" in rows["x-z"].detail
    assert all(r.quantity == parity.DIVERGENCE for r in rows.values())
    assert parity.non_finite_onset(_losses(1.0, 2.0)) is None


def test_float32_may_stop_before_float64_only_where_float64_left_its_range():
    """float64 keeps the range float32 overflowed, but its loss must be past float32's
    largest number at the step float32 stopped; a float32 NaN where float64 computes an
    ordinary loss is a failure, and so is float64 turning non-finite before float32."""
    outputs = {"x": _losses(2.0, 3e37, np.nan)}
    overflowed = parity.divergence_rows(outputs, _losses(2.0, 3e37, 4e50), "v")
    assert [(r.pair, r.ok) for r in overflowed] == [("x-float64", True)]
    assert "beyond float32's range" in overflowed[0].detail
    (ordinary,) = parity.divergence_rows(outputs, _losses(2.0, 3e37, 5.0), "v")
    assert not ordinary.ok and "not an overflow" in ordinary.detail
    (earlier,) = parity.divergence_rows({"x": _losses(2.0, 3.0, 4.0)}, _losses(2.0, np.nan, np.nan), "v")
    assert not earlier.ok and earlier.detail == "x finite through step 3, float64 non-finite from step 2"


def test_a_diverging_trajectory_is_compared_over_the_steps_before_its_first_non_finite_loss():
    """An mlp-tiny step with a learning rate far too large: the standardization loss grows
    by orders of magnitude per step and every computation overflows at the same step; the
    rows say so, and the steps before are compared as usual, each row saying how many."""
    installed = backends.available()
    if len(installed) < 2:
        pytest.skip("needs two installed backends")
    pair = installed[:2]
    spec = spec_module.loads(_TINY_SPEC.format(name="diverging", steps=6, optimizer='name = "sgd"\nlearning_rate = 0.5')
                             .replace('model = "cnn-tiny"', 'model = "mlp-tiny"').replace("warmup_steps = 3", "warmup_steps = 0")
                             .replace('normalization = "batch_norm_scale_shift"',
                                      'normalization = "standardization_loss"\nstandardization_loss_weight = 2.0'),
                             source="<parity-diverging>")
    variant = spec.variants[0].name
    onset = parity.non_finite_onset(parity.trajectory_outputs(spec, variant, pair[0], 6, "float32", SEED))
    assert onset is not None and 2 < onset <= 6, "the spec no longer diverges within its steps: make it"
    rows = parity.compare_trajectory(spec, variant, pair, 6, "float32", SEED, reference_backend=pair[0])
    divergence = [r for r in rows if r.quantity == parity.DIVERGENCE]
    assert {r.pair for r in divergence} == {"-".join(pair), *(parity.reference_pair(b) for b in pair)}
    assert all(r.ok for r in divergence), parity.format_table(divergence)
    compared = [r for r in rows if r.quantity != parity.DIVERGENCE]
    assert any(r.quantity.startswith("final/") for r in compared)
    assert all(r.ok and f"compared over steps 1-{onset - 1}" in r.detail for r in compared), parity.format_table(compared)
    assert all(r.detail.startswith("worst at step") and f"of {onset - 1}" in r.detail
               for r in compared if r.quantity.startswith("trajectory/"))


def test_format_table_marks_failures():
    rows = [parity.Row("torch-jax", "v", "gradient/conv1/kernel", 1e-3, 1e-2, 1e-4, False),
            parity.Row("torch-jax", "v", "gradient/conv2/kernel", 1e-9, 1e-8, 1e-4, True)]
    table = parity.format_table(rows)
    assert table.count("\n") == 2  # header, rule, one collapsed row
    assert "FAIL" in table and "gradient/conv1/kernel" in table


def test_float64_reference_rows_name_the_backend_that_drifted():
    reference = {"trajectory/loss": np.array([2.0, 2.0]), "final/l/kernel": np.array([1.0, -1.0])}
    outputs = {"x": {"trajectory/loss": np.array([2.0, 2.0 + 1e-7]), "final/l/kernel": np.array([1.0, -1.0])},
               "y": {"trajectory/loss": np.array([2.0, 2.2]), "final/l/kernel": np.array([1.0, -1.0])}}
    rows = parity.compare_with_reference(outputs, reference, "v", 1e-8)
    assert {(r.pair, r.quantity): r.ok for r in rows} == {
        ("x-float64", "trajectory/loss"): True, ("x-float64", "final/l/kernel"): True,
        ("y-float64", "trajectory/loss"): False, ("y-float64", "final/l/kernel"): True}
    assert all(r.tolerance == parity.drift_tolerance(r.quantity) for r in rows)
    assert parity.drifted_backends(rows) == ["y"]
    assert "y-float64" in parity.format_table(rows)


def test_total_loss_is_held_to_its_loosest_term():
    """A total with an auxiliary loss (tolerance 5e-5) in it may be as far off as that
    term; without one it keeps the total's own 5e-6."""
    from normbench.parity import compare_outputs

    base = {"cross_entropy": np.array(2.0), "total_loss": np.array(100.0)}
    off = {"cross_entropy": np.array(2.0), "total_loss": np.array(100.0 * (1 + 2e-5))}
    plain = compare_outputs({"a": base, "b": off}, "float32", "v", log_epsilon=1e-8)
    assert not next(r for r in plain if r.quantity == "total_loss").ok
    with_aux = {**base, "decorrelation_loss": np.array(98.0)}
    with_aux_off = {**off, "decorrelation_loss": np.array(98.0 * (1 + 2e-5))}
    rows = compare_outputs({"a": with_aux, "b": with_aux_off}, "float32", "v", log_epsilon=1e-8)
    assert next(r for r in rows if r.quantity == "total_loss").ok
    assert next(r for r in rows if r.quantity == "total_loss").tolerance == 5e-5


# ----------------------------------------------------------------------------- ReLU ties along a trajectory


def test_relu_ties_tell_a_tie_from_a_real_difference():
    a = {"preactivation/l": np.array([3.0, 1e-7, -2.0]), "logits": np.array([1.0])}
    tie = {"preactivation/l": np.array([3.0, -1e-7, -2.0])}       # within 2e-5 of the layer's max (3)
    real = {"preactivation/l": np.array([3.0, -1e-3, -2.0])}      # a flip, but 3.4e-4 apart: not rounding
    assert parity.relu_ties(a, a, 2e-5) == {}
    assert parity.relu_ties(a, tie, 2e-5) == {"l": 1}
    assert parity.relu_ties(a, real, 2e-5) is None
    # held to a layer's own conditioning (a shadowed update's probe), the same flip is a tie
    bound = parity._conditioned_tie_bound(2e-5, a, dict(a, **{"preactivation/l": a["preactivation/l"] * (1 + 4e-5)}),
                                          1e-8, 1)
    assert bound("l") == pytest.approx(4e-4, rel=1e-4) and parity.relu_ties(a, real, bound) == {"l": 1}
    assert parity.relu_ties(a, real, parity._conditioned_tie_bound(2e-5, a, dict(a), 1e-8, 1)) is None  # unmoved


def test_single_step_ties_are_recompared_without_the_tied_examples(monkeypatch):
    """A pair whose gradients fail at a ReLU tie in example 1 of a 3-example batch is
    compared again on examples 0 and 2; a pair whose flip is a real difference is not."""
    spec = _tiny_spec("adam")
    variant = spec.variants[0].name
    z = np.array([[3.0, 1.0], [1e-7, 2.0], [-2.0, 0.5]])
    a = {"preactivation/l": z, "gradient/l/kernel": np.array([1.0, 2.0])}
    flipped = z.copy()
    flipped[1, 0] = -1e-7  # within rounding of 0, on the other side
    tie = {"preactivation/l": flipped, "gradient/l/kernel": np.array([1.0, 2.5])}
    seen = []

    def reduced_step(spec_, variant_, backend, dtype, seed, batch_indices, device):
        seen.append((backend, list(batch_indices)))
        return {"preactivation/l": z[[0, 2]], "gradient/l/kernel": np.array([1.0, 2.0])}

    monkeypatch.setattr(parity, "step_outputs", reduced_step)
    outputs = {"x": a, "y": tie}
    rows = parity.compare_outputs(outputs, "float32", variant, 1e-8)
    assert not all(r.ok for r in rows)
    batch = np.array([10, 11, 12])
    rows = parity.recheck_step_ties(rows, outputs, None, spec, variant, "float32", 0, None, None, batch)
    assert all(r.ok for r in rows) and seen == [("x", [10, 12]), ("y", [10, 12])]
    assert all("without example(s) [11]" in r.detail for r in rows)
    # a flip between pre-activations 1e-3 apart is a real difference: nothing is re-run
    far = z.copy()
    far[1, 0] = -1e-3
    real = dict(tie, **{"preactivation/l": far})
    seen.clear()
    rows = parity.compare_outputs({"x": a, "y": real}, "float32", variant, 1e-8)
    rows = parity.recheck_step_ties(rows, {"x": a, "y": real}, None, spec, variant, "float32", 0, None, None, batch)
    assert seen == [] and not all(r.ok for r in rows)



def _conditioning_case(monkeypatch, float32_x, probe_moves, float64_y=0.0):
    """Single-step outputs of backends x and y in float32 (y exact, x off by `float32_x` on
    its logits), the reference's float64 step (exact) and, from `step_outputs`, the float64
    step from a start one rounding away (logits moved by `probe_moves`) or, for any other
    call, backend y's float64 step (off by `float64_y`). Returns (rows, calls)."""
    spec = _tiny_spec("adam")
    variant = spec.variants[0].name
    exact = {"logits": np.array([1.0, -2.0]), "cross_entropy": np.array(0.5)}

    def moved(by):
        return dict(exact, logits=exact["logits"] * (1 + by))

    calls = []

    def step(spec_, variant_, backend, dtype, seed, batch_indices, device, start_perturbed_at=None):
        calls.append((backend, dtype, start_perturbed_at))
        return moved(probe_moves) if start_perturbed_at else moved(float64_y if backend == "y" else 0.0)

    monkeypatch.setattr(parity, "step_outputs", step)
    outputs = {"x": moved(float32_x), "y": dict(exact)}
    rows = parity.compare_outputs(outputs, "float32", variant, 1e-8)
    rows += parity.compare_with_reference(outputs, exact, variant, 1e-8)
    assert not all(r.ok for r in rows)
    rows = parity.recheck_step_conditioning(rows, outputs, exact, spec, variant, "float32", 0, None, None, "x")
    return rows, calls


def test_a_failing_single_step_is_held_to_its_own_conditioning_and_to_float64(monkeypatch):
    """A float32 step off by 1e-3 where the float64 step from a start one float32 rounding
    away moves by 5e-4: the rows pass against bounds raised to the conditioning, the
    passing rows keep their bounds, and every backend pair is added in float64."""
    rows, calls = _conditioning_case(monkeypatch, float32_x=1e-3, probe_moves=5e-4)
    assert calls[0] == ("x", "float64", "float32") and ("y", "float64", None) in calls
    assert all(r.ok for r in rows)
    raised = [r for r in rows if r.tolerance > parity.tolerance(r.quantity, "float32")]
    assert {(r.pair, r.quantity) for r in raised} == {("x-y", "logits"), ("x-float64", "logits")}
    assert all("own conditioning" in r.detail and "moves it by 5.0e-04" in r.detail for r in raised)
    formula = [r for r in rows if r.pair.endswith(" in float64")]
    assert {r.pair for r in formula} == {"x-y in float64"} and all(r.tolerance == parity.FLOAT64_TOLERANCE for r in formula)


def test_a_single_step_beyond_its_conditioning_or_its_float64_formula_still_fails(monkeypatch):
    # the probe moves 1e-6: ten times that (twice, for a pair) cannot cover 1e-3
    rows, _ = _conditioning_case(monkeypatch, float32_x=1e-3, probe_moves=1e-6)
    assert not all(r.ok for r in rows if r.quantity == "logits" and r.pair in ("x-y", "x-float64"))
    # covered by the conditioning, but backend y computes another formula in float64
    rows, _ = _conditioning_case(monkeypatch, float32_x=1e-3, probe_moves=5e-4, float64_y=1e-6)
    assert [(r.pair, r.quantity) for r in rows if not r.ok] == [("x-y in float64", "logits")]
    # raised to the ceiling and still failing: the row says float32 cannot check it
    rows, _ = _conditioning_case(monkeypatch, float32_x=0.5, probe_moves=0.2)
    failed = [r for r in rows if not r.ok]
    assert failed and all(r.tolerance == parity.CONDITIONING_FACTOR * parity.CONDITIONING_LIMIT for r in failed)
    assert all("--dtype float64" in r.detail for r in failed)


def test_single_step_bounds_grow_with_depth_and_trajectory_bounds_do_not():
    assert parity.tolerance("logits", "float32", 35) == pytest.approx(parity.tolerance("logits", "float32") * 35 / 4)
    assert parity.tolerance("logits", "float32", 3) == parity.tolerance("logits", "float32")  # never below the bound
    assert parity.tolerance("final/l/kernel", "float32", 35) == parity.tolerance("final/l/kernel", "float32")
    assert parity.tolerance("logits", "float64", 35) == parity.FLOAT64_TOLERANCE
    assert parity.drift_tolerance("gradient/l/kernel", 8) == 2 * parity.drift_tolerance("gradient/l/kernel")


def test_tie_description_names_step_layer_and_size():
    text = parity.Tie(6, {"conv2": 1}, 4.2e-8).describe()
    assert text == "step 6: conv2 x1, |z| <= 4.2e-08 of the layer's max"


@pytest.mark.parametrize("backend", backends.names())
def test_load_state_restarts_a_run_exactly(backend):
    """A trainer loaded with another's parameters, running statistics and optimizer slots
    takes the same next step, bit for bit (what a lockstep re-anchor relies on)."""
    _require(backend)
    spec = _tiny_spec("rmsprop")
    program = TrainingProgram(spec, spec.variants[0].name)
    data, batches, used = parity._trajectory_inputs(spec, spec.variants[0].name, 3, SEED)
    running = parity._trainer(program, data, used, backend, "float32", SEED, None)
    for t in range(2):
        running.step(np.searchsorted(used, batches[t]), program.learning_rate(t))
    restarted = parity._trainer(program, data, used, backend, "float32", SEED, None)
    restarted.load_state(*running.export(), running.export_optimizer_state())
    assert set(restarted.export_optimizer_state()) == set(running.export_optimizer_state()) != set()
    losses = [t.step_and_read(np.searchsorted(used, batches[2]), program.learning_rate(2)) for t in (running, restarted)]
    assert losses[0] == losses[1]
    for a, b in zip(running.export(), restarted.export()):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_lockstep_reanchors_the_second_side_at_every_tie(monkeypatch):
    """With every step declared a tie, the float32 side restarts from the float64 side's
    state after each update: it ends on float64's parameters rounded once to float32,
    closer than its free-running drift, and every step is listed."""
    backend = _any_backend()
    spec = _tiny_spec("adam")
    variant = spec.variants[0].name
    steps = 4
    first, second, _, updates = parity.lockstep_outputs(spec, variant, (backend, "float64"), (backend, "float32"), steps,
                                                        SEED)
    assert updates == []  # listed only when shadowing
    free_gap = max(np.max(np.abs(first[k] - second[k])) for k in first if k.startswith("final/"))
    monkeypatch.setattr(parity, "relu_ties", lambda a, b, tol: {"forced": 1})
    monkeypatch.setattr(parity, "_largest_flipped", lambda a, b, layers: 0.0)
    first, second, ties, _ = parity.lockstep_outputs(spec, variant, (backend, "float64"), (backend, "float32"), steps,
                                                     SEED)
    assert [t.step for t in ties] == list(range(1, steps + 1))
    for k in first:
        if k.startswith(("final/", "final_state/")):  # exactly float64's values rounded to float32
            np.testing.assert_array_equal(second[k], first[k].astype(np.float32).astype(np.float64))
    assert free_gap > 0


def test_shadowing_compares_every_update_from_a_common_state():
    """Shadowed, the float32 side restarts from float64's state after every update, and
    each update's two resulting states are listed: one float32 step from a common state,
    far closer than the free-running drift; the rows report the worst update."""
    backend = _any_backend()
    spec = _tiny_spec("adam")
    variant = spec.variants[0].name
    steps = 4
    first, second, _, updates = parity.lockstep_outputs(spec, variant, (backend, "float64"), (backend, "float32"), steps,
                                                        SEED, every_step=True)
    assert len(updates) == steps and set(updates[0].first) == {k for k in first if k.startswith(("final/", "final_state/"))}
    assert {f"final/{k}" for k in updates[0].first_gradients} == {k for k in first if k.startswith("final/")}
    assert set(updates[0].second_gradients) == set(updates[0].first_gradients)
    rows = parity._shadowed_rows((backend, "float64"), (second, first), [u.swapped() for u in updates], variant, 1e-8,
                                 parity.drift_tolerance)
    assert {r.quantity for r in rows} == set(first) and all(r.ok for r in rows)
    assert any(r.detail.startswith("worst at update ") for r in rows)
    # a real difference in one update still fails, and is found at that update
    b = updates[2].second
    broken = dataclasses.replace(updates[2], second=dict(b, **{k: b[k] * 1.01 for k in b if k.startswith("final/")}))
    rows = parity._shadowed_rows(("x", "y"), (first, second), [*updates[:2], broken, *updates[3:]], variant, 1e-8,
                                 lambda q: 1e-3)
    failing = [r for r in rows if not r.ok]
    assert failing and all(r.detail == f"worst at update 3 of {steps}" for r in failing)


def _undetermined_update(first_gradient: float, second_gradient: float) -> "parity.Update":
    """A zero-initialized kernel after one Adam-like step of 1e-3 (the layer's largest
    gradient is 1): element 0's gradient is `first_gradient` on one side and
    `second_gradient` on the other, and its two steps point opposite ways."""
    gradient = np.array([first_gradient, 1.0, -0.5, 0.25])
    first = np.array([1e-3, 1e-3, -1e-3, 1e-3])
    second = np.array([-1e-3, 1e-3, -1e-3, 1e-3])
    return parity.Update(first={"final/l/kernel": first}, second={"final/l/kernel": second},
                         start={"final/l/kernel": np.zeros(4)},
                         first_gradients={"l/kernel": gradient, "l/bias": np.array([0.1])},
                         second_gradients={"l/kernel": np.array([second_gradient, 1.0, -0.5, 0.25]), "l/bias": np.array([0.1])})


def _kernel_row(update, gradient_tolerance=5e-3):
    outs = ({"trajectory/loss": np.ones(1)}, {"trajectory/loss": np.ones(1)})
    rows = parity._shadowed_rows(("x", "y"), outs, [update], "v", 1e-8, lambda q: 1e-3, gradient_tolerance)
    return next(r for r in rows if r.quantity == "final/l/kernel")


def test_an_undetermined_gradient_is_left_out_of_a_shadowed_update_and_counted():
    """An element whose gradient is within the gradient bound of 0 and differs between
    the sides beyond the parameter's bound takes a step of rounding: left out, and the row
    says so. Every other way the same opposite steps can arise fails (relative error 2 on
    a parameter one step in size): a gradient the sides agree on, a gradient too large to
    be rounding, or no gradient bound at all."""
    row = _kernel_row(_undetermined_update(1e-4, -1e-4))
    assert row.ok and row.max_abs == 0.0 and "undetermined gradients left out: 1 of 4 at update 1" in row.detail
    for update, bound in [(_undetermined_update(1e-4, 1e-4), 5e-3),   # determined: both sides agree
                          (_undetermined_update(0.2, -0.2), 5e-3),    # far outside the gradient bound
                          (_undetermined_update(1e-4, -1e-4), 0.0)]:  # no bound given
        row = _kernel_row(update, bound)
        assert not row.ok and row.max_rel == pytest.approx(2.0) and "undetermined" not in row.detail



def test_a_gradient_within_the_updates_own_conditioning_is_undetermined():
    """Element 0's gradient, 5% of the layer's largest, is far outside the gradient bound
    (5e-3) and its two steps point opposite ways: that fails, unless the probe's float64
    gradients at the common state and one rounding away differ by 0.3% of the layer's
    largest, which makes the bound 2 x 10 x 0.3% for two backends: then rounding decides
    that gradient, and the element is left out."""
    update = _undetermined_update(0.05, -0.05)
    assert not _kernel_row(update).ok
    gradients = update.first_gradients
    moved = dict(gradients, **{"l/kernel": gradients["l/kernel"] + np.array([0.003, 0.0, 0.0, 0.0])})
    row = _kernel_row(dataclasses.replace(update, probe_gradients=(gradients, moved)))
    assert row.ok and "undetermined gradients left out: 1 of 4 at update 1" in row.detail
    # a probe moving it by 0.2% only: 2 x 10 x 0.2% = 4% < 5%, still fails
    small = dict(gradients, **{"l/kernel": gradients["l/kernel"] + np.array([0.002, 0.0, 0.0, 0.0])})
    assert not _kernel_row(dataclasses.replace(update, probe_gradients=(gradients, small))).ok


def test_a_shadowed_update_at_a_relu_tie_compares_losses_but_not_parameters():
    """A tie lets one side's gradient keep a unit the other's drops (a whole example's
    contribution), so the two exact updates may differ by far more than rounding; as in
    the lockstep re-run, such an update's parameters are not compared and the rows say
    which updates were left out. An update without a tie still fails the same way."""
    apart = _undetermined_update(0.2, -0.2)  # steps opposite ways at a gradient no rounding explains
    close = dataclasses.replace(apart, second=dict(apart.first))
    outs = ({"trajectory/loss": np.ones(2)}, {"trajectory/loss": np.ones(2)})

    def rows(updates):
        return {r.quantity: r for r in parity._shadowed_rows(("x", "y"), outs, updates, "v", 1e-8, lambda q: 1e-3, 5e-3)}

    tied = rows([dataclasses.replace(apart, ties={"conv2": 1}), close])
    assert all(r.ok for r in tied.values()) and tied["final/l/kernel"].detail.startswith("worst at update 2 of 2")
    assert all("updates at ReLU ties, parameters not compared: 1 (conv2 x1)" in r.detail for r in tied.values())
    untied = rows([apart, close])
    assert not untied["final/l/kernel"].ok and "ReLU ties" not in untied["final/l/kernel"].detail


def test_a_bound_raised_past_the_conditioning_limit_is_replaced_by_shadowing(monkeypatch):
    """A chaotic pair passes its conditioned bound only because the probe itself moved by
    O(1): that holds nothing, so the pair is shadowed, and the shadowed rows decide."""
    spec = _tiny_spec("adam")
    variant = spec.variants[0].name
    x = {"trajectory/loss": np.array([1.0, 1.0]), "final/l/kernel": np.array([1.0, 2.0])}
    y = {"trajectory/loss": np.array([1.0, 1.5]), "final/l/kernel": np.array([1.0, 3.0])}
    shadow_calls = []

    def lockstep(spec_, variant_, first, second, steps, seed, device, every_step=False, probe=None):
        if every_step:
            shadow_calls.append(first)
            state = {"final/l/kernel": np.array([1.0, 2.0])}
            gradients = {"l/kernel": np.ones(2)}
            return x, dict(x), [], [parity.Update(state, dict(state), dict(state), gradients, dict(gradients))]
        return x, y, [], []

    monkeypatch.setattr(parity, "lockstep_outputs", lockstep)
    monkeypatch.setattr(parity, "conditioning_outputs", lambda *a, **k: (x, y))  # the probe moved as far as the pair
    rows = parity.compare_outputs({"jax": x, "tensorflow": y}, "float64", variant, 1e-8)
    assert not all(r.ok for r in rows)
    rows = parity.recheck_trajectories(rows, spec, variant, ["jax", "tensorflow"], 2, "float64")
    assert shadow_calls == [("jax", "float64")]
    assert all(r.ok for r in rows) and all(parity.SHADOWED_NOTE in r.detail for r in rows)
    assert all(r.tolerance == parity.FLOAT64_TOLERANCE for r in rows)  # held at the calibrated bound



def test_a_shadowed_update_that_fails_is_held_to_its_own_conditioning():
    """An update whose two results differ by 5% of a kernel fails the calibrated bound
    (2e-2; relative to the kernel's largest, 4.8e-2); where the probe's float64 update from
    the common state one rounding away moves the kernel by 4.0e-3, the bound becomes
    2 x 10 x 4.0e-3 for two backends, and 1 x 10 x 4.0e-3 against float64, which it exceeds."""
    kernel = np.array([1.0, 2.0])
    after = {"final/l/kernel": kernel}
    apart = {"final/l/kernel": kernel * np.array([1.0, 1.05])}
    probed = ({"final/l/kernel": kernel}, {"final/l/kernel": kernel * np.array([1.0, 1.004])})
    gradients = {"l/kernel": np.ones(2)}
    tolerance_of = lambda q: parity.tolerance(q, "float32")  # noqa: E731
    losses = {"trajectory/loss": np.array([1.0])}

    def rows(probe, sides):
        update = parity.Update(after, apart, after, gradients, dict(gradients), {}, probe)
        return parity._shadowed_rows(("x", "y"), (losses, dict(losses)), [update], "v", 1e-8, tolerance_of, 0.0, 0.0,
                                     sides=sides)

    kernel_row = lambda rs: next(r for r in rs if r.quantity == "final/l/kernel")  # noqa: E731
    assert not kernel_row(rows(None, 2)).ok  # no probe: the calibrated bound
    held = kernel_row(rows(probed, 2))
    moved = 0.008 / 2.008
    assert held.ok and held.tolerance == pytest.approx(20 * moved) and "own conditioning" in held.detail
    alone = kernel_row(rows(probed, 1))
    assert not alone.ok and alone.tolerance == pytest.approx(10 * moved)


# ----------------------------------------------------------------------------- a trajectory's own conditioning


def test_series_rows_take_a_bound_per_step():
    a = np.array([1.0, 1.0, 1.0])
    b = np.array([1.0 + 1e-6, 1.0 + 1e-4, 1.0 + 1e-3])
    ok = parity._compare_series("x-y", "v", "trajectory/loss", a, b, np.array([1e-5, 2e-4, 1e-2]))
    assert ok.ok and ok.detail == "worst at step 2 of 3"  # 1e-4 of 2e-4 is the closest to its bound
    tight_early = parity._compare_series("x-y", "v", "trajectory/loss", a, b, np.array([1e-7, 1e-3, 1e-2]))
    assert not tight_early.ok and tight_early.detail == "worst at step 1 of 3" and tight_early.tolerance == 1e-7


def test_conditioned_bounds_follow_the_perturbed_run():
    exact = {"trajectory/loss": np.array([2.0, 2.0, 2.0]), "final/l/kernel": np.array([1.0, -1.0]),
             "logits": np.array([1.0])}
    moved = {"trajectory/loss": np.array([2.0, 2.0 * (1 + 1e-3), 2.0]), "final/l/kernel": np.array([1.0, -1.1]),
             "logits": np.array([2.0])}
    bound = parity._conditioned(lambda q: 1e-6, exact, moved, 1e-8)
    np.testing.assert_allclose(bound("trajectory/loss"), [1e-6, 1e-2 / (1 + 1e-3), 1e-2 / (1 + 1e-3)])  # running max
    assert bound("final/l/kernel") == pytest.approx(10 * 0.1 / 1.1)
    assert bound("logits") == 1e-6  # single-step quantities: not by a trajectory's probe


def test_one_rounding_moves_every_value_by_one_ulp_of_the_precision():
    x = np.array([1.0, -3.0, 0.0, 1e-3])
    moved = parity._one_rounding(x, "float64")
    assert np.all(np.abs(moved[[0, 1, 3]]) > np.abs(x[[0, 1, 3]])) and moved[2] == 0.0
    np.testing.assert_array_equal(np.abs(moved - x), np.spacing(np.abs(x)) * (x != 0))
    assert parity._one_rounding(np.array([0.1]), "float32").dtype == np.float32


def test_a_tie_under_per_replica_statistics_leaves_out_its_whole_replica():
    """Per-replica moments (replica_batch_size 4) cannot run a batch of 15, and dropping
    any other 4 examples would regroup the replicas: the tied example's whole aligned
    replica goes, and the other replicas keep their examples."""
    assert parity._whole_blocks([5], 16, 4) == [4, 5, 6, 7]
    assert parity._whole_blocks([1, 9], 16, 4) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert parity._whole_blocks([5], 16, 1) == [5]  # whole-batch statistics: the example alone
    assert parity._whole_blocks([0], 4, 4) is None  # nothing left to run
    spec = spec_module.load("smoke-mobilenet-v1")
    assert {v.name: parity._replica_size(TrainingProgram(spec, v.name)) for v in spec.variants}["batch_norm"] == 4
