"""Feeding data to a model whose batch dim may be fixed: the one rule every pass follows.

Many exported models hard-code their batch size: the graph input declares dim 0 as a
number (often 1) and a ``Reshape`` to ``[1, -1]`` bakes it into the graph, so such a model
cannot run more (or fewer) samples at once. Every pass over calibration data (criteria,
BN re-calibration, bias compensation, fine-tuning, evaluation) goes through this module.

Rules:

- *Declared input shape* (:func:`declared_input_shape`): the dims of a real graph input
  (not an initializer); a dim is fixed when it has a positive ``dim_value``, else None.
- *Fixed batch* (:func:`fixed_batch`): the model needs a fixed batch B exactly when its
  first graph input declares dim 0 as a positive number B. Nothing else is inspected (a
  ``Reshape`` constant alone does not count: onnxruntime enforces the declared dim, and a
  model whose declared dim is symbolic but whose Reshape hard-codes the batch fails with
  an :class:`~onnxprune.errors.OnnxPruneError` naming the node, from
  :class:`~onnxprune.executor.graph_module.TorchGraph`).
- *Micro-batching* (:func:`fixed_chunks`, :func:`run_in_fixed_batches`,
  :func:`forward_fixed`): a batch of any size n is run as ceil(n / B) micro-batches of
  exactly B samples; a last partial micro-batch is padded by repeating its last sample
  and the padding rows are dropped from the outputs, so every sample is used exactly once
  and no padded row reaches a loss, a statistic or a gradient. The per-micro-batch
  outputs are concatenated along dim 0, which requires every output to be batch-first
  (dim 0 == B on each micro-batch); an output that is not raises an OnnxPruneError naming
  it. With a free batch dim (or n == B) the batch runs as it is. Padding assumes the
  samples of a batch do not interact (true for inference-mode graphs).
- The logical batch size (``--batch-size``) keeps its meaning: it is the number of
  samples a loss, a gradient or an optimiser step is taken over; B only decides how that
  batch is cut for the forward passes. The concatenated torch outputs keep autograd, so a
  loss on them is exactly the loss of the logical batch (memory as for a free-batch model
  run on the whole logical batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError

__all__ = ["declared_input_shape", "fixed_batch", "batch_dim", "fixed_chunks", "forward_fixed",
           "require_one_input", "run_in_fixed_batches", "value_info_dims"]

T = TypeVar("T")


def batch_dim(dim: Any) -> int | None:
    """One declared dim as the rule reads it: a positive int, else None (symbolic, unknown,
    0 or negative such as Paddle's -1). Accepts an ONNX ``TensorShapeProto.Dimension`` or
    what onnxruntime's ``NodeArg.shape`` holds (int, str or None)."""
    if isinstance(dim, onnx.TensorShapeProto.Dimension):
        return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and int(dim) > 0:
        return int(dim)
    return None


def value_info_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dims of a tensor value (graph input / output): positive ``dim_value`` or
    None per dim; None when the value declares no shape or is not a tensor."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [batch_dim(d) for d in vi.type.tensor_type.shape.dim]


def declared_input_shape(model: onnx.ModelProto, index: int = 0) -> list[int | None] | None:
    """Declared dims of the ``index``-th real graph input (initializers skipped).

    Returns:
        One entry per dim: the positive ``dim_value`` or None; None (not a list) when the
        input declares no shape (rank unknown) or is not a tensor.

    Raises:
        OnnxPruneError: the model has no real graph input at ``index``.
    """
    from onnxprune.inputs import graph_inputs

    ins = graph_inputs(model)
    if not 0 <= index < len(ins):
        raise OnnxPruneError(f"the model has {len(ins)} graph input(s), no input #{index}")
    return value_info_dims(ins[index])


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size B the model must be fed (its first input's declared dim 0), or None.

    See the module docstring for the rule; a model without graph inputs gives None.
    """
    from onnxprune.inputs import graph_inputs

    if not graph_inputs(model):
        return None
    dims = declared_input_shape(model)
    return dims[0] if dims else None


def require_one_input(names: Sequence[str], what: str) -> None:
    """Raise unless ``names`` (a TorchGraph's ``input_names``) is exactly one input.

    Args:
        names: the graph input names.
        what: the feature, for the message (e.g. ``"BN re-calibration"``, ``"criterion taylor"``).

    Raises:
        OnnxPruneError: ``"<what> supports models with one input, this one has N (a, b)"``.
    """
    if len(names) != 1:
        raise OnnxPruneError(f"{what} supports models with one input, this one has {len(names)} "
                             f"({', '.join(names)})")


def _cat(parts: list):
    import torch

    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=0)
    return np.concatenate(parts, axis=0)


def fixed_chunks(x: T, fixed: int | None) -> Iterator[tuple[T, int]]:
    """``x`` ([n, ...] numpy array or torch tensor) cut for a model with fixed batch ``fixed``.

    Yields:
        ``(chunk, real)``: with ``fixed`` None or n == fixed, ``(x, n)`` once; else chunks
        of exactly ``fixed`` rows, the last one padded by repeating its last row, and
        ``real`` the number of its leading rows that are data (the rest is padding).
        Nothing for n == 0.
    """
    n = len(x)
    if n == 0:
        return
    if fixed is None or n == fixed:
        yield x, n
        return
    for i in range(0, n, fixed):
        chunk = x[i:i + fixed]
        real = len(chunk)
        if real < fixed:
            chunk = _cat([chunk] + [chunk[-1:]] * (fixed - real))
        yield chunk, real


def run_in_fixed_batches(run: Callable[[T], Sequence[T]], x: T, fixed: int | None,
                         names: Sequence[str] = (), label: str = "") -> list[T]:
    """``run(x)`` for a model with fixed batch ``fixed``: micro-batches, outputs joined.

    Args:
        run: evaluates one batch, returning its outputs in order (numpy arrays or torch
            tensors, the type of ``x``).
        x: float [n, ...] (numpy or torch); n >= 1.
        fixed: the model's fixed batch (:func:`fixed_batch`) or None.
        names: the output names, for messages.
        label: the model's name, prefixed to messages (``"<label>: "``) when given.

    Returns:
        The outputs for all n samples: per output, the micro-batch outputs without their
        padding rows, concatenated along dim 0 (torch: differentiable).

    Raises:
        OnnxPruneError: x is empty, or (with several micro-batches) an output whose dim 0
            is not the micro-batch size: it is not batch-first, so the outputs of several
            runs cannot be joined (the message names it and its shape).
    """
    n = len(x)
    if n == 0:
        raise OnnxPruneError("no samples to run")
    if fixed is None or n == fixed:
        return list(run(x))
    parts: list[list] | None = None
    for chunk, real in fixed_chunks(x, fixed):
        outs = list(run(chunk))
        if parts is None:
            parts = [[] for _ in outs]
        for j, o in enumerate(outs):
            if o.ndim == 0 or o.shape[0] != fixed:
                name = names[j] if j < len(names) else f"#{j}"
                raise OnnxPruneError(
                    f"{label + ': ' if label else ''}output {name!r} has shape {list(o.shape)} for a batch of {fixed}: it is not batch-first, "
                    f"so {n} samples cannot be run in batches of the model's fixed batch size {fixed}; "
                    f"use a model with a free batch dim or {fixed} samples")
            parts[j].append(o[:real])
    return [_cat(p) for p in parts]


def forward_fixed(graph, x, fixed: int | None) -> tuple:
    """``graph(x)`` for a TorchGraph whose model has fixed batch ``fixed`` (:func:`run_in_fixed_batches`).

    Args:
        graph: a :class:`~onnxprune.executor.graph_module.TorchGraph` with one input.
        x: torch tensor [n, ...] on the graph's device, n >= 1.
        fixed: :func:`fixed_batch` of the graph's model, or None.

    Returns:
        The graph outputs for the n samples (tuple, graph-output order), with autograd
        when grad is enabled.

    Raises:
        OnnxPruneError: as :func:`run_in_fixed_batches`, or a node failing
            (:meth:`TorchGraph.forward`).
    """
    return tuple(run_in_fixed_batches(graph, x, fixed, graph.output_names))
