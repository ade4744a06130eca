"""Mutable state of one channel analysis: channel elements, their unions, and records.

A *channel element* is one channel of one *allocation* (an op output that creates new
channels, such as a Conv output, or an untracked tensor). Ops that align channels
(residual Add, SE Mul, depthwise Conv) union elements; ops that move channels (Concat,
Split, Slice, Flatten, Transpose) map them. After all handlers ran, each union class of
elements is one prunable channel, and allocations that share classes form one group
(:mod:`onnxprune.analysis.groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx_graphsurgeon as gs


class Role(str, Enum):
    """What a weight member is to the channels of its group."""

    PRODUCER = "producer"  # filter / row that computes the channel (Conv W[c], Gemm W[c])
    CONSUMER = "consumer"  # slice of the next layer that reads the channel (W[:, c])
    NORM = "norm"  # BatchNormalization scale (gamma)
    NORM_STAT = "norm_stat"  # BN bias, mean, var
    BIAS = "bias"  # producer bias
    CONSTANT = "constant"  # per-channel constant of an elementwise op (Mul/Add/PRelu)


@dataclass(frozen=True, eq=False)
class TensorChannels:
    """Channel elements of an activation tensor.

    Attributes:
        axis: the non-negative axis that carries channels.
        elems: int64 [size of that axis]: element id of each position (positions may
            repeat an element, e.g. after Flatten one channel spans H*W features).
    """

    axis: int
    elems: np.ndarray


@dataclass(frozen=True, eq=False)
class WeightRecord:
    """A constant (initializer) slice whose positions along ``axis`` belong to elements.

    ``rows`` optionally restricts the record to rows [start, stop) of axis 0 (grouped
    convolutions: block b of the input channels is read only by block b of the filters).
    """

    tensor: str
    node: str
    op: str
    axis: int
    elems: np.ndarray
    role: Role
    rows: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class CostTerm:
    """A bilinear count: ``coef * sum_b kept(out_b) * kept(in_b)`` over ``blocks`` blocks.

    ``out``/``inp`` are element arrays (None = a factor of 1); for blocks > 1 both are
    split into ``blocks`` equal contiguous blocks (grouped convolution). ``kind`` is
    ``"macs"`` or ``"params"``. With nothing removed the term equals the node's count.
    """

    kind: str
    node: str
    coef: float
    out: np.ndarray | None
    inp: np.ndarray | None
    blocks: int = 1
    tensor: str | None = None  # the initializer a params term counts


@dataclass(frozen=True)
class ConstMeta:
    """What the analysis knows of a constant without reading its values: ``shape`` and ``ndim``."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


class ElementSpace:
    """Union-find over channel elements, with allocation bookkeeping and block reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.alloc_of: list[int] = []  # element -> allocation id
        self.allocs: list[tuple[str, str, np.ndarray]] = []  # (node name, tensor name, elems)
        self.blocked: dict[int, str] = {}  # element -> reason

    def allocate(self, n: int, node: str, tensor: str) -> np.ndarray:
        """Create ``n`` fresh elements (one allocation) and return their ids (int64 [n])."""
        start = len(self._parent)
        ids = np.arange(start, start + n, dtype=np.int64)
        self._parent.extend(range(start, start + n))
        aid = len(self.allocs)
        self.alloc_of.extend([aid] * n)
        self.allocs.append((node, tensor, ids))
        return ids

    def find(self, e: int) -> int:
        p = self._parent
        root = e
        while p[root] != root:
            root = p[root]
        while p[e] != root:
            p[e], e = root, p[e]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union elements position-wise; ``a`` and ``b`` must have the same length."""
        if len(a) != len(b):
            raise ValueError(f"cannot align {len(a)} and {len(b)} channels")
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def block(self, elems: np.ndarray, reason: str) -> None:
        """Mark elements as never removable (first reason wins)."""
        for e in np.unique(elems).tolist():
            self.blocked.setdefault(int(e), reason)

    def __len__(self) -> int:
        return len(self._parent)

    def roots(self) -> np.ndarray:
        """int64 [num elements]: union-find root of every element."""
        return np.array([self.find(i) for i in range(len(self._parent))], dtype=np.int64)


@dataclass
class AnalysisContext:
    """What handlers read and write while the analysis walks the graph in topological order.

    Attributes:
        graph: the canonical graph (onnx-graphsurgeon), not modified by the analysis.
        shapes: concrete shape of every tensor (from :func:`onnxprune.shapes.measure_shapes`).
        opset: default-domain opset of the model.
    """

    graph: gs.Graph
    shapes: dict[str, tuple[int, ...]]
    opset: int
    space: ElementSpace = field(default_factory=ElementSpace)
    channels: dict[str, TensorChannels] = field(default_factory=dict)
    weights: list[WeightRecord] = field(default_factory=list)
    costs: list[CostTerm] = field(default_factory=list)
    block_requirements: list[tuple[str, np.ndarray, int]] = field(default_factory=list)
    fixed: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    # ---- tensors -------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        """Concrete shape of ``t`` (constants: their array's shape), or None if unknown."""
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.values.shape)
        s = self.shapes.get(t.name)
        return None if s is None else tuple(int(d) for d in s)

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    @staticmethod
    def const(t: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor, or None for a variable."""
        return t.values if isinstance(t, gs.Constant) else None

    @staticmethod
    def const_meta(t: gs.Tensor) -> ConstMeta | None:
        """Shape of a constant tensor without loading its values (:class:`ConstMeta`), or None
        for a variable. Handlers that only need a weight's shape use this, not :meth:`const`."""
        if not isinstance(t, gs.Constant):
            return None
        return ConstMeta(tuple(int(d) for d in t.shape))

    def get(self, t: gs.Tensor) -> TensorChannels | None:
        """Channel elements of an activation tensor, or None when untracked."""
        if isinstance(t, gs.Constant) or not t.name:
            return None
        return self.channels.get(t.name)

    def set(self, t: gs.Tensor, axis: int, elems: np.ndarray) -> None:
        """Record the channel elements of output tensor ``t``."""
        self.channels[t.name] = TensorChannels(int(axis), np.asarray(elems, dtype=np.int64))

    def allocate(self, node: gs.Node, t: gs.Tensor, axis: int, n: int) -> np.ndarray:
        """Create ``n`` new channels on ``t`` at ``axis`` (the node produces new channels)."""
        elems = self.space.allocate(n, node.name, t.name)
        self.set(t, axis, elems)
        return elems

    def get_or_fixed(self, node: gs.Node, t: gs.Tensor, axis: int, why: str) -> np.ndarray:
        """Elements of ``t`` along ``axis``; a fixed (blocked) allocation when untracked.

        Used where an op must align an untracked tensor with tracked ones: the tracked
        side then inherits the block (an untracked tensor cannot be sliced). The fixed
        allocation is named after the tensor's producer (or the tensor, for graph inputs
        and constants) and shared by every reader of the same tensor and axis. When
        ``t`` is tracked on another axis, its own channels are blocked too: the op would
        see that axis shrink (a Conv reading a transposed tensor as if it were NCHW).
        """
        tc = self.get(t)
        if tc is not None and tc.axis == axis:
            return tc.elems
        if tc is not None:
            why = (f"{node.op} {node.name} reads {t.name} along axis {axis} but its channels "
                   f"lie on axis {tc.axis}")
            self.space.block(tc.elems, why)
        key = (t.name, axis)
        if t.name and key in self.fixed:
            return self.fixed[key]
        shp = self.shape(t)
        if shp is None:
            raise KeyError(t.name)
        is_input = any(t.name == i.name for i in self.graph.inputs)
        producer = t.inputs[0].name if isinstance(t, gs.Variable) and t.inputs else ""
        owner = t.name if is_input or not producer else producer
        elems = self.space.allocate(shp[axis], owner or node.name, t.name or node.name)
        self.space.block(elems, f"graph input {t.name} has fixed channels" if is_input else why)
        if t.name:
            self.fixed[key] = elems
        return elems

    def block(self, t: gs.Tensor, reason: str) -> None:
        """Block every element of tensor ``t`` (no-op when untracked)."""
        tc = self.get(t)
        if tc is not None:
            self.space.block(tc.elems, reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            self.block(t, reason)

    # ---- records -------------------------------------------------------------------
    def weight(self, node: gs.Node, t: gs.Tensor, axis: int, elems: np.ndarray, role: Role,
               rows: tuple[int, int] | None = None) -> None:
        """Record that positions of constant ``t`` along ``axis`` belong to ``elems``."""
        self.weights.append(WeightRecord(t.name, node.name, node.op, axis, np.asarray(elems), role, rows))

    def cost(self, kind: str, node: gs.Node, coef: float, out: np.ndarray | None = None,
             inp: np.ndarray | None = None, blocks: int = 1, tensor: gs.Tensor | None = None) -> None:
        """Record a MACs or params term (see :class:`CostTerm`); params terms name their tensor."""
        self.costs.append(CostTerm(kind, node.name, float(coef), out, inp, blocks,
                                   None if tensor is None else tensor.name))

    def require_blocks(self, node: gs.Node, elems: np.ndarray, blocks: int) -> None:
        """Require that ``elems`` be pruned in ``blocks`` equal contiguous blocks (grouped conv)."""
        self.block_requirements.append((node.name, np.asarray(elems), int(blocks)))
