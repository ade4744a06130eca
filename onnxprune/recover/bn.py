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
  ``training_mode=0`` is re-estimated.
- Every BN normalises in inference mode, as in the deployed model: the statistics written
  for a BN are the per-channel mean and variance of its input *in the re-calibrated
  model*, i.e. computed with the re-estimated statistics of every BN upstream of it. To
  get them, the BNs are grouped by depth (a BN's depth is 1 + the largest depth of the
  re-estimated BNs its input depends on; 1 without one) and pass k over the data
  measures the inputs of the depth-k BNs while the BNs of depth < k already use their
  new statistics (the pass stops after its last depth-k BN). The number of passes is the
  largest depth (the number of BNs in sequence). The result is exact for any batch size,
  including a fixed batch of 1 (no per-batch statistics, so no instance normalisation and
  no zero variance of a BN on [N, C] with N = 1).
- Batches of ``batch_size`` samples, or micro-batches of the model's fixed batch B
  (:mod:`onnxprune.batching`: the last one padded, padding rows not counted), so every
  sample is used exactly once whatever N and B.
- Statistics are per channel (axis 1) over N and every spatial axis, accumulated over
  batches in float64 with Chan's parallel update (exact population mean and *biased*
  variance of all samples, not a momentum average).
- Only the BN's mean and variance initializers change (scale, bias, epsilon and the
  graph stay); an initializer shared with another node is given a fresh name first.
- Multi-process runs (:mod:`onnxprune.distributed`): each rank passes its shard
  (``data.shard(rank, world)``) and after every pass the statistics of all ranks are
  combined exactly (:func:`all_reduce_stats`: counts and sums, then the squared
  deviations around the global mean; never a mean of means), so every rank writes the
  statistics one process would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxprune.batching import fixed_batch, fixed_chunks, require_one_input
from onnxprune.data import CalibrationData
from onnxprune.distributed import DistContext, current
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph

__all__ = ["BNRecalibration", "RunningStats", "all_reduce_stats", "fixed_batch", "recalibrate_bn"]


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

    def set(self, count: int, mean: torch.Tensor | None, m2: torch.Tensor | None) -> None:
        """Replace the state: ``count`` values per channel, float64 [C] ``mean`` and sum of
        squared deviations ``m2`` (None, None when nothing was seen)."""
        self.count, self._mean, self._m2 = int(count), mean, m2

    @property
    def var(self) -> np.ndarray:
        return (self._m2 / max(self.count, 1)).cpu().numpy()


def all_reduce_stats(stats: Sequence[RunningStats], sizes: Sequence[int], ctx: DistContext) -> None:
    """Make every ``stats[i]`` (this rank's values) the statistics of all ranks' values, in place.

    Exact: the counts and per-channel sums are all-reduced first (global mean), then each
    rank's squared deviations about its own mean plus ``n_r (mean_r - mean)^2`` (Chan's
    combination), all in float64. A rank that saw nothing contributes zeros. Nothing
    happens at world 1.

    Args:
        stats: this rank's statistics, in the same order on every rank.
        sizes: the channel count of each (known from the model, so a rank that saw no
            value still sends a buffer of the right size).
        ctx: the process's :class:`~onnxprune.distributed.DistContext`.

    Raises:
        OnnxPruneError: a statistic whose channel count differs from ``sizes``;
        DistributedError: another rank failed.
    """
    if ctx.world == 1 or not stats:
        return
    offsets = np.cumsum([0] + [1 + int(c) for c in sizes])
    first = np.zeros(int(offsets[-1]), dtype=np.float64)  # per stat: count, then the per-channel sums
    for s, c, o in zip(stats, sizes, offsets):
        if s.count:
            if s._mean.numel() != int(c):
                raise OnnxPruneError(f"statistics of {s._mean.numel()} channels where the model has {c}")
            first[o] = s.count
            first[o + 1:o + 1 + c] = s.mean * s.count
    first = ctx.all_reduce_sum(first)
    second = np.zeros(int(offsets[-1]), dtype=np.float64)  # per stat: unused slot, then the m2 terms
    means = []
    for s, c, o in zip(stats, sizes, offsets):
        total = first[o]
        mean = first[o + 1:o + 1 + c] / total if total else np.zeros(c)
        means.append(mean)
        if s.count:
            second[o + 1:o + 1 + c] = (s._m2.cpu().numpy() + s.count * (s.mean - mean) ** 2)
    second = ctx.all_reduce_sum(second)
    for s, c, o, mean in zip(stats, sizes, offsets, means):
        total = int(round(first[o]))
        if total == 0:
            s.set(0, None, None)
            continue
        device = s._mean.device if s._mean is not None else "cpu"
        s.set(total, torch.from_numpy(mean).to(device), torch.from_numpy(second[o + 1:o + 1 + c].copy()).to(device))


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


def _depths(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, int]:
    """Depth of each re-estimated BN: 1 + the largest depth among the re-estimated BNs its
    data input depends on (1 when none). ``model.graph.node`` is in topological order (ONNX)."""
    chosen = {n.name for n in nodes}
    level: dict[str, int] = {}  # tensor -> largest depth of a re-estimated BN it depends on
    depth: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in chosen:
            depth[node.name] = d = 1 + level.get(node.input[0], 0)
        else:
            d = max((level.get(t, 0) for t in node.input if t), default=0)
        for t in node.output:
            if t:
                level[t] = d
    return depth


class _PassDone(Exception):
    """Raised after the last BN measured in a pass, to stop the forward (not an error)."""


def _inference_bn(mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
                  record: RunningStats | None = None, rows: list[int] | None = None, on_seen=None):
    """Evaluator of a BN node in inference mode with ``mean`` / ``var`` (None: the stored
    ones, the node's inputs 3 and 4). With ``record``, the first ``rows[0]`` rows of its
    input (the real samples of the micro-batch) are added to ``record``, then ``on_seen()``
    is called (it may raise :class:`_PassDone`)."""

    def fn(node, inputs, ctx):
        x, scale, bias = inputs[0], inputs[1], inputs[2]
        if record is not None:
            record.update(x[: rows[0]], 1)
            on_seen()
        m = inputs[3] if mean is None else mean
        v = inputs[4] if var is None else var
        eps = float(node.attrs.get("epsilon", 1e-5))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        inv = scale.float() * torch.rsqrt(v.float() + eps)
        y = xf * inv.view(shape) + (bias.float() - m.float() * inv).view(shape)
        extra = [inputs[3], inputs[4], inputs[3], inputs[4]]  # optional outputs: stored statistics
        return [y.to(x.dtype)] + extra[: max(0, node.n_outputs - 1)]

    return fn


def recalibrate_bn(model: onnx.ModelProto, data: CalibrationData, *, batch_size: int = 32,
                   device: str | torch.device = "cpu") -> BNRecalibration:
    """Re-estimate the running mean / variance of every BatchNormalization node on ``data``.

    Exact (module docstring): each BN gets the float64 per-channel mean and biased variance
    of its input over all N samples, in the model with the new statistics of the BNs before
    it, for any batch size and any fixed batch dim.

    Args:
        model: a canonical model (weights as initializers), one graph input; not modified.
        data: calibration inputs float32 [N, ...] in the model's input layout (labels unused).
        batch_size: samples per forward pass (bounds memory, >= 1); a model with a fixed
            batch dim B is fed micro-batches of B instead (:mod:`onnxprune.batching`).
        device: torch device of the passes.

    Returns:
        :class:`BNRecalibration` (``samples`` = N, every sample is used); ``nodes`` is
        empty (and ``model`` an unchanged copy) when the model has no BatchNormalization node.
        In a multi-process run every rank must call this and gets the same result.

    Raises:
        OnnxPruneError: no samples, batch_size < 1, several graph inputs, a node failing in
        torch, or a BN channel that saw no value; UnsupportedModelError: an op the torch
        executor lacks; DistributedError: another rank failed.
    """
    if len(data) == 0:
        raise OnnxPruneError("BN re-calibration needs at least one calibration sample")
    if int(batch_size) < 1:
        raise OnnxPruneError(f"--batch-size must be >= 1, got {batch_size}")
    ctx = current()
    data = data.shard(ctx.rank, ctx.world)  # statistics are sums over samples: any split adds up
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = _bn_nodes(out, inits)
    if not nodes:
        return BNRecalibration(out, (), len(data), {})
    graph = TorchGraph(out, requires_grad=False).to(device)
    require_one_input(graph.input_names, "BN re-calibration")
    fixed = fixed_batch(out)
    depth = _depths(out, nodes)
    by_name = {n.name: n for n in nodes}
    stats = {n.name: RunningStats() for n in nodes}
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = [0]
    samples = 0
    for k in range(1, max(depth.values()) + 1):
        level = [n.name for n in nodes if depth[n.name] == k]
        seen = [0]

        def on_seen(total=len(level), seen=seen):
            seen[0] += 1
            if seen[0] == total:
                raise _PassDone

        for name in level:
            graph.override_node(name, _inference_bn(record=stats[name], rows=rows, on_seen=on_seen))
        samples = 0
        with torch.no_grad():
            for x, _ in data.batches(int(batch_size)):
                xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
                for chunk, real in fixed_chunks(xt, fixed):
                    rows[0], seen[0] = real, 0
                    try:
                        graph(chunk)
                    except _PassDone:
                        pass
                    samples += real
        all_reduce_stats([stats[name] for name in level], [int(inits[by_name[name].input[1]].dims[0])
                                                          for name in level], ctx)
        for name in level:  # later passes see this level with its new statistics
            s = stats[name]
            if s.count == 0:
                raise OnnxPruneError(f"BatchNormalization {name}: no values seen during re-calibration")
            new[name] = (torch.from_numpy(s.mean).to(device), torch.from_numpy(s.var).to(device))
            graph.override_node(name, _inference_bn(*new[name]))
    uses: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    shift: dict[str, float] = {}
    for node in nodes:
        s = stats[node.name]
        eps = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        old_mean = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64)
        old_var = numpy_helper.to_array(inits[node.input[4]]).astype(np.float64)
        shift[node.name] = float(np.max(np.abs(s.mean - old_mean) / np.sqrt(old_var + eps), initial=0.0))
        for slot, value in ((3, s.mean), (4, s.var)):
            name = node.input[slot]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            if uses.get(name, 0) > 1:  # shared with another node: give this BN its own copy
                new_name = f"{node.name}.{'running_mean' if slot == 3 else 'running_var'}_recal"
                out.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), new_name))
                node.input[slot] = new_name
                uses[name] -= 1
            else:
                inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    return BNRecalibration(out, tuple(n.name for n in nodes), ctx.all_reduce_sum(samples), shift)
