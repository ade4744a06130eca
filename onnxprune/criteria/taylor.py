"""``taylor``: first-order Taylor importance of channel gates.

Molchanov, Mallya, Tyree, Frosio, Kautz, "Importance Estimation for Neural Network
Pruning", CVPR 2019. Every channel c gets a multiplicative gate m_c = 1 (see
:mod:`onnxprune.criteria.gates`: the gates sit where the channel-reducing ops read the
channel, so m_c = 0 is exactly removing c). Removing c changes the loss by about
-dL/dm_c to first order; the score is (dL/dm_c)^2 per batch (mean loss of the batch,
weighted by its share of a full batch), summed over batches.
The loss is cross-entropy against the labels. Without labels the loss is a teacher loss
(KL to the original's softmax for classifiers, MSE to its outputs otherwise), whose
gradient is zero at the unpruned point; the gradient then comes from
:meth:`~onnxprune.criteria.loss.Loss.fisher_sample` (targets drawn from the teacher),
so the score estimates the Fisher diagonal of the gates (Theis et al. 2018), the
teacher loss's second-order change: the squared gradient of the batch's *summed*
sampled loss, whose expectation is the sum of the per-sample Fisher terms. ``loss="ce"`` without labels uses the original's
argmax as pseudo-labels instead.

Multi-process runs (:mod:`onnxprune.distributed`): every rank scores whole batches (global
batches ``rank, rank + world, ...``) and the per-channel sums are all-reduced, so the
scores equal one process's. The targets drawn for the teacher losses come from a
generator seeded per batch (``seed`` and the batch's index), whatever rank draws them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxprune.analysis.groups import Analysis
from onnxprune.criteria.base import Scores
from onnxprune.batching import fixed_batch
from onnxprune.criteria.calibration import calibration_batches, scoring_setup
from onnxprune.criteria.gates import channel_gates
from onnxprune.data import CalibrationData
from onnxprune.distributed import current
from onnxprune.errors import OnnxPruneError


@dataclass(frozen=True)
class Taylor:
    """(dL/dm_c)^2 summed over calibration batches (Molchanov et al., CVPR 2019).

    Attributes:
        batch_size / device / seed: defaults of :meth:`score_with_data`.
        loss: ``auto``, ``ce``, ``kl`` or ``mse`` (:mod:`onnxprune.criteria.loss`).
    """

    batch_size: int = 32
    device: str = "cpu"
    seed: int = 0
    loss: str = "auto"
    name: str = "taylor"
    normalize: bool = True
    requires_data: bool = True

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        """Not usable without data: raises OnnxPruneError (use :meth:`score_with_data`)."""
        raise OnnxPruneError("criterion taylor needs calibration data (score_with_data with the model and data)")

    def score_with_data(self, analysis: Analysis, model: onnx.ModelProto, data: CalibrationData, *,
                        batch_size: int | None = None, device: str | torch.device | None = None,
                        seed: int | None = None) -> Scores:
        """Score every prunable group's channels on ``data``.

        Args:
            analysis: analysis of ``model``.
            model: the canonical model (single graph input).
            data: calibration inputs (and optional labels).
            batch_size / device / seed: override the instance's settings.

        Returns:
            ``{group id: float64 [group.size]}`` for every prunable group (the same on
            every rank of a multi-process run: every rank must call this).

        Raises:
            OnnxPruneError: no data, several graph inputs, or an output the loss cannot use
                (``ce``/``kl`` on a first output that is not [N, classes]);
                DistributedError: another rank failed (multi-process runs).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        device = self.device if device is None else device
        seed = self.seed if seed is None else seed
        graph, loss_fn = scoring_setup("taylor", model, data, self.loss, device)
        G, offsets = channel_gates(analysis, graph, device, model=model)
        acc = torch.zeros(G.shape[0], dtype=torch.float64, device=device)
        gen = torch.Generator(device=device)
        ctx = current()
        part, batch_ids = data, range(-(-len(data) // max(int(batch_size), 1)))
        if ctx.world > 1:  # whole batches per rank: a batch's squared gradient is not a sum over its samples
            rows, batch_ids = ctx.batch_shard(len(data), batch_size)
            part = data.take(rows)
        for batch_id, b in zip(batch_ids, calibration_batches(part, batch_size, device, fixed=fixed_batch(model))):
            gen.manual_seed(seed + 1_000_003 * int(batch_id))  # batch 0: the seed itself
            out = b.forward(graph)
            ref = tuple(o.detach() for o in out)  # gates are all one: the original's outputs
            n = b.x.shape[0]
            if loss_fn.uses_teacher:
                # sum over the batch: the draws are independent and zero-mean, so the
                # squared gradient of the sum estimates the sum of per-sample Fisher terms
                loss = loss_fn.fisher_sample(out, b.y, ref, generator=gen) * n
                weight = 1.0
            else:
                # Molchanov's squared minibatch-mean gradient, weighted by the batch's size
                # so that a short last batch counts for its share of the samples
                loss = loss_fn(out, b.y, ref)
                weight = n / batch_size
            (grad,) = torch.autograd.grad(loss, G, allow_unused=True)
            if grad is not None:
                acc += weight * grad.detach().to(torch.float64) ** 2
        graph.clear_gates()
        scores = ctx.all_reduce_sum(acc).cpu().numpy()
        return {g.id: scores[offsets[g.id]:offsets[g.id + 1]].copy() for g in analysis.groups if g.prunable}
