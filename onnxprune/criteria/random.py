"""``random``: uniform random scores, the floor every criterion must beat."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.groups import Analysis
from onnxprune.criteria.base import Scores


@dataclass(frozen=True)
class Random:
    """Independent U(0, 1) scores from ``numpy.random.default_rng(seed)``."""

    seed: int = 0
    name: str = "random"
    normalize: bool = False
    requires_data: bool = False

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        rng = np.random.default_rng(self.seed)
        return {g.id: rng.random(g.size) for g in analysis.groups if g.prunable}
