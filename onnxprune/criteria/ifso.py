"""``ifso``: influence-function based second-order channel importance.

Cheng, Zhang, Shi, "Influence Function Based Second-Order Channel Pruning: Evaluating
True Loss Changes For Pruning Is Possible Without Retraining", arXiv 2308.06755 (2023).

The estimator
-------------
Every channel c gets a multiplicative gate m_c = 1 where the channel-reducing ops
(Conv, ConvTranspose, Gemm, MatMul) read it (:mod:`onnxprune.criteria.gates`: one
flat gate vector ``G``, shared by every consumer of a group's channel, so m_c = 0 is
exactly removing c). With w the weights and the weight Hessian approximated by
lambda * I (the paper's damping; lambda only scales the scores), the influence-function
estimate of the loss change after removing channels and re-fitting the weights is
built from the mixed second derivative H_wm = d2L / dw dm. The score of channel c is

    s_c = | (H_mw (lambda^-1 I) H_wm 1)_c |

per calibration batch, summed over batches, then divided by a cost (below). Both
Hessian-vector products are central finite differences of gradients, four forward +
backward passes per batch and nothing of second order in autograd:

    v = H_wm 1  ~= [grad_w L(w, m + R1 1) - grad_w L(w, m - R1 1)] / (2 R1),
                   R1 = r / ||1|| = r / sqrt(#gates)
    v <- v / lambda
    u = H_mw v  ~= [grad_m L(w + R2 v, m) - grad_m L(w - R2 v, m)] / (2 R2),
                   R2 = r / ||v||
    s += |u|   (per batch, float64)

with r = 1e-2. (H_wm 1 is the gradient w.r.t. w of sum_c dL/dm_c, so the first
difference moves every gate at once along the all-ones direction.)
:func:`fd_hessian_vector_product` computes ``u`` for one batch; tests check it
against exact double backprop.

What the authors' public code (github.com/hrcheng1066/IFSO,
``tools/pruning_conv_fc_norm_sqrt.py``, built on FisherPruning) adds to the paper
---------------------------------------------------------------------------------
(read to learn; nothing copied)

- Gates: one input mask per Conv2d / Linear (per input channel; per input feature for
  Linear), i.e. exactly where our gates sit.
- Weights w: only the Conv2d and Linear *weights* (no biases, no BatchNorm
  parameters). ``weights="reducing"`` (default) does the same here: the float
  initializers of rank >= 2 read by Conv/ConvTranspose/Gemm/MatMul nodes;
  ``weights="all"`` uses every float initializer.
- Finite differences: both steps are central differences with step r / ||vector||,
  r = 1e-2, including the first one, whose vector is the all-ones gate vector (so the
  gate step is r / sqrt(#gates)). lambda is the optimiser's weight decay, applied as
  v / lambda between the two steps (a pure scale: ``lam`` here, default 1).
- Absolute value per batch (taken per mask entry), accumulated over batches (they
  average over only two mini-batches; we sum over all calibration batches: the same
  ranking up to the sampling noise).
- Normalisation ("norm_sqrt"): the score is divided by the square root of a per-channel
  cost. ``acts`` (their default): the number of activation *elements* one output channel
  of the producing layer(s) holds (batch x H x W of the producer's output feature map,
  summed over the producers of a coupled group), floored at 1 -- a size, not an
  activation magnitude. ``flops``: the FLOPs freed by removing the channel (the
  consumer's per-input-channel FLOPs plus the producers' per-output-channel FLOPs).
  Here ``normalize_by="activations"`` uses per-sample H x W of the producer outputs from
  the analysis shapes (the batch factor is a constant), and ``normalize_by="macs"`` the
  MACs freed per channel from :meth:`Analysis.freed`; both under a square root.
- Selection: one global argmin of score / sqrt(cost) across all layers and groups,
  so the scores are compared across layers as they are: :attr:`IFSO.normalize` is
  False (the planner must not divide each group by its mean, which would erase exactly
  the cross-layer magnitudes the estimator provides).
- The first conv's input mask (the image channels) is zeroed; here the graph input
  is never a prunable group anyway.

Multi-process runs (:mod:`onnxprune.distributed`)
--------------------------------------------------
The estimator is nonlinear within a batch (``|u|`` of a batch, steps scaled by
``1 / ||v||`` of the batch), so batches are never split: every rank scores whole batches
(global batches ``rank, rank + world, ...``) and the per-channel sums of ``|u|`` (and the
diagnostics' sums) are all-reduced, so the scores equal one process's.

Deviations (and why)
--------------------
- Coupled channels: the authors give each consumer its own mask and add the per-module
  |u| of a coupled group (sum of absolute values). Here the gate is *shared* by every
  consumer of a channel (DESIGN.md: groups share a gate), so u_c is the derivative for
  removing c everywhere at once and |u_c| is taken after summing over consumers. The
  same holds for the H*W Gemm features that one channel spans after a Flatten.
- One shot: the authors prune one channel every few training iterations and re-score
  in between (with BatchNorm in training mode); here all channels are scored once on
  the ONNX graph as deployed (BatchNormalization with its running statistics) and the
  planner removes the lowest-ranked ones to reach the target.
- Loss: ``auto`` means the teacher losses of :mod:`onnxprune.criteria.loss` (``kl``
  for classifiers, ``mse`` otherwise) *with or without labels* (the paper uses
  cross-entropy on the training labels; ``--loss ce`` gives that). The estimator is a
  second-order expansion around a stationary point: the teacher loss is exactly
  stationary at the unpruned weights (zero gradient, Hessian = the Gauss-Newton term),
  whereas cross-entropy on a small calibration set is not, and its H_mw adds a
  residual-times-bilinear term. Measured on LeNet5 below. Only second derivatives are
  used, so no sampled Fisher surrogate is needed.
- Deterministic: no sampling is involved; ``seed`` is accepted for a uniform
  criterion interface and recorded in the diagnostics.

Notes from testing
------------------
- r = 1e-2 is a secant, not the exact Hessian, on ReLU / MaxPool networks: a weight
  step of norm 1e-2 crosses activation kinks, and on the tiny test LeNet the product
  then differs from double backprop by up to ~70% (max-relative); with r <= 1e-5 it
  agrees to 1e-6 in float64. float32 cannot go much below r = 1e-3 (cancellation).
  r = 1e-3 and 1e-2 gave the same pruned LeNet5.
- u_c = <H_wm e_c, H_wm 1>, a row sum of a Gram matrix: a channel whose mixed
  derivative is large lifts every channel correlated with it, and under cross-entropy
  or KL the curvature of confidently predicted samples vanishes (softmax saturation),
  so "large contribution" does not mean "large score" the way it does for magnitude
  criteria.
- LeNet5 / MNIST-5k at 20% of the MACs (512 calibration samples): the teacher loss
  (``loss="kl"``, whose H_mw is the pure Gauss-Newton term) kept 95.1% / 89.5% (two
  sample draws) against 80.9% / 77.6% with cross-entropy on the labels, whose H_mw adds
  a residual-times-bilinear term; with group-mean normalisation in the planner 68.7%,
  without any cost normalisation 20%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxprune.analysis.context import Role
from onnxprune.analysis.groups import Analysis
from onnxprune.criteria.base import Scores
from onnxprune.batching import fixed_batch
from onnxprune.criteria.calibration import calibration_batches, scoring_setup
from onnxprune.criteria.gates import channel_gates, group_offsets
from onnxprune.data import CalibrationData
from onnxprune.distributed import current
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.ops.registry import get_handler

NORMALIZE_BY = ("activations", "macs", "none")
WEIGHTS = ("reducing", "all")


@dataclass(frozen=True)
class IFSO:
    """Second-order influence score | H_mw (lambda^-1 I) H_wm 1 | (Cheng et al., arXiv 2308.06755).

    See the module docstring for the estimator, what was learned from the authors'
    code, and the deviations.

    Attributes:
        batch_size / device / seed: defaults of :meth:`score_with_data`.
        loss: ``auto`` (the teacher loss, see the module docstring), ``ce``, ``kl`` or ``mse``.
        normalize_by: ``activations`` (default: divide by sqrt of the activation elements
            per channel of the producing layers), ``macs`` (sqrt of the MACs freed per
            channel) or ``none``.
        r: finite-difference scale; each step moves its vector by norm ``r``.
        lam: the damping lambda of H_ww ~= lambda I (only scales the scores).
        weights: ``reducing`` (weights of Conv/Gemm/MatMul, rank >= 2, as the authors)
            or ``all`` (every float initializer).
        normalize: False: the scores are compared across groups as they are (global
            argmin, as the authors), the planner does not divide by group means.

    Raises:
        OnnxPruneError: an unknown ``normalize_by`` / ``weights`` or a non-positive or
            non-finite ``r`` / ``lam`` / ``batch_size``.
    """

    batch_size: int = 32
    device: str = "cpu"
    seed: int = 0
    loss: str = "auto"
    normalize_by: str = "activations"
    r: float = 1e-2
    lam: float = 1.0
    weights: str = "reducing"
    name: str = "ifso"
    normalize: bool = False
    requires_data: bool = True

    def __post_init__(self) -> None:
        if self.normalize_by not in NORMALIZE_BY:
            raise OnnxPruneError(f"ifso normalize_by={self.normalize_by!r}; choose from {', '.join(NORMALIZE_BY)}")
        if self.weights not in WEIGHTS:
            raise OnnxPruneError(f"ifso weights={self.weights!r}; choose from {', '.join(WEIGHTS)}")
        for k in ("r", "lam"):
            v = float(getattr(self, k))
            if not (math.isfinite(v) and v > 0):
                raise OnnxPruneError(f"ifso {k}={v} must be a finite number > 0")
        if int(self.batch_size) < 1:
            raise OnnxPruneError(f"ifso batch_size={self.batch_size} must be >= 1")

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        """Not usable without data: raises OnnxPruneError (use :meth:`score_with_data`)."""
        raise OnnxPruneError("criterion ifso needs calibration data (score_with_data with the model and data; "
                             "on the command line --data)")

    def score_with_data(self, analysis: Analysis, model: onnx.ModelProto, data: CalibrationData, *,
                        batch_size: int | None = None, device: str | torch.device | None = None,
                        seed: int | None = None) -> Scores:
        """Score every prunable group's channels on ``data``.

        Cost: four forward + backward passes of the model per batch of ``batch_size``
        samples (plus one forward without gradient for the teacher's outputs when the
        loss needs them); memory is that of one backward pass plus two copies of the
        differentiated weights.

        Args:
            analysis: analysis of ``model``.
            model: the canonical model (single graph input).
            data: calibration inputs (float32 [N, ...]) and optional int64 [N] labels.
            batch_size / device / seed: override the instance's settings.

        Returns:
            Scores ``{group id: float64 [group.size]}`` (>= 0, higher = more important)
            for every prunable group; ``info`` holds diagnostics (batches, the mean
            ||H_wm 1|| per batch, the loss, the normalisation).

        Raises:
            OnnxPruneError: no data, several graph inputs, an output the loss cannot use,
                no weights to differentiate, or a non-finite loss or Hessian-vector product;
                DistributedError: another rank failed (multi-process runs: every rank must
                call this, and every rank gets the same scores).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        device = self.device if device is None else device
        seed = self.seed if seed is None else seed
        if data is None:
            raise OnnxPruneError("criterion ifso needs calibration data (--data)")
        graph, loss_fn = scoring_setup("ifso", model, data, self.loss, device, prefer_teacher=True)
        params = differentiated_weights(graph, analysis, self.weights)
        G, offsets = channel_gates(analysis, graph, device, model=model)
        need_ref = loss_fn.uses_teacher or data.y is None
        acc = torch.zeros(G.shape[0], dtype=torch.float64, device=device)
        v_norms = []
        ctx = current()
        part = data if ctx.world == 1 else data.take(ctx.batch_shard(len(data), batch_size)[0])
        try:
            for b in calibration_batches(part, batch_size, device, teacher=graph if need_ref else None,
                                         fixed=fixed_batch(model)):
                def loss_at(b=b):
                    return loss_fn(b.forward(graph), b.y, b.reference)

                u, v_norm = fd_hessian_vector_product(loss_at, G, params, r=self.r, lam=self.lam)
                if not bool(torch.isfinite(u).all()):
                    raise OnnxPruneError("criterion ifso: the Hessian-vector product is not finite "
                                         "(the loss overflows on the calibration data?)")
                acc += u.detach().abs().to(torch.float64)
                v_norms.append(v_norm)
        finally:
            graph.clear_gates()
            for _, p in params:
                p.requires_grad_(False)
        raw = ctx.all_reduce_sum(acc).cpu().numpy()
        n_batches, norm_sum = ctx.all_reduce_sum(np.array([len(v_norms), float(np.sum(v_norms))], dtype=np.float64))
        n_batches = int(n_batches)
        cost = channel_costs(analysis, model, self.normalize_by)
        scores = raw / np.sqrt(cost) if cost is not None else raw
        info = {"batches": n_batches, "loss": loss_fn.kind, "normalize_by": self.normalize_by,
                "r": self.r, "lam": self.lam, "weights": self.weights, "weight_tensors": len(params),
                "hvp_passes": 4 * n_batches, "seed": seed,
                "mean_norm_H_wm_1": float(norm_sum / n_batches) if n_batches else 0.0}
        return Scores({g.id: scores[offsets[g.id]:offsets[g.id + 1]].astype(np.float64)
                       for g in analysis.groups if g.prunable}, info)


def differentiated_weights(graph: TorchGraph, analysis: Analysis, which: str = "reducing"
                           ) -> list[tuple[str, torch.nn.Parameter]]:
    """The weights w of H_wm, set to ``requires_grad``, as (ONNX name, parameter) pairs.

    Args:
        graph: the model's TorchGraph.
        analysis: its analysis (for the opset that picks the op handlers).
        which: ``reducing``: float initializers of rank >= 2 read by channel-reducing
            nodes (Conv, ConvTranspose, Gemm, MatMul), the authors' Conv/Linear weights;
            ``all``: every float initializer.

    Raises:
        OnnxPruneError: no such weight in the model.
    """
    named = dict(graph.named_onnx_parameters())
    if which == "all":
        names = list(named)
    else:
        names = []
        for _, op, domain, inputs in graph.nodes():
            handler = get_handler(op, analysis.opset, domain)
            if handler is None or not handler.reduces_channels:
                continue
            names += [t for t in inputs if t in named and named[t].dim() >= 2 and t not in names]
    if not names:
        raise OnnxPruneError("criterion ifso found no Conv/Gemm/MatMul weights (initializers) to differentiate")
    out = [(n, named[n]) for n in names]
    for _, p in out:
        p.requires_grad_(True)
    return out


def fd_hessian_vector_product(loss_at: Callable[[], torch.Tensor], G: torch.Tensor,
                              params: Sequence[tuple[str, torch.Tensor]], *, r: float = 1e-2,
                              lam: float = 1.0) -> tuple[torch.Tensor, float]:
    """u = H_mw (lambda^-1 I) H_wm 1 for one batch, by two central finite differences.

    Args:
        loss_at: evaluates the scalar loss of the batch at the current ``G`` and weights
            (a forward pass building a fresh autograd graph).
        G: the gate vector, float [M], a leaf with ``requires_grad``, currently all ones.
        params: (name, tensor) of the weights w (leaves with ``requires_grad``).
        r: step scale: the gates move by r / sqrt(M) each (norm r), the weights by
            r / ||v|| along v (norm r).
        lam: the damping lambda (v is divided by it).

    Returns:
        ``(u, ||v||)``: ``u`` with G's shape and dtype (detached), and the norm of
        v = H_wm 1 / lambda. ``G`` and the weights are restored bit for bit.
        u is all zeros when v is zero (the loss does not couple gates and weights).
    """
    tensors = [p for _, p in params]
    g0 = G.detach().clone()
    r1 = r / math.sqrt(max(G.numel(), 1))
    try:
        with torch.no_grad():
            G.copy_(g0 + r1)
        plus = torch.autograd.grad(loss_at(), tensors, allow_unused=True)
        with torch.no_grad():
            G.copy_(g0 - r1)
        minus = torch.autograd.grad(loss_at(), tensors, allow_unused=True)
    finally:
        with torch.no_grad():
            G.copy_(g0)
    v = [torch.zeros_like(t) if a is None else (a - b) / (2 * r1 * lam)
         for t, a, b in zip(tensors, plus, minus)]
    del plus, minus
    v_norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v))
    if not math.isfinite(v_norm):
        return torch.full_like(g0, float("nan")), v_norm
    if v_norm == 0.0:
        return torch.zeros_like(g0), 0.0
    r2 = r / v_norm
    saved = [t.detach().clone() for t in tensors]
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:  # only dL/dG is needed now
            t.requires_grad_(False)
        with torch.no_grad():
            for t, s, d in zip(tensors, saved, v):
                t.copy_(s + r2 * d)
        (gp,) = torch.autograd.grad(loss_at(), G, allow_unused=True)
        with torch.no_grad():
            for t, s, d in zip(tensors, saved, v):
                t.copy_(s - r2 * d)
        (gm,) = torch.autograd.grad(loss_at(), G, allow_unused=True)
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
    if gp is None or gm is None:
        return torch.zeros_like(g0), v_norm
    return ((gp - gm) / (2 * r2)).detach(), v_norm


def channel_costs(analysis: Analysis, model: onnx.ModelProto, normalize_by: str) -> np.ndarray | None:
    """float64 [sum of group sizes] (flat gate order), each >= 1, or None for ``none``.

    ``activations``: per channel, the elements one sample's channel holds at the output
    of every node that produces it (PRODUCER members: Conv / Gemm / MatMul filters), i.e.
    the H x W of the producer's output map, summed over the producers of the group
    (residual Adds, Concat inputs each count their own producer); the batch dimension of
    the analysis shapes is divided out. ``macs``: MACs freed by removing the channel alone
    (:meth:`Analysis.freed`). Values below 1 (no producer found, no MACs) become 1.
    """
    if normalize_by == "none":
        return None
    offsets = group_offsets(analysis)
    if normalize_by == "macs":
        flat = np.concatenate([np.asarray(f, dtype=np.float64) for f in analysis.freed("macs")]
                              ) if analysis.groups else np.zeros(0)
        return np.maximum(flat, 1.0)
    if normalize_by != "activations":
        raise OnnxPruneError(f"ifso normalize_by={normalize_by!r}; choose from {', '.join(NORMALIZE_BY)}")
    acts = np.zeros(int(offsets[-1]), dtype=np.float64)
    producers = {m.node for g in analysis.groups for m in g.members if m.role == Role.PRODUCER}
    for node in model.graph.node:
        if node.name not in producers or not node.output:
            continue
        t = node.output[0]
        tc, shape = analysis.channels.get(t), analysis.shapes.get(t)
        if tc is None or shape is None or len(shape) == 0:
            continue
        n = max(int(shape[0]), 1) if tc.axis != 0 else 1
        per_position = float(np.prod(shape)) / max(int(shape[tc.axis]), 1) / n
        gidx = offsets[analysis.elem_group[tc.elems]] + analysis.elem_channel[tc.elems]
        np.add.at(acts, gidx, per_position)
    return np.maximum(acts, 1.0)
