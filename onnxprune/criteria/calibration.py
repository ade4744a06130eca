"""What every data-driven criterion does before it scores: graph, loss and batches.

:func:`scoring_setup` builds the :class:`~onnxprune.executor.graph_module.TorchGraph`
of the canonical model on the device and resolves the loss for the data and the model;
:func:`calibration_batches` yields the batches as tensors on the device together with the
original model's outputs (the teacher's, for the ``kl`` / ``mse`` losses and pseudo-labels).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxprune.criteria.loss import Loss, resolve_loss
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph


@dataclass(frozen=True)
class Batch:
    """One calibration batch on the device.

    Attributes:
        x: float [B, ...] input.
        y: int64 [B] labels or None.
        reference: the original model's outputs on ``x`` (graph-output order, no grad),
            or None when no teacher was given.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    reference: tuple[torch.Tensor, ...] | None


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
    if len(graph.input_names) != 1:
        raise OnnxPruneError(f"criterion {name} supports models with one input, this one has "
                             f"{len(graph.input_names)} ({', '.join(graph.input_names)})")
    return graph, resolved


def calibration_batches(data: CalibrationData, batch_size: int, device: str | torch.device,
                        teacher: TorchGraph | None = None) -> Iterator[Batch]:
    """``data`` in batches of at most ``batch_size`` with ``teacher``'s outputs (no grad).

    ``teacher`` is evaluated as it is when each batch is drawn: pass a graph whose gates
    are all one and whose weights are the original's (or None: ``reference`` is None,
    for a criterion that takes the reference from its own unperturbed forward pass).
    """
    for x, y in data.batches(batch_size):
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        yt = None if y is None else torch.from_numpy(np.asarray(y)).to(device)
        ref = None
        if teacher is not None:
            with torch.no_grad():
                ref = tuple(t.detach() for t in teacher(xt))
        yield Batch(xt, yt, ref)
