"""Losses for the gradient-based criteria.

Only classifiers are supported for now: the model's first graph output must be 2-D
``[N, classes]`` logits.

- With labels: cross-entropy against them.
- Without labels: cross-entropy against the *original model's argmax* (pseudo-labels).
  Why not the obvious "distance to the teacher" (KL to the original's softmax, MSE to
  its outputs)? At the unpruned point (all gates 1) the pruned model *is* the teacher,
  so such a loss is at its minimum and its gradient with respect to every gate is
  exactly zero: a first-order criterion like Taylor would score every channel 0.
  Cross-entropy against hard pseudo-labels is not at a minimum there (the softmax is
  not one-hot), so its gradient carries information.

For other outputs (detection, segmentation, regression) an MSE-like loss has the same
zero-gradient problem and no pseudo-label trick exists, so :func:`make_loss` raises
:class:`~onnxprune.errors.OnnxPruneError`: taylor needs labels and a classifier output
for now.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnxprune.errors import OnnxPruneError

LossFn = Callable[..., torch.Tensor]
KINDS = ("ce", "auto")


def make_loss(kind: str = "auto") -> LossFn:
    """The loss called ``kind``: ``ce`` (cross-entropy) or ``auto`` (the same, for now).

    The returned function is ``loss(output, labels=None, reference=None) -> scalar``:
    ``output`` float [N, classes] logits; ``labels`` int [N] or None; ``reference`` the
    original model's output on the same batch, whose argmax gives the pseudo-labels
    when ``labels`` is None (when both are None, ``output``'s own argmax is used,
    which is the original's when every gate is 1). Mean over the batch.

    Raises:
        OnnxPruneError: unknown ``kind``; at call time, an output that is not 2-D
            (taylor needs labels or a classifier output for now) or labels that do not
            match the output.
    """
    if kind not in KINDS:
        raise OnnxPruneError(f"unknown loss {kind!r}; choose from {', '.join(KINDS)}")

    def loss(output: torch.Tensor, labels: torch.Tensor | None = None,
             reference: torch.Tensor | None = None) -> torch.Tensor:
        if output.dim() != 2:
            raise OnnxPruneError(
                f"the model's first output has shape {tuple(output.shape)}; gradient criteria (taylor) need a "
                "classifier output [N, classes] for now (labels or pseudo-labels for cross-entropy)")
        if labels is None:
            labels = (reference if reference is not None else output).detach().argmax(dim=1)
        labels = labels.to(device=output.device, dtype=torch.long).reshape(-1)
        if labels.shape[0] != output.shape[0]:
            raise OnnxPruneError(f"{labels.shape[0]} labels for a batch of {output.shape[0]} outputs")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= output.shape[1]):
            raise OnnxPruneError(f"labels outside [0, {output.shape[1]}) for an output of {output.shape[1]} classes")
        return F.cross_entropy(output.float() if output.dtype == torch.float16 else output, labels)

    return loss
