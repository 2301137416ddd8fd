"""Batch norm folded into the layers before it: a trained variant as the plain network that
computes the same inference-mode logits.

At inference batch norm is a fixed per-channel map of its layer's output,
(z - running_mean) / sqrt(running_var + epsilon) * scale + shift = z * m + o, and so is a
variant's `affine` after it. With z = conv(x, W) + b (or dense), the slot's output is
conv(x, W * m) + (b * m + o): scaling each output channel of the kernel and replacing the
bias leaves the network without normalization, the one the standardization loss trains
(the paper's Discussion, point 3: no normalization at inference). A method states whether
and how it folds (`Normalization.inference_affine`); group, layer and instance norm
normalize with each example's own statistics, so they are computed at every prediction.

Every normalization slot sits directly after its convolution or dense layer (the layer
vocabulary couples them), so whatever follows (residual additions, concatenations,
pooling) is unchanged, and every architecture folds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from normbench.plan import Plan
from normbench.spec import PluginSpec


def plain_plan(plan: Plan) -> Plan:
    """`plan`'s network with no normalization, `affine` or auxiliary losses (which do not
    change inference): what a folded network runs as."""
    variant = dataclasses.replace(plan.variant, normalization=PluginSpec("none"), affine=False, auxiliary_losses=())
    return Plan(plan.spec, variant, plan.arch)


def folds_anything(plan: Plan) -> bool:
    """Whether folding changes `plan`'s network: False when it already is the plain one."""
    plain = plain_plan(plan)
    return plan.method.canonical() != plain.method.canonical() or plan.affine


def fold(plan: Plan, params: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> tuple[Plan, dict[str, np.ndarray]]:
    """(`plain_plan(plan)`, its parameters) computing `plan`'s inference-mode logits from its
    canonical NumPy `params` and `state` (float64 out; the running statistics are spent).

    ValueError naming the layer when the variant's method cannot be folded. A normalized
    layer declared without a bias gets one (`Plan.forward` adds any `<layer>/bias` it is
    given); no bundled architecture has one, so the parameter names are the plain plan's."""
    params_by_layer, state_by_layer = _by_layer(params), _by_layer(state)
    folded = {}
    for layer in plan.layers:
        own = params_by_layer[layer.name]
        kernel, bias = own["kernel"], own.get("bias")
        if not layer.normalized:
            folded.update(_named(layer.name, kernel=kernel, bias=bias))
            continue
        affine = plan.method.inference_affine(own, state_by_layer.get(layer.name, {}), layer.slot)
        if affine is None:
            raise ValueError(f"{plan.method.describe()} cannot be folded into layer {layer.name} of {plan.arch.name}: "
                             "its inference is not a per-channel scale and shift of the layer's output")
        multiplier, offset = affine
        if plan.affine:
            multiplier, offset = multiplier * own["affine_scale"], offset * own["affine_scale"] + own["affine_shift"]
        if bias is not None:
            offset = offset + bias * multiplier
        # The output channel is the last axis of every canonical kernel (HWIO, grouped and
        # depthwise ones included, and (in, out)): broadcasting scales each channel's slice.
        folded.update(_named(layer.name, kernel=kernel * multiplier, bias=offset))
    return plain_plan(plan), folded


def _by_layer(tree: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"conv1/kernel": k} -> {"conv1": {"kernel": k}}, as float64."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tree.items():
        layer, _, suffix = name.rpartition("/")
        out.setdefault(layer, {})[suffix] = np.asarray(value, np.float64)
    return out


def _named(layer: str, **values) -> dict[str, np.ndarray]:
    return {f"{layer}/{suffix}": value for suffix, value in values.items() if value is not None}
