"""PyTorch engine: eager execution with autograd; parameters are leaf tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from normbench.backends import base
from normbench.backends.torch.ops import Ops

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64}

_RECOMPILE_LIMIT = 256  # variants one process may compile (see Engine.training_loss)


class Engine(base.Engine):
    name = "torch"
    framework = "torch"

    def __init__(self, device: str | None = None, dtype: str = "float32", compile: bool = False):  # noqa: A002
        super().__init__(device, dtype, compile)
        self.compiled_step = compile
        self._compiled_functions: dict[tuple, object] = {}  # (what, spec hash, variant, ...) -> its torch.compile
        requested = device or "cpu"
        try:
            self.torch_device = torch.device(requested)
        except RuntimeError as exc:
            raise base.BackendUnavailable(f"torch: invalid device {requested!r}: {exc}") from None
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise base.BackendUnavailable(f"torch: device {requested!r} requested but no CUDA device is available; use --device cpu")
        if self.torch_device.type == "cuda" and (self.torch_device.index or 0) >= torch.cuda.device_count():
            raise base.BackendUnavailable(f"torch: device {requested!r} does not exist; {torch.cuda.device_count()} CUDA device(s) present")
        if self.torch_device.type not in ("cpu", "cuda"):
            raise base.BackendUnavailable(f"torch: device type {self.torch_device.type!r} is not supported; use cpu or cuda")
        if self.torch_device.type == "cuda":
            # TF32 would make float32 matmuls/convs disagree with the other backends at ~1e-3.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device = str(self.torch_device)
        self.torch_dtype = _DTYPES[dtype]
        self.ops = Ops()
        if self.torch_device.type == "cpu":
            base.keep_freed_memory()

    def versions(self):
        return {"torch": torch.__version__}

    def device_description(self):
        if self.torch_device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.torch_device)}"
        return f"cpu ({torch.get_num_threads()} threads)"

    def put_images(self, images_nhwc):
        # One copy on the host into this backend's layout (NCHW, height and width reversed:
        # backends/torch/ops.py), with standard contiguous strides: a single-channel view
        # counts as contiguous either way, and one whose strides look channels-last sends
        # PyTorch's fused batch norm down a path ~1e-3 off float64 in float32.
        nchw = np.array(np.asarray(images_nhwc).transpose(0, 3, 1, 2)[:, :, ::-1, ::-1], dtype=_NUMPY_DTYPES[self.dtype],
                        order="C")
        return torch.from_numpy(nchw).to(self.torch_device)

    def put_labels(self, labels):
        return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.torch_device)

    def import_tree(self, tree):
        out = {}
        for name, value in tree.items():
            value = np.asarray(value)
            if value.ndim == 4:  # HWIO -> OIHW, its window reversed as the activations are
                value = value.transpose(3, 2, 0, 1)[:, :, ::-1, ::-1]
            # A fresh C-ordered copy: a reversed axis of size 1 leaves NumPy's flags contiguous
            # with a negative stride, which torch.from_numpy refuses.
            out[name] = torch.from_numpy(np.array(value, order="C")).to(self.torch_device, self.torch_dtype)
        return out

    def export_tree(self, tree):
        out = {}
        for name, value in tree.items():
            value = value.detach().cpu().numpy()
            out[name] = np.ascontiguousarray(value[:, :, ::-1, ::-1].transpose(2, 3, 1, 0)) if value.ndim == 4 else value
        return out

    def activation_to_numpy(self, x):
        x = x.detach().cpu().numpy()
        return np.ascontiguousarray(x[:, :, ::-1, ::-1].transpose(0, 2, 3, 1)) if x.ndim == 4 else x

    def to_numpy(self, x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    def stack_to_numpy(self, arrays):
        return torch.stack(arrays).cpu().numpy()

    def synchronize(self):
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def trainer(self, program, params, state, train_images, train_labels, track=()):
        return Trainer(self, program, params, state, train_images, train_labels, track)

    def training_loss(self, program):
        """`program.loss` as the training step calls it: eager, or with `compile` the
        torch.compile of it (forward and, through AOTAutograd, backward), compiled once per
        spec and variant and shared by every trainer of them (a sweep's seeds)."""
        ops = self.ops
        return self._compiled(("loss", program.spec.hash(), program.variant.name),
                              lambda params, state, images, labels, masks: program.loss(ops, params, state, images, labels, masks))

    def evaluation_function(self, program, track=()):
        """`program.evaluation` of one chunk: eager, or with `compile` its torch.compile,
        shared as `training_loss` is. Compiled, a chunk's convolutions, activations and
        pre-activation moments run as a few fused kernels: on cnn3 an evaluation of 10,000
        images took 206 / 221 / 161 ms against 281 / 348 / 218 eager (none / batch norm /
        standardization loss; 2-core machine, alternating in one process), the moments
        aggregated across chunks exactly as before."""
        ops, track = self.ops, tuple(track)
        return self._compiled(("evaluation", program.spec.hash(), program.variant.name, track),
                              lambda params, state, images, labels: program.evaluation(ops, params, state, images, labels, track))

    def _compiled(self, key, function):
        if not self.compiled_step:
            return function
        if key not in self._compiled_functions:
            # Dynamo guards on the plan the closure holds, so every variant is a recompile
            # of this one code object; its default limit (8) would silently fall back to
            # eager from the ninth variant of a sweep on.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
            self._compiled_functions[key] = torch.compile(function, dynamic=False)
        return self._compiled_functions[key]

    def vectorized_group(self, program, members, train_images, train_labels, track=()):
        return VectorizedGroup(self, program, members, train_images, train_labels, track)

    def fastest_group_size(self):
        # torch.func.vmap batches the members' convolutions into grouped ones, which
        # oneDNN runs no faster than the members' own on CPU: cnn3, batch 128, 2-core
        # machine, per step of 4 runs, vmapped against one after the other: 26-32 / 28-36 ms
        # without normalization, 57-60 / 37-40 ms with batch norm, 40-44 / 37-38 ms with
        # the standardization loss; 10 runs without normalization 124 / 78-83 ms. A GPU,
        # where one small run leaves most of the device idle, is where batching pays: on
        # an H200 (results/benchmarks/gpu/, two leases) cnn3's main job cost 3.4-4.4 s per
        # run alone, 1.9-2.6 in groups of 4 and 0.90-1.26 in groups of 10.
        return 1 if self.torch_device.type == "cpu" else 10


class Trainer(base.Trainer):
    def __init__(self, engine, program, params, state, train_images, train_labels, track):
        super().__init__(engine, program, track)
        self.ops = engine.ops
        self.params = {k: v.requires_grad_() for k, v in engine.import_tree(params).items()}
        self.state = engine.import_tree(state)
        self.opt_state = program.optimizer.init(self.ops, self.params)
        self.train_images, self.train_labels = train_images, train_labels
        self._loss = engine.training_loss(program)
        self._evaluation = engine.evaluation_function(program, track)

    def _batch(self, indices, images=None):
        index = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(self.engine.torch_device)
        images = self.train_images.index_select(0, index) if images is None else self.engine.put_images(images)
        return images, self.train_labels.index_select(0, index)

    def _masks(self, dropout_masks):
        return None if dropout_masks is None else self.engine.import_tree(dropout_masks)

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        images, labels = self._batch(indices, images)
        total, aux = self._loss(self.params, self.state, images, labels, self._masks(dropout_masks))
        grads = torch.autograd.grad(total, list(self.params.values()))
        with torch.no_grad():
            params, self.opt_state = self.program.update(
                self.ops, self.params, dict(zip(self.params, grads)), self.opt_state, learning_rate)
        self.params = {k: v.requires_grad_() for k, v in params.items()}
        self.state = aux["state"]
        return torch.stack([value.detach() for value in self.program.step_losses(aux)])

    def export(self):
        return self.engine.export_tree(self.params), self.engine.export_tree(self.state)

    def export_optimizer_state(self):
        return self.engine.export_tree(self.opt_state)

    def load_state(self, params, state, optimizer_state):
        e = self.engine
        self.params = {k: v.requires_grad_() for k, v in e.import_tree(params).items()}
        self.state, self.opt_state = e.import_tree(state), e.import_tree(optimizer_state)

    def gradients(self, images, labels, dropout_masks=None):
        masks = self._masks(dropout_masks)
        total, _ = self.program.loss(self.ops, self.params, self.state, images, labels, masks)
        grads = torch.autograd.grad(total, list(self.params.values()))
        with torch.no_grad():
            grads = self.program.objective_gradients(self.ops, self.params, dict(zip(self.params, grads)))
            seen = self.program.inspect(self.ops, self.params, self.state, images, labels, masks)
        return self.engine.export_tree(grads), self._canonical_intermediates(seen)

    def predict(self, images):
        with torch.inference_mode():
            out = self.program.forward(self.ops, self.params, self.state, images, training=False)
            return self.engine.activation_to_numpy(out.logits)

    def _evaluate_chunk(self, images, labels):
        with torch.inference_mode():
            return self._chunk_to_numpy(self._evaluation(self.params, self.state, images, labels))


def _stacked(trees: list[dict]) -> dict:
    return {k: torch.stack([tree[k] for tree in trees]) for k in trees[0]}


class VectorizedGroup(base.VectorizedGroup):
    """`torch.func.vmap` of the functional training step (`torch.func.grad_and_value` of
    `program.loss`) over members stacked on a first axis."""

    evaluation_chunk_size = Trainer.evaluation_chunk_size

    def __init__(self, engine, program, members, train_images, train_labels, track):
        super().__init__(engine, program, len(members), track)
        ops = self.ops = engine.ops
        self.params = _stacked([engine.import_tree(p) for p, _ in members])
        self.state = _stacked([engine.import_tree(s) for _, s in members])
        self.opt_state = _stacked([program.optimizer.init(ops, engine.import_tree(p)) for p, _ in members])
        self.train_images, self.train_labels = train_images, train_labels

        def member_step(params, opt_state, state, images, labels, masks, lr):
            objective = lambda p: program.loss(ops, p, state, images, labels, masks)
            grads, (_, aux) = grad_and_value(objective, has_aux=True)(params)
            params, opt_state = program.update(ops, params, grads, opt_state, lr)
            return params, opt_state, aux["state"], torch.stack(program.step_losses(aux))

        def evaluation(params, state, images, labels):
            return program.evaluation(ops, params, state, images, labels, track)

        # torch.func.vmap takes no in_dim for a None argument: one step with dropout masks, one without.
        self._train_steps = {masked: vmap(member_step, in_dims=(0, 0, 0, 0, 0, 0 if masked else None, None))
                             for masked in (False, True)}
        self._evaluation = vmap(evaluation, in_dims=(0, 0, None, None))
        # On CPU each member is evaluated alone, by the function its runs alone use: mnist-cnn's
        # 20,000 evaluated images took 0.30-0.33 s per run alone, 1.13-1.71 s per run in a
        # vmapped group of 4 (grouped convolutions) and 0.31-0.34 s this way (none, batch
        # norm, standardization loss; 2-core machine), with the same cross-entropies.
        self._members_evaluation = (engine.evaluation_function(program, track)
                                    if engine.torch_device.type == "cpu" else None)

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        e = self.engine
        index = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(e.torch_device)
        labels = self.train_labels[index]  # (members, batch)
        images = self.train_images[index] if images is None else torch.stack([e.put_images(x) for x in images])
        masks = None if dropout_masks is None else _stacked([e.import_tree(m) for m in dropout_masks])
        with torch.no_grad():  # grad_and_value differentiates inside; nothing outside needs a graph
            self.params, self.opt_state, self.state, losses = self._train_steps[masks is not None](
                self.params, self.opt_state, self.state, images, labels, masks, learning_rate)
        return losses

    def _evaluate_members(self, images, labels):
        if self._members_evaluation is None:
            with torch.no_grad():
                return self._per_member(self._evaluation(self.params, self.state, images, labels))
        with torch.inference_mode():  # as a run alone evaluates (Trainer._evaluate_chunk)
            return [self._members_evaluation(params, state, images, labels)
                    for params, state in zip(self._per_member(self.params), self._per_member(self.state))]
