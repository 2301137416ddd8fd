"""mobilenet-batch-size: its spec follows the naming and replica rules its report reads,
and the report reads per-replica batch sizes and states the paper's claims from a table."""

from __future__ import annotations

import pandas as pd

from normbench import spec as spec_module
from normbench.experiments import mobilenet_batch_size as experiment

PER_REPLICA = {"batch_norm", "batch_renorm"}  # methods whose moments are taken per replica


def test_every_variant_trains_eight_replicas_of_its_batch_for_two_epochs():
    spec = spec_module.load("mobilenet-batch-size")
    seen = {}
    for v in spec.variants:
        method, batch = experiment.method_and_batch(v.name)
        seen.setdefault(method, []).append(batch)
        assert spec.batch_size_for(v) == experiment.REPLICAS * batch
        assert spec.steps_for(v) == 2 * 60000 // (experiment.REPLICAS * batch)  # the same examples at every size
        replica = [v.normalization.option("replica_batch_size")] if v.normalization.name in PER_REPLICA else []
        replica += [loss.option("replica_batch_size") for loss in v.auxiliary_losses]
        assert all(r == batch for r in replica)
        assert spec.learning_rate_for(v) == 0.165 * experiment.REPLICAS * batch / 1024  # the linear rule
    # The sweep: six methods at every size; and the standardization loss at heavier
    # weights (`standardization-w<weight>`, the weight its loss is given) at some sizes.
    sweep = {"none", "batch-norm", "batch-renorm", "group-norm", "layer-norm", "standardization"}
    assert sweep <= set(seen)
    assert all(seen[method] == [2, 4, 8, 16, 32, 64, 128] for method in sweep)
    for v in spec.variants:
        method, _ = experiment.method_and_batch(v.name)
        if method not in sweep:
            assert method.startswith("standardization-w"), method
            assert [loss.option("weight") for loss in v.auxiliary_losses] == [float(method[len("standardization-w"):])]


def _table(rows):
    return pd.DataFrame([{"backend": "torch", "method": m, "batch": b, "variant": f"{m}-b{b}", "accuracy": a,
                          "sd": float("nan"), "seeds": 1, "diverged": 0} for m, b, a in rows])


def test_verdicts_state_each_claim_against_the_table():
    sizes = [2, 4, 32]
    rows = [("none", b, 10.0) for b in sizes]
    rows += [("batch-norm", 2, 60.0), ("batch-norm", 4, 70.0), ("batch-norm", 32, 85.0)]
    rows += [("standardization", 2, 80.0), ("standardization", 4, 80.5), ("standardization", 32, 80.0)]
    rows += [("group-norm", b, 84.0) for b in sizes]
    said = experiment.verdicts(_table(rows))
    assert len(said) == 5 and all("**holds**" in s for s in said), said
    # batch norm robust and ahead everywhere: the small-batch claim and the range claim fail
    rows = [r for r in rows if r[0] != "batch-norm"] + [("batch-norm", b, 86.0) for b in sizes]
    said = {s.split(".")[0]: s for s in experiment.verdicts(_table(rows))}
    assert sum("does not hold" in s for s in said.values()) == 3  # range, batches 2 and 4, group norm beats the loss


def test_a_name_outside_the_convention_is_left_out():
    assert experiment.method_and_batch("batch-norm-b16") == ("batch-norm", 16)
    assert experiment.method_and_batch("batch-norm") is None


def test_an_incomplete_sweep_states_no_range():
    """A method still missing a batch size has no range yet: a range over part of the sweep
    would understate it, so its cell is n/a and the range claims wait."""
    sizes = [2, 4, 32]
    rows = [("batch-norm", b, a) for b, a in zip(sizes, (60.0, 70.0, 85.0))]
    rows += [("standardization", 2, 80.0), ("group-norm", 2, 84.0)]  # their other sizes still running
    said = experiment.verdicts(_table(rows))
    ranged = [s for s in said if "range" in s]
    assert len(ranged) == 2 and all("not measured yet" in s for s in ranged), said
    assert experiment._spread(_table(rows).query("method == 'batch-norm'").set_index("batch").accuracy, sizes) == 25.0


def test_a_loss_constant_at_chance_is_not_robust_to_the_batch_size():
    """The first sweep: the standardization loss stayed at chance at every size, a range of
    0 that must not count as the paper's roughly constant 66.5-66.9%."""
    sizes = [2, 4, 32]
    rows = [("batch-norm", b, a) for b, a in zip(sizes, (60.0, 70.0, 85.0))] + [("standardization", b, 10.0) for b in sizes]
    ranged = next(s for s in experiment.verdicts(_table(rows)) if "range" in s)
    assert "does not hold" in ranged and "constant at chance" in ranged


def test_a_heavier_weight_is_listed_and_a_full_row_of_it_is_held_to_the_claims():
    sizes = [2, 4, 32]
    rows = [("batch-norm", b, a) for b, a in zip(sizes, (60.0, 70.0, 85.0))] + [("standardization", b, 10.0) for b in sizes]
    rows += [("standardization-w1e-2", b, a) for b, a in zip(sizes, (78.0, 79.0, 80.0))]  # every size
    rows += [("standardization-w1", 4, 12.0)]  # one size only
    said = experiment.verdicts(_table(rows))
    swept = [s for s in said if s.startswith("The standardization loss's weight, swept")]
    assert len(swept) == 1 and "b = 4" in swept[0], said  # the one size where two weights ran
    assert "1e-2: 79.0%, 1: 12.0%; the scaled paper weight: 10.0%" in swept[0], swept
    heavier = [s for s in said if "the loss at weight 1e-2" in s]
    assert len(heavier) == 3 and all("**holds**" in s for s in heavier), heavier  # 80 >= 0.9 * 85, range 2 < 25, beats 60 / 70
    assert not any("weight 1 " in s or "weight 1:" in s for s in said)  # no claims on a partial row


def test_where_the_weight_was_swept_the_loss_values_are_read_from_the_test_metrics():
    table = _table([("standardization", 16, 10.0), ("standardization-w1e-2", 16, 36.0), ("standardization-w1", 16, 11.0),
                    ("standardization-w1e-2", 32, 28.0)])
    rows = []
    for variant, weight, first, last in (("standardization-b16", 3.9e-4, 23910.0, 889.0),
                                         ("standardization-w1e-2-b16", 1e-2, 23910.0, 17.7),
                                         ("standardization-w1-b16", 1.0, 23910.0, 1313.0)):
        rows += [{"backend": "torch", "variant": variant, "split": split, "step": step, "std_loss": value,
                  "std_loss_weight": weight, "seed": 0} for step, value in ((0, first), (937, last))
                 for split in ("train", "test")]
    said = experiment.loss_values(pd.DataFrame(rows), table)
    assert len(said) == 1 and "b = 16" in said[0]  # b = 32 has one weight only
    assert "0.00039: 23,910 -> 889; 0.01: 23,910 -> 17.7; 1: 23,910 -> 1.31e+03" in said[0], said
