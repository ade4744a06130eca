"""CPMC: channel pruning via multi-criteria based on weight dependency.

Yan, Guo, Li, Yang, Xu, arXiv:2011.03240. Three criteria per channel c, from weights
and shapes only:

1. weight value with weight dependency: ||W_l[c]||_1 / |W_l[c]| + ||W_{l+1}[:, c]||_1 /
   |W_{l+1}[:, c]| (each term an L1 norm divided by its element count), summed over
   every producer and consumer member of c's group;
2. computational cost: MACs freed by removing c alone (producers and consumers);
3. parameter quantity: parameters freed by removing c alone.

Each criterion is divided by its maximum over all prunable channels of the network
(global normalisation), then combined as ``w / (macs^a * params^b)`` with a = b = 0.5 by
default. The paper's exact combination is not public to us: this is our reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from onnxprune.analysis.groups import Analysis, ChannelGroup
from onnxprune.errors import OnnxPruneError
from onnxprune.criteria.base import WEIGHT_ROLES, Scores, member_reduce

_EPS = 1e-12


@dataclass(frozen=True)
class CPMC:
    """See the module docstring. ``a`` and ``b`` weigh MACs and params (>= 0)."""

    a: float = 0.5
    b: float = 0.5
    name: str = "cpmc"
    normalize: bool = False  # already globally normalised
    requires_data: bool = False

    def __post_init__(self) -> None:
        for k in ("a", "b"):
            v = float(getattr(self, k))
            if not (np.isfinite(v) and v >= 0):
                raise OnnxPruneError(f"cpmc exponent {k}={v} must be a finite number >= 0")

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        groups = [g for g in analysis.groups if g.prunable]
        if not groups:
            return {}
        macs, params = analysis.freed("macs"), analysis.freed("params")
        w = {g.id: _weight_term(g, weights) for g in groups}

        def gmax(d):
            return max(float(np.max(d[g.id])) for g in groups) or 1.0

        m = {g.id: macs[g.id] for g in groups}
        p = {g.id: params[g.id] for g in groups}
        wm, mm, pm = gmax(w), gmax(m), gmax(p)
        return {g.id: (w[g.id] / wm) / (np.maximum(m[g.id] / mm, _EPS) ** self.a *
                                       np.maximum(p[g.id] / pm, _EPS) ** self.b)
                for g in groups}


def _weight_term(g: ChannelGroup, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per channel: sum over producer/consumer members of mean |w| of the channel's slice.

    A channel may own several positions of one member (after Flatten, channel c is
    H*W Gemm columns), so the mean is the member's L1 sum over all of them divided by
    their total element count, not a sum of per-position means.
    """
    out = np.zeros(g.size, dtype=np.float64)
    for m in g.members:
        if m.role not in WEIGHT_ROLES:
            continue
        one = replace(g, members=(m,))
        l1 = member_reduce(one, weights, WEIGHT_ROLES, lambda x: np.abs(x).sum(axis=1))
        n = member_reduce(one, weights, WEIGHT_ROLES, lambda x: np.full(len(x), float(x.shape[1])))
        out += np.divide(l1, n, out=np.zeros_like(l1), where=n > 0)
    return out
