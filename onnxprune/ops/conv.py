"""Conv and ConvTranspose: the ops that create channels and read them.

Channel rules (ONNX Conv, all opsets; ConvTranspose likewise with W transposed):
- ``group == 1``: the output's channels are new (an allocation); W[o] is the producer
  filter of output channel o, W[:, i] the consumer slice of input channel i.
- depthwise (``group == C_in == C_out``): output channel c *is* input channel c (their
  elements are united); W[c] and B[c] belong to that channel.
- grouped (``1 < group``, otherwise): new output channels, pruned in ``group`` equal
  blocks; the input channels must also be pruned in ``group`` equal blocks, block b of
  the input read only by block b of the filters.
MACs: N * H_out * W_out * k_h * k_w * (C_in / group) * C_out for Conv;
N * H_in * W_in * k_h * k_w * C_in * C_out / group for ConvTranspose.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext, Role
from onnxprune.ops._conv2d import conv2d
from onnxprune.ops._torch import F, attr_ints, attr_str, auto_pads, present, torch, torch_pad_arg, unsupported
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext


def _kernel_area(w) -> int:
    return int(math.prod(w.shape[2:])) if w.ndim > 2 else 1


@register("Conv")
class ConvHandler(OpHandler):
    reduces_channels = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        y = node.outputs[0]
        wv = ctx.const_meta(w)
        yshape = ctx.shape(y)
        if wv is None or yshape is None or (b is not None and ctx.const_meta(b) is None):
            why = f"Conv {node.name} has non-constant weights"
            ctx.block_inputs(node, why)
            if yshape is not None:
                ctx.space.block(ctx.allocate(node, y, 1, yshape[1]), why)
                ws = ctx.shape(w)
                if ws is not None:  # W [C_out, C_in / group, k...]
                    ctx.cost("macs", node, int(math.prod(yshape[2:])) * yshape[0] * math.prod(ws))
            return
        g = int(node.attrs.get("group", 1))
        c_out, cin_g = int(wv.shape[0]), int(wv.shape[1])
        c_in = cin_g * g
        xe = ctx.get_or_fixed(node, x, 1, f"Conv {node.name} reads untracked tensor " + x.name)
        spatial_out = int(math.prod(yshape[2:])) * int(yshape[0])
        k = _kernel_area(wv)
        if g == c_in and c_out == c_in and g > 1:  # depthwise
            ctx.set(y, 1, xe)
            ctx.weight(node, w, 0, xe, Role.PRODUCER)
            if b is not None:
                ctx.weight(node, b, 0, xe, Role.BIAS)
                ctx.cost("params", node, 1, out=xe, tensor=b)
            ctx.cost("macs", node, spatial_out * k, out=xe)
            ctx.cost("params", node, k, out=xe, tensor=w)
            return
        ye = ctx.allocate(node, y, 1, c_out)
        ctx.weight(node, w, 0, ye, Role.PRODUCER)
        if b is not None:
            ctx.weight(node, b, 0, ye, Role.BIAS)
            ctx.cost("params", node, 1, out=ye, tensor=b)
        if g == 1:
            ctx.weight(node, w, 1, xe, Role.CONSUMER)
        else:
            cout_g = c_out // g
            for blk in range(g):
                ctx.weight(node, w, 1, xe[blk * cin_g:(blk + 1) * cin_g], Role.CONSUMER,
                           rows=(blk * cout_g, (blk + 1) * cout_g))
            ctx.require_blocks(node, ye, g)
            ctx.require_blocks(node, xe, g)
        ctx.cost("macs", node, spatial_out * k, out=ye, inp=xe, blocks=g)
        ctx.cost("params", node, k, out=ye, inp=xe, blocks=g, tensor=w)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        # Weights are sliced from the analysis records; only a depthwise conv's group
        # attribute follows the channel count.
        # Handlers run before the weights are sliced, so W has its original shape here.
        g = int(node.attrs.get("group", 1))
        wv = ctx.const(node.inputs[1])
        keep = ctx.keep(node.outputs[0])
        if wv is not None and keep is not None and g > 1 and wv.shape[1] == 1 and wv.shape[0] == g:
            node.attrs["group"] = int(keep.sum())

    def evaluate(self, node, inputs, ctx):
        x, w, b = inputs[0], inputs[1], present(inputs, 2)
        n = x.dim() - 2
        key = (n, tuple(x.shape[2:]))
        spec = node.cache.get("conv")
        if spec is None or spec[0] != key:  # attributes parsed once per input size
            spec = node.cache["conv"] = (key, _conv_spec(node, n, list(x.shape[2:]), list(w.shape[2:])))
        fn, strides, padding, dil, group, pad_arg, im2col = spec[1]
        if pad_arg is not None:  # asymmetric: pad explicitly (zeros), then convolve without padding
            x = F.pad(x, pad_arg)
        if n == 2:
            y = conv2d(x, w, b, strides, padding, dil, group, channels_last=ctx.channels_last, im2col=im2col)
        else:
            y = fn(x, w, b, strides, padding, dil, group)
        if ctx.channels_last and n == 2 and not y.is_contiguous(memory_format=torch.channels_last):
            # e.g. one input channel: torch cannot tell the layouts apart and answers NCHW
            y = y.contiguous(memory_format=torch.channels_last)
        return [y]


def _conv_spec(node, n: int, in_sizes: list[int], w_kernel: list[int]):
    """(torch conv function, strides, padding, dilations, group, F.pad argument or None,
    whether torch's im2col kernel can run it: 2-D, group 1, no dilation)."""
    if n not in (1, 2, 3):
        raise unsupported(node, f"a {n}-D convolution")
    kernel = attr_ints(node, "kernel_shape") or w_kernel
    strides = attr_ints(node, "strides", [1] * n)
    dil = attr_ints(node, "dilations", [1] * n)
    group = int(node.attrs.get("group", 1))
    pads = auto_pads(node, in_sizes, kernel, strides, dil)
    begin, end = pads[:n], pads[n:]
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    im2col = n == 2 and group == 1 and dil == [1, 1] and hasattr(torch._C._nn, "thnn_conv2d")
    if begin == end:
        return fn, strides, begin, dil, group, None, im2col
    return fn, strides, [0] * n, dil, group, torch_pad_arg(begin, end), im2col


@register("ConvTranspose")
class ConvTransposeHandler(OpHandler):
    reduces_channels = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        y = node.outputs[0]
        wv, xshape, yshape = ctx.const_meta(w), ctx.shape(x), ctx.shape(y)
        g = int(node.attrs.get("group", 1))
        if wv is None or yshape is None or xshape is None or g != 1 or (b is not None and ctx.const_meta(b) is None):
            why = (f"ConvTranspose {node.name} has group={g}" if g != 1
                   else f"ConvTranspose {node.name} has non-constant weights")
            ctx.block_inputs(node, why)
            if yshape is not None:
                ctx.space.block(ctx.allocate(node, y, 1, yshape[1]), why)
            ws = ctx.shape(w)
            if xshape is not None and ws is not None:  # W [C_in, C_out / group, k...]
                ctx.cost("macs", node, int(math.prod(xshape[2:])) * xshape[0] * math.prod(ws))
            return
        xe = ctx.get_or_fixed(node, x, 1, f"ConvTranspose {node.name} reads untracked tensor " + x.name)
        ye = ctx.allocate(node, y, 1, int(wv.shape[1]))
        ctx.weight(node, w, 0, xe, Role.CONSUMER)
        ctx.weight(node, w, 1, ye, Role.PRODUCER)
        k = _kernel_area(wv)
        if b is not None:
            ctx.weight(node, b, 0, ye, Role.BIAS)
            ctx.cost("params", node, 1, out=ye, tensor=b)
        ctx.cost("macs", node, int(math.prod(xshape[2:])) * int(xshape[0]) * k, out=ye, inp=xe)
        ctx.cost("params", node, k, out=ye, inp=xe, tensor=w)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing beyond the recorded weight slices."""

    def evaluate(self, node, inputs, ctx):
        x, w, b = inputs[0], inputs[1], present(inputs, 2)
        n = x.dim() - 2
        if n not in (1, 2, 3):
            raise unsupported(node, f"a {n}-D transposed convolution")
        kernel = attr_ints(node, "kernel_shape") or list(w.shape[2:])
        strides = attr_ints(node, "strides", [1] * n)
        dil = attr_ints(node, "dilations", [1] * n)
        group = int(node.attrs.get("group", 1))
        out_pad = attr_ints(node, "output_padding", [0] * n)
        out_shape = attr_ints(node, "output_shape")
        mode = attr_str(node, "auto_pad", "NOTSET")
        in_sizes = list(x.shape[2:])
        # the full (unpadded) output length: stride * (in - 1) + (k - 1) * dilation + 1
        full = [strides[i] * (in_sizes[i] - 1) + (kernel[i] - 1) * dil[i] + 1 for i in range(n)]
        if out_shape is not None or mode in ("SAME_UPPER", "SAME_LOWER"):
            if out_shape is None:
                target = [in_sizes[i] * strides[i] for i in range(n)]
            else:
                target = out_shape[-n:]
            begin, end = [], []
            for i in range(n):
                total = full[i] + out_pad[i] - target[i]
                if out_shape is None:  # SAME_*: onnxruntime clamps the total padding at 0
                    total = max(0, total)
                small, big = total // 2, total - total // 2
                if mode == "SAME_UPPER":
                    begin.append(small), end.append(big)
                else:  # NOTSET / SAME_LOWER with output_shape
                    begin.append(big), end.append(small)
        elif mode == "VALID":
            begin, end = [0] * n, [0] * n
        elif mode in ("NOTSET", ""):
            pads = attr_ints(node, "pads", [0] * (2 * n))
            begin, end = pads[:n], pads[n:]
        else:
            raise unsupported(node, f"auto_pad {mode}")
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        if begin == end and all(op < max(s, d) for op, s, d in zip(out_pad, strides, dil)) \
                and all(p >= 0 for p in begin):
            return [fn(x, w, b, strides, begin, out_pad, group, dil)]
        # general case: full output, then crop the pads (and zero-extend output_padding)
        y = fn(x, w, None, strides, 0, 0, group, dil)
        y = F.pad(y, torch_pad_arg([-p for p in begin], [op - p for op, p in zip(out_pad, end)]))
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * n)
        return [y]
