"""Normalisation ops.

- BatchNormalization / InstanceNormalization: per-channel (axis 1); output channel c is
  input channel c; scale, bias (and BN's running mean/var) are sliced with the channel.
- LayerNormalization: normalises over axes [axis, rank); if the channel axis is among
  them the op mixes channels and blocks them, otherwise channels pass through.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext, Role
from onnxprune.ops._torch import F, present, torch, unsupported
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
        if any(ctx.const_meta(t) is None for t in params):
            ctx.block(x, f"{node.op} {node.name} has non-constant parameters")
            return
        ctx.set(node.outputs[0], 1, tc.elems)
        for i, t in enumerate(params):
            ctx.weight(node, t, 0, tc.elems, Role.NORM if i == 0 else Role.NORM_STAT)
            ctx.cost("params", node, 1, out=tc.elems, tensor=t)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Parameters are sliced from the analysis records."""

    def evaluate(self, node, inputs, ctx):
        if node.op == "InstanceNormalization":
            x, scale, bias = inputs[0], inputs[1], inputs[2]
            eps = float(node.attrs.get("epsilon", 1e-5))
            return [F.instance_norm(x, weight=scale, bias=bias, eps=eps)]
        return _batch_norm(node, inputs, ctx)


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

    def evaluate(self, node, inputs, ctx):
        x, scale, bias = inputs[0], inputs[1], present(inputs, 2)
        rank = x.dim()
        axis = int(node.attrs.get("axis", -1)) % rank
        eps = float(node.attrs.get("epsilon", 1e-5))
        norm_shape = tuple(x.shape[axis:])
        simple = (node.n_outputs == 1 and tuple(scale.shape) == norm_shape
                  and (bias is None or tuple(bias.shape) == norm_shape))
        if simple and x.dtype == scale.dtype:
            return [F.layer_norm(x, norm_shape, scale, bias, eps)]
        dims = tuple(range(axis, rank))
        xf = x.float() if int(node.attrs.get("stash_type", 1)) == 1 else x
        mean = xf.mean(dim=dims, keepdim=True)
        centered = xf - mean
        inv = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + eps)
        y = (centered * inv).to(x.dtype) * scale
        if bias is not None:
            y = y + bias
        return [y, mean, inv][: max(1, node.n_outputs)]


def _param_view(p, x):
    """Per-channel parameter ``p`` shaped to broadcast against ``x`` [N, C, ...]."""
    if p.dim() == 1:
        return p.reshape((1, -1) + (1,) * (x.dim() - 2))
    return p.reshape((1,) + tuple(p.shape))  # spatial=0 (opsets < 9): [C, D1, ...]


def batch_norm_is_inference(attrs, opset: int) -> bool:
    """Whether a BatchNormalization with ``attrs`` uses its running statistics (not
    ``training_mode=1``) and per-channel (``spatial=1``) parameters."""
    training = int(attrs.get("training_mode", 0)) == 1 and opset >= 14
    return not training and not (opset < 9 and int(attrs.get("spatial", 1)) == 0)


def batch_norm_affine(node, scale, bias, mean, var):
    """Inference BN as ``y = x * mul + shift`` per channel: (mul, shift), each [C].

    ``mul = scale / sqrt(var + eps)``, ``shift = bias - mean * mul`` (what a Conv's
    weight and bias absorb when BN follows it; differentiable in all four).
    """
    cached = node.cache.get("eps")
    if cached is None:
        cached = node.cache["eps"] = float(node.attrs.get("epsilon", 1e-5))
    mul = scale * torch.rsqrt(var + cached)
    return mul, bias - mean * mul


def _batch_norm(node, inputs, ctx):
    """BatchNormalization; inference (running statistics) unless training_mode=1."""
    x, scale, bias, mean, var = inputs[:5]
    eps = float(node.attrs.get("epsilon", 1e-5))
    training = int(node.attrs.get("training_mode", 0)) == 1 and ctx.opset >= 14
    if ctx.opset < 9 and int(node.attrs.get("spatial", 1)) == 0 and scale.dim() == 1 and x.dim() > 2:
        raise unsupported(node, "spatial=0 with 1-D parameters")
    if training:
        dims = (0,) + tuple(range(2, x.dim()))
        cur_mean = x.mean(dim=dims)
        cur_var = x.var(dim=dims, unbiased=False)
        inv = scale * torch.rsqrt(cur_var + eps)
        y = x * _param_view(inv, x) + _param_view(bias - cur_mean * inv, x)
        momentum = float(node.attrs.get("momentum", 0.9))
        run_mean = mean * momentum + cur_mean * (1 - momentum)
        run_var = var * momentum + cur_var * (1 - momentum)
        return [y, run_mean, run_var][: max(1, node.n_outputs)]
    # optional outputs (training-only in the spec): the running statistics, unchanged
    extra = [mean, var, mean, var][: max(0, node.n_outputs - 1)]
    stats_grad = torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad)
    if (scale.dim() == 1 and x.dim() >= 2 and not stats_grad
            and x.dtype == scale.dtype == bias.dtype == mean.dtype == var.dtype):
        # torch's fused kernel (one pass; it has no gradient for the running statistics)
        return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)] + extra
    inv = scale * torch.rsqrt(var + eps)
    y = x * _param_view(inv, x) + _param_view(bias - mean * inv, x)
    return [y] + extra
