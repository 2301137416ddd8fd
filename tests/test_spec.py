"""Tests for normbench.spec: every malformed spec is rejected before anything runs, with
one line naming the file, the field and what is allowed; valid specs round-trip.

The table of bad specs starts from one small valid document and breaks one thing each;
the CLI checks run `normbench run` in a subprocess for a few of them (exit 2, one line on
stderr, no traceback) and in-process for backends that are unknown or not installed.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import tomli_w

from normbench import backends, cli, runner, spec as spec_module
from normbench.spec import SpecError

VALID = {
    "name": "tiny",
    "description": "a small valid spec that each case below breaks in one place",
    "model": "mlp-tiny",
    "dataset": "mnist",
    "batch_size": 8,
    "steps": 3,
    "eval_every": 1,
    "seeds": 2,
    "train_eval_examples": 64,
    "optimizer": {"name": "sgd", "learning_rate": 0.1},
    "variant": [
        {"name": "none", "normalization": "none"},
        {"name": "batch_norm", "normalization": "batch_norm_shift"},
        {"name": "std", "normalization": "standardization_loss", "standardization_loss_weight": 1.0},
    ],
}


def changed(**changes):
    """VALID with top-level fields changed (None removes one); tables are dicts, merged."""
    doc = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return tomli_w.dumps(doc)


def variant_changed(index, **fields):
    doc = copy.deepcopy(VALID)
    for key, value in fields.items():
        if value is None:
            doc["variant"][index].pop(key)
        else:
            doc["variant"][index][key] = value
    return tomli_w.dumps(doc)


# (id, TOML text, field named in the message, a fragment of what the message says is allowed)
BAD_SPECS = [
    # TOML syntax
    ("syntax-missing-value", "name = \nmodel = 'mlp-tiny'\n", "line 1, column 8", "TOML syntax error"),
    ("syntax-duplicate-key", changed() + 'name = "again"\n', "line", "TOML syntax error"),
    # unknown keys, at the top level and in every table
    ("unknown-top-level", changed(batchsize=8), "batchsize", "did you mean 'batch_size'"),
    ("misplaced-optimizer-field", changed(learning_rate=0.1), "learning_rate", "[optimizer]"),
    ("unknown-optimizer-key", changed(optimizer={"lr": 0.1}), "optimizer.lr", "learning_rate"),
    ("other-optimizers-key", changed(optimizer={"name": "adam", "momentum": 0.9}), "optimizer.momentum",
     "does not apply to optimizer 'adam'"),
    ("unknown-schedule-key", changed(schedule={"name": "constant", "decay_rate": 0.5}), "schedule.decay_rate",
     "'step_decay'"),
    ("unknown-batch-norm-key", changed(batch_norm={"momentum": 0.99}), "batch_norm.momentum", "running_decay"),
    ("unknown-std-loss-key", changed(standardization_loss={"epsilon": 1e-8}), "standardization_loss.epsilon",
     "log_epsilon"),
    ("unknown-variant-key", variant_changed(0, weight=1.0), "variant[0].weight", "standardization_loss_weight"),
    # wrong types
    ("string-batch-size", changed(batch_size="128"), "batch_size", "expected an integer"),
    ("float-steps", changed(steps=100.0), "steps", "expected an integer"),
    ("bool-eval-every", changed(eval_every=True), "eval_every", "expected an integer"),
    ("string-learning-rate", changed(optimizer={"learning_rate": "1e-3"}), "optimizer.learning_rate",
     "expected a finite number"),
    ("int-nesterov", changed(optimizer={"momentum": 0.9, "nesterov": 1}), "optimizer.nesterov", "true or false"),
    ("optimizer-not-a-table", changed(optimizer="sgd"), "optimizer", "expected a table"),
    ("variant-not-an-array", tomli_w.dumps({**VALID, "variant": VALID["variant"][0]}), "variant", "[[variant]]"),
    ("float-seeds", changed(seeds=[0.5, 1.5]), "seeds", "list of integers"),
    ("track-not-a-list", changed(track_percentiles="dense1"), "track_percentiles", "list of strings"),
    ("description-not-a-string", changed(description=3), "description", "expected a string"),
    # out of range
    ("zero-batch", changed(batch_size=0), "batch_size", ">= 1"),
    ("zero-learning-rate", changed(optimizer={"learning_rate": 0.0}), "optimizer.learning_rate", "> 0.0"),
    ("nan-learning-rate", changed(optimizer={"learning_rate": float("nan")}), "optimizer.learning_rate", "finite"),
    ("momentum-one", changed(optimizer={"momentum": 1.0}), "optimizer.momentum", "< 1.0"),
    ("negative-bn-epsilon", changed(batch_norm={"epsilon": -1e-3}), "batch_norm.epsilon", "> 0.0"),
    ("decay-rate-above-one", changed(schedule={"name": "step_decay", "decay_rate": 1.5, "decay_every": 10}),
     "schedule.decay_rate", "<= 1.0"),
    ("decay-in-steps-and-epochs", changed(schedule={"name": "step_decay", "decay_rate": 0.5, "decay_every": 10,
                                                    "decay_every_epochs": 2}),
     "schedule.decay_every_epochs", "either decay_every (steps) or decay_every_epochs"),
    ("decay-every-zero-epochs", changed(schedule={"name": "step_decay", "decay_rate": 0.5, "decay_every_epochs": 0}),
     "schedule.decay_every_epochs", "> 0.0"),
    ("decay-epochs-on-piecewise", changed(schedule={"name": "piecewise", "boundaries": [5], "multipliers": [1, 0.1],
                                                    "decay_every_epochs": 2}),
     "schedule.decay_every_epochs", ""),
    ("zero-seeds", changed(seeds=0), "seeds", "1..10000"),
    ("absurd-seed-count", changed(seeds=10**9), "seeds", "1..10000"),
    ("negative-seed", changed(seeds=[-1, 0]), "seeds", ">= 0"),
    ("duplicate-seeds", changed(seeds=[1, 1]), "seeds", "distinct"),
    ("zero-variant-steps", variant_changed(0, steps=0), "variant[0].steps", ">= 1"),
    ("zero-variant-batch", variant_changed(0, batch_size=0), "variant[0].batch_size", ">= 1"),
    ("variant-batch-larger-than-data", variant_changed(0, batch_size=60001), "variant[0].batch_size",
     "60000 training examples"),
    ("variant-batch-of-one-with-dense-batch-norm", variant_changed(1, batch_size=1), "variant[1].normalization",
     "need at least 2 values per channel"),
    ("zero-reference-batch", changed(optimizer={"reference_batch_size": 0}), "optimizer.reference_batch_size", ">= 1"),
    # unknown choices
    ("unknown-model", changed(model="resnet50"), "model", "cnn3, cnn-tiny, mlp3, mlp-tiny"),
    ("unknown-dataset", changed(dataset="cifar11"), "dataset", "unknown value 'cifar11'; allowed: "),
    ("unknown-dtype", changed(dtype="float16"), "dtype", "float32, float64"),
    ("unknown-optimizer", changed(optimizer={"name": "lamb"}), "optimizer.name", "sgd, rmsprop, adam"),
    ("unknown-schedule", changed(schedule={"name": "cosine"}), "schedule.name", "constant, step_decay, piecewise"),
    ("unknown-normalization", variant_changed(0, normalization="switch_norm"), "variant[0].normalization",
     "batch_norm"),
    ("unknown-running-variance", changed(batch_norm={"running_variance": "sample"}), "batch_norm.running_variance",
     "biased, unbiased"),
    # missing required fields
    ("missing-model", changed(model=None), "model", "is required"),
    ("missing-optimizer", changed(optimizer=None), "optimizer", "is required"),
    ("missing-std-weight", variant_changed(2, standardization_loss_weight=None),
     "variant[2].standardization_loss_weight", "is required"),
    ("empty-variants", changed(variant=[]), "variant", "[[variant]]"),
    # inconsistent combinations
    ("std-weight-on-batch-norm", variant_changed(1, standardization_loss_weight=1.0),
     "variant[1].standardization_loss_weight", 'only applies to normalization = "standardization_loss"'),
    ("zero-std-weight", variant_changed(2, standardization_loss_weight=0.0), "variant[2].standardization_loss_weight",
     "> 0.0"),
    ("nesterov-without-momentum", changed(optimizer={"nesterov": True}), "optimizer.nesterov", "momentum > 0"),
    ("piecewise-lengths", changed(schedule={"name": "piecewise", "boundaries": [10, 20], "multipliers": [1.0, 0.1]}),
     "schedule.multipliers", "len(boundaries) + 1 = 3"),
    ("piecewise-not-increasing", changed(schedule={"name": "piecewise", "boundaries": [20, 10], "multipliers": [1, 0.1, 0.01]}),
     "schedule.boundaries", "strictly increasing"),
    ("duplicate-variant-names", tomli_w.dumps({**VALID, "variant": [VALID["variant"][0], VALID["variant"][0]]}),
     "variant", "duplicate variant names ['none']"),
    ("untracked-layer", changed(track_percentiles=["conv1"]), "track_percentiles", "it has ['dense1', 'dense2']"),
    ("duplicate-tracked-layer", changed(track_percentiles=["dense1", "dense1"]), "track_percentiles", "distinct"),
    ("batch-larger-than-data", changed(batch_size=60001), "batch_size", "60000 training examples"),
    ("train-eval-larger-than-data", changed(train_eval_examples=70000), "train_eval_examples", "60000 training examples"),
    ("batch-of-one-with-dense-batch-norm", changed(batch_size=1), "variant[1].normalization",
     "need at least 2 values per channel"),
    # names that would become unsafe directory names
    ("variant-name-dotdot", variant_changed(0, name=".."), "variant[0].name", "letters, digits"),
    ("spec-name-with-slash", changed(name="a/b"), "name", "letters, digits"),
]


def test_bad_spec_table_is_large_and_distinct():
    ids = [case[0] for case in BAD_SPECS]
    assert len(ids) == len(set(ids)) >= 25
    assert len({case[1] for case in BAD_SPECS}) == len(BAD_SPECS)


def test_the_base_document_is_valid():
    spec = spec_module.loads(changed(), source="valid.toml")
    assert [v.name for v in spec.variants] == ["none", "batch_norm", "std"]


@pytest.mark.parametrize("text, field, allowed", [pytest.param(*case[1:], id=case[0]) for case in BAD_SPECS])
def test_bad_spec_is_rejected_with_one_line_naming_file_and_field(tmp_path, text, field, allowed):
    path = tmp_path / "bad spec.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as caught:
        spec_module.load(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: "), message
    where = message[len(f"{path}: "):]
    assert where.startswith(f"{field}") if field != "line" else where.startswith("line "), message
    assert allowed in message, message


def test_messages_stay_one_line_when_values_hold_newlines():
    with pytest.raises(SpecError) as caught:
        spec_module.loads(changed(model="cnn3\nDROP TABLE"), source="x.toml")
    assert "\n" not in str(caught.value)
    assert str(SpecError("a\nb\r\nc")) == "a b c"


def test_unreadable_and_missing_spec_files(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    for target, fragment in [(binary, "cannot read the spec"), (tmp_path / "absent.toml", "no such spec file"),
                             ("no-such-bundled-spec", "bundled:")]:
        with pytest.raises(SpecError, match=fragment) as caught:
            spec_module.load(target)
        assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "normbench.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case_id", ["syntax-missing-value", "unknown-optimizer-key", "untracked-layer"])
def test_cli_run_rejects_a_bad_spec_with_exit_2_and_one_line(tmp_path, case_id):
    text, field = next((c[1], c[2]) for c in BAD_SPECS if c[0] == case_id)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_cli("run", str(path), "--backend", "torch", "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"normbench: error: {path}: {field}"), lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_cli_run_rejects_an_unknown_backend_with_exit_2_and_one_line(tmp_path):
    result = run_cli("run", "smoke", "--backend", "mxnet", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "unknown backend 'mxnet'; choose from torch, jax, tensorflow" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_run_rejects_a_backend_whose_framework_is_not_installed(tmp_path, monkeypatch, capsys):
    # jax as it is on a machine without it: the adapter is there, the framework is not.
    monkeypatch.setitem(backends._REGISTRY, "jax", ("normbench_no_such_framework", "normbench.backends.torch.engine"))

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the backend was checked")

    monkeypatch.setattr(runner, "load_data", no_data)
    code = cli.main(["run", "smoke", "--backend", "jax", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs normbench_no_such_framework, which is not installed" in err
    assert "pip install 'normbench[jax]'" in err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_bad_override_with_exit_2(tmp_path, capsys):
    path = tmp_path / "spec.toml"
    path.write_text(changed(eval_every=1))
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", str(path), "--backend", "torch", "--seeds", "0"])
    assert exited.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


# ----------------------------------------------------------------------------- valid specs


FULL = {
    "name": "everything",
    "description": "unicode ✓ 😀, quotes \" and \\ backslash, tab\t, newline\n and DEL \x7f",
    "model": "cnn-tiny",
    "dataset": "mnist",
    "dtype": "float64",
    "batch_size": 16,
    "steps": 40,
    "eval_every": 7,
    "train_eval_examples": 123,
    "seeds": [3, 1, 7],
    "track_percentiles": ["conv2", "conv1"],
    "optimizer": {"name": "adam", "learning_rate": 3e-4, "weight_decay": 1e-5, "beta1": 0.8, "beta2": 0.99,
                  "epsilon": 1e-7},
    "schedule": {"name": "piecewise", "warmup_steps": 5, "boundaries": [10, 30], "multipliers": [1.0, 0.1, 0.01]},
    "batch_norm": {"running_decay": 0.9, "epsilon": 1e-5, "running_variance": "unbiased"},
    "standardization_loss": {"log_epsilon": 1e-6},
    "variant": [
        {"name": "none", "normalization": "none", "steps": 80},
        {"name": "bn.scale", "normalization": "batch_norm_scale_shift"},
        {"name": "std-0.1", "normalization": "standardization_loss", "standardization_loss_weight": 0.1},
    ],
}


@pytest.mark.parametrize("name", [*spec_module.bundled_specs(), "<every-field>"])
def test_round_trip_gives_an_equal_spec_and_hash(name):
    spec = spec_module.loads(tomli_w.dumps(FULL), source="full.toml") if name == "<every-field>" else spec_module.load(name)
    again = spec_module.loads(spec_module.to_toml(spec), source="again.toml")
    assert again == spec
    assert again.hash() == spec.hash()
    assert again.to_dict() == spec.to_dict()


def test_every_bundled_spec_loads():
    bundled = spec_module.bundled_specs()
    assert {"smoke", "mnist-cnn", "mnist-mlp"} <= set(bundled)
    for name, path in bundled.items():
        spec = spec_module.load(name)
        assert spec.source == str(path)
        assert spec_module.load(path) == spec


def test_source_label_names_bundled_specs_by_their_place_in_the_package(tmp_path):
    for name, path in spec_module.bundled_specs().items():
        assert spec_module.source_label(str(path)) == f"normbench/specs/{name}.toml"
    # A copy of a bundled spec elsewhere is the user's own file: its path as given.
    copy = tmp_path / "mnist-cnn.toml"
    copy.write_text(spec_module.bundled_specs()["mnist-cnn"].read_text())
    assert spec_module.source_label(str(copy)) == str(copy)
    assert spec_module.source_label("<memory>") == "<memory>"


def test_hash_ignores_the_source_and_sees_every_field():
    a = spec_module.loads(changed(), source="a.toml")
    b = spec_module.loads(changed(), source="elsewhere/b.toml")
    assert a == b and a.hash() == b.hash()
    assert spec_module.loads(changed(optimizer={"weight_decay": 1e-4})).hash() != a.hash()


def test_replace_revalidates():
    spec = spec_module.load("smoke")
    assert spec.replace(seeds=3).seeds == (0, 1, 2)
    assert spec.replace(optimizer=spec.optimizer) == spec
    # Variants written as in a spec file: methods as inline tables, losses as a list of tables.
    inline = spec.replace(variants=[{"name": "ln", "normalization": {"name": "layer_norm", "epsilon": 0.01},
                                     "auxiliary_losses": [{"name": "standardization", "weight": 0.5}]}])
    assert inline.variants[0].label.startswith("layer_norm(epsilon=0.01) + standardization(weight=0.5,")
    assert inline.replace(seeds=2).variants == inline.variants  # and again from the resolved form
    bad = [
        (dict(batch_size=0), "batch_size: must be >= 1"),
        (dict(batch_size=10**6), "batch_size"),
        (dict(model="nope"), "model: unknown architecture 'nope'"),
        (dict(track_percentiles=["dense1"]), "track_percentiles"),
        (dict(optimizer=dataclass_replace(spec.optimizer, learning_rate=-1.0)), "optimizer.learning_rate"),
        (dict(variants=[{"name": "s", "normalization": "standardization_loss"}]), "variant[0].standardization_loss_weight"),
        (dict(variants=[]), "variant"),
        (dict(unknown_field=1), "unknown_field: unknown field"),
    ]
    for changes, fragment in bad:
        with pytest.raises(SpecError, match=None) as caught:
            spec.replace(**changes)
        message = str(caught.value)
        assert message.startswith(f"{spec.source}: ") and fragment in message and "\n" not in message, message


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_eval_resolution_validates_round_trips_and_leaves_old_hashes_alone():
    base = spec_module.load("mnist-cnn")
    finer = base.replace(eval_resolution=0.05)
    assert finer.eval_resolution == 0.05 and finer.hash() != base.hash()
    assert spec_module.loads(spec_module.to_toml(finer)) == finer
    assert "eval_resolution" not in spec_module.to_toml(base)
    assert finer.replace(eval_resolution=None) == base and finer.replace(eval_resolution=None).hash() == base.hash()
    for bad in (0, 1, -0.1, 2.0, "5%"):
        with pytest.raises(spec_module.SpecError, match="eval_resolution"):
            base.replace(eval_resolution=bad)


def test_decay_every_epochs_round_trips_and_leaves_old_hashes_alone():
    base = spec_module.load("inception-fashion")  # step_decay every 1125 steps
    by_epochs = base.replace(schedule=spec_module.ScheduleSpec(name="step_decay", decay_rate=0.98,
                                                               decay_every_epochs=2.4))
    assert by_epochs.hash() != base.hash() and "decay_every_epochs = 2.4" in spec_module.to_toml(by_epochs)
    assert "decay_every =" not in spec_module.to_toml(by_epochs)
    assert spec_module.loads(spec_module.to_toml(by_epochs)) == by_epochs
    assert "decay_every_epochs" not in spec_module.to_toml(base)
    assert base.hash() == "9c15ea60688e506d"  # the published inception-fashion runs' spec hash


def test_test_examples_is_optional_bounded_and_leaves_old_hashes_alone():
    base = spec_module.load("mnist-cnn")
    assert base.test_examples is None and "test_examples" not in spec_module.to_toml(base)
    fewer = base.replace(test_examples=1000)
    assert fewer.test_examples == 1000 and spec_module.loads(spec_module.to_toml(fewer)) == fewer
    assert fewer.replace(test_examples=None).hash() == base.hash()
    for bad in (0, 10001, 2.5):
        with pytest.raises(SpecError, match="test_examples"):
            base.replace(test_examples=bad)


def test_variant_batch_size_and_the_linear_rule_round_trip_and_leave_old_hashes_alone():
    from normbench.identity import run_key
    from normbench.plan import resolve

    base = spec_module.loads(changed())
    doc = changed(optimizer={"reference_batch_size": 4})
    scaled = spec_module.loads(doc)
    assert scaled.hash() != base.hash() and spec_module.loads(spec_module.to_toml(scaled)) == scaled
    assert "reference_batch_size" not in base.to_dict()["optimizer"]
    assert all("batch_size" not in v for v in base.to_dict()["variants"])
    sweep_doc = copy.deepcopy(VALID)
    sweep_doc["optimizer"]["reference_batch_size"] = 4
    sweep_doc["variant"] = [{"name": "b2", "normalization": "none", "batch_size": 2},
                            {"name": "b16", "normalization": "none", "batch_size": 16},
                            {"name": "default", "normalization": "none"}]
    sweep = spec_module.loads(tomli_w.dumps(sweep_doc))
    assert spec_module.loads(spec_module.to_toml(sweep)) == sweep
    b2, b16, default = sweep.variants
    assert [sweep.batch_size_for(v) for v in sweep.variants] == [2, 16, 8]
    # the linear rule: learning_rate 0.1 is the rate at batch 4
    assert [sweep.learning_rate_for(v) for v in sweep.variants] == pytest.approx([0.05, 0.4, 0.2])
    assert resolve(sweep, "b16").batch_size == 16 and resolve(sweep, "b16").learning_rate(0) == pytest.approx(0.4)
    assert base.learning_rate_for(base.variants[0]) == 0.1  # no reference: the rate as written
    # a variant's batch size is part of its run's identity
    assert len({run_key(sweep, v, 0, "torch") for v in sweep.variants}) == 3
    same_batch = sweep.replace(batch_size=16)
    assert run_key(same_batch, same_batch.variant("default"), 0, "torch") != run_key(sweep, default, 0, "torch")
