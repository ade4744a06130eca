"""The criterion interface and helpers shared by the data-free criteria."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import numpy as np

from onnxprune.analysis.context import Role
from onnxprune.analysis.groups import Analysis, ChannelGroup



class Scores(dict):
    """``{group id: float64 [group.size] or None}``, with criterion diagnostics.

    Attributes:
        info: JSON-ready figures the criterion wants in the report (e.g. infcp's spread
            between ensemble members); empty for most criteria. A plain ``dict`` of
            scores is accepted wherever Scores is (its info is taken as empty).
    """

    def __init__(self, scores=(), info: Mapping | None = None) -> None:
        super().__init__(scores)
        self.info = dict(info or {})


class Criterion(Protocol):
    """Scores every channel of every group; higher means more important.

    Attributes:
        name: the CLI name (``l1``, ``cpmc``, ...).
        normalize: whether the planner should divide each group's scores by their mean
            before ranking globally (False when scores are already globally comparable).
        requires_data: True for data-driven criteria (they need calibration data).
    """

    name: str
    normalize: bool
    requires_data: bool

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        """``{group id: float64 [group.size] or None}`` for every prunable group."""
        ...


def member_reduce(group: ChannelGroup, weights: Mapping[str, np.ndarray], roles: Iterable[Role],
                  fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Sum over members with a role in ``roles`` of ``fn`` of each channel's slice.

    Args:
        group: the group.
        weights: initializer name -> array.
        roles: which members count.
        fn: maps a float64 [P, K] array (P positions, the K weights of each slice) to [P].

    Returns:
        float64 [group.size]; channels no member touches get 0.
    """
    roles = set(roles)
    out = np.zeros(group.size, dtype=np.float64)
    for m in group.members:
        if m.role not in roles:
            continue
        w = np.asarray(weights[m.tensor], dtype=np.float64)
        if m.rows is not None:
            w = w[m.rows[0]:m.rows[1]]
        w = np.moveaxis(w, m.axis, 0)[m.positions].reshape(len(m.positions), -1)
        np.add.at(out, m.channels, fn(w))
    return out


WEIGHT_ROLES = (Role.PRODUCER, Role.CONSUMER)
