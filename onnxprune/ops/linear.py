"""Gemm and MatMul with constant weights (fully connected layers).

Channel rules:
- Gemm Y = A' B' + C: A's K axis is read (consumer slice of B' per input feature, which
  after a Flatten repeats each channel H*W times); Y's N axis holds new channels
  (producer row of B', bias C). MACs M*K*N.
- MatMul A[..., M, K] @ B[K, N] with constant 2-D B: the same when A's channels lie on
  its last axis; when they lie on another axis the product acts per channel and the
  channels pass through unchanged (MACs counted, nothing sliced).
- a non-constant weight operand (attention-style products) blocks the channels read.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext, Role
from onnxprune.ops._onednn import linear
from onnxprune.ops._torch import present, torch
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext


def _blocked_product(node: gs.Node, ctx: AnalysisContext, why: str, k_axis: int = -1) -> None:
    """Block the inputs and the output; the MACs still count, as a fixed term."""
    ctx.block_inputs(node, why)
    y = node.outputs[0]
    ys, xs = ctx.shape(y), ctx.shape(node.inputs[0])
    if ys is not None and len(ys) >= 1:
        ctx.space.block(ctx.allocate(node, y, len(ys) - 1, ys[-1]), why)
    if ys is not None and xs:
        ctx.cost("macs", node, math.prod(ys) * xs[k_axis])


@register("Gemm")
class GemmHandler(OpHandler):
    reduces_channels = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        bv = ctx.const_meta(b)
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        k_axis_a = 0 if trans_a else 1
        if bv is None or (c is not None and ctx.const_meta(c) is None):
            _blocked_product(node, ctx, f"Gemm {node.name} has non-constant weights", k_axis_a)
            return
        tc = ctx.get(a)
        if tc is not None and tc.axis != k_axis_a:
            _blocked_product(node, ctx, f"Gemm {node.name} reads channels on its M axis", k_axis_a)
            return
        ae = ctx.get_or_fixed(node, a, k_axis_a, f"Gemm {node.name} reads an untracked input")
        y = node.outputs[0]
        m, n = ctx.shape(y)
        ye = ctx.allocate(node, y, 1, n)
        ctx.weight(node, b, 1 if trans_b else 0, ae, Role.CONSUMER)
        ctx.weight(node, b, 0 if trans_b else 1, ye, Role.PRODUCER)
        ctx.cost("macs", node, m, out=ye, inp=ae)
        ctx.cost("params", node, 1, out=ye, inp=ae, tensor=b)
        if c is not None:
            cs = ctx.shape(c)
            if cs and cs[-1] == n and n > 1:
                ctx.weight(node, c, len(cs) - 1, ye, Role.BIAS)
                ctx.cost("params", node, math.prod(cs) / n, out=ye, tensor=c)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Weights are sliced from the analysis records."""

    def evaluate(self, node, inputs, ctx):
        a, b, c = inputs[0], inputs[1], present(inputs, 2)
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        if int(node.attrs.get("transA", 0)):
            a = a.transpose(-1, -2)
        if int(node.attrs.get("transB", 0)):
            b = b.transpose(-1, -2)
        if a.dim() != 2:  # opsets < 9 coerce A to 2-D; B is 2-D
            a = a.reshape(a.shape[0], -1)
        if c is None or beta == 0.0:
            y = linear(a, b.t()) if a.is_floating_point() else a @ b
            return [y if alpha == 1.0 else y * alpha]
        if a.is_floating_point():
            if alpha == 1.0 and beta == 1.0 and c.dim() == 1 and c.shape[0] == b.shape[1]:
                return [linear(a, b.t(), c)]  # oneDNN's GEMM where it can (ops._onednn)
            return [torch.addmm(c, a, b, beta=beta, alpha=alpha)]
        y = a @ b
        y = y if alpha == 1.0 else y * int(alpha)
        return [y + (c if beta == 1.0 else c * int(beta))]


@register("MatMul")
class MatMulHandler(OpHandler):
    reduces_channels = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a, b = node.inputs[0], node.inputs[1]
        bv = ctx.const_meta(b)
        tc = ctx.get(a)
        y = node.outputs[0]
        ys = ctx.shape(y)
        if bv is None or bv.ndim != 2 or ys is None:
            if tc is not None or ctx.get(b) is not None:
                _blocked_product(node, ctx, f"MatMul {node.name} multiplies two activations")
            elif ys is not None and ctx.shape(a):
                ctx.cost("macs", node, math.prod(ys) * ctx.shape(a)[-1])
            return
        rank = ctx.rank(a)
        if tc is not None and tc.axis != rank - 1:
            ctx.set(y, tc.axis + len(ys) - rank, tc.elems)
            ctx.cost("macs", node, math.prod(ys) * bv.shape[0])
            return
        ae = ctx.get_or_fixed(node, a, rank - 1, f"MatMul {node.name} reads an untracked input")
        ye = ctx.allocate(node, y, len(ys) - 1, ys[-1])
        ctx.weight(node, b, 0, ae, Role.CONSUMER)
        ctx.weight(node, b, 1, ye, Role.PRODUCER)
        ctx.cost("macs", node, math.prod(ys[:-1]), out=ye, inp=ae)
        ctx.cost("params", node, 1, out=ye, inp=ae, tensor=b)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Weights are sliced from the analysis records."""

    def evaluate(self, node, inputs, ctx):
        return [torch.matmul(inputs[0], inputs[1])]
