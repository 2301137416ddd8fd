"""Instance norm with F.instance_norm (input statistics in training and inference alike)."""

import torch.nn.functional as F


def normalize(z, params, state, method):
    return F.instance_norm(z, weight=params["scale"], bias=params["shift"], use_input_stats=True,
                           eps=method.epsilon), state
