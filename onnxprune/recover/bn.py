"""BatchNormalization re-calibration: new running statistics from calibration data.

After pruning, the inputs of the surviving BatchNormalization nodes have other statistics
than the ones stored in the model (the channels feeding them lost inputs), so the stored
running mean / variance normalise them wrongly. Re-estimating them on a few hundred
samples, without any training, recovers much of the accuracy lost: "adaptive BN" of
Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning"
(ECCV 2020), who show that the accuracy of a pruned network *with re-estimated BN
statistics* is what correlates with its accuracy after fine-tuning.

Rules :func:`recalibrate_bn` follows:

- The graph is evaluated in torch (:class:`~onnxprune.executor.graph_module.TorchGraph`,
  no gradients). Every BatchNormalization node with 1-D parameters and
  ``training_mode=0`` is re-estimated; one pass over the data updates all of them.
- During that pass each BN normalises its input with the *batch* statistics (as in
  training mode, the EagleEye procedure), so a BN downstream sees inputs produced with
  the re-estimated (not the stale) statistics of the BNs before it. With all data in one
  batch the written statistics are exactly the per-channel mean and variance of each
  BN's input in the re-calibrated model.
- Statistics are per channel (axis 1) over N and every spatial axis, accumulated over
  batches in float64 with Chan's parallel update (exact population mean and *biased*
  variance of all samples, not a momentum average).
- Only the BN's mean and variance initializers change (scale, bias, epsilon and the
  graph stay); an initializer shared with another node is given a fresh name first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph

__all__ = ["BNRecalibration", "RunningStats", "fixed_batch", "model_batches", "recalibrate_bn"]


class RunningStats:
    """Per-channel mean and biased variance over many batches (Chan et al. 1979 update, float64).

    ``update(x, axis)`` adds every value of ``x`` (any shape) at its position along ``axis``;
    :attr:`mean` / :attr:`var` are float64 numpy arrays [C]; :attr:`count` values per channel.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, axis: int = 1) -> None:
        x = x.detach().to(torch.float64).movedim(axis, 0).reshape(x.shape[axis], -1)
        n_b = x.shape[1]
        if n_b == 0:
            return
        bm = x.mean(dim=1)
        bm2 = ((x - bm[:, None]) ** 2).sum(dim=1)
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, bm, bm2
            return
        n = self.count
        tot = n + n_b
        delta = bm - self._mean
        self._mean = self._mean + delta * (n_b / tot)
        self._m2 = self._m2 + bm2 + delta * delta * (n * n_b / tot)
        self.count = tot

    @property
    def mean(self) -> np.ndarray:
        return self._mean.cpu().numpy()

    @property
    def var(self) -> np.ndarray:
        return (self._m2 / max(self.count, 1)).cpu().numpy()


@dataclass(frozen=True)
class BNRecalibration:
    """Outcome of :func:`recalibrate_bn`.

    Attributes:
        model: a copy of the input model with the new statistics.
        nodes: names of the BatchNormalization nodes re-estimated, in graph order.
        samples: number of calibration samples used.
        mean_shift: per node, max over channels of |new mean - old mean| / sqrt(old var + eps)
            (how far the stored statistics were off, in units of the old std).
    """

    model: onnx.ModelProto
    nodes: tuple[str, ...]
    samples: int
    mean_shift: dict[str, float]

    def to_dict(self) -> dict:
        return {"nodes": len(self.nodes), "samples": self.samples,
                "max_mean_shift": max(self.mean_shift.values(), default=0.0)}


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The first graph input's declared batch dim when it is a fixed number, else None.

    A model exported with batch 1 often hard-codes it (``Reshape`` to ``[1, -1]``), so the
    torch passes of recovery feed such a model exactly that many samples at a time.
    """
    from onnxprune.inputs import graph_inputs

    ins = graph_inputs(model)
    dims = ins[0].type.tensor_type.shape.dim if ins else []
    return int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def model_batches(model: onnx.ModelProto, data: CalibrationData, batch_size: int):
    """``data.batches`` of ``batch_size``, or of the model's fixed batch dim (:func:`fixed_batch`);
    with a fixed batch B > 1 a last partial batch is dropped."""
    fixed = fixed_batch(model)
    for x, y in data.batches(fixed or batch_size):
        if fixed is None or len(x) == fixed:
            yield x, y


def _bn_nodes(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    out = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("training_mode", 0)) == 1:
            continue
        if len(node.input) < 5 or not all(n in inits for n in node.input[1:5]):
            continue
        if any(len(inits[n].dims) != 1 for n in node.input[1:5]):
            continue  # spatial=0 (opset < 9) per-position statistics: left alone
        out.append(node)
    return out


def _batch_stat_bn(stats: RunningStats):
    """Evaluator of a BN node that records its input and normalises with batch statistics."""

    def fn(node, inputs, ctx):
        x, scale, bias = inputs[0], inputs[1], inputs[2]
        eps = float(node.attrs.get("epsilon", 1e-5))
        stats.update(x, 1)
        dims = (0,) + tuple(range(2, x.dim()))
        xf = x.float()
        mean = xf.mean(dim=dims)
        var = xf.var(dim=dims, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv = scale.float() * torch.rsqrt(var + eps)
        y = xf * inv.view(shape) + (bias.float() - mean * inv).view(shape)
        extra = [inputs[3], inputs[4], inputs[3], inputs[4]]  # optional outputs: stored statistics
        return [y.to(x.dtype)] + extra[: max(0, node.n_outputs - 1)]

    return fn


def recalibrate_bn(model: onnx.ModelProto, data: CalibrationData, *, batch_size: int = 32,
                   device: str | torch.device = "cpu") -> BNRecalibration:
    """Re-estimate the running mean / variance of every BatchNormalization node on ``data``.

    Args:
        model: a canonical model (weights as initializers), one graph input; not modified.
        data: calibration inputs float32 [N, ...] in the model's input layout (labels unused).
        batch_size: samples per forward pass (bounds memory); a model with a fixed batch
            dim is fed that many (:func:`model_batches`).
        device: torch device of the pass.

    Returns:
        :class:`BNRecalibration`; ``nodes`` is empty (and ``model`` an unchanged copy)
        when the model has no BatchNormalization node.

    Raises:
        OnnxPruneError: no samples, several graph inputs, or a BN channel that saw no value;
        UnsupportedModelError: an op the torch executor lacks.
    """
    if len(data) == 0:
        raise OnnxPruneError("BN re-calibration needs at least one calibration sample")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = _bn_nodes(out, inits)
    if not nodes:
        return BNRecalibration(out, (), len(data), {})
    graph = TorchGraph(out, requires_grad=False).to(device)
    if len(graph.input_names) != 1:
        raise OnnxPruneError(f"BN re-calibration supports models with one input, this one has "
                             f"{len(graph.input_names)} ({', '.join(graph.input_names)})")
    stats = {n.name: RunningStats() for n in nodes}
    for n in nodes:
        graph.override_node(n.name, _batch_stat_bn(stats[n.name]))
    with torch.no_grad():
        for x, _ in model_batches(out, data, batch_size):
            graph(torch.from_numpy(np.ascontiguousarray(x)).to(device))
    uses: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    shift: dict[str, float] = {}
    for node in nodes:
        s = stats[node.name]
        if s.count == 0:
            raise OnnxPruneError(f"BatchNormalization {node.name}: no values seen during re-calibration")
        eps = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        old_mean = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64)
        old_var = numpy_helper.to_array(inits[node.input[4]]).astype(np.float64)
        shift[node.name] = float(np.max(np.abs(s.mean - old_mean) / np.sqrt(old_var + eps), initial=0.0))
        for slot, value in ((3, s.mean), (4, s.var)):
            name = node.input[slot]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            if uses.get(name, 0) > 1:  # shared with another node: give this BN its own copy
                new = f"{node.name}.{'running_mean' if slot == 3 else 'running_var'}_recal"
                out.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), new))
                node.input[slot] = new
                uses[name] -= 1
            else:
                inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    return BNRecalibration(out, tuple(n.name for n in nodes), len(data), shift)
