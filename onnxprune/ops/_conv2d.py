"""The executor's 2-D convolution on the CPU in float32: kernel choice and a leaner backward.

:func:`conv2d` computes what ``F.conv2d`` computes (the same sums, up to the order of a
float32 reduction) and is what the Conv handler calls. What it does differently, each
measured on this project's 2-core CPU with one thread (README "Executor speed"):

- a 1x1, stride-1, unpadded, ungrouped convolution on a channels_last input runs on oneDNN:
  as a convolution (``torch.mkldnn_convolution``) from :data:`POINTWISE_ONEDNN` output
  positions, below that as a matrix product over the pixels (:mod:`onnxprune.ops._onednn`;
  ResNet-50's 2048 -> 512 at 7x7: 1.6 ms as a convolution, 0.6 ms as a product); torch
  itself picks its im2col kernel there with one thread and a batch under 16, about 2x slower;
- the backward (an ``autograd.Function``, double-differentiable: it is written with
  differentiable ops) never asks oneDNN for the bias gradient: ``convolution_backward``
  with the bias in its mask takes a path about twice as slow for depthwise convolutions
  (a 5x5 depthwise over 32x200x2x96: 8.9 ms against 4.8 ms); the bias gradient is the sum
  of the output gradient over batch and space instead;
- the weight gradient of an ungrouped convolution whose output has few positions
  (batch x height x width < :data:`SMALL_OUTPUT`, e.g. ResNet-50's last stage at batch 1)
  is one GEMM of the output gradient with the unfolded input (oneDNN: 17 ms, GEMM 2.4 ms
  for 512x512x3x3 at 7x7); the backward's GEMMs run on :func:`onnxprune.ops._onednn.mm`.

- a one-channel input (a grayscale image) in channels_last runs as two channels, the second
  zero (:func:`_two_channels`), and on torch's im2col kernel otherwise.

Anything else (other dtypes and devices, 1-D / 3-D) goes to ``F.conv*``.
"""

from __future__ import annotations

from typing import Any

from onnxprune.ops import _onednn
from onnxprune.ops._torch import F, torch

#: output positions (batch x height x width) under which the weight gradient is one GEMM
SMALL_OUTPUT = 128
#: output positions from which a 1x1 convolution's backward runs on oneDNN (below: two GEMMs)
POINTWISE_ONEDNN = 1024

_FUNCTION: Any = None


def conv2d(x, w, b, stride: list[int], padding: list[int], dilation: list[int], groups: int, *,
           channels_last: bool = False, im2col: bool = False):
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)``, faster on the CPU (module doc).

    Args:
        x: input [N, C, H, W]; w: weight [O, C / groups, kh, kw]; b: bias [O] or None. The
            fast paths take float32 CPU tensors; anything else (other dtypes or devices, an
            empty tensor) runs ``F.conv2d`` itself.
        channels_last: the executor runs in that layout (a one-channel input then runs as
            two channels, see :func:`_two_channels`).
        im2col: torch's im2col kernel can run it (no groups or dilation).

    Returns:
        The output [N, O, H', W'], as ``F.conv2d``.
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() != 4
            or x.numel() == 0 or w.numel() == 0):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    if x.shape[1] == 1 and groups == 1:
        if channels_last and w.shape[0] >= 8 and torch.backends.mkldnn.is_available():
            x, w = _two_channels(x), _two_channels(w)
        elif im2col:
            # oneDNN's one-channel kernel is several times slower than torch's im2col + GEMM
            return torch._C._nn.thnn_conv2d(x, w, list(w.shape[2:]), b, stride, padding)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _function().apply(x, w, b, tuple(stride), tuple(padding), tuple(dilation), int(groups))
    return _forward(x, w, b, stride, padding, dilation, groups)


def _two_channels(t):
    """[N, 1, H, W] -> [N, 2, H, W] channels_last, channel 1 zero (differentiable).

    oneDNN's kernel for one input channel is slow (LeNet's first conv, 256x1x28x28 -> 32:
    17.9 ms against 3.6 ms with two); the zero channel adds exact zeros to every sum.
    """
    return torch.stack((t[:, 0], torch.zeros_like(t[:, 0])), -1).permute(0, 3, 1, 2)


def _pointwise(w, stride, padding, dilation, groups) -> bool:
    return groups == 1 and w.shape[2] == 1 and w.shape[3] == 1 and tuple(stride) == (1, 1) \
        and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)


def _forward(x, w, b, stride, padding, dilation, groups):
    if _pointwise(w, stride, padding, dilation, groups) and x.is_contiguous(memory_format=torch.channels_last) \
            and x.shape[1] > 1 and torch.backends.mkldnn.is_available():
        n, c, h, wd = x.shape
        if n * h * wd < POINTWISE_ONEDNN and _onednn.available():  # a GEMM over the pixels, on oneDNN
            o = w.shape[0]
            y = _onednn._linear_raw(x.permute(0, 2, 3, 1).reshape(-1, c), w.reshape(o, c), b)
            return y.reshape(n, h, wd, o).permute(0, 3, 1, 2)
        return torch.mkldnn_convolution(x, w, b, list(padding), list(stride), list(dilation), groups)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _weight_grad_gemm(x, go, w_shape, stride, padding, dilation, channels_last: bool):
    """dL/dW of an ungrouped convolution as one GEMM: go [O, N*L] @ unfold(x) [N*L, C*kh*kw].

    ``channels_last``: the gradient comes out in that layout (the unfolded input's rows
    ordered (kh, kw, C), a copy of the small unfolded input instead of the weight)."""
    n, o = go.shape[0], go.shape[1]
    c, kh, kw = w_shape[1], w_shape[2], w_shape[3]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    if go.is_contiguous(memory_format=torch.channels_last):
        g = go.permute(0, 2, 3, 1).reshape(-1, o)  # [N*L, O], a view
    else:
        g = go.reshape(n, o, -1).transpose(1, 2).reshape(-1, o)
    if channels_last:
        rows = cols.reshape(n, c, kh * kw, -1).permute(0, 3, 2, 1).reshape(-1, kh * kw * c)  # [N*L, (k, C)]
        gw = _onednn.mm(g.t(), rows)  # [O, kh*kw*C]
        return gw.reshape(o, kh, kw, c).permute(0, 3, 1, 2)
    rows = cols.transpose(1, 2).reshape(-1, c * kh * kw)  # [N*L, C*kh*kw]
    return _onednn.mm(g.t(), rows).reshape(w_shape)


def _nhwc_rows(t):
    """[N, C, H, W] channels_last -> the same memory as [N*H, C, 1, W] (a view)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h, 1, w, c).permute(0, 3, 1, 2)


def _pointwise_backward(go, x, w, need_x: bool, need_w: bool):
    """(dL/dx, dL/dW) of a 1x1 convolution (stride 1, no padding, no groups) on channels_last."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    go = go.contiguous(memory_format=torch.channels_last)
    if n * h * wd >= POINTWISE_ONEDNN and n * h >= 16:
        # oneDNN's backward (torch takes its im2col kernel for a batch under 16 with one
        # thread: the rows of the image as a batch of [C, 1, W] images are the same sums)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            _nhwc_rows(go), _nhwc_rows(x), w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_x, need_w, False])
        if gx is not None:
            gx = gx.permute(0, 2, 3, 1).reshape(n, h, wd, c).permute(0, 3, 1, 2)
        return gx, gw
    g2 = go.permute(0, 2, 3, 1).reshape(-1, o)
    gx = gw = None
    if need_x:
        gx = _onednn.mm(g2, w.reshape(o, c)).reshape(n, h, wd, c).permute(0, 3, 1, 2)
    if need_w:
        gw = _onednn.mm(g2.transpose(0, 1), x.permute(0, 2, 3, 1).reshape(-1, c)).reshape(w.shape)
    return gx, gw


def _function():
    global _FUNCTION
    if _FUNCTION is None:

        class Conv2d(torch.autograd.Function):
            """conv2d with the backward of the module doc."""

            @staticmethod
            def forward(ctx, x, w, b, stride, padding, dilation, groups):
                ctx.save_for_backward(x, w)
                ctx.conf = (stride, padding, dilation, groups)
                return _forward(x, w, b, stride, padding, dilation, groups)

            @staticmethod
            def backward(ctx, go):
                x, w = ctx.saved_tensors
                stride, padding, dilation, groups = ctx.conf
                need_x, need_w, need_b = ctx.needs_input_grad[:3]
                gx = gw = gb = None
                if (need_x or need_w) and _pointwise(w, stride, padding, dilation, groups) \
                        and x.is_contiguous(memory_format=torch.channels_last):
                    gx, gw = _pointwise_backward(go, x, w, need_x, need_w)
                    need_x = need_w = False
                if need_w and groups == 1 and go.shape[0] * go.shape[2] * go.shape[3] < SMALL_OUTPUT:
                    gw = _weight_grad_gemm(x, go, w.shape, stride, padding, dilation,
                                           w.is_contiguous(memory_format=torch.channels_last))
                    need_w = False
                if need_x or need_w:
                    gx, gw2, _ = torch.ops.aten.convolution_backward(
                        go, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
                        [need_x, need_w, False])
                    if need_w:
                        gw = gw2
                if gw is not None and w.is_contiguous(memory_format=torch.channels_last) and not gw.is_contiguous(
                        memory_format=torch.channels_last):
                    gw = gw.contiguous(memory_format=torch.channels_last)  # the weight's layout (no copy by autograd)
                if need_b:
                    gb = go.sum((0, 2, 3))
                return gx, gw, gb, None, None, None, None

        _FUNCTION = Conv2d
    return _FUNCTION
