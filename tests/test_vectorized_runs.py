"""Vectorized runs: seeds of one variant trained by one batched step (`Engine.vectorized_group`)
must each follow the trajectory they follow alone, within the float32 trajectory
tolerances of the parity tests, for every normalization method and auxiliary loss; and a
sweep in groups must write, key, resume and reuse runs exactly as a sweep of single runs.

Each member gets its own initial weights, batch order and dropout masks; a mixing of
members (a batched reduction over the wrong axis, shared running statistics, one
member's optimizer slots applied to another) moves a member by far more than the
tolerances, which is what the trajectory comparison below would catch."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from normbench import auxiliary_losses, backends, normalizations, parity, runner
from normbench.backends import base
from normbench.backends.base import VectorizedGroup
from normbench.data_order import BatchOrder, seed_streams
from normbench.plan import resolve

SEEDS = [0, 1, 2]
STEPS = 12
EXAMPLES = 96

# Options that make a method run on cnn3 (32, 16 and 8 channels); everything else at its defaults.
METHOD_OPTIONS = {"group_norm": {"groups": 4}}


def _method_variants() -> list:
    cases = []
    for name in normalizations.names():
        method = {"name": name, **METHOD_OPTIONS[name]} if name in METHOD_OPTIONS else name
        cases.append(pytest.param({"name": name, "normalization": method}, id=name))
    for name in auxiliary_losses.names():
        cases.append(pytest.param({"name": f"{name}_loss", "normalization": "none",
                                   "auxiliary_losses": [{"name": name, "weight": 0.1}]},
                                  id=f"{name}-loss"))
    return cases


def _trajectories(engine, plan, images, labels, vectorize: bool) -> list[dict]:
    """`STEPS` steps of the runs SEEDS of `plan`, each with its own batch order and dropout
    masks: per run, the parity quantities 'trajectory/<loss>', 'final/<param>' and
    'final_state/<name>'."""
    group = runner.make_group(engine, plan, SEEDS, engine.put_images(images), engine.put_labels(labels), vectorize)
    assert isinstance(group, VectorizedGroup) == vectorize
    orders = [BatchOrder(seed_streams(seed)[1], len(labels), plan.batch_size) for seed in SEEDS]
    pending = [group.step(np.stack([order.indices(step) for order in orders]), plan.learning_rate(step),
                          runner._group_masks(plan, SEEDS, step)) for step in range(STEPS)]
    losses = group.read_losses(pending)
    assert losses.shape == (STEPS, len(SEEDS), len(plan.step_loss_names))
    outputs = []
    for member in range(len(SEEDS)):
        params, state = group.export(member)
        out = {f"trajectory/{name}": losses[:, member, k].astype(np.float64) for k, name in enumerate(plan.step_loss_names)}
        out.update({f"final/{k}": np.asarray(v, np.float64) for k, v in params.items()})
        out.update({f"final_state/{k}": np.asarray(v, np.float64) for k, v in state.items()})
        outputs.append(out)
    return outputs


def _vectorizing_engine(backend: str, dtype: str = "float32"):
    engine = backends.get_engine(backend, device="cpu", dtype=dtype)
    if type(engine).vectorized_group is base.Engine.vectorized_group:
        pytest.skip(f"{backend} steps a group's runs one by one (see its engine.py)")
    return engine


def _compare_members(engine, plan, images, labels) -> None:
    alone = _trajectories(engine, plan, images, labels, vectorize=False)
    together = _trajectories(engine, plan, images, labels, vectorize=True)
    log_epsilon = plan.std_metric.log_epsilon
    for seed, a, b in zip(SEEDS, alone, together):
        rows = parity.compare_outputs({"alone": a, "vectorized": b}, plan.spec.dtype, plan.variant.name, log_epsilon)
        assert rows and {r.quantity for r in rows} == set(a)
        failed = [r for r in rows if not r.ok]
        assert not failed, f"seed {seed}:\n" + parity.format_table(failed)
    # The members really are different runs (a group that trained one run three times would pass the above).
    assert not np.allclose(alone[0]["trajectory/loss"], alone[1]["trajectory/loss"])


@pytest.mark.parametrize("variant", _method_variants())
def test_vectorized_members_follow_their_own_trajectories(backend_name, variant, spec_factory):
    engine = _vectorizing_engine(backend_name)
    # Adam (two slots per parameter) with a schedule that changes the rate mid-way, and
    # batch-norm running statistics updated at every step. Adam's epsilon is 1e-4, not 1e-8:
    # at 1e-8 a gradient element that is 0 but for rounding gets a full step of either sign
    # (m / sqrt(v) = +-1), so torch's batch_norm member parted from itself alone by 8.7e-3 of
    # conv2's kernel within 4 steps (2.07e-2 by step 12, over the 2e-2 bound) on one AMD
    # EPYC and not on another; at 1e-4 the same member stays within 7.8e-7 over 12 steps.
    spec = spec_factory(model="cnn3", dtype="float32", batch_size=16, steps=STEPS, seeds=len(SEEDS),
                     optimizer={"name": "adam", "learning_rate": 3e-3, "weight_decay": 1e-4, "epsilon": 1e-4},
                     schedule={"name": "piecewise", "boundaries": [6], "multipliers": [1.0, 0.3]},
                     variants=[variant])
    plan = resolve(spec, spec.variants[0])
    rng = np.random.default_rng(7)
    images = rng.random((EXAMPLES, *plan.arch.input_shape), dtype=np.float64).astype(np.float32)
    labels = rng.integers(0, 10, EXAMPLES)
    _compare_members(engine, plan, images, labels)


def test_vectorized_members_keep_their_own_dropout_masks(backend_name, spec_factory):
    """PointNet: dropout masks drawn per run and step, T-Nets, the feature-transform loss.

    In float64, to the float64 parity tolerance: the feature-transform loss |I - A A^T|^2
    cancels almost all of its terms while A is near I, so its value carries ~1e5 times
    the rounding of the step (float64: alone and vectorized 2e-11 apart, float32 8e-3,
    past the trajectory tolerance, whatever the grouping). Without batch norm for the
    same reason: conv5's shift gradient is zero in real arithmetic there (fc1's batch
    norm cancels any shift of the max-pooled features). Batch norm's members are held to
    their float32 trajectories on cnn3 above."""
    engine = _vectorizing_engine(backend_name, "float64")
    spec = spec_factory(model="pointnet-small", dataset="mnist_point_clouds", dtype="float64", batch_size=8, steps=STEPS,
                     seeds=len(SEEDS), optimizer={"name": "adam", "learning_rate": 1e-3},
                     variants=[{"name": "none", "normalization": "none"}])
    plan = resolve(spec, spec.variants[0])
    assert plan.dropout_masks(0, 0, plan.batch_size) is not None
    rng = np.random.default_rng(8)
    images = rng.normal(size=(EXAMPLES, *plan.arch.input_shape))
    _compare_members(engine, plan, images, rng.integers(0, 10, EXAMPLES))


@pytest.mark.parametrize("batched", [False, True], ids=["members-alone", "batched"])
def test_a_vectorized_group_evaluates_each_member_as_alone(backend_name, spec_factory, batched):
    """On CPU a group evaluates each member by the function its run alone uses (faster
    there); elsewhere, one batched evaluation of all members. Both are checked here."""
    engine = _vectorizing_engine(backend_name)
    spec = spec_factory(model="cnn-tiny", dtype="float32", batch_size=16, seeds=len(SEEDS),
                     variants=[{"name": "batch_norm", "normalization": "batch_norm"}], track_percentiles=["conv1"])
    plan = resolve(spec, spec.variants[0])
    rng = np.random.default_rng(9)
    images = rng.random((EXAMPLES, *plan.arch.input_shape)).astype(np.float32)
    labels = rng.integers(0, 10, EXAMPLES)
    placed = engine.put_images(images), engine.put_labels(labels)
    batches, results = rng.integers(0, EXAMPLES, (len(SEEDS), plan.batch_size)), {}
    for vectorize in (False, True):
        group = runner.make_group(engine, plan, SEEDS, *placed, vectorize)
        if vectorize:
            assert group._members_evaluation is not None  # a CPU engine: members alone by default
            if batched:
                group._members_evaluation = None
        group.step(batches, 0.1)  # parameters and running statistics move off their start
        # 70 images: chunks of the group's size and a ragged last one where the size is smaller
        results[vectorize] = group.evaluate(placed[0][:70], placed[1][:70], 70)
    for alone, together in zip(results[False], results[True]):
        assert together["accuracy"] == pytest.approx(alone["accuracy"], abs=1.5 / 70)
        assert together["cross_entropy"] == pytest.approx(alone["cross_entropy"], rel=1e-5)
        for layer, (mean, var) in alone["moments"].items():
            np.testing.assert_allclose(together["moments"][layer][0], mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(together["moments"][layer][1], var, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(together["tracked"]["conv1"], alone["tracked"]["conv1"], rtol=1e-4, atol=1e-5)
    assert results[False][0]["cross_entropy"] != results[False][1]["cross_entropy"]


# ----------------------------------------------------------------------------- sweeps in groups


def _sweep_spec(make_spec):
    return make_spec(model="cnn-tiny", dtype="float32", batch_size=16, steps=6, eval_every=3, seeds=3,
                     train_eval_examples=64, test_examples=64,
                     variants=[{"name": "none", "normalization": "none"},
                               {"name": "batch_norm", "normalization": "batch_norm"}])


@pytest.fixture
def tiny_data(monkeypatch):
    """Random 28x28 images in place of MNIST (the sweep tests check bookkeeping, not learning)."""
    rng = np.random.default_rng(10)
    data = runner.LoadedData("mnist", rng.random((256, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 256),
                             rng.random((64, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 64), {})
    monkeypatch.setattr(runner, "load_data", lambda spec, data_dir=None: data)
    return data


def _metrics(out, backend):
    rows = {}
    for path in sorted((out / "runs" / backend).glob("*/seed-*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows[(row["variant"], row["seed"], row["step"], row["split"])] = row
    return rows


def test_a_sweep_in_groups_writes_the_runs_it_writes_alone(backend_name, tmp_path, tiny_data, spec_factory):
    spec = _sweep_spec(spec_factory)
    alone = runner.run_sweep(spec, [backend_name], tmp_path / "alone", progress=False, log=lambda *_: None, group_size=1)
    grouped = runner.run_sweep(spec, [backend_name], tmp_path / "grouped", progress=False, log=lambda *_: None, group_size=3)
    assert [r.status for r in grouped] == ["ok"] * 6
    a, b = _metrics(tmp_path / "alone", backend_name), _metrics(tmp_path / "grouped", backend_name)
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 3 * 2
    for key in a:
        assert float(b[key]["cross_entropy"]) == pytest.approx(float(a[key]["cross_entropy"]), rel=5e-3), key
    for r_alone, r_grouped in zip(alone, grouped):
        one = json.loads((r_alone.run_dir / "provenance.json").read_text())
        together = json.loads((r_grouped.run_dir / "provenance.json").read_text())
        assert together["run_key"] == one["run_key"]  # a grouped run is the same run
        assert "group" not in one and together["group"]["seeds"] == [0, 1, 2]
        assert together["group"]["vectorized"] == (backend_name in ("torch", "jax"))
    # ... so either directory resumes the other's runs: nothing is trained again.
    again = runner.run_sweep(spec, [backend_name], tmp_path / "alone", progress=False, log=lambda *_: None, group_size=3)
    assert all(r.reused for r in again)


def test_a_resumed_group_trains_only_its_unfinished_runs(backend_name, tmp_path, tiny_data, monkeypatch, spec_factory):
    spec = _sweep_spec(spec_factory)
    out = tmp_path / "out"
    runner.run_sweep(spec.replace(seeds=[1]), [backend_name], out, progress=False, log=lambda *_: None)
    trained = []
    real = runner.train_group
    monkeypatch.setattr(runner, "train_group", lambda spec, variant, seeds, *a, **k: (
        trained.append((variant.name, list(seeds))) or real(spec, variant, seeds, *a, **k)))
    results = runner.run_sweep(spec, [backend_name], out, progress=False, log=lambda *_: None, group_size=3)
    assert trained == [("none", [0, 2]), ("batch_norm", [0, 2])]
    assert [r.reused for r in results] == [False, True, False] * 2


def test_group_size_must_be_a_positive_integer(tmp_path, tiny_data, spec_factory):
    spec = _sweep_spec(spec_factory)
    with pytest.raises(ValueError, match="--group-size"):
        runner.run_sweep(spec, ["torch"], tmp_path / "out", progress=False, group_size=0)
