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
from onnxprune.ops._torch import F, attr_str, broadcast_legacy, onnx_dtype, present, scalar, torch, unsupported
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

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        op = node.op
        a = node.attrs
        fn = _UNARY_FNS.get(op)
        if fn is not None:
            return [fn(x)]
        if op == "LeakyRelu":
            return [F.leaky_relu(x, float(a.get("alpha", 0.01)))]
        if op == "Elu":
            return [F.elu(x, float(a.get("alpha", 1.0)))]
        if op == "Selu":
            alpha = float(a.get("alpha", 1.67326319217681884765625))
            gamma = float(a.get("gamma", 1.05070102214813232421875))
            return [gamma * torch.where(x > 0, x, alpha * torch.expm1(x))]
        if op == "Celu":
            return [F.celu(x, float(a.get("alpha", 1.0)))]
        if op == "ThresholdedRelu":
            return [torch.where(x > float(a.get("alpha", 1.0)), x, torch.zeros_like(x))]
        if op == "HardSigmoid":
            alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            if alpha == _SIXTH and beta == 0.5:  # torch's kernel: clamp(x + 3, 0, 6) / 6
                return [F.hardsigmoid(x)]
            return [torch.clamp(x * alpha + beta, 0.0, 1.0)]
        if op == "Gelu":
            approx = attr_str(node, "approximate", "none")
            return [F.gelu(x, approximate=approx)]
        if op == "Clip":
            return [_clip(node, inputs, ctx)]
        if op == "Cast":
            return [x.to(onnx_dtype(node, a["to"]))]
        if op == "Dropout":
            return _dropout(node, inputs, ctx)
        if op == "IsInf":
            pos, neg = int(a.get("detect_positive", 1)), int(a.get("detect_negative", 1))
            if pos and neg:
                return [torch.isinf(x)]
            if pos:
                return [torch.isposinf(x)]
            if neg:
                return [torch.isneginf(x)]
            return [torch.zeros_like(x, dtype=torch.bool)]
        raise unsupported(node, op)


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

    def evaluate(self, node, inputs, ctx):
        op = node.op
        if op in ("Sum", "Mean", "Max", "Min"):
            xs = [t for t in inputs if t is not None]
            y = xs[0]
            for t in xs[1:]:
                if op in ("Sum", "Mean"):
                    y = y + t
                elif op == "Max":
                    y = torch.maximum(y, t)
                else:
                    y = torch.minimum(y, t)
            if op == "Mean":
                y = y / len(xs)
            return [y]
        if op == "Where":
            return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]
        a, b = inputs[0], inputs[1]
        if op == "PRelu":
            if ctx.opset < 7 and b.dim() == 1 and b.numel() > 1 and a.dim() > 2:
                b = b.reshape((-1,) + (1,) * (a.dim() - 2))
            return [torch.where(a < 0, b * a, a)]
        b = broadcast_legacy(node, a, b, ctx.opset)
        if op == "Add":
            return [a + b]
        if op == "Sub":
            return [a - b]
        if op == "Mul":
            return [a * b]
        if op == "Div":
            if a.is_floating_point() or b.is_floating_point():
                return [a / b]
            return [torch.div(a, b, rounding_mode="trunc")]
        if op == "Pow":
            # a scalar exponent is a constant: no gradient flows to it (it would be NaN
            # for negative bases, d/db a^b = a^b log a)
            y = torch.pow(a, b.detach() if b.numel() == 1 else b)
            return [y if y.dtype == a.dtype else y.to(a.dtype)]
        if op == "Equal":
            return [torch.eq(a, b)]
        if op == "Greater":
            return [torch.gt(a, b)]
        if op == "Less":
            return [torch.lt(a, b)]
        if op == "And":
            return [torch.logical_and(a, b)]
        if op == "Or":
            return [torch.logical_or(a, b)]
        raise unsupported(node, op)


#: HardSigmoid's alpha as ONNX stores 1/6 (float32)
_SIXTH = 0.1666666716337204

_UNARY_FNS = {
    "Relu": lambda x: torch.relu(x),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "HardSwish": lambda x: F.hardswish(x),
    "Tanh": lambda x: torch.tanh(x),
    "Softplus": lambda x: F.softplus(x),
    "Softsign": lambda x: x / (1 + x.abs()),
    "Mish": lambda x: F.mish(x),
    "Erf": lambda x: torch.erf(x),
    "Exp": lambda x: torch.exp(x),
    "Log": lambda x: torch.log(x),
    "Neg": lambda x: torch.neg(x),
    "Abs": lambda x: torch.abs(x),
    "Sqrt": lambda x: torch.sqrt(x),
    "Reciprocal": lambda x: torch.reciprocal(x),
    "Floor": lambda x: torch.floor(x),
    "Ceil": lambda x: torch.ceil(x),
    "Round": lambda x: torch.round(x),  # half to even, as ONNX
    "Sign": lambda x: torch.sign(x),
    "Sin": lambda x: torch.sin(x),
    "Cos": lambda x: torch.cos(x),
    "Identity": lambda x: x,
    "Not": lambda x: torch.logical_not(x),
    "IsNaN": lambda x: torch.isnan(x),
}


def _clip(node, inputs, ctx):
    x = inputs[0]
    if ctx.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
    else:
        lo, hi = present(inputs, 1), present(inputs, 2)
        # scalar bounds as Python numbers (exact for float32 and integer inputs alike)
        lo = None if lo is None else scalar(lo)
        hi = None if hi is None else scalar(hi)
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None and lo > hi:  # ONNX: every value becomes max
        return torch.full_like(x, hi)
    return torch.clamp(x, lo, hi)


def _dropout(node, inputs, ctx):
    x = inputs[0]
    training = False
    ratio = float(node.attrs.get("ratio", 0.5))
    if ctx.opset >= 12:
        r, t = present(inputs, 1), present(inputs, 2)
        training = t is not None and bool(scalar(t))
        if r is not None:
            ratio = float(scalar(r))
    if training and ratio > 0:
        mask = torch.rand_like(x, dtype=torch.float32) >= ratio
        y = x * mask.to(x.dtype) / (1.0 - ratio)
    else:
        y = x
        mask = None
    if node.n_outputs < 2:
        return [y]
    if mask is None:  # inference: an all-true mask (a broadcast view, no memory)
        one = torch.ones((), dtype=torch.bool if ctx.opset >= 10 else x.dtype, device=x.device)
        return [y, one.expand(x.shape)]
    return [y, mask if ctx.opset >= 10 else mask.to(x.dtype)]
