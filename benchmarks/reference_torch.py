"""A minimal hand-written PyTorch training loop for the paper's models: the yardstick
for the torch backend's per-step overhead (bench_ratios.ReferenceRatio).

Plain nn.Module / F.conv2d with the same explicit TensorFlow-SAME pads as normbench's
cnn3, torch.optim.SGD (lr 1e-3, L2 4e-5 on kernels only, as the specs have it),
nn.BatchNorm with its scale frozen at 1 for shift-only batch norm, and the
standardization loss written inline. Same work per step as the backend (batch of 128
device-resident MNIST images, forward, backward, update); nothing else: no loss is
read back, no normbench code runs inside a step. Weights use PyTorch's default
initialization: they only need the right shapes here.

Contract shared by every benchmarks/reference_<framework>.py:
    make_reference_step(model, normalization, batch_size=128, device=None)
        -> (step(i) -> None, synchronize() -> None)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEARNING_RATE, WEIGHT_DECAY = 1e-3, 4e-5
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.01  # running = 0.99 * running + 0.01 * batch
LOG_EPSILON, STD_LOSS_WEIGHT = 1e-8, 1.0
# cnn3: (out channels, ((top, bottom), (left, right))) for 5x5 stride-2 convs on 28 -> 14 -> 7 -> 4.
CNN3 = ((32, ((1, 2), (1, 2))), (16, ((1, 2), (1, 2))), (8, ((2, 2), (2, 2))))
MLP3 = (100, 100, 100)


class _Net(nn.Module):
    def __init__(self, model: str, normalization: str):
        super().__init__()
        self.conv = model == "cnn3"
        batch_norm = normalization == "batch_norm_shift"
        if self.conv:
            self.pads = [pads for _, pads in CNN3]
            widths = [c for c, _ in CNN3]
            self.layers = nn.ModuleList(nn.Conv2d(i, o, 5, stride=2, bias=not batch_norm) for i, o in zip([1] + widths, widths))
            norm, head_in = nn.BatchNorm2d, widths[-1] * 4 * 4
        else:
            widths = list(MLP3)
            self.layers = nn.ModuleList(nn.Linear(i, o, bias=not batch_norm) for i, o in zip([28 * 28] + widths, widths))
            norm, head_in = nn.BatchNorm1d, widths[-1]
        self.norms = None
        if batch_norm:
            self.norms = nn.ModuleList(norm(c, eps=BN_EPSILON, momentum=BN_MOMENTUM) for c in widths)
            for bn in self.norms:
                bn.weight.requires_grad_(False)  # shift only: the scale stays 1
        self.head = nn.Linear(head_in, 10)

    def forward(self, x):
        preactivations = []
        if not self.conv:
            x = x.flatten(1)
        for k, layer in enumerate(self.layers):
            if self.conv:
                (top, bottom), (left, right) = self.pads[k]
                x = F.pad(x, (left, right, top, bottom))
            z = layer(x)
            if self.norms is not None:
                z = self.norms[k](z)
            preactivations.append(z)
            x = torch.relu(z)
        return self.head(x.flatten(1)), preactivations


def _standardization_loss(preactivations):
    total = 0.0
    for z in preactivations:
        # Two reductions, not torch.var_mean: over NCHW's (0, 2, 3) axes var_mean is 2-5x
        # slower on CPU, and a yardstick must be the fastest plain way to write the loop.
        dims = (0, 2, 3) if z.dim() == 4 else (0,)
        mean = z.mean(dim=dims, keepdim=True)
        var = (z - mean).square().mean(dim=dims)
        mean = mean.flatten()
        total = total + 0.5 * torch.sum(mean * mean + var - torch.log(var + LOG_EPSILON) - 1.0)
    return total


def make_reference_step(model: str, normalization: str, batch_size: int = 128, device=None):
    from normbench import spec
    from normbench.runner import load_data

    if model not in ("cnn3", "mlp3"):
        raise ValueError(f"reference_torch: unknown model {model!r}")
    if normalization not in ("none", "batch_norm_shift", "standardization_loss"):
        raise ValueError(f"reference_torch: unknown normalization {normalization!r}")
    device = torch.device(device or "cpu")
    data = load_data(spec.load("mnist-cnn"))
    images = torch.from_numpy(data.train_images.transpose(0, 3, 1, 2).copy()).to(device)
    labels = torch.from_numpy(data.train_labels).to(device)
    batches = images.shape[0] // batch_size
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0)).to(device)

    torch.manual_seed(0)
    net = _Net(model, normalization).to(device).train()
    kernels = [p for n, p in net.named_parameters() if p.requires_grad and n.endswith("weight") and not n.startswith("norms")]
    others = [p for n, p in net.named_parameters() if p.requires_grad and not any(p is k for k in kernels)]
    optimizer = torch.optim.SGD([{"params": kernels, "weight_decay": WEIGHT_DECAY}, {"params": others, "weight_decay": 0.0}],
                                lr=LEARNING_RATE)
    use_std_loss = normalization == "standardization_loss"

    def step(i: int) -> None:
        start = (i % batches) * batch_size
        index = order[start:start + batch_size]
        logits, preactivations = net(images.index_select(0, index))
        loss = F.cross_entropy(logits, labels.index_select(0, index))
        if use_std_loss:
            loss = loss + STD_LOSS_WEIGHT * _standardization_loss(preactivations)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, synchronize
