"""Models with a fixed batch dim (onnxprune.batching) through every data pass.

1. The rule: declared input shape / fixed batch (dim 0 a positive number), one-input check.
2. Micro-batching: every sample run once (padding dropped), outputs joined, a non
   batch-first output is an error naming it; torch outputs and gradients of the
   hard-coded ``Reshape([1, -1])`` model equal those of the same model with a free batch.
3. TorchGraph turns a torch failure into an OnnxPruneError naming node, op and shapes.
4. Criteria API: Taylor scores computed with ``calibration_batches(fixed=...)`` +
   ``Batch.forward`` on the fixed-batch model equal those of the free-batch model; the
   compress pipeline runs end to end with taylor / ifso / infcp and gives the plan of
   the free-batch model.
5. BN re-calibration is exact in inference mode: every BN's new statistics equal the
   numpy statistics of its input captured with onnxruntime on the re-calibrated model
   (BNs in sequence, a residual, a 2-D BN after Gemm), with a fixed batch of 1 and with a
   free batch in partial batches; all samples counted.
6. Fine-tuning with a fixed batch B > --batch-size, and N < B, trains every step and
   takes the same steps as the free-batch model; a teacher with other output sizes is a
   clear error.
7. evaluate: a non batch-first output of a fixed-batch model is an error naming it.
8. compress hands its analysis to the channel sweep.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxprune.batching import (declared_input_shape, fixed_batch, fixed_chunks, forward_fixed, require_one_input,
                                run_in_fixed_batches)
from onnxprune.canonicalize import canonicalize
from onnxprune.criteria.calibration import calibration_batches, scoring_setup
from onnxprune.criteria.gates import channel_gates
from onnxprune.data import CalibrationData, from_arrays
from onnxprune.errors import OnnxPruneError
from onnxprune.evaluate import evaluate
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.recover import FinetuneOptions, check_teacher, finetune, recalibrate_bn
from planted import analyze_tiny
from tiny_models import ALL_BUILDERS

ort.set_default_logger_severity(3)
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ helpers


def frg_pair():
    """(fixed, free): tiny flatten_reshape_gemm (Reshape hard-coded to [1, -1], input
    [1,3,16,16]) and the same weights with a free batch (Reshape [-1, 128])."""
    fixed = canonicalize(ALL_BUILDERS["flatten_reshape_gemm"]()).model
    free = onnx.ModelProto()
    free.CopyFrom(fixed)
    for t in free.graph.initializer:
        if t.name == "flatten.shape":
            t.CopyFrom(numpy_helper.from_array(np.array([-1, 128], np.int64), t.name))
    for vi in list(free.graph.input) + list(free.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    del free.graph.value_info[:]
    return fixed, free


def ort_run(model: onnx.ModelProto, x: np.ndarray, extra: tuple[str, ...] = ()) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {m.graph.input[0].name: x})


def ort_per_sample(model, x, extra=()):
    """onnxruntime outputs sample by sample (a batch-1 model), joined along dim 0."""
    parts = [ort_run(model, x[i:i + 1], extra) for i in range(len(x))]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def images(n: int, shape=(3, 16, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------ 1. the rule


def test_declared_shape_and_fixed_batch_rule():
    fixed, free = frg_pair()
    assert declared_input_shape(fixed) == [1, 3, 16, 16] and fixed_batch(fixed) == 1
    assert declared_input_shape(free) == [None, 3, 16, 16] and fixed_batch(free) is None
    paddle = onnx.ModelProto()
    paddle.CopyFrom(fixed)
    paddle.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # Paddle's "any"
    assert fixed_batch(paddle) is None
    paddle.graph.input[0].type.tensor_type.ClearField("shape")  # rank unknown
    assert declared_input_shape(paddle) is None and fixed_batch(paddle) is None
    CalibrationData(images(3), None).check(None)  # no declared shape: nothing to compare
    require_one_input(["x"], "thing")
    with pytest.raises(OnnxPruneError, match=r"thing supports models with one input, this one has 2 \(a, b\)"):
        require_one_input(["a", "b"], "thing")


# ------------------------------------------------------------------------------ 2. micro-batching


def test_fixed_chunks_use_every_sample_once_and_pad_the_last():
    x = np.arange(10)[:, None].astype(np.float32)
    got = list(fixed_chunks(x, 4))
    assert [len(c) for c, _ in got] == [4, 4, 4] and [r for _, r in got] == [4, 4, 2]
    assert got[-1][0][:, 0].tolist() == [8, 9, 9, 9]
    assert [r for _, r in fixed_chunks(x, None)] == [10] and list(fixed_chunks(x[:0], 3)) == []
    calls = []

    def run(chunk):
        calls.append(len(chunk))
        return [chunk * 2, chunk.sum(axis=1)]

    out = run_in_fixed_batches(run, x, 4, ["a", "b"])
    assert calls == [4, 4, 4]
    np.testing.assert_array_equal(out[0], x * 2)
    np.testing.assert_array_equal(out[1], x[:, 0])
    with pytest.raises(OnnxPruneError, match=r"m: output 'total' has shape \[\] for a batch of 4: it is not batch-first"):
        run_in_fixed_batches(lambda c: [c, c.sum()], x, 4, ["y", "total"], label="m")


def test_forward_fixed_matches_the_free_batch_model_with_gradients():
    fixed, free = frg_pair()
    x = torch.from_numpy(images(7))
    gf, gr = TorchGraph(fixed), TorchGraph(free)
    with pytest.raises(OnnxPruneError, match=r"node 'fc1' \(Gemm\) failed on inputs of shapes \[1, 896\]"):
        gf(x)  # 3. the raw torch error names the node
    (a,), (b,) = forward_fixed(gf, x, fixed_batch(fixed)), forward_fixed(gr, x, fixed_batch(free))
    assert a.shape == (7, 5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.detach().numpy(), ort_per_sample(fixed, x.numpy())[0], rtol=1e-4, atol=1e-5)
    (a * a).sum().backward()
    (b * b).sum().backward()
    for name, p in gf.named_onnx_parameters():
        ref = gr.parameter(name).grad
        # float32 sums over 7 samples in another order (micro-batches, fused kernels): compare
        # against the gradient's own scale, not an absolute 1e-6
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ------------------------------------------------------------------------------ 4. criteria


def taylor_by_hand(model, data, batch_size, use_api=True):
    """Taylor scores (ce, squared gate gradient of each logical batch's mean loss)."""
    analysis = analyze_tiny(model, "flatten_reshape_gemm")
    graph, loss_fn = scoring_setup("taylor", model, data, "ce", "cpu")
    G, _ = channel_gates(analysis, graph, "cpu", model=model)
    acc = torch.zeros(G.shape[0], dtype=torch.float64)
    for b in calibration_batches(data, batch_size, "cpu", fixed=fixed_batch(model) if use_api else None):
        assert len(b.x) in (batch_size, len(data) % batch_size)  # the logical batch, not the fixed one
        out = b.forward(graph)
        (grad,) = torch.autograd.grad(loss_fn(out, b.y, None), G)
        acc += grad.double() ** 2
    return acc.numpy()


def test_criteria_api_gives_the_free_batch_scores():
    fixed, free = frg_pair()
    data = CalibrationData(images(40), RNG.integers(0, 5, 40))
    want = taylor_by_hand(free, data, 16)
    got = taylor_by_hand(fixed, data, 16)
    assert want.max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * want.max())
    with pytest.raises(OnnxPruneError, match="node 'fc1' \\(Gemm\\)"):  # without fixed=: a clear error
        taylor_by_hand(fixed, data, 16, use_api=False)
    # the teacher's outputs come per logical batch too
    graph, _ = scoring_setup("t", fixed, data, "kl", "cpu")
    b = next(calibration_batches(data, 16, "cpu", graph, fixed=1))
    assert b.reference[0].shape == (16, 5) and b.x.shape[0] == 16


@pytest.mark.parametrize("criterion", ["taylor", "ifso", "infcp"])
def test_compress_runs_on_a_fixed_batch_model_like_on_the_free_one(tmp_path, criterion):
    from onnxprune.pipeline import CompressOptions, compress
    fixed, free = frg_pair()
    onnx.save(fixed, tmp_path / "fixed.onnx")
    onnx.save(free, tmp_path / "free.onnx")
    data = CalibrationData(images(24), RNG.integers(0, 5, 24))
    opts = CompressOptions(criterion=criterion, data=data, bench=False, batch_size=8, device="cpu")
    a = compress(tmp_path / "fixed.onnx", tmp_path / "a.onnx", opts)
    b = compress(tmp_path / "free.onnx", tmp_path / "b.onnx", opts)
    assert {g: list(v) for g, v in a.plan.removed.items()} == {g: list(v) for g, v in b.plan.removed.items()}


# ------------------------------------------------------------------------------ 5. BN re-calibration


def bn_model(batch: int | str = 1) -> onnx.ModelProto:
    """x[B,3,8,8] -> conv1 -> bn1 -> relu (t1) -> conv2 -> bn2 -> + t1 -> bn3 -> relu -> GAP
    -> Reshape([B, -1]) -> fc Gemm(6->5) -> bn4 (2-D) -> y[B,5]; stale BN statistics.
    ``batch`` an int hard-codes it in the input and the Reshape; a str leaves it free."""
    r = np.random.default_rng(3)
    inits, nodes = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def bn(name, x, c):
        nodes.append(helper.make_node("BatchNormalization", [x, const(f"{name}.scale", r.uniform(0.5, 2, c).astype(np.float32)),
                                                             const(f"{name}.bias", r.normal(0, .3, c).astype(np.float32)),
                                                             const(f"{name}.mean", r.normal(0, 1, c).astype(np.float32)),
                                                             const(f"{name}.var", r.uniform(.2, 3, c).astype(np.float32))],
                                      [f"{name}_out"], name=name, epsilon=1e-5))
        return f"{name}_out"

    def conv(name, x, cin, cout):
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.w", r.normal(0, .5, (cout, cin, 3, 3)).astype(np.float32)),
                                               const(f"{name}.b", r.normal(0, .5, cout).astype(np.float32))],
                                      [f"{name}_out"], name=name, pads=[1, 1, 1, 1]))
        return f"{name}_out"

    t1 = bn("bn1", conv("conv1", "x", 3, 6), 6)
    nodes.append(helper.make_node("Relu", [t1], ["t1"], name="relu1"))
    t = bn("bn2", conv("conv2", "t1", 6, 6), 6)
    nodes.append(helper.make_node("Add", [t, "t1"], ["add_out"], name="add"))
    t = bn("bn3", "add_out", 6)
    nodes.append(helper.make_node("Relu", [t], ["r3"], name="relu3"))
    nodes.append(helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"))
    shape = [batch, -1] if isinstance(batch, int) else [-1, 6]
    nodes.append(helper.make_node("Reshape", ["gap", const("flat.shape", np.array(shape, np.int64))], ["flat"],
                                  name="flat"))
    nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", r.normal(0, .5, (5, 6)).astype(np.float32)),
                                           const("fc.b", r.normal(0, .5, 5).astype(np.float32))], ["fc_out"],
                                  name="fc", transB=1))
    t = bn("bn4", "fc_out", 5)
    nodes.append(helper.make_node("Identity", [t], ["y"], name="out"))
    g = helper.make_graph(nodes, "bns", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


BN_INPUTS = {"bn1": "conv1_out", "bn2": "conv2_out", "bn3": "add_out", "bn4": "fc_out"}


@pytest.mark.parametrize("batch, batch_size", [(1, 4), ("N", 5), ("N", 64), (4, 3)])
def test_bn_statistics_are_those_of_the_recalibrated_model(batch, batch_size):
    model = bn_model(batch)
    x = images(23, (3, 8, 8), seed=1)
    res = recalibrate_bn(model, from_arrays(x), batch_size=batch_size)
    assert res.nodes == ("bn1", "bn2", "bn3", "bn4") and res.samples == 23
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    names = tuple(BN_INPUTS.values())
    if isinstance(batch, int):  # the deployed model takes B samples at a time
        xs = np.concatenate([x, np.repeat(x[-1:], (-len(x)) % batch, axis=0)])
        got = [ort_run(res.model, xs[i:i + batch], names)[1:] for i in range(0, len(xs), batch)]
        captured = [np.concatenate([g[j] for g in got])[:len(x)] for j in range(len(names))]
    else:
        captured = ort_run(res.model, x, names)[1:]
    for (bn, _), t in zip(BN_INPUTS.items(), captured):
        t = t.astype(np.float64)
        axes = (0,) + tuple(range(2, t.ndim))
        mean, var = t.mean(axis=axes), t.var(axis=axes)
        assert var.min() > 1e-3, bn  # a 2-D BN after Gemm no longer collapses to variance 0
        np.testing.assert_allclose(inits[f"{bn}.mean"], mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max())
        np.testing.assert_allclose(inits[f"{bn}.var"], var, rtol=1e-4, atol=1e-6)
    # the statistics moved from the stale ones for every BN
    stale = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(not np.allclose(stale[f"{bn}.mean"], inits[f"{bn}.mean"]) for bn in BN_INPUTS)


def test_bn_fixed_batch_and_free_batch_agree_and_few_samples_work():
    x = images(3, (3, 8, 8), seed=2)  # fewer samples than the fixed batch 4
    a = recalibrate_bn(bn_model(4), from_arrays(x))
    b = recalibrate_bn(bn_model("N"), from_arrays(x), batch_size=2)
    assert a.samples == b.samples == 3
    ia = {t.name: numpy_helper.to_array(t) for t in a.model.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.model.graph.initializer}
    for bn in BN_INPUTS:
        for k in ("mean", "var"):
            np.testing.assert_allclose(ia[f"{bn}.{k}"], ib[f"{bn}.{k}"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ 6. fine-tuning


def conv_fc(batch: int | str, classes: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x[B,3,8,8] -> Conv(3->4) -> Relu -> Reshape([B,-1]) -> Gemm(256->classes) -> y[B,classes]."""
    r = np.random.default_rng(seed)
    shape = [batch, -1] if isinstance(batch, int) else [-1, 256]
    inits = [numpy_helper.from_array(r.normal(0, .3, (4, 3, 3, 3)).astype(np.float32), "c.w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "c.b"),
             numpy_helper.from_array(np.array(shape, np.int64), "shape"),
             numpy_helper.from_array(r.normal(0, .1, (classes, 256)).astype(np.float32), "fc.w"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes = [helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("n, batch_size", [(6, 2), (3, 2), (7, 16)])
def test_finetune_with_fixed_batch_larger_than_the_step_trains_like_the_free_model(n, batch_size):
    x = images(n, (3, 8, 8), seed=4)
    y = RNG.integers(0, 5, n)
    opts = FinetuneOptions(epochs=2, lr=5e-2, batch_size=batch_size, device="cpu", optimizer="sgd")
    a = finetune(conv_fc(4), from_arrays(x, y), options=opts)
    b = finetune(conv_fc("N"), from_arrays(x, y), options=opts)
    steps = 2 * -(-n // batch_size)
    assert a.steps == b.steps == steps > 0
    assert a.loss_after < a.loss_before
    np.testing.assert_allclose(a.loss_before, b.loss_before, rtol=1e-5)
    wa = {t.name: numpy_helper.to_array(t) for t in a.model.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.model.graph.initializer}
    for name in ("c.w", "fc.w", "fc.b"):
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6)
    assert not np.allclose(wa["fc.w"], numpy_helper.to_array(conv_fc(4).graph.initializer[3]))


def test_teacher_with_other_output_sizes_is_a_clear_error():
    student, teacher = conv_fc("N", classes=4), conv_fc(1, classes=8)
    with pytest.raises(OnnxPruneError, match=r"--teacher t: output 'y' has shape \[1, 8\], but s's is \[\?, 4\]"):
        check_teacher(student, teacher, student_label="s", teacher_label="--teacher t")
    with pytest.raises(OnnxPruneError, match=r"output 'y' has shape \[1, 8\]"):
        finetune(student, from_arrays(images(4, (3, 8, 8))), teacher=teacher,
                 options=FinetuneOptions(device="cpu"))
    check_teacher(conv_fc("N"), conv_fc(1))  # only the batch differs: fine


# ------------------------------------------------------------------------------ 7. evaluate


def test_evaluate_rejects_a_non_batch_first_output_of_a_fixed_batch_model():
    m = conv_fc(1)
    m.graph.node.append(helper.make_node("ReduceSum", ["y", "axes0"], ["total"], name="sum", keepdims=0))
    m.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    m.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, [5]))
    x = images(3, (3, 8, 8))
    assert evaluate(m, from_arrays(x[:1]), batch_size=1).samples == 1  # one micro-batch: nothing to join
    with pytest.raises(OnnxPruneError, match=r"model: output 'total' has shape \[5\] for a batch of 1"):
        evaluate(m, from_arrays(x), batch_size=8)
    # batch-first outputs of a fixed-batch model: per sample, same as the free model
    res = evaluate(conv_fc(1), from_arrays(x, np.array([0, 1, 2])), reference=conv_fc("N"), batch_size=2)
    assert res.outputs["y"].max_abs_error < 1e-5 and res.accuracy is not None


# ------------------------------------------------------------------------------ 8. pipeline


def test_compress_hands_its_analysis_to_the_channel_sweep(tmp_path, monkeypatch):
    import onnxprune.pipeline as pipeline
    from onnxprune.planning import PlanOptions

    seen = {}

    class Stop(Exception):
        pass

    def fake(model, shapes, **kw):
        seen.update(kw)
        raise Stop

    import onnxprune.runtime.sweep as sweep

    monkeypatch.setattr(sweep, "channel_sweep", fake)
    onnx.save(ALL_BUILDERS["residual"](), tmp_path / "m.onnx")
    opts = dataclasses.replace(pipeline.CompressOptions(), plan=PlanOptions(round_to="auto"), bench=False,
                               use_cache=False)
    with pytest.raises(Stop):
        pipeline.compress(tmp_path / "m.onnx", tmp_path / "o.onnx", opts)
    assert seen["analysis"] is not None and hasattr(seen["analysis"], "groups")
