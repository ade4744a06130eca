"""Normalisation ops.

- BatchNormalization / InstanceNormalization: per-channel (axis 1); output channel c is
  input channel c; scale, bias (and BN's running mean/var) are sliced with the channel.
- LayerNormalization: normalises over axes [axis, rank); if the channel axis is among
  them the op mixes channels and blocks them, otherwise channels pass through.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext, Role
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext


@register("BatchNormalization", "InstanceNormalization")
class ChannelNormHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        if tc.axis != 1:
            ctx.block(x, f"{node.op} {node.name} normalises axis 1 but channels lie on axis {tc.axis}")
            return
        params = [t for t in node.inputs[1:] if t.name]
        if any(ctx.const(t) is None for t in params):
            ctx.block(x, f"{node.op} {node.name} has non-constant parameters")
            return
        ctx.set(node.outputs[0], 1, tc.elems)
        for i, t in enumerate(params):
            ctx.weight(node, t, 0, tc.elems, Role.NORM if i == 0 else Role.NORM_STAT)
            ctx.cost("params", node, 1, out=tc.elems, tensor=t)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Parameters are sliced from the analysis records."""


@register("LayerNormalization")
class LayerNormHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        rank = ctx.rank(x)
        axis = int(node.attrs.get("axis", -1)) % rank
        if tc.axis >= axis:
            ctx.block(x, f"LayerNormalization {node.name} normalises across channels")
            return
        ctx.set(node.outputs[0], tc.axis, tc.elems)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""
