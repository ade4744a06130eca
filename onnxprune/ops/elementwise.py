"""Elementwise ops: activations (one input) and broadcasting binary/variadic ops.

Channel rules:
- unary activations (Relu, Clip, Sigmoid, HardSwish, ...): output channel c is input
  channel c. Clip's min/max and similar extra inputs must be scalars.
- broadcasting ops (Add, Sub, Mul, Div, Max, Min, Sum, Mean, Pow, PRelu, Where):
  every variable input whose channel axis has the full channel count is *aligned*
  with the output (their elements are united: residual Add, SE Mul, SiLU's x*sigmoid(x));
  an input with size 1 on that axis broadcasts and is unrelated; a constant with the
  full channel count is a per-channel constant, sliced with the channel.
No MACs are counted for elementwise ops (the convention of conv/linear-only MAC counts);
per-channel constants count as params.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext, Role
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext

UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Neg",
    "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Clip",
    "Dropout", "Identity", "Cast", "Not", "IsNaN", "IsInf",
)


@register(*UNARY)
class UnaryHandler(OpHandler):
    """Output 0 has the channels of input 0; extra inputs (Clip min/max) must be scalars."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tc = ctx.get(node.inputs[0])
        if tc is None:
            return
        for extra in node.inputs[1:]:
            if extra.name and ctx.const(extra) is None and ctx.get(extra) is not None:
                ctx.block(node.inputs[0], f"{node.op} {node.name} has a non-constant parameter input")
                return
        ctx.set(node.outputs[0], tc.axis, tc.elems)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""


@register("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", "Where",
          "Equal", "Greater", "Less", "And", "Or")
class BroadcastHandler(OpHandler):
    """Numpy-style broadcasting between inputs; see the module docstring."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        out = node.outputs[0]
        oshape = ctx.shape(out)
        tracked = [(t, ctx.get(t)) for t in node.inputs if ctx.get(t) is not None]
        if not tracked or oshape is None:
            return
        rank = len(oshape)
        axes = set()
        for t, tc in tracked:
            axes.add(tc.axis + rank - ctx.rank(t))
        if len(axes) != 1:
            why = f"{node.op} {node.name} combines tensors whose channels lie on different axes"
            for t, _ in tracked:
                ctx.block(t, why)
            return
        axis = axes.pop()
        n = oshape[axis]
        elems = None
        consts = []
        for t in node.inputs:
            if not t.name:
                continue
            shp = ctx.shape(t)
            if shp is None:
                continue
            a = axis - (rank - len(shp))
            if a < 0 or shp[a] == 1:
                continue  # broadcasts along the channel axis
            if ctx.const(t) is not None:
                consts.append((t, a))
                continue
            e = ctx.get_or_fixed(node, t, a, f"{node.op} {node.name} aligns channels with an untracked tensor {t.name}")
            if len(e) != n:
                ctx.block(t, f"{node.op} {node.name}: channel counts differ")
                continue
            if elems is None:
                elems = e
            else:
                ctx.space.union(elems, e)
        if elems is None:
            return
        ctx.set(out, axis, elems)
        for t, a in consts:
            ctx.weight(node, t, a, elems, Role.CONSTANT)
            ctx.cost("params", node, math.prod(ctx.shape(t)) / n, out=elems, tensor=t)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Per-channel constants are sliced from the analysis records."""
