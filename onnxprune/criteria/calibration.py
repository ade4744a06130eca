"""What every data-driven criterion does before it scores: graph, loss and batches.

:func:`scoring_setup` builds the :class:`~onnxprune.executor.graph_module.TorchGraph`
of the canonical model on the device and resolves the loss for the data and the model;
:func:`calibration_batches` yields the batches as tensors on the device together with the
original model's outputs (the teacher's, for the ``kl`` / ``mse`` losses and pseudo-labels).

Models with a fixed batch dim (:mod:`onnxprune.batching`): pass
``fixed=fixed_batch(model)`` to :func:`calibration_batches` and evaluate the model on a
batch with ``b.forward(graph)``; the batch size stays the logical batch (the loss and its
gradient are over all its samples), the forward runs in micro-batches of the fixed size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxprune.batching import forward_fixed, require_one_input
from onnxprune.criteria.loss import Loss, resolve_loss
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph


@dataclass(frozen=True)
class Batch:
    """One logical calibration batch on the device.

    Attributes:
        x: float [n, ...] input (n <= the batch size; all n samples of the logical batch,
            whatever the model's fixed batch).
        y: int64 [n] labels or None.
        reference: the original model's outputs on ``x`` (graph-output order, no grad,
            dim 0 = n for batch-first outputs), or None when no teacher was given.
        fixed: the model's fixed batch B (:func:`onnxprune.batching.fixed_batch`) or None;
            :meth:`forward` runs ``x`` in micro-batches of B.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    reference: tuple[torch.Tensor, ...] | None
    fixed: int | None = None

    def forward(self, graph: TorchGraph) -> tuple[torch.Tensor, ...]:
        """``graph``'s outputs on ``x``: ``graph(x)``, or with a fixed batch B the outputs of
        ceil(n / B) micro-batches (last one padded, padding dropped) joined along dim 0 —
        differentiable, so a loss on them is the loss of the whole logical batch.

        Raises:
            OnnxPruneError: an output that is not batch-first with several micro-batches,
                or a node failing (see :func:`onnxprune.batching.run_in_fixed_batches`).
        """
        return forward_fixed(graph, self.x, self.fixed)


def first_output_rank(model: onnx.ModelProto) -> int:
    """Rank of the model's first graph output, from its declared or inferred type (0 if unknown)."""
    out = model.graph.output[0]
    t = out.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else 0


def scoring_setup(name: str, model: onnx.ModelProto, data: CalibrationData, loss: str,
                  device: str | torch.device, *, prefer_teacher: bool = False) -> tuple[TorchGraph, Loss]:
    """The model's TorchGraph on ``device`` (weights frozen) and the resolved loss.

    Args:
        name: the criterion's name, for messages.
        model: the canonical model (one graph input).
        data: calibration data (labels decide ``auto``'s loss).
        loss: ``auto``, ``ce``, ``kl`` or ``mse`` (see :mod:`onnxprune.criteria.loss`).
        device: torch device.
        prefer_teacher: ``auto`` means the teacher loss even with labels
            (:func:`~onnxprune.criteria.loss.resolve_loss`).

    Raises:
        OnnxPruneError: no samples, several graph inputs, an unknown loss or one the
            model's output cannot take; UnsupportedModelError for ops the executor lacks.
    """
    if len(data) == 0:
        raise OnnxPruneError(f"criterion {name} needs at least one calibration sample")
    resolved = resolve_loss(loss, has_labels=data.y is not None, first_output_rank=first_output_rank(model),
                            prefer_teacher=prefer_teacher)
    graph = TorchGraph(model, requires_grad=False).to(device)
    require_one_input(graph.input_names, f"criterion {name}")
    return graph, resolved


def calibration_batches(data: CalibrationData, batch_size: int, device: str | torch.device,
                        teacher: TorchGraph | None = None, *, fixed: int | None = None) -> Iterator[Batch]:
    """``data`` in logical batches of at most ``batch_size`` with ``teacher``'s outputs (no grad).

    ``teacher`` is evaluated as it is when each batch is drawn: pass a graph whose gates
    are all one and whose weights are the original's (or None: ``reference`` is None,
    for a criterion that takes the reference from its own unperturbed forward pass).

    Args:
        data: calibration data, x float32 [N, ...], y int64 [N] or None.
        batch_size: samples per logical batch (>= 1): the batch a loss / gradient is
            taken over, whatever the model's fixed batch.
        device: torch device.
        teacher: the reference graph or None.
        fixed: the model's fixed batch B, ``fixed_batch(model)`` (the teacher is the same
            model); the batches' :meth:`Batch.forward` and the teacher run micro-batches of
            B. Every sample is used once (a partial micro-batch is padded internally).

    A criterion must evaluate the model with ``b.forward(graph)`` (not ``graph(b.x)``,
    which fails on a fixed-batch model given another number of samples).

    Raises:
        OnnxPruneError: ``batch_size`` < 1; from :meth:`Batch.forward` for the teacher.
    """
    if int(batch_size) < 1:
        raise OnnxPruneError(f"batch size must be >= 1, got {batch_size}")
    for x, y in data.batches(int(batch_size)):
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        yt = None if y is None else torch.from_numpy(np.asarray(y)).to(device)
        b = Batch(xt, yt, None, fixed)
        if teacher is not None:
            with torch.no_grad():
                b = Batch(xt, yt, tuple(t.detach() for t in b.forward(teacher)), fixed)
        yield b
