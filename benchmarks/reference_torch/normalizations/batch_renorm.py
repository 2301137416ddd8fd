"""Batch renormalization by hand (PyTorch has no built-in): batch norm corrected by the
clipped, gradient-free r and d towards the running statistics."""

import torch


def normalize(z, params, state, method):
    dims = (0, 2, 3) if z.dim() == 4 else (0,)
    shape = (1, -1, 1, 1) if z.dim() == 4 else (1, -1)
    mean = z.mean(dim=dims, keepdim=True)
    var = (z - mean).square().mean(dim=dims, keepdim=True)
    batch_std = torch.sqrt(var + method.epsilon)
    running_mean, running_var, step = state["running_mean"], state["running_var"], state["step"]
    with torch.no_grad():
        if method.warmup_steps:
            progress = ((step - method.warmup_start) / method.warmup_steps).clamp(0.0, 1.0)
        else:
            progress = (step - method.warmup_start + 1.0).clamp(0.0, 1.0)
        r_max = 1.0 + (method.r_max - 1.0) * progress
        d_max = method.d_max * progress
        running_std = torch.sqrt(running_var + method.epsilon).view(shape)
        r = torch.clamp(batch_std / running_std, 1.0 / r_max, r_max)
        d = torch.clamp((mean - running_mean.view(shape)) / running_std, -d_max, d_max)
    y = ((z - mean) / batch_std * r + d) * params["scale"].view(shape) + params["shift"].view(shape)
    with torch.no_grad():
        decay = method.running_decay
        running_mean.mul_(decay).add_(mean.flatten(), alpha=1.0 - decay)
        running_var.mul_(decay).add_(var.flatten(), alpha=1.0 - decay)
        step.add_(1.0)
    return y, state
