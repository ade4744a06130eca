"""Magnitude criteria: ``l1``, ``l2`` (Li et al., "Pruning Filters for Efficient ConvNets",
ICLR 2017, extended to every weight a channel owns across its group) and ``bn`` (|gamma|
of BatchNormalization, Liu et al., "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.context import Role
from onnxprune.analysis.groups import Analysis
from onnxprune.criteria.base import WEIGHT_ROLES, Scores, member_sum


@dataclass(frozen=True)
class L1:
    """Sum of |w| over the producer filters and consumer slices of each channel."""

    name: str = "l1"
    normalize: bool = True
    requires_data: bool = False

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        return {g.id: member_sum(g, weights, WEIGHT_ROLES, np.abs)
                for g in analysis.groups if g.prunable}


@dataclass(frozen=True)
class L2:
    """sqrt of the sum of w^2 over the producer filters and consumer slices of each channel."""

    name: str = "l2"
    normalize: bool = True
    requires_data: bool = False

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        return {g.id: np.sqrt(member_sum(g, weights, WEIGHT_ROLES, np.square))
                for g in analysis.groups if g.prunable}


@dataclass(frozen=True)
class BN:
    """|gamma| summed over the BatchNormalization layers of a group; None where a group has none."""

    name: str = "bn"
    normalize: bool = True
    requires_data: bool = False

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        out: Scores = {}
        for g in analysis.groups:
            if not g.prunable:
                continue
            has_bn = any(m.role is Role.NORM for m in g.members)
            out[g.id] = member_sum(g, weights, [Role.NORM], np.abs) if has_bn else None
        return out
