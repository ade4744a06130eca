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


#: float64 elements converted at a time by :func:`member_reduce` (bounds its memory: 64 MB)
REDUCE_CHUNK_ELEMENTS = 1 << 23


def _member_arrays(group: ChannelGroup, weights: Mapping[str, np.ndarray], roles: Iterable[Role]):
    """(member, its weight as an array, restricted to the member's rows) for the members of
    ``group`` whose role is in ``roles``."""
    roles = set(roles)
    for m in group.members:
        if m.role not in roles:
            continue
        w = np.asarray(weights[m.tensor])
        if m.rows is not None:
            w = w[m.rows[0]:m.rows[1]]
        yield m, w


def member_reduce(group: ChannelGroup, weights: Mapping[str, np.ndarray], roles: Iterable[Role],
                  fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Sum over members with a role in ``roles`` of ``fn`` of each channel's slice.

    Args:
        group: the group.
        weights: initializer name -> array.
        roles: which members count.
        fn: maps a float64 [P, K] array (P positions, the K weights of each slice) to [P],
            row by row: it is called on consecutive blocks of rows (at most
            :data:`REDUCE_CHUNK_ELEMENTS` elements each), so the float64 copy of a big
            weight is never made whole.

    Returns:
        float64 [group.size]; channels no member touches get 0.
    """
    out = np.zeros(group.size, dtype=np.float64)
    for m, w in _member_arrays(group, weights, roles):
        w = np.moveaxis(w, m.axis, 0)  # a view
        per = max(1, w[0].size if w.shape[0] else 1)
        step = max(1, REDUCE_CHUNK_ELEMENTS // per)
        pos = np.asarray(m.positions)
        vals = np.empty(len(pos), dtype=np.float64)
        for s in range(0, len(pos), step):
            block = np.asarray(w[pos[s:s + step]], dtype=np.float64).reshape(len(pos[s:s + step]), -1)
            vals[s:s + step] = fn(block)
        np.add.at(out, m.channels, vals)
    return out


def member_sum(group: ChannelGroup, weights: Mapping[str, np.ndarray], roles: Iterable[Role],
               elementwise: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """:func:`member_reduce` of ``lambda w: elementwise(w).sum(axis=1)``, in one pass per weight.

    Each weight is read in blocks along its first (outermost) axis (at most
    :data:`REDUCE_CHUNK_ELEMENTS` elements), ``elementwise`` applied in float64 (``np.abs``
    in the weight's own float type: exact) and summed in float64 over every axis but the
    member's: no gather of strided slices (a consumer's axis 1). Channels with equal
    weights get equal sums (each position sums the same way).

    Args:
        elementwise: applied in place to a float64 block (``np.abs``, ``np.square``):
            called as ``elementwise(block, out=block)``.
    """
    out = np.zeros(group.size, dtype=np.float64)
    for m, w in _member_arrays(group, weights, roles):
        if w.ndim == 0:
            w = w.reshape(1)
        acc = np.zeros(w.shape[m.axis], dtype=np.float64)
        step = max(1, REDUCE_CHUNK_ELEMENTS // max(1, w[0].size if w.shape[0] else 1))
        others = tuple(i for i in range(w.ndim) if i != m.axis)
        exact = elementwise is np.abs and w.dtype.kind == "f"  # |w| is exact in w's own type
        for s in range(0, w.shape[0], step):
            if exact:
                block = np.abs(w[s:s + step])
            else:
                block = w[s:s + step].astype(np.float64)
                elementwise(block, out=block)
            if m.axis == 0:
                acc[s:s + len(block)] = block.sum(axis=others, dtype=np.float64) if others else block
            else:
                acc += block.sum(axis=others, dtype=np.float64)
        np.add.at(out, m.channels, acc[np.asarray(m.positions)])
    return out


WEIGHT_ROLES = (Role.PRODUCER, Role.CONSUMER)
