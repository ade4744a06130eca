"""A per-node latency model of a model's channel groups, built from measured node times.

The predicted latency (ms) of the model with some channels removed is::

    fixed_ms + sum over nodes n of node_ms[n] * f_n(removed)

Rules for ``f_n`` (1 with nothing removed):

- a node with MACs: its MACs with the channels removed over its MACs unpruned (a Conv's
  time follows kept input x kept output channels, a depthwise conv's kept channels);
- a node without MACs whose first output is a tracked activation (BN, activations,
  pooling, Add, ...): the fraction of that tensor's channels kept (memory-bound ops scale
  with the activation's size);
- any other node, and time the profiler did not map to a node (layout reorders, session
  overhead), is in ``fixed_ms`` and never shrinks.

Each node keeps its *measured* share of the latency, so layers that are slow for their
MACs (depthwise, memory-bound, misaligned) weigh more than their MACs. What the model
cannot see (kernel choice changing with channel count, fusions) the search corrects by
measuring (:mod:`onnxprune.runtime.latency_search`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.analysis.groups import Analysis, term_value

__all__ = ["LatencyModel"]


@dataclass(frozen=True, eq=False)
class LatencyModel:
    """Predicted latency of ``analysis``'s model as channels are removed (see module docstring).

    Attributes:
        analysis: the channel analysis whose group ids :meth:`predict_ms` takes.
        node_ms: node name -> measured ms of the nodes that scale with channels.
        fixed_ms: ms that no channel removal changes.
        terms: node -> its MACs cost terms (nodes with MACs).
        outputs: node -> int64 channel elements of its first output (other scaling nodes).
    """

    analysis: Analysis
    node_ms: Mapping[str, float]
    fixed_ms: float
    terms: Mapping[str, tuple] = field(default_factory=dict, repr=False)
    outputs: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_node_times(cls, analysis: Analysis, model: onnx.ModelProto, node_ms: Mapping[str, float],
                        total_ms: float) -> "LatencyModel":
        """Build the model from measured per-node times (ms) of ``model`` (the model ``analysis``
        describes) and the whole run's time (ms).

        Nodes that neither have MACs nor write a tracked activation go to ``fixed_ms``, as does
        ``total_ms - sum(node_ms)`` (clipped at 0).
        """
        terms: dict[str, list] = {}
        for t in analysis.costs:
            if t.kind == "macs":
                terms.setdefault(t.node, []).append(t)
        outputs = {}
        for n in model.graph.node:
            tc = analysis.channels.get(n.output[0]) if n.output else None
            if n.name not in terms and tc is not None and len(tc.elems):
                outputs[n.name] = np.asarray(tc.elems, dtype=np.int64)
        scaling = {n: float(v) for n, v in node_ms.items() if v > 0 and (n in terms or n in outputs)}
        fixed = max(0.0, float(total_ms) - sum(scaling.values()))
        return cls(analysis, scaling, fixed, {k: tuple(v) for k, v in terms.items() if k in scaling},
                   {k: v for k, v in outputs.items() if k in scaling})

    @property
    def total_ms(self) -> float:
        """Predicted latency with nothing removed (= the measured total)."""
        return self.fixed_ms + float(sum(self.node_ms.values()))

    def predict_ms(self, removed: Mapping[int, np.ndarray | tuple[int, ...]]) -> float:
        """Predicted latency (ms) with ``{group id: removed channel indices}`` removed."""
        a = self.analysis
        mask = a.removed_elements({g: np.asarray(v, dtype=np.int64) for g, v in removed.items()})
        none = np.zeros_like(mask)
        total = self.fixed_ms
        for node, ms in self.node_ms.items():
            if node in self.terms:
                before = sum(term_value(t, none) for t in self.terms[node])
                total += ms * (sum(term_value(t, mask) for t in self.terms[node]) / before if before > 0 else 1.0)
            else:
                elems = self.outputs[node]
                total += ms * float((~mask[elems]).sum()) / len(elems)
        return total

    def saved_ms(self) -> list[np.ndarray]:
        """Per group, float64 [size]: predicted ms saved by removing each channel alone."""
        a = self.analysis
        offsets = np.cumsum([0] + [g.size for g in a.groups])
        gidx = offsets[a.elem_group] + a.elem_channel
        out = np.zeros(offsets[-1], dtype=np.float64)
        none = np.zeros(len(a.elem_group), dtype=bool)
        for node, ms in self.node_ms.items():
            if node in self.terms:
                before = sum(term_value(t, none) for t in self.terms[node])
                if before <= 0:
                    continue
                w = ms / before
                for t in self.terms[node]:
                    n_out = 1 if t.out is None else len(t.out) // t.blocks
                    n_in = 1 if t.inp is None else len(t.inp) // t.blocks
                    if t.out is not None:
                        np.add.at(out, gidx[t.out], w * t.coef * n_in)
                    if t.inp is not None:
                        np.add.at(out, gidx[t.inp], w * t.coef * n_out)
            else:
                elems = self.outputs[node]
                np.add.at(out, gidx[elems], ms / len(elems))
        return [out[offsets[i]:offsets[i + 1]] for i in range(len(a.groups))]
