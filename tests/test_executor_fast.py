"""The executor's fast paths give the results of the plain node-by-node evaluation.

- fused chains (Conv+BN, hard-swish as Add/Clip/Mul/Div or HardSigmoid*x, SiLU) equal
  onnxruntime and the unfused evaluation, values and gradients (finite differences on the
  fused Conv+BN in float64); a gate on an inner tensor, an input gate on an inner node or
  an override of any link turns the chain back into its nodes;
- channels_last and NCHW evaluations agree (and a one-channel Conv, which takes torch's
  im2col kernel, equals onnxruntime);
- no-grad and grad forwards give the same values; every intermediate value is released
  by the step that reads it last.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnxprune.executor.graph_module import TorchGraph
from test_executor import assert_close, make_model, ort_run, torch_feeds, torch_run
from tiny_models import ALL_BUILDERS, random_input


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(a) -> np.ndarray:
    return np.asarray(a, np.float32)


def _conv_bn(rng, bias: bool = True, group: int = 1, c: int = 6):
    x = _f32(rng.standard_normal((2, c, 9, 7)))
    inits = {"W": _f32(rng.standard_normal((8 if group == 1 else c, c // group, 3, 3)) * 0.3),
             "scale": _f32(rng.uniform(0.5, 1.5, 8 if group == 1 else c)),
             "bias": _f32(rng.standard_normal(8 if group == 1 else c)),
             "mean": _f32(rng.standard_normal(8 if group == 1 else c) * 0.1),
             "var": _f32(rng.uniform(0.5, 2.0, 8 if group == 1 else c))}
    ins = ["x", "W"]
    if bias:
        inits["B"] = _f32(rng.standard_normal(inits["W"].shape[0]))
        ins.append("B")
    nodes = [helper.make_node("Conv", ins, ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn",
                              epsilon=1e-3)]
    return make_model(nodes, {"x": x}, ["y"], inits), {"x": x}


def _hardswish_chain(rng, swap: bool = False):
    x = _f32(rng.standard_normal((2, 4, 5, 5)) * 4)
    inits = {"three": _f32(3.0), "zero": _f32(0.0), "six": _f32(6.0), "six_div": _f32(6.0)}
    add_in = ["three", "x"] if swap else ["x", "three"]
    nodes = [helper.make_node("Add", add_in, ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
             helper.make_node("Mul", ["c", "x"] if swap else ["x", "c"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six_div"], ["y"], name="div")]
    return make_model(nodes, {"x": x}, ["y"], inits), {"x": x}


def _hardsigmoid_mul(rng):
    x = _f32(rng.standard_normal((2, 4, 5, 5)) * 4)
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], name="hs", alpha=1.0 / 6.0, beta=0.5),
             helper.make_node("Mul", ["x", "h"], ["y"], name="mul")]
    return make_model(nodes, {"x": x}, ["y"]), {"x": x}


def _silu(rng):
    x = _f32(rng.standard_normal((2, 4, 5, 5)) * 4)
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             helper.make_node("Mul", ["s", "x"], ["y"], name="mul")]
    return make_model(nodes, {"x": x}, ["y"]), {"x": x}


def _matmul_add(rng, rank: int = 2):
    a = _f32(rng.standard_normal((3, 5) if rank == 2 else (2, 3, 5)))
    inits = {"B": _f32(rng.standard_normal((5, 4))), "bias": _f32(rng.standard_normal(4))}
    nodes = [helper.make_node("MatMul", ["x", "B"], ["m"], name="mm"),
             helper.make_node("Add", ["bias", "m"], ["y"], name="add")]
    return make_model(nodes, {"x": a}, ["y"], inits), {"x": a}


def _conv_affine(rng, bn: bool, mul_shape, add_shape, width: int = 7):
    """Conv [-> BN] [-> Mul(., c)] [-> Add(c, .)] (the learnable affine block of PP-OCRv4)."""
    model, feeds = _conv_bn(rng) if bn else _conv_bn(rng)
    nodes = list(model.graph.node) if bn else [model.graph.node[0]]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    if not bn:
        nodes[0].output[0] = "y"
        for k in ("scale", "bias", "mean", "var"):
            inits.pop(k)
    last = "y"
    if mul_shape is not None:
        inits["s"] = _f32(rng.uniform(0.5, 1.5, mul_shape))
        nodes.append(helper.make_node("Mul", [last, "s"], ["ym"], name="mul"))
        last = "ym"
    if add_shape is not None:
        inits["t"] = _f32(rng.standard_normal(add_shape))
        nodes.append(helper.make_node("Add", ["t", last], ["ya"], name="add"))
        last = "ya"
    return make_model(nodes, feeds, [last], inits), feeds


def _mul_add(rng):
    x = _f32(rng.standard_normal((2, 4, 5, 5)))
    inits = {"s": _f32([1.5]), "t": _f32(rng.standard_normal((4, 1, 1)))}
    nodes = [helper.make_node("Mul", ["s", "x"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "t"], ["y"], name="add")]
    return make_model(nodes, {"x": x}, ["y"], inits), {"x": x}


def _relu_maxpool(rng):
    x = _f32(rng.standard_normal((2, 3, 7, 6)))
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[3, 2], strides=[2, 2],
                              pads=[1, 0, 1, 0])]
    return make_model(nodes, {"x": x}, ["y"]), {"x": x}


FUSED = {
    "conv_bn": (_conv_bn, "Conv+BatchNormalization"),
    "conv_bn_nobias": (lambda r: _conv_bn(r, bias=False), "Conv+BatchNormalization"),
    "conv_bn_depthwise": (lambda r: _conv_bn(r, group=6), "Conv+BatchNormalization"),
    "hardswish_chain": (_hardswish_chain, "HardSwish(Add,Clip,Mul,Div)"),
    "hardswish_chain_swapped": (lambda r: _hardswish_chain(r, swap=True), "HardSwish(Add,Clip,Mul,Div)"),
    "hardsigmoid_mul": (_hardsigmoid_mul, "HardSwish(HardSigmoid,Mul)"),
    "silu": (_silu, "SiLU(Sigmoid,Mul)"),
    "matmul_add": (_matmul_add, "Linear(MatMul,Add)"),
    "conv_mul_add_scalars": (lambda r: _conv_affine(r, False, (1,), (1,)), "Conv+Mul+Add"),
    "conv_bn_mul_add_channels": (lambda r: _conv_affine(r, True, (1, 8, 1, 1), (8, 1, 1)),
                                 "Conv+BatchNormalization+Mul+Add"),
    "conv_add_channels": (lambda r: _conv_affine(r, False, None, (8, 1, 1)), "Conv+Add"),
    "conv_bn_mul_scalar": (lambda r: _conv_affine(r, True, (), None), "Conv+BatchNormalization+Mul"),
    "mul_add": (_mul_add, "Affine(Mul,Add)"),
    "relu_maxpool": (_relu_maxpool, "MaxPool+Relu"),
    "matmul_add_3d": (lambda r: _matmul_add(r, 3), "Linear(MatMul,Add)"),
}


def _ops(tg: TorchGraph) -> list[str]:
    return [s.op for s in tg.program().steps]


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_chain_equals_onnxruntime_and_unfused(name: str) -> None:
    build, label = FUSED[name]
    model, feeds = build(_rng(len(name)))
    ref = ort_run(model, feeds)
    fused = TorchGraph(model, requires_grad=False)
    assert _ops(fused) == [label]
    plain = TorchGraph(model, requires_grad=False, fuse=False)
    assert label not in _ops(plain)
    got, got_plain = torch_run(fused, feeds), torch_run(plain, feeds)
    assert_close(got[0], ref[0], what=name)
    assert_close(got[0], got_plain[0], what=f"{name} fused vs node by node", rel=1e-5)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_chain_gradients_equal_unfused(name: str) -> None:
    build, _ = FUSED[name]
    model, feeds = build(_rng(len(name)))
    grads = []
    for fuse in (True, False):
        tg = TorchGraph(model, fuse=fuse)
        x = torch_feeds(feeds)["x"].requires_grad_(True)
        (y,) = tg(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in tg.named_onnx_parameters() if p.grad is not None}})
    # a fused chain's scalar constants (3, 0, 6) are constants: no gradient reaches them
    assert grads[0].keys() <= grads[1].keys()
    assert all(tuple(grads[1][k].shape) == () for k in grads[1].keys() - grads[0].keys())
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5, msg=f"{name}: d/d{k}")


def test_fused_conv_bn_gradient_matches_finite_differences() -> None:
    """float64: d loss / d (conv weight, BN scale, mean, var) of the fused step by central differences."""
    model, feeds = _conv_bn(_rng(3))
    tg = TorchGraph(model).double()
    assert _ops(tg) == ["Conv+BatchNormalization"]
    x = torch.from_numpy(feeds["x"]).double()
    wts = torch.linspace(-1, 1, 2 * 8 * 9 * 7, dtype=torch.float64).reshape(2, 8, 9, 7)

    def loss() -> torch.Tensor:
        return (tg(x)[0] * wts).square().sum()

    loss().backward()
    for name, idx in (("W", (3, 2, 1, 0)), ("scale", (5,)), ("mean", (1,)), ("var", (7,)), ("B", (2,))):
        p = tg.parameter(name)
        eps = 1e-6
        with torch.no_grad():
            p[idx] += eps
            lp = float(loss())
            p[idx] -= 2 * eps
            lm = float(loss())
            p[idx] += eps
        numeric = (lp - lm) / (2 * eps)
        assert abs(numeric - float(p.grad[idx])) <= 1e-5 * max(1.0, abs(numeric)), (name, numeric, float(p.grad[idx]))


def test_inner_gate_or_override_unfuses_the_chain() -> None:
    model, feeds = _conv_bn(_rng(1))
    tg = TorchGraph(model, requires_grad=False)
    assert _ops(tg) == ["Conv+BatchNormalization"]
    (ref,) = torch_run(tg, feeds)
    # a gate on the Conv output (inner tensor): evaluated node by node, the gate applies
    gate = torch.ones(8)
    gate[[1, 4]] = 0.0
    tg.set_gate("c", 1, gate)
    assert _ops(tg) == ["Conv", "BatchNormalization"]
    (gated,) = torch_run(tg, feeds)
    bn = {n: tg.parameter(n).detach().numpy() for n in ("scale", "bias", "mean", "var")}
    shift = bn["bias"] - bn["mean"] * bn["scale"] / np.sqrt(bn["var"] + 1e-3)
    np.testing.assert_allclose(gated[:, [1, 4]], np.broadcast_to(shift[[1, 4], None, None], (2, 2, 9, 7)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.delete(gated, [1, 4], axis=1), np.delete(ref, [1, 4], axis=1), rtol=1e-5, atol=1e-5)
    tg.clear_gates()
    assert _ops(tg) == ["Conv+BatchNormalization"]
    # an override of the BN (what BN re-calibration does) is called, so BN is not fused
    seen = []

    def observe(node, inputs, ctx):
        seen.append(tuple(inputs[0].shape))
        from onnxprune.ops.registry import get_evaluator
        return get_evaluator("BatchNormalization", 17)(node, inputs, ctx)

    tg.override_node("bn", observe)
    assert _ops(tg) == ["Conv", "BatchNormalization"]
    (again,) = torch_run(tg, feeds)
    assert seen == [(2, 8, 9, 7)]
    np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-5)
    # an input gate on an inner node (the BN) unfuses too; one on the Conv (first link) does not
    tg.override_node("bn", None)
    tg.set_input_gate("conv", 0, 1, torch.ones(6))
    assert _ops(tg) == ["Conv+BatchNormalization"]
    tg.set_input_gate("bn", 0, 1, torch.ones(8))
    assert _ops(tg) == ["Conv", "BatchNormalization"]


def test_shared_inner_tensor_is_not_fused() -> None:
    """Add(x, 3) read by the Clip and by a graph output: the hard-swish chain stays nodes."""
    model, feeds = _hardswish_chain(_rng(0))
    model.graph.output.append(helper.make_value_info("a", onnx.TypeProto()))
    model = onnx.shape_inference.infer_shapes(model)
    tg = TorchGraph(model, requires_grad=False)
    assert "HardSwish(Add,Clip,Mul,Div)" not in _ops(tg)
    for g, r in zip(torch_run(tg, feeds), ort_run(model, feeds)):
        assert_close(g, r)


def test_conv_add_along_width_is_not_folded() -> None:
    """Add(conv, c) with c [W] broadcasts along the width, not the channels: no folding."""
    model, feeds = _conv_affine(_rng(2), False, None, (7,))
    tg = TorchGraph(model, requires_grad=False)
    assert _ops(tg) == ["Conv", "Add"]
    assert_close(torch_run(tg, feeds)[0], ort_run(model, feeds)[0])


def test_hardsigmoid_other_alpha_is_not_fused() -> None:
    x = _f32(_rng(0).standard_normal((2, 3, 4, 4)) * 4)
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], name="hs", alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["x", "h"], ["y"], name="mul")]
    model = make_model(nodes, {"x": x}, ["y"])
    tg = TorchGraph(model, requires_grad=False)
    assert _ops(tg) == ["HardSigmoid", "Mul"]
    assert_close(torch_run(tg, {"x": x})[0], ort_run(model, {"x": x})[0])


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_channels_last_equals_nchw(name: str) -> None:
    model = ALL_BUILDERS[name]()
    feeds = random_input(name, 1)
    a = torch_run(TorchGraph(model, requires_grad=False, channels_last=True), feeds)
    b = torch_run(TorchGraph(model, requires_grad=False, channels_last=False), feeds)
    for g, r in zip(a, b):
        assert_close(g, r, what=f"{name} channels_last vs NCHW", rel=1e-5)


def test_one_channel_conv_equals_onnxruntime_with_gradients() -> None:
    """A Conv reading one channel (torch's im2col kernel on CPU) equals onnxruntime; its
    gradients equal those of F.conv2d; its output is channels_last in that layout."""
    rng = _rng(5)
    x = _f32(rng.standard_normal((3, 1, 11, 10)))
    inits = {"W": _f32(rng.standard_normal((5, 1, 3, 3))), "B": _f32(rng.standard_normal(5))}
    model = make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 0, 1, 0],
                                         strides=[2, 1])], {"x": x}, ["y"], inits)
    ref = ort_run(model, {"x": x})
    tg = TorchGraph(model, channels_last=True)
    assert_close(torch_run(tg, {"x": x})[0], ref[0])
    xt = torch.from_numpy(x).requires_grad_(True)
    tg(xt)[0].square().sum().backward()
    w = torch.from_numpy(inits["W"]).requires_grad_(True)
    b = torch.from_numpy(inits["B"]).requires_grad_(True)
    x2 = torch.from_numpy(x).requires_grad_(True)
    torch.nn.functional.conv2d(x2, w, b, [2, 1], [1, 0]).square().sum().backward()
    for got, want in ((xt.grad, x2.grad), (tg.parameter("W").grad, w.grad), (tg.parameter("B").grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["chain", "se_block", "residual", "lenet"])
def test_grad_and_no_grad_forwards_agree(name: str) -> None:
    model = ALL_BUILDERS[name]()
    feeds = torch_feeds(random_input(name, 2))
    tg = TorchGraph(model)
    with torch.no_grad():
        a = tg(**feeds)
    b = tg(**feeds)
    assert all(t.requires_grad for t in b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_every_value_is_released_after_its_last_use(name: str) -> None:
    """Each slot read by a step is freed by the last step reading it (graph outputs excepted)."""
    tg = TorchGraph(ALL_BUILDERS[name]())
    prog = tg.program()
    last: dict[int, int] = {}
    for k, step in enumerate(prog.steps):
        for s in step.ins:
            if s:
                last[s] = k
    for s, k in last.items():
        if s not in prog.output_slots:
            assert s in prog.steps[k].frees, f"slot {s} is not freed by step {k} ({prog.steps[k].op})"
    for k, step in enumerate(prog.steps):
        assert not set(step.frees) & set(prog.output_slots)


def test_compile_is_off_by_default_and_refused_without_a_toolchain(monkeypatch) -> None:
    from onnxprune.errors import OnnxPruneError
    from onnxprune.executor import compiling

    assert compiling.compile_default() is False
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert "C++ compiler" in compiling.missing_toolchain("cpu")
    model, feeds = _silu(_rng(0))
    tg = TorchGraph(model, compile=True)
    with pytest.raises(OnnxPruneError, match="C\\+\\+ compiler"):
        tg(**torch_feeds(feeds))


def test_folded_weights_of_frozen_parameters_follow_in_place_changes() -> None:
    """With frozen parameters the folded Conv+BN weights are reused between passes, and
    recomputed after an in-place change of any of them (an optimizer step, ifso's copy_)."""
    model, feeds = _conv_bn(_rng(4))
    fused = TorchGraph(model, requires_grad=False)
    plain = TorchGraph(model, requires_grad=False, fuse=False)
    for name, change in (("scale", lambda p: p.mul_(2.0)), ("W", lambda p: p.add_(0.1)),
                         ("var", lambda p: p.copy_(p * 3.0))):
        for tg in (fused, plain):
            torch_run(tg, feeds)  # a pass with the old values
            with torch.no_grad():
                change(tg.parameter(name))
        assert_close(torch_run(fused, feeds)[0], torch_run(plain, feeds)[0], what=f"after changing {name}", rel=1e-5)


def test_conv_bn_with_a_weight_bigger_than_the_output_scales_the_output() -> None:
    """Trainable Conv+BN whose weight outnumbers its output (batch 1, small map): the
    scale is applied to the output; values and gradients equal the node-by-node ones."""
    rng = _rng(6)
    x = _f32(rng.standard_normal((1, 6, 2, 3)))
    inits = {"W": _f32(rng.standard_normal((16, 6, 3, 3)) * 0.3), "B": _f32(rng.standard_normal(16)),
             "scale": _f32(rng.uniform(0.5, 1.5, 16)), "bias": _f32(rng.standard_normal(16)),
             "mean": _f32(rng.standard_normal(16) * 0.1), "var": _f32(rng.uniform(0.5, 2.0, 16))}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    model = make_model(nodes, {"x": x}, ["y"], inits)
    ref = ort_run(model, {"x": x})
    grads = []
    for fuse in (True, False):
        tg = TorchGraph(model, fuse=fuse)
        assert ("Conv+BatchNormalization" in _ops(tg)) == fuse
        (y,) = tg(torch.from_numpy(x))
        assert_close(y.detach().numpy(), ref[0])
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append({n: p.grad for n, p in tg.named_onnx_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5, msg=f"d/d{k}")
