"""Losses of the data-driven criteria (taylor, infcp, ifso) and of recovery.

Kinds (``--loss``):

- ``ce``: cross-entropy of the first output ``[N, classes]`` against the labels; without
  labels, against the original model's argmax (pseudo-labels).
- ``kl``: KL(p_teacher || p_model) of the first output's softmax, batch mean (the
  original model is the teacher; needs no labels).
- ``mse``: over every floating-point output, the mean squared difference to the
  teacher's output divided by the variance of the teacher's output (so heads of
  different scales weigh alike), summed over outputs. For detectors, OCR, anything that
  is not a classifier.
- ``auto``: ``ce`` with labels; without labels ``kl`` when the first output is 2-D
  (a classifier) and ``mse`` otherwise (the rule of issue 3 / DESIGN.md). A criterion
  built on a second-order expansion around a minimum (``ifso``) asks for the teacher
  loss even with labels (``prefer_teacher``): only the teacher loss is exactly at a
  stationary point at the unpruned weights.

The teacher losses (``kl``, ``mse``) are at their minimum where the model *is* the
teacher, i.e. at the unpruned point: their gradient with respect to every gate or
weight is exactly zero there. Criteria that need a first-order signal (taylor, the
influence of infcp) use :meth:`Loss.fisher_sample` instead: a loss with a target drawn
at random from the teacher's predictive distribution (a label sampled from the softmax
for ``kl``; a random projection of the outputs for ``mse``), whose squared gradient is
an unbiased estimate of the Fisher (Gauss-Newton) diagonal, which is what the teacher
loss's second-order change is made of (Theis et al., "Faster gaze prediction with dense
networks and Fisher pruning", 2018, for the sampled-label Fisher). Samples of a batch
draw independent targets, so the square of a batch gradient estimates the *sum* of the
per-sample Fisher terms when the batch's *summed* loss is differentiated (the mean
divides it by the batch size squared).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onnxprune.errors import OnnxPruneError

KINDS = ("auto", "ce", "kl", "mse", "distill")
TEACHER_KINDS = ("kl", "mse")

Outputs = torch.Tensor | Sequence[torch.Tensor]


def _seq(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _logits(outputs: Outputs, kind: str) -> torch.Tensor:
    out = _seq(outputs)[0]
    if out.dim() != 2:
        raise OnnxPruneError(
            f"loss {kind} needs a classifier output [N, classes], but the model's first output has shape "
            f"{tuple(out.shape)}; use --loss mse (distance to the original model's outputs) for other models")
    return _float(out)


def _labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    labels = labels.to(device=logits.device, dtype=torch.long).reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise OnnxPruneError(f"{labels.shape[0]} labels for a batch of {logits.shape[0]} outputs")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise OnnxPruneError(f"labels outside [0, {logits.shape[1]}) for an output of {logits.shape[1]} classes")
    return labels


def _float_pairs(outputs: Outputs, reference: Outputs | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if reference is None:
        raise OnnxPruneError("loss mse needs the original model's outputs (reference)")
    outs, refs = _seq(outputs), _seq(reference)
    if len(outs) != len(refs):
        raise OnnxPruneError(f"{len(outs)} outputs but {len(refs)} reference outputs")
    pairs = [(_float(o), _float(r).detach()) for o, r in zip(outs, refs) if o.is_floating_point()]
    if not pairs:
        raise OnnxPruneError("loss mse needs at least one floating-point model output")
    for o, r in pairs:
        if o.shape != r.shape:
            raise OnnxPruneError(f"output shape {tuple(o.shape)} differs from the reference's {tuple(r.shape)}")
    return pairs


def _teacher_logits(reference: Outputs | None, logits: torch.Tensor) -> torch.Tensor:
    if reference is None:
        raise OnnxPruneError("loss kl needs the original model's outputs (reference)")
    ref = _float(_seq(reference)[0]).detach()
    if ref.shape != logits.shape:
        raise OnnxPruneError(f"loss kl: the model's first output has shape {tuple(logits.shape)} but the "
                             f"original's (teacher's) has {tuple(ref.shape)}")
    return ref


def _scale(r: torch.Tensor) -> torch.Tensor:
    """Variance of a reference output (floored so constant outputs do not divide by 0)."""
    return r.var(unbiased=False).clamp_min(1e-12) if r.numel() > 1 else r.new_tensor(1.0)


@dataclass(frozen=True)
class Loss:
    """A resolved loss: ``kind`` is ``ce``, ``kl`` or ``mse`` (see the module docstring).

    ``loss(outputs, labels=None, reference=None, scales=None)`` returns a scalar, the mean
    over the batch. ``outputs`` / ``reference``: the model's outputs on a batch (a tensor or
    a sequence in graph-output order, float, batch first); ``labels``: int [N] or None;
    ``scales`` (``mse`` only): the variance to divide each floating-point output's term by,
    in output order, instead of the batch reference's own (a data-parallel step passes the
    variance of the whole global batch, of which this rank holds a part).

    Raises (at call time):
        OnnxPruneError: ``ce``/``kl`` on a first output that is not 2-D, labels whose
            count or range does not fit the output, ``kl``/``mse`` without ``reference``.
    """

    kind: str

    @property
    def uses_teacher(self) -> bool:
        """True for ``kl`` / ``mse``: zero gradient at the unpruned point (see module doc)."""
        return self.kind in TEACHER_KINDS

    def __call__(self, outputs: Outputs, labels: torch.Tensor | None = None,
                 reference: Outputs | None = None, scales: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if self.kind == "ce":
            logits = _logits(outputs, "ce")
            if labels is None:
                src = _seq(reference)[0] if reference is not None else logits
                labels = src.detach().argmax(dim=1)
            return F.cross_entropy(logits, _labels(labels, logits))
        if self.kind == "kl":
            logits = _logits(outputs, "kl")
            ref = _teacher_logits(reference, logits)
            return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(ref, dim=1), log_target=True,
                            reduction="batchmean")
        total = None
        pairs = _float_pairs(outputs, reference)
        if scales is not None and len(scales) != len(pairs):
            raise OnnxPruneError(f"{len(scales)} scales for {len(pairs)} floating-point outputs")
        for i, (o, r) in enumerate(pairs):
            term = F.mse_loss(o, r) / (_scale(r) if scales is None else scales[i])
            total = term if total is None else total + term
        return total

    def fisher_sample(self, outputs: Outputs, labels: torch.Tensor | None = None,
                      reference: Outputs | None = None, *, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        """A scalar whose squared gradient estimates this loss's Fisher diagonal.

        ``ce``: the loss itself (labels or pseudo-labels, as :meth:`__call__`).
        ``kl``: cross-entropy against labels drawn from the teacher's softmax.
        ``mse``: sum over outputs of <output, eps> / (std(reference) * sqrt(elements per
        sample)) / N with eps ~ N(0, 1), the random projection whose squared gradient is
        the Gauss-Newton diagonal of the ``mse`` loss up to a constant factor.
        ``generator`` (on the outputs' device) makes the draw reproducible.
        """
        if self.kind == "ce":
            return self(outputs, labels, reference)
        if self.kind == "kl":
            logits = _logits(outputs, "kl")
            p = F.softmax(_teacher_logits(reference, logits), dim=1)
            drawn = torch.multinomial(p, 1, generator=generator).reshape(-1)
            return F.cross_entropy(logits, drawn)
        total = None
        for o, r in _float_pairs(outputs, reference):
            eps = torch.randn(o.shape, generator=generator, device=o.device, dtype=o.dtype)
            per_sample = max(1, o[0].numel()) if o.dim() else 1
            n = o.shape[0] if o.dim() else 1
            term = (o * eps).sum() / (_scale(r).sqrt() * math.sqrt(per_sample) * n)
            total = term if total is None else total + term
        return total


def resolve_loss(kind: str = "auto", *, has_labels: bool, first_output_rank: int,
                 prefer_teacher: bool = False) -> Loss:
    """The :class:`Loss` that ``kind`` means for this data and model.

    Args:
        kind: one of ``auto``, ``ce``, ``kl``, ``mse``, ``distill`` (the teacher loss:
            ``kl`` for classifiers, ``mse`` otherwise, labels or not).
        has_labels: whether the calibration data carries labels (``auto`` uses them only
            for a classifier output; labels of a detector's data do not make a loss).
        first_output_rank: rank of the model's first output (2 = classifier logits).
        prefer_teacher: ``auto`` resolves to the teacher loss (``kl`` / ``mse``) even
            when labels exist.

    Raises:
        OnnxPruneError: unknown kind; ``ce``/``kl`` asked for a first output that is not 2-D.
    """
    if kind not in KINDS:
        raise OnnxPruneError(f"unknown loss {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "distill":
        kind, prefer_teacher = "auto", True
    if kind == "auto":  # labels only mean classes for a classifier output [N, classes]
        use_labels = has_labels and not prefer_teacher and first_output_rank == 2
        kind = "ce" if use_labels else ("kl" if first_output_rank == 2 else "mse")
    if kind in ("ce", "kl") and first_output_rank != 2:
        raise OnnxPruneError(f"loss {kind} needs a classifier output [N, classes], but the model's first output has "
                             f"rank {first_output_rank}; use --loss mse for other models")
    return Loss(kind)


def make_loss(kind: str = "ce") -> Loss:
    """``Loss(kind)`` for an explicit kind (``ce``, ``kl``, ``mse``); see :func:`resolve_loss` for ``auto``.

    Raises:
        OnnxPruneError: unknown kind (``auto`` included: it needs the data and the model).
    """
    if kind not in KINDS or kind in ("auto", "distill"):
        raise OnnxPruneError(f"unknown loss {kind!r}; choose from {', '.join(k for k in KINDS if k != 'auto')} "
                             "(auto is resolved by resolve_loss from the data and the model)")
    return Loss(kind)
