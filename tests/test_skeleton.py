"""Skeletons (large weights as graph inputs) compute what the model computes, and the
masked surgery oracle equals the zeroed one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis import analyze
from onnxprune.shapes import measure_shapes
from onnxprune.skeleton import infer_value_info, lift_weights, skeleton
from onnxprune.surgery.oracle import masked_reference, zeroed_reference
from tiny_models import ALL_BUILDERS, INPUT_NAME, INPUT_SHAPES, random_input


def _model(big: int = 80, small: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, big)).astype(np.float32), "w")  # 64 x 80 > 4096: lifted
    b = numpy_helper.from_array(rng.standard_normal((small,)).astype(np.float32), "b")  # kept
    shape = numpy_helper.from_array(np.array([1, big], dtype=np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Reshape", ["y", "shape"], ["z"], name="rs")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, big])], [w, b, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})


def test_skeleton_lifts_only_large_weights_and_leaves_the_model_unchanged():
    m = _model()
    before = m.SerializeToString()
    skel, lifted = skeleton(m)
    assert lifted == ["w"]
    assert [t.name for t in skel.graph.initializer] == ["b", "shape"]
    assert [i.name for i in skel.graph.input] == ["x", "w"]
    assert m.SerializeToString() == before


def test_skeleton_of_a_model_without_large_weights_is_the_model():
    m = _model(big=8)
    skel, lifted = skeleton(m)
    assert lifted == []
    assert skel.SerializeToString() == m.SerializeToString()


def test_lifted_run_equals_the_model_run():
    m = _model()
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    lifted = lift_weights(m)
    # to rounding: onnxruntime prepacks constant MatMul weights, not fed ones
    np.testing.assert_allclose(_run(lifted.model, {"x": x, **lifted.weights})[0], _run(m, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_infer_value_info_fills_shapes_without_the_weights():
    m = _model()
    infer_value_info(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    assert shapes["y"] == [1, 80]
    assert [t.name for t in m.graph.initializer] == ["w", "b", "shape"]


def test_masked_reference_equals_zeroed_reference_on_tiny_models():
    # to rounding: a weight fed as an input takes onnxruntime's unpacked GEMM path
    for name, build in ALL_BUILDERS.items():
        model = build()
        analysis = analyze(model, measure_shapes(model, {INPUT_NAME: INPUT_SHAPES[name]}))
        removed = {g.id: np.array([0]) for g in analysis.groups if g.prunable and g.size > 1 and g.blocks == 1}
        feeds = random_input(name, seed=2)
        zeroed = _run(zeroed_reference(model, analysis, removed), feeds)
        ref = masked_reference(model, analysis, removed)
        got = _run(ref.model, {**feeds, **ref.feeds(zeroed=True)})
        plain = _run(ref.model, {**feeds, **ref.feeds(zeroed=False)})
        for a, b in zip(got, zeroed):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        for a, b in zip(plain, _run(model, feeds)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
