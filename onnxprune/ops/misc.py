"""Ops the torch executor evaluates but whose channel behaviour is not modelled.

These are mostly shape arithmetic around detection heads and attention blocks (Gather,
Range, ConstantOfShape, Expand, Tile, Constant) plus a few comparison and
rearrangement ops. Each is a :class:`BarrierHandler`: analysis blocks the channels of
its tracked inputs; surgery leaves it alone.
"""

from __future__ import annotations

import numpy as np

from onnxprune.ops._torch import attr_str, const_tensor, int_list, onnx_dtype, present, scalar, torch, unsupported
from onnxprune.ops.registry import BarrierHandler, register


@register("Constant")
class ConstantHandler(BarrierHandler):
    """The tensor held by the node's ``value*`` attribute (on the CPU)."""

    def evaluate(self, node, inputs, ctx):
        a = node.attrs
        if "value" in a:
            return [const_tensor(node, a["value"])]
        if "value_float" in a:
            return [torch.tensor(float(a["value_float"]), dtype=torch.float32)]
        if "value_floats" in a:
            return [torch.tensor([float(v) for v in a["value_floats"]], dtype=torch.float32)]
        if "value_int" in a:
            return [torch.tensor(int(a["value_int"]), dtype=torch.int64)]
        if "value_ints" in a:
            return [torch.tensor([int(v) for v in a["value_ints"]], dtype=torch.int64)]
        raise unsupported(node, f"attribute(s) {sorted(a)}")


@register("ConstantOfShape")
class ConstantOfShapeHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        shape = int_list(inputs[0])
        value = node.attrs.get("value")
        if value is None:
            return [torch.zeros(shape, dtype=torch.float32, device=inputs[0].device)]
        v = const_tensor(node, value).reshape(-1)
        return [torch.full(shape, v[0].item(), dtype=v.dtype, device=inputs[0].device)]


@register("Gather")
class GatherHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        data, idx = inputs[0], inputs[1]
        axis = int(node.attrs.get("axis", 0)) % data.dim()
        n = data.shape[axis]
        idx = idx.to(torch.int64)
        idx = torch.where(idx < 0, idx + n, idx)
        y = data.index_select(axis, idx.reshape(-1).to(data.device))
        shape = tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:])
        return [y.reshape(shape)]


@register("GatherElements")
class GatherElementsHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        data, idx = inputs[0], inputs[1]
        axis = int(node.attrs.get("axis", 0)) % data.dim()
        idx = idx.to(torch.int64)
        idx = torch.where(idx < 0, idx + data.shape[axis], idx)
        return [torch.gather(data, axis, idx)]


@register("Range")
class RangeHandler(BarrierHandler):
    """start + i * delta for i < max(ceil((limit - start) / delta), 0), in start's dtype."""

    def evaluate(self, node, inputs, ctx):
        start, limit, delta = (scalar(t) for t in inputs[:3])
        dt, dev = inputs[0].dtype, inputs[0].device
        if inputs[0].is_floating_point():
            n = max(int(np.ceil((limit - start) / delta)), 0)
            y = start + torch.arange(n, dtype=torch.float64, device=dev) * delta
            return [y.to(dt)]
        n = max(-(-(limit - start) // delta), 0)  # exact integer ceil division
        return [start + torch.arange(n, dtype=dt, device=dev) * delta]


@register("Expand")
class ExpandHandler(BarrierHandler):
    """Bidirectional broadcast of the input against ``shape``."""

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        shape = torch.broadcast_shapes(tuple(x.shape), tuple(int_list(inputs[1])))
        return [x.expand(shape)]


@register("Tile")
class TileHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        if ctx.opset < 6:
            raise unsupported(node, f"Tile of opset {ctx.opset}")
        return [inputs[0].repeat(int_list(inputs[1]))]


@register("GreaterOrEqual", "LessOrEqual", "Xor", "Mod")
class CompareHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        a, b = inputs[0], inputs[1]
        if node.op == "GreaterOrEqual":
            return [torch.ge(a, b)]
        if node.op == "LessOrEqual":
            return [torch.le(a, b)]
        if node.op == "Xor":
            return [torch.logical_xor(a, b)]
        # Mod: fmod=0 takes the divisor's sign (integers only), fmod=1 the dividend's (C fmod)
        if int(node.attrs.get("fmod", 0)):
            return [torch.fmod(a, b)]
        if a.is_floating_point():
            raise unsupported(node, "fmod=0 on floating-point inputs")
        return [torch.remainder(a, b)]


@register("DepthToSpace", "SpaceToDepth")
class DepthSpaceHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        bs = int(node.attrs["blocksize"])
        n, c, h, w = x.shape
        if node.op == "SpaceToDepth":
            y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
            return [y.reshape(n, c * bs * bs, h // bs, w // bs)]
        if attr_str(node, "mode", "DCR") == "CRD":
            y = x.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
        else:  # DCR
            y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        return [y.reshape(n, c // (bs * bs), h * bs, w * bs)]


@register("CumSum")
class CumSumHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        axis = int(scalar(inputs[1])) % x.dim()
        if int(node.attrs.get("reverse", 0)):
            x = x.flip(axis)
        y = torch.cumsum(x, dim=axis, dtype=x.dtype)
        if int(node.attrs.get("exclusive", 0)):
            y = y - x
        if int(node.attrs.get("reverse", 0)):
            y = y.flip(axis)
        return [y]


@register("EyeLike")
class EyeLikeHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        k = int(node.attrs.get("k", 0))
        dt = onnx_dtype(node, node.attrs["dtype"]) if "dtype" in node.attrs else x.dtype
        rows, cols = x.shape
        i = torch.arange(rows, device=x.device).reshape(-1, 1)
        j = torch.arange(cols, device=x.device).reshape(1, -1)
        return [(j - i == k).to(dt)]


@register("Trilu")
class TriluHandler(BarrierHandler):
    def evaluate(self, node, inputs, ctx):
        k_t = present(inputs, 1)
        k = int(scalar(k_t)) if k_t is not None else 0
        if int(node.attrs.get("upper", 1)):
            return [torch.triu(inputs[0], k)]
        return [torch.tril(inputs[0], k)]
