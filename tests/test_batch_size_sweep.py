"""A spec sweeping batch sizes (variant `batch_size`, optimizer `reference_batch_size`):
each run draws batches of its own variant's size at its own linearly scaled learning rate,
from the training loop down, and parity compares the variant at its own batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tomli_w

from normbench import backends, cli, parity, plan, runner, spec as spec_module

SWEEP = {
    "name": "sweep", "model": "mlp-tiny", "dataset": "mnist", "batch_size": 8, "steps": 2, "eval_every": 2,
    "seeds": 1, "train_eval_examples": 64, "test_examples": 64,
    "optimizer": {"name": "sgd", "learning_rate": 0.1, "reference_batch_size": 8},
    "variant": [{"name": "b4", "normalization": "batch_norm", "batch_size": 4},
                {"name": "b16", "normalization": "batch_norm", "batch_size": 16}],
}


def _backend() -> str:
    name = next((b for b in ("jax", "tensorflow", "torch") if backends.is_available(b)), None)
    if name is None:
        pytest.skip("no backend available")
    return name


def test_each_run_draws_its_variants_batches_at_its_scaled_rate(tmp_path, monkeypatch):
    backend = _backend()
    path = tmp_path / "sweep.toml"
    path.write_text(tomli_w.dumps(SWEEP))
    sizes, rates = [], []
    real_order, real_rate = runner.BatchOrder, plan.Plan.learning_rate

    def recording_order(seed, examples, batch_size):
        sizes.append(batch_size)
        return real_order(seed, examples, batch_size)

    monkeypatch.setattr(runner, "BatchOrder", recording_order)
    monkeypatch.setattr(plan.Plan, "learning_rate", lambda self, step: rates.append((self.batch_size, real_rate(self, step)))
                        or real_rate(self, step))
    assert cli.main(["run", str(path), "--backend", backend, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(sizes) == [4, 16]
    assert sorted(set(rates)) == [(4, pytest.approx(0.05)), (16, pytest.approx(0.2))]


def test_parity_takes_each_variants_own_batch():
    spec = spec_module.loads(tomli_w.dumps(SWEEP))
    assert len(parity.first_batch(spec, 0, "b4")) == 4 and len(parity.first_batch(spec, 0, "b16")) == 16
    assert len(parity.first_batch(spec, 0)) == 8  # the spec's own, where no variant is named
    outputs = parity.step_outputs(spec, "b16", _backend(), "float64")
    assert outputs["logits"].shape[0] == 16


def test_a_sweep_checks_each_variants_batch_against_its_method():
    doc = copy.deepcopy(SWEEP)
    doc["variant"][0]["batch_size"] = 1  # batch norm over one example of a dense layer: one value per channel
    with pytest.raises(spec_module.SpecError, match=r"variant\[0\]\.normalization: .*at least 2 values per channel"):
        spec_module.loads(tomli_w.dumps(doc))
