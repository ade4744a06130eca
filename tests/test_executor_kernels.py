"""The executor's CPU kernels compute what torch's plain calls compute.

- :func:`onnxprune.ops._conv2d.conv2d` equals ``F.conv2d`` in values and in the gradients
  of input, weight and bias (first and second order) for every kernel it picks: 1x1 on
  oneDNN as a convolution and as a matrix product, the backward's GEMM weight gradient
  for small outputs, a one-channel input run as two channels, depthwise, strided,
  dilated, grouped; in both layouts, and a forward is the same with and without grad;
- :mod:`onnxprune.ops._onednn`: ``linear`` and ``mm`` equal ``F.linear`` and ``@``, first
  and second order, with and without grad (bit for bit between the two);
- TorchGraph holds 2-D Conv weights in channels_last and writes back the same bytes;
- :func:`onnxprune.executor.allocator.tune_allocator` runs once, and not when told not to.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from onnxprune.executor import allocator
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.ops import _conv2d, _onednn
from onnxprune.ops._conv2d import conv2d
from test_executor import assert_close, make_model, ort_run, torch_run

CL = torch.channels_last

#: (N, C, H, W, O, k, stride, pad, dilation, groups)
CONVS = {
    "dense3x3": (2, 6, 9, 7, 8, 3, 1, 1, 1, 1),
    "small_output_gemm": (1, 16, 5, 5, 12, 3, 1, 1, 1, 1),
    "pointwise_product": (3, 16, 5, 5, 8, 1, 1, 0, 1, 1),
    "pointwise_onednn_conv": (20, 16, 8, 8, 8, 1, 1, 0, 1, 1),
    "pointwise_rows_below_16": (1, 8, 40, 40, 8, 1, 1, 0, 1, 1),
    "pointwise_pixels": (8, 12, 1, 1, 24, 1, 1, 0, 1, 1),
    "depthwise5x5_stride2": (2, 8, 9, 9, 8, 5, 2, 2, 1, 8),
    "dilated_strided": (2, 4, 11, 11, 6, 3, 2, 1, 2, 1),
    "grouped": (2, 6, 9, 7, 8, 3, 1, 1, 1, 2),
    "strided_pointwise": (2, 4, 11, 11, 6, 1, 2, 0, 1, 1),
    "one_channel_two": (3, 1, 11, 10, 9, 3, 1, 1, 1, 1),
    "one_channel_im2col": (3, 1, 11, 10, 5, 3, 2, 0, 1, 1),
}


def _conv_case(name: str, layout_cl: bool, dtype=torch.float32, seed: int = 0):
    n, c, h, w, o, k, s, p, d, g = CONVS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(o, c // g, k, k, generator=gen, dtype=dtype)
    if layout_cl:
        x, wt = x.contiguous(memory_format=CL), wt.contiguous(memory_format=CL)
    b = torch.randn(o, generator=gen, dtype=dtype)
    return x.requires_grad_(True), wt.requires_grad_(True), b.requires_grad_(True), ([s, s], [p, p], [d, d], g)


def _ours(x, w, b, conf, layout_cl):
    s, p, d, g = conf
    return conv2d(x, w, b, s, p, d, g, channels_last=layout_cl, im2col=g == 1 and d == [1, 1])


@pytest.mark.parametrize("layout_cl", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d_values_and_gradients_equal_torch(name: str, layout_cl: bool) -> None:
    x, w, b, conf = _conv_case(name, layout_cl)
    s, p, d, g = conf
    y = _ours(x, w, b, conf, layout_cl)
    ref = F.conv2d(x, w, b, s, p, d, g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), go)
    want = torch.autograd.grad(ref, (x, w, b), go)
    for what, a, e in zip(("x", "w", "b"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"{name}: d/d{what}")
        assert a.shape == e.shape
    if w.is_contiguous(memory_format=CL):  # autograd need not copy it into the weight's layout
        assert got[1].is_contiguous(memory_format=CL)
    with torch.no_grad():
        assert torch.equal(_ours(x, w, b, conf, layout_cl), y.detach()), "grad and no-grad forwards differ"


@pytest.mark.parametrize("name", ["dense3x3", "small_output_gemm", "pointwise_product", "pointwise_onednn_conv",
                                  "depthwise5x5_stride2", "one_channel_two"])
def test_conv2d_second_order_gradients_equal_torch(name: str) -> None:
    x, w, b, conf = _conv_case(name, True)
    s, p, d, g = conf
    grads = []
    for fn in (lambda: _ours(x, w, b, conf, True), lambda: F.conv2d(x, w, b, s, p, d, g)):
        (gx,) = torch.autograd.grad(fn().square().sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), (w, b), allow_unused=True))
    for a, e in zip(*grads):
        if e is None:
            assert a is None or not a.abs().any()
            continue
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_conv2d_leaves_other_dtypes_to_torch() -> None:
    x, w, b, conf = _conv_case("pointwise_product", True, dtype=torch.float64)
    s, p, d, g = conf
    torch.testing.assert_close(_ours(x, w, b, conf, True), F.conv2d(x, w, b, s, p, d, g), rtol=0, atol=0)


def test_one_channel_conv_with_many_filters_equals_onnxruntime() -> None:
    """A grayscale input (run as two channels on oneDNN) equals onnxruntime in a graph."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1, 12, 9)).astype(np.float32)
    inits = {"W": rng.standard_normal((16, 1, 3, 3)).astype(np.float32),
             "B": rng.standard_normal(16).astype(np.float32)}
    model = make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                       {"x": x}, ["y"], inits)
    assert_close(torch_run(TorchGraph(model, channels_last=True), {"x": x})[0], ort_run(model, {"x": x})[0])


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 9, 4), (33, 16, 8)])
def test_onednn_linear_and_mm_equal_torch(shape) -> None:
    m, k, n = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    w = torch.randn(k, n, generator=gen).t().detach().requires_grad_(True)  # a transposed view, as Gemm's
    b = torch.randn(n, generator=gen, requires_grad=True)
    y = _onednn.linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), go), torch.autograd.grad(ref, (x, w, b), go)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(_onednn.linear(x, w, b), y.detach())
        a2, b2 = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        torch.testing.assert_close(_onednn.mm(a2, b2), a2 @ b2, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(_onednn.linear(x, w).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), w)
    (gx2,) = torch.autograd.grad(F.linear(x, w).square().sum(), x, create_graph=True)
    (gw2,) = torch.autograd.grad(gx2.square().sum(), w)
    torch.testing.assert_close(gw, gw2, rtol=1e-4, atol=1e-4)


def test_onednn_falls_back_where_it_cannot(monkeypatch) -> None:
    monkeypatch.setattr(_onednn, "_OK", False)
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.equal(_onednn.linear(x, w), F.linear(x, w))
    assert torch.equal(_onednn.mm(x, w.t()), x @ w.t())
    monkeypatch.setattr(_conv2d._onednn, "_OK", False)
    x4, w4 = torch.randn(2, 4, 3, 3).contiguous(memory_format=CL), torch.randn(6, 4, 1, 1)
    torch.testing.assert_close(conv2d(x4, w4, None, [1, 1], [0, 0], [1, 1], 1), F.conv2d(x4, w4))


def test_conv_weights_are_held_channels_last_and_written_back_unchanged() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "W2": rng.standard_normal((5, 4, 1, 1)).astype(np.float32)}
    model = make_model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Conv", ["c", "W2"], ["y"], name="conv2")], {"x": x}, ["y"], inits)
    tg = TorchGraph(model)
    assert tg.parameter("W").is_contiguous(memory_format=CL) and not tg.parameter("W").is_contiguous()
    assert TorchGraph(model, channels_last=False).parameter("W").is_contiguous()
    out = tg.write_back(model)
    for init in out.graph.initializer:
        assert np.array_equal(onnx.numpy_helper.to_array(init), inits[init.name])
    tg(torch.from_numpy(x))[0].square().sum().backward()
    assert tg.parameter("W").grad.is_contiguous(memory_format=CL)  # no layout copy by autograd


def test_tune_allocator_runs_once_and_can_be_turned_off(monkeypatch) -> None:
    first = allocator.tune_allocator()
    assert isinstance(first, bool) and allocator.tune_allocator() is first
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv("ONNXPRUNE_MALLOPT", "0")
    assert allocator.tune_allocator() is False
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv("ONNXPRUNE_MALLOPT")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert allocator.tune_allocator() is False  # the user's own glibc setting wins
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    assert allocator.tune_allocator() is False


def test_global_average_pool_gradient_is_a_broadcast_view() -> None:
    """GlobalAveragePool's backward (first and second order) equals x.mean's; forward values
    are the same with and without grad."""
    from onnxprune.ops.pool import _global_mean

    x = torch.randn(3, 4, 5, 2, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_(True)
    assert torch.autograd.gradcheck(_global_mean, (x,))
    assert torch.autograd.gradgradcheck(_global_mean, (x,))
    with torch.no_grad():
        assert torch.equal(_global_mean(x), x.mean((2, 3), keepdim=True))


@pytest.mark.parametrize("k", [1, 3])
def test_empty_batch_runs_like_torch(k: int) -> None:
    """A batch of 0 samples: the same (empty) output and zero gradients as F.conv2d."""
    from onnxprune.ops._conv2d import conv2d

    x = torch.zeros(0, 4, 8, 8, requires_grad=True)
    w = torch.randn(6, 4, k, k, requires_grad=True)
    y = conv2d(x, w, None, [1, 1], [k // 2, k // 2], [1, 1], 1, channels_last=True)
    assert y.shape == torch.nn.functional.conv2d(x, w, None, 1, k // 2).shape
    y.sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0
