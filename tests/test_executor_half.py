"""Half-precision models: computed in float32 by the executor, end to end.

An all-float16 model (float16 initializers, inputs and outputs) goes through the
executor, taylor and ifso scoring, BN re-calibration, fine-tuning and evaluation; the
torch side computes in float32, so each result equals the one of the float32 model that
holds the same (float16-representable) values, and what is written back is float16.
bfloat16 initializers are handled the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxprune.criteria import get_criterion
from onnxprune.data import CalibrationData
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.recover import FinetuneOptions, finetune
from onnxprune.recover.bn import recalibrate_bn
from planted import analyze_tiny
from test_executor import assert_close, ort_run
from tiny_models import INPUT_NAME, build_chain, build_lenet, random_input


def _retype(model: onnx.ModelProto, to: int) -> onnx.ModelProto:
    """Copy of a float32 model with every float initializer, input, output and value_info in ``to``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            np_dt = helper.tensor_dtype_to_np_dtype(to)
            init.CopyFrom(numpy_helper.from_array(arr.astype(np_dt), init.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = to
    return out


def _to_f32(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def _lenet16():
    m16 = _retype(build_lenet(), TensorProto.FLOAT16)
    onnx.checker.check_model(m16)
    return m16, _to_f32(m16)


def _data(n: int = 24, labels: bool = True) -> CalibrationData:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64) if labels else None
    return CalibrationData(x, y)


def test_float16_model_parameters_are_float32_and_write_back_float16() -> None:
    m16, _ = _lenet16()
    tg = TorchGraph(m16)
    assert {p.dtype for _, p in tg.named_onnx_parameters()} == {torch.float32}
    x = random_input("lenet")[INPUT_NAME]
    ref = ort_run(m16, {INPUT_NAME: x.astype(np.float16)})
    with torch.no_grad():
        (got,) = tg(torch.from_numpy(x.astype(np.float16)))  # a float16 feed is cast up
    assert got.dtype == torch.float32
    assert_close(got.numpy().astype(np.float16), ref[0], rel=2e-3, abs_=1e-3)
    with torch.no_grad():
        tg.parameter("fc2.bias").add_(0.5)
    back = tg.write_back(m16)
    inits = {i.name: i for i in back.graph.initializer}
    assert inits["fc2.bias"].data_type == TensorProto.FLOAT16
    want = numpy_helper.to_array(next(i for i in m16.graph.initializer if i.name == "fc2.bias")).astype(np.float32) + 0.5
    np.testing.assert_array_equal(numpy_helper.to_array(inits["fc2.bias"]), want.astype(np.float16))


@pytest.mark.parametrize("crit", ["taylor", "ifso"])
def test_float16_model_scores_like_its_float32_twin(crit: str) -> None:
    """taylor / ifso on an all-float16 model (it used to fail: Input type (float) and bias
    type (c10::Half)) equal the scores of the float32 model with the same values."""
    m16, m32 = _lenet16()
    data = _data()
    scores = []
    for m in (m16, m32):
        a = analyze_tiny(_to_f32(m), "lenet")  # the analysis reads shapes only
        scores.append(get_criterion(crit).score_with_data(a, m, data, batch_size=8, device="cpu"))
    assert scores[0].keys() == scores[1].keys() and scores[0]
    for k in scores[0]:
        np.testing.assert_allclose(scores[0][k], scores[1][k], rtol=1e-5, atol=1e-12)
        assert np.isfinite(scores[0][k]).all()


def test_float16_model_finetunes_like_its_float32_twin() -> None:
    m16, m32 = _lenet16()
    data = _data()
    opts = FinetuneOptions(epochs=1, batch_size=8, lr=1e-3, device="cpu", loss="ce")
    r16, r32 = finetune(m16, data, options=opts), finetune(m32, data, options=opts)
    np.testing.assert_allclose(r16.loss_before, r32.loss_before, rtol=1e-6)
    np.testing.assert_allclose(r16.loss_after, r32.loss_after, rtol=1e-5)
    assert r16.loss_after != r16.loss_before
    i16 = {i.name: i for i in r16.model.graph.initializer}
    i32 = {i.name: numpy_helper.to_array(i) for i in r32.model.graph.initializer}
    for name in r16.trained:
        assert i16[name].data_type == TensorProto.FLOAT16, name
        np.testing.assert_allclose(numpy_helper.to_array(i16[name]).astype(np.float32),
                                   i32[name].astype(np.float16).astype(np.float32), rtol=0, atol=1e-3)


def test_float16_bn_model_recalibrates_and_evaluates() -> None:
    from onnxprune.evaluate import evaluate

    m16 = _retype(build_chain(), TensorProto.FLOAT16)
    x = np.random.default_rng(1).standard_normal((16,) + tuple(random_input("chain")[INPUT_NAME].shape[1:]))
    data = CalibrationData(x.astype(np.float32), None)
    rc = recalibrate_bn(m16, data, batch_size=8)
    rc32 = recalibrate_bn(_to_f32(m16), data, batch_size=8)
    assert rc.nodes and rc.nodes == rc32.nodes
    for init in rc.model.graph.initializer:
        ref = next(i for i in rc32.model.graph.initializer if i.name == init.name)
        assert init.data_type == TensorProto.FLOAT16, init.name
        np.testing.assert_allclose(numpy_helper.to_array(init).astype(np.float32),
                                   numpy_helper.to_array(ref).astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-4)
    ev = evaluate(rc.model, data, reference=m16, batch_size=8)
    assert ev is not None


def test_bfloat16_initializers_compute_in_float32() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    b16 = helper.make_tensor("B", TensorProto.BFLOAT16, [4, 5], w.reshape(-1).tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["a", "B"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])], [b16])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    tg = TorchGraph(model)
    p = tg.parameter("B")
    assert p.dtype == torch.float32
    wb = numpy_helper.to_array(b16).astype(np.float32)  # w rounded to bfloat16
    np.testing.assert_array_equal(p.detach().numpy(), wb)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        (y,) = tg(torch.from_numpy(a))
    np.testing.assert_allclose(y.numpy(), a @ wb, rtol=1e-6, atol=1e-6)
    back = {i.name: i for i in tg.write_back(model).graph.initializer}
    assert back["B"].data_type == TensorProto.BFLOAT16
