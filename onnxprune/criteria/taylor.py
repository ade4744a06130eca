"""``taylor``: first-order Taylor importance of channel gates.

Molchanov, Mallya, Tyree, Frosio, Kautz, "Importance Estimation for Neural Network
Pruning", CVPR 2019. Every channel c gets a multiplicative gate m_c = 1 (see
:mod:`onnxprune.criteria.gates`: the gates sit where the channel-reducing ops read the
channel, so m_c = 0 is exactly removing c). Removing c changes the loss by about
-dL/dm_c to first order; the score is (dL/dm_c)^2 per batch, summed over batches.
The loss is cross-entropy against the labels, or against the original model's argmax
when there are none (:mod:`onnxprune.criteria.loss` explains why).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxprune.analysis.groups import Analysis
from onnxprune.criteria.base import Scores
from onnxprune.criteria.gates import channel_gates
from onnxprune.criteria.loss import make_loss
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph


@dataclass(frozen=True)
class Taylor:
    """(dL/dm_c)^2 summed over calibration batches (Molchanov et al., CVPR 2019).

    Attributes:
        batch_size / device / seed: defaults of :meth:`score_with_data`.
        loss: loss kind for :func:`onnxprune.criteria.loss.make_loss`.
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
            model: the canonical model (single graph input; first output = logits [N, classes]).
            data: calibration inputs (and optional labels).
            batch_size / device / seed: override the instance's settings.

        Returns:
            ``{group id: float64 [group.size]}`` for every prunable group.

        Raises:
            OnnxPruneError: no data, several graph inputs, or an output the loss cannot use.
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        device = self.device if device is None else device
        seed = self.seed if seed is None else seed
        if len(data) == 0:
            raise OnnxPruneError("criterion taylor needs at least one calibration sample")
        loss_fn = make_loss(self.loss)
        graph = TorchGraph(model, requires_grad=False).to(device)
        if len(graph.input_names) != 1:
            raise OnnxPruneError(f"criterion taylor supports models with one input, this one has "
                                 f"{len(graph.input_names)} ({', '.join(graph.input_names)})")
        G, offsets = channel_gates(analysis, graph, device, model=model)
        acc = torch.zeros(G.shape[0], dtype=torch.float64, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for x, y in data.batches(batch_size):
                xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
                yt = None if y is None else torch.from_numpy(np.asarray(y)).to(device)
                out = graph(xt)[0]
                loss = loss_fn(out, yt)
                (grad,) = torch.autograd.grad(loss, G, allow_unused=True)
                if grad is not None:
                    acc += grad.detach().to(torch.float64) ** 2
        graph.clear_gates()
        scores = acc.cpu().numpy()
        return {g.id: scores[offsets[g.id]:offsets[g.id + 1]].copy() for g in analysis.groups if g.prunable}
