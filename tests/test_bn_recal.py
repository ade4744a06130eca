"""BN re-calibration and bias compensation (onnxprune.recover.bn / .bias).

1. Bias compensation: on a model whose removed channels are exactly constant (BN scale 0,
   bias > 0, then ReLU), the compensated pruned model equals the original in onnxruntime
   (Conv, Gemm, MatMul + Add, bare MatMul readers), while the uncompensated one does not.
2. The measured means are the numpy means of the consumer inputs captured with onnxruntime.
3. BN re-calibration writes the numpy mean / variance of each BN's input, captured with
   onnxruntime: for the first BN over several batches (Chan's update), for every BN when the
   data is one batch (later BNs see inputs normalised with the new statistics).
4. A model without BN comes back unchanged; no samples is an error.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxprune.analysis import analyze
from onnxprune.data import from_arrays
from onnxprune.errors import OnnxPruneError
from onnxprune.recover import activation_means, activation_moments, compensate_bias, recalibrate_bn, removed_sites
from onnxprune.shapes import measure_shapes
from onnxprune.surgery import apply_plan
from tiny_models import INPUT_NAME, build_const_channel, build_flatten_gemm

ort.set_default_logger_severity(3)


def run(model: onnx.ModelProto, x: np.ndarray, extra: tuple[str, ...] = ()) -> list[np.ndarray]:
    """onnxruntime outputs of ``model`` on ``x``: the graph outputs, then the ``extra`` tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra:
        m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x})


def data(n: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def plan_for(model):
    a = analyze(model, measure_shapes(model, {INPUT_NAME: (2, 3, 8, 8)}))
    removed = {a.group("conv1").id: np.array([1]), a.group("conv3").id: np.array([2])}
    return a, removed


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# ------------------------------------------------------------------------------ bias compensation


@pytest.mark.parametrize("linear", ["gemm", "matmul", "matmul_nobias"])
def test_compensation_of_constant_channels_is_exact(linear):
    model = build_const_channel(linear=linear)
    a, removed = plan_for(model)
    pruned = apply_plan(model, a, removed)
    x = data()
    want = run(model, x)[0]
    plain = run(pruned, x)[0]
    assert np.abs(plain - want).max() > 0.05  # the constant channels mattered

    sites = removed_sites(model, a, removed)
    assert {(s.node, s.index) for s in sites} == {("conv2", 0), ("fc", 0)}
    means = activation_means(model, sites, from_arrays(x), batch_size=5)
    comp = compensate_bias(pruned, model, a, removed, means)
    assert set(comp.nodes) == {"conv2", "fc"} and comp.skipped == ()
    onnx.checker.check_model(comp.model, full_check=True)
    got = run(comp.model, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the input model is untouched
    assert np.array_equal(run(pruned, x)[0], plain)


def test_measured_means_are_the_consumer_input_means():
    model = build_const_channel()
    a, removed = plan_for(model)
    x = data(10)
    sites = removed_sites(model, a, removed)
    means = activation_means(model, sites, from_arrays(x), batch_size=3)
    relu1, flat = run(model, x, ("relu1_out", "flatten_out"))[1:]
    np.testing.assert_allclose(means[("conv2", 0)], relu1.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(means[("fc", 0)], flat.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-7)
    assert means[("conv2", 0)][1] == pytest.approx(0.7, rel=1e-6)
    np.testing.assert_allclose(means[("fc", 0)][8:12], 0.5, rtol=1e-6)


def test_only_nearly_constant_channels_are_folded_when_spreads_are_given():
    model = build_const_channel()
    a, _ = plan_for(model)
    removed = {a.group("conv1").id: np.array([0, 1])}  # channel 1 is the constant 0.7, channel 0 varies
    pruned = apply_plan(model, a, removed)
    x = data(8)
    sites = removed_sites(model, a, removed)
    moments = activation_moments(model, sites, from_arrays(x), batch_size=3)
    m, sd = moments[("conv2", 0)]
    relu1 = run(model, x, ("relu1_out",))[1].astype(np.float64)
    np.testing.assert_allclose(sd, relu1.std(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    assert sd[1] < 1e-6 and sd[0] > 0.1 * abs(m[0]) > 0
    means = {k: mm for k, (mm, _) in moments.items()}
    stds = {k: ss for k, (_, ss) in moments.items()}
    by_cv = compensate_bias(pruned, model, a, removed, means, stds)
    # the same as folding channel 1 alone (channel 0's mean withheld)
    only_const = {k: np.where(np.arange(len(v)) == 1, v, 0.0) for k, v in means.items()}
    want = run(compensate_bias(pruned, model, a, removed, only_const).model, x)[0]
    np.testing.assert_allclose(run(by_cv.model, x)[0], want, rtol=1e-6, atol=1e-6)
    every = run(compensate_bias(pruned, model, a, removed, means).model, x)[0]
    assert np.abs(every - want).max() > 1e-3  # folding channel 0 too would differ


def test_compensation_creates_a_missing_conv_bias():
    model = build_const_channel()
    for node in model.graph.node:  # drop conv2's bias
        if node.name == "conv2":
            del node.input[2]
    a, removed = plan_for(model)
    pruned = apply_plan(model, a, removed)
    x = data(6)
    means = activation_means(model, removed_sites(model, a, removed), from_arrays(x))
    comp = compensate_bias(pruned, model, a, removed, means)
    conv2 = next(n for n in comp.model.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3
    np.testing.assert_allclose(run(comp.model, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ BN re-calibration


def test_first_bn_gets_the_data_statistics_over_batches():
    model = build_const_channel()
    x = data(23, seed=1)
    res = recalibrate_bn(model, from_arrays(x), batch_size=4)  # 6 batches, the last one of 3
    assert res.nodes == ("bn1", "bn3") and res.samples == 23
    conv1 = run(model, x, ("conv1_out",))[1].astype(np.float64)
    np.testing.assert_allclose(init(res.model, "bn1.mean"), conv1.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(init(res.model, "bn1.var"), conv1.var(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # the stored statistics moved, scale and bias did not
    assert not np.allclose(init(model, "bn1.mean"), init(res.model, "bn1.mean"))
    assert np.array_equal(init(model, "bn1.scale"), init(res.model, "bn1.scale"))
    assert np.array_equal(init(model, "bn3.bias"), init(res.model, "bn3.bias"))


def test_one_batch_gives_every_bn_its_measured_statistics():
    model = build_const_channel()
    x = data(16, seed=2)
    res = recalibrate_bn(model, from_arrays(x), batch_size=64)
    # capture the BN inputs in the re-calibrated model: they are what the statistics describe
    conv1, conv3 = (t.astype(np.float64) for t in run(res.model, x, ("conv1_out", "conv3_out"))[1:])
    for bn, t in (("bn1", conv1), ("bn3", conv3)):
        np.testing.assert_allclose(init(res.model, f"{bn}.mean"), t.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(init(res.model, f"{bn}.var"), t.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    # normalised with its own statistics, each BN input channel now has mean ~0 after BN
    bn1 = run(res.model, x, ("bn1_out",))[1].astype(np.float64)
    scale, bias = init(res.model, "bn1.scale"), init(res.model, "bn1.bias")
    np.testing.assert_allclose(bn1.mean(axis=(0, 2, 3)), bias, atol=1e-4)
    np.testing.assert_allclose(bn1.std(axis=(0, 2, 3)), np.abs(scale), rtol=1e-3, atol=1e-4)


def test_model_without_bn_is_unchanged_and_no_samples_is_an_error():
    model = build_flatten_gemm()
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    res = recalibrate_bn(model, from_arrays(x))
    assert res.nodes == () and res.model.SerializeToString() == model.SerializeToString()
    empty = from_arrays(x)
    object.__setattr__(empty, "x", x[:0])
    with pytest.raises(OnnxPruneError, match="at least one calibration sample"):
        recalibrate_bn(build_const_channel(), empty)


@pytest.mark.parametrize("recal_better", [True, False])
def test_recalibration_is_kept_only_when_the_held_out_figure_does_not_drop(recal_better):
    from onnxprune.recover import recover

    model = build_const_channel(seed=0)
    a, removed = plan_for(model)
    pruned = apply_plan(model, a, removed)
    calib = from_arrays(data())

    def validate(m):  # the plain cut scores 50; anything else (the re-calibrated model) 60 or 40
        return 50.0 if m is pruned else (60.0 if recal_better else 40.0)

    rec = recover(model, pruned, a, removed, calib, recalibrate=True, validate=validate)
    held = rec.info["bn_recalibration"]["held_out"]
    assert held == {"before": 50.0, "after": 60.0 if recal_better else 40.0, "kept": recal_better}
    assert (rec.model is pruned) is (not recal_better)
