"""Registry of per-op handlers.

Everything onnxprune knows about one op family lives in one handler class (one module
per family under :mod:`onnxprune.ops`): how channels propagate through it (analysis),
which weights it owns per channel and what they cost (MACs, params), and how it is
sliced (surgery). An op with no handler is a barrier: the channels it reads are blocked.

Handlers register with :func:`register`, keyed by op type and an opset range (the style
of onnxscript's constant folder); registering an overlapping key twice is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

    from onnxprune.analysis.context import AnalysisContext
    from onnxprune.surgery.context import SurgeryContext


class OpHandler:
    """Base class of an op family's handler.

    Subclasses override :meth:`analyze` and :meth:`apply`; both receive a node of an
    ``onnx_graphsurgeon`` graph. Handlers hold no state: one instance serves all nodes.
    """

    #: True when the op reduces over the channels of (some of) its inputs, like Conv
    #: and Gemm. The surgery oracle zeroes removed channels at these inputs.
    reduces_channels: bool = False

    def analyze(self, node: "gs.Node", ctx: "AnalysisContext") -> None:
        """Propagate channel elements from inputs to outputs; record members and costs."""
        raise NotImplementedError

    def apply(self, node: "gs.Node", ctx: "SurgeryContext") -> None:
        """Slice the node's weights and attributes to the kept channels of its tensors."""
        raise NotImplementedError

    #: Torch evaluation (:mod:`onnxprune.executor`), or None when the op has none:
    #: ``evaluate(node: EvalNode, inputs: list[torch.Tensor | None], ctx: EvalContext)
    #: -> list[torch.Tensor]`` (one per node output; absent optional inputs are None).
    evaluate = None


class BarrierHandler(OpHandler):
    """An op the executor can evaluate but whose channel behaviour is not modelled.

    Analysis blocks every tracked input (naming the op and node) and leaves outputs
    untracked, exactly as for an op with no handler; surgery leaves the node alone.
    """

    def analyze(self, node: "gs.Node", ctx: "AnalysisContext") -> None:
        ctx.block_inputs(node, f"no channel rule for op {node.op} (node {node.name})")

    def apply(self, node: "gs.Node", ctx: "SurgeryContext") -> None:
        """Nothing to slice."""


@dataclass(frozen=True)
class _Entry:
    op_type: str
    since: int
    until: int | None  # inclusive; None = open
    handler: OpHandler


_REGISTRY: dict[str, list[_Entry]] = {}


def register(*op_types: str, since: int = 1, until: int | None = None) -> Callable[[type], type]:
    """Class decorator: register a handler class for ``op_types`` in opsets [since, until].

    Raises:
        ValueError: if an op type already has a handler whose opset range overlaps.
    """

    def deco(cls: type) -> type:
        inst = cls()
        for op in op_types:
            for e in _REGISTRY.get(op, []):
                lo, hi = max(e.since, since), min(e.until or 10**9, until or 10**9)
                if lo <= hi:
                    raise ValueError(f"handler for {op} opsets {since}..{until} overlaps {type(e.handler).__name__}")
            _REGISTRY.setdefault(op, []).append(_Entry(op, since, until, inst))
        return cls

    return deco


def get_handler(op_type: str, opset: int, domain: str = "") -> OpHandler | None:
    """The handler of ``op_type`` at ``opset`` in the default domain, or None (a barrier)."""
    if domain not in ("", "ai.onnx"):
        return None
    _load_builtin()
    for e in _REGISTRY.get(op_type, []):
        if e.since <= opset and (e.until is None or opset <= e.until):
            return e.handler
    return None


def get_evaluator(op_type: str, opset: int, domain: str = "") -> Callable | None:
    """The torch evaluation function of ``op_type`` at ``opset``, or None."""
    h = get_handler(op_type, opset, domain)
    return None if h is None else h.evaluate


def supported_ops() -> list[str]:
    """Sorted op types that have at least one handler."""
    _load_builtin()
    return sorted(_REGISTRY)


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from onnxprune.ops import conv, elementwise, linear, misc, norm, pool, shape_ops  # noqa: F401
