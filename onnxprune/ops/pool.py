"""Per-channel spatial ops and reductions.

- pooling (MaxPool, AveragePool, LpPool, their Global forms), Resize/Upsample, Pad,
  SpaceToDepth is *not* here (it mixes channels): channel c of the output is channel c
  of the input, provided nothing is resized or padded along the channel axis.
- reductions (ReduceMean, ReduceSum, ..., ArgMax) and Softmax-like ops: pass channels
  through when they act on other axes, block them when they reduce or normalise across
  the channel axis (channel c's removal would change every other channel's value).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext


def _passthrough(node: gs.Node, ctx: AnalysisContext, axis: int | None = None) -> None:
    tc = ctx.get(node.inputs[0])
    if tc is None:
        return
    for out in node.outputs:
        if out.name:
            ctx.set(out, tc.axis if axis is None else axis, tc.elems)


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
          "MaxRoiPool", "LRN")
class PoolHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tc = ctx.get(node.inputs[0])
        if tc is None:
            return
        if tc.axis != 1 or node.op == "LRN":
            ctx.block(node.inputs[0], f"{node.op} {node.name} mixes or moves channels")
            return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""


@register("Resize", "Upsample")
class ResizeHandler(OpHandler):
    """Resize keeps channels when its scale along the channel axis is 1.

    A constant ``sizes`` input holds the channel count; surgery rewrites it.
    """

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None or xs[tc.axis] != ys[tc.axis]:
            ctx.block(x, f"{node.op} {node.name} resizes the channel axis")
            return
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name and ctx.const(node.inputs[3]) is None:
            ctx.block(x, f"Resize {node.name} has non-constant sizes")
            return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        keep = ctx.keep(node.inputs[0])
        if keep is None or node.op != "Resize" or len(node.inputs) <= 3:
            return
        sizes = ctx.const(node.inputs[3])
        if sizes is not None and sizes.size:
            new = sizes.copy()
            new[ctx.axis(node.inputs[0])] = int(keep.sum())
            ctx.set_const(node, 3, new)


@register("Pad")
class PadHandler(OpHandler):
    """Pad keeps channels when it pads nothing on the channel axis."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        pads = node.attrs.get("pads") if ctx.opset < 11 else (
            ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None)
        rank = ctx.rank(x)
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3].name:
            av = ctx.const(node.inputs[3])
            axes = None if av is None else [int(a) % rank for a in av.tolist()]
        if pads is None or axes is None:
            ctx.block(x, f"Pad {node.name} has non-constant pads")
            return
        pads = np.asarray(pads).tolist()
        k = len(axes)
        for i, a in enumerate(axes):
            if a == tc.axis and (pads[i] != 0 or pads[i + k] != 0):
                ctx.block(x, f"Pad {node.name} pads the channel axis")
                return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""


_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")


def _reduce_axes(node: gs.Node, ctx: AnalysisContext, rank: int) -> list[int] | None:
    if node.op in ("ArgMax", "ArgMin"):
        return [int(node.attrs.get("axis", 0)) % rank]
    if "axes" in node.attrs:
        return [int(a) % rank for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = ctx.const(node.inputs[1])
        return None if v is None else [int(a) % rank for a in v.tolist()]
    if int(node.attrs.get("noop_with_empty_axes", 0)):
        return []
    return list(range(rank))


@register(*_REDUCE)
class ReduceHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        axes = _reduce_axes(node, ctx, ctx.rank(x))
        if axes is None or tc.axis in axes:
            ctx.block(x, f"{node.op} {node.name} reduces across channels")
            return
        keep = int(node.attrs.get("keepdims", 1))
        axis = tc.axis if keep else tc.axis - sum(1 for a in axes if a < tc.axis)
        _passthrough(node, ctx, axis)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxHandler(OpHandler):
    """Softmax along the channel axis mixes channels; along another axis it does not."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        rank = ctx.rank(x)
        if ctx.opset < 13:  # coerced to 2-D: axes [axis, rank) are normalised together
            axis = int(node.attrs.get("axis", 1)) % rank
            mixes = tc.axis >= axis
        else:
            mixes = tc.axis == int(node.attrs.get("axis", -1)) % rank
        if mixes:
            ctx.block(x, f"{node.op} {node.name} normalises across channels")
            return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""
