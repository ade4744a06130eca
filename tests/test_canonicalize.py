"""Tests of onnxprune.canonicalize on tiny Paddle-style and "light"-zoo-style models."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.canonicalize import CanonicalResult, canonicalize

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(_run(a, feeds), _run(b, feeds), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def _const(name: str, array: np.ndarray, node_name: str = "") -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=node_name, value=numpy_helper.from_array(array.astype(np.float32)))


def _make_model(graph: onnx.GraphProto, opset: int = 13) -> onnx.ModelProto:
    # IR 8: helper.make_model's default IR version can be newer than onnxruntime reads.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _is_toposorted(model: onnx.ModelProto) -> bool:
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        if any(i not in known for i in node.input):
            return False
        known.update(node.output)
    return True


def paddle_style_model(batch: str | int = "N") -> onnx.ModelProto:
    """Conv -> BN -> Relu -> SE-style Mul -> Flatten-by-Shape -> MatMul, weights in Constant nodes.

    Nodes are deliberately out of order, some unnamed, and Identity nodes
    sit in the middle and in front of the graph output.
    """
    nodes = [
        # out of order on purpose: the consumer comes first
        helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
        _const("conv_w", RNG.standard_normal((4, 3, 3, 3)) * 0.3),
        _const("conv_b", RNG.standard_normal(4) * 0.1),
        helper.make_node("Conv", ["x", "conv_w_id", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["conv_w"], ["conv_w_id"]),
        _const("bn_scale", RNG.uniform(0.5, 1.5, 4)),
        _const("bn_bias", RNG.standard_normal(4) * 0.1),
        _const("bn_mean", RNG.standard_normal(4) * 0.1),
        _const("bn_var", RNG.uniform(0.5, 1.5, 4)),
        helper.make_node("BatchNormalization", ["conv", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn", epsilon=1e-5),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        # a foldable chain: half * two -> one (Mul of two constants)
        helper.make_node("Constant", [], ["two"], value_floats=[2.0]),
        helper.make_node("Mul", ["half", "two"], ["one"]),
        helper.make_node("Mul", ["relu", "one"], ["scaled"]),
        helper.make_node("Identity", ["scaled"], ["scaled_id"]),
        # flatten through Shape (batch must stay dynamic)
        helper.make_node("Shape", ["scaled_id"], ["shp"]),
        helper.make_node("Constant", [], ["idx0"], value_ints=[0]),
        helper.make_node("Gather", ["shp", "idx0"], ["n"], axis=0),
        helper.make_node("Constant", [], ["minus1"], value_ints=[-1]),
        helper.make_node("Concat", ["n", "minus1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["scaled_id", "flat_shape"], ["flat"]),
        _const("fc_w", RNG.standard_normal((4 * 6 * 6, 5)) * 0.1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["logits"]),
        helper.make_node("Identity", ["logits"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 5])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def light_style_model() -> onnx.ModelProto:
    """IR 3 model: weights filled by ConstantOfShape, shape initializers repeated in graph.input."""
    shape_w = numpy_helper.from_array(np.array([4, 3, 1, 1], np.int64), "w_shape")
    shape_b = numpy_helper.from_array(np.array([4], np.int64), "b_shape")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          [("s", RNG.uniform(0.5, 1.5, 4)), ("bb", RNG.standard_normal(4)), ("m", RNG.standard_normal(4)), ("v", RNG.uniform(0.5, 1.5, 4))]]
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="fill_w",
                         value=numpy_helper.from_array(np.array([0.01], np.float32))),
        helper.make_node("ConstantOfShape", ["b_shape"], ["b"], name="fill_b"),  # default value: float 0
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"], name="bn"),
    ]
    inits = [shape_w, shape_b, *bn]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "light", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


# ----------------------------------------------------------------------------- tests


def test_paddle_style_model_is_canonicalized():
    model = paddle_style_model()
    before = model.SerializeToString()
    res = canonicalize(model)
    assert isinstance(res, CanonicalResult) and res.changed
    assert model.SerializeToString() == before, "input model must not be mutated"
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    ops = _ops(out)
    assert ops["Constant"] == 0 and ops["Identity"] == 0
    assert ops["BatchNormalization"] == 1 and ops["Conv"] == 1
    assert "Shape" in ops, "a dynamic batch dim must not be folded into a constant"
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["out"]
    assert _is_toposorted(out)
    inits = {t.name for t in out.graph.initializer}
    assert {"conv_w", "bn_scale", "fc_w"} <= inits
    assert "one" in inits, "Mul of two constants should be folded"
    text = " | ".join(res.changes)
    assert "Constant node(s) into initializers" in text and "Identity" in text and "folded" in text
    for batch in (1, 3):
        feeds = {"x": RNG.standard_normal((batch, 3, 6, 6)).astype(np.float32)}
        _assert_same_outputs(model, out, feeds)


def test_symbolic_dims_stay_symbolic_and_value_info_filled():
    out = canonicalize(paddle_style_model()).model
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    vi = {v.name: v for v in out.graph.value_info}
    conv_out = next(n.output[0] for n in out.graph.node if n.op_type == "Conv")
    dims = vi[conv_out].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [4, 6, 6]


def test_second_pass_is_unchanged():
    first = canonicalize(paddle_style_model())
    second = canonicalize(first.model)
    assert not second.changed and second.changes == ()
    assert [n.name for n in second.model.graph.node] == [n.name for n in first.model.graph.node]


def test_light_style_constant_of_shape():
    model = light_style_model()
    res = canonicalize(model)
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    assert _ops(out) == Counter({"Conv": 1, "BatchNormalization": 1})
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.ir_version >= 4
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert w["w"].shape == (4, 3, 1, 1) and np.allclose(w["w"], 0.01)
    assert w["b"].dtype == np.float32 and not w["b"].any()
    assert "w_shape" not in w, "unused shape initializers are dropped"
    text = " | ".join(res.changes)
    assert "ConstantOfShape" in text and "graph.input" in text
    _assert_same_outputs(model, out, {"x": RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"value_float": 1.5}, np.array(1.5, np.float32)),
        ({"value_floats": [1.0, 2.0]}, np.array([1.0, 2.0], np.float32)),
        ({"value_int": 3}, np.array(3, np.int64)),
        ({"value_ints": [4, 5]}, np.array([4, 5], np.int64)),
        ({"value": numpy_helper.from_array(np.array([[1, 2]], np.int32))}, np.array([[1, 2]], np.int32)),
        (
            {"sparse_value": helper.make_sparse_tensor(
                numpy_helper.from_array(np.array([7.0, 9.0], np.float32), "v"),
                numpy_helper.from_array(np.array([1, 3], np.int64), "i"),
                [2, 2])},
            np.array([[0, 7], [0, 9]], np.float32),
        ),
    ],
)
def test_every_constant_attribute_kind(attrs, expected):
    elem = helper.np_dtype_to_tensor_dtype(expected.dtype)
    nodes = [
        helper.make_node("Constant", [], ["c"], **attrs),
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", elem, list(expected.shape))],
        [helper.make_tensor_value_info("y", elem, list(expected.shape))],
    )
    model = _make_model(graph)
    out = canonicalize(model).model
    assert _ops(out) == Counter({"Add": 1})
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), expected)
    x = np.ones(expected.shape, expected.dtype)
    _assert_same_outputs(model, out, {"x": x})


def test_identity_on_graph_output_keeps_output_name():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="id"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = _make_model(graph)
    out = canonicalize(model).model
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [("Relu", ["y"])]
    assert out.graph.output[0].name == "y"
    _assert_same_outputs(model, out, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})


def test_identity_between_graph_input_and_output_stays():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id"), helper.make_node("Neg", ["x"], ["z"], name="neg")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    model = _make_model(graph)
    res = canonicalize(model)
    assert not res.changed
    assert _ops(res.model) == Counter({"Identity": 1, "Neg": 1})


def test_constant_graph_output_is_kept():
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], name="k", value_floats=[1.0, 2.0]), helper.make_node("Neg", ["x"], ["y"], name="neg")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("k", TensorProto.FLOAT, [2])],
    )
    model = _make_model(graph)
    res = canonicalize(model)
    assert [o.name for o in res.model.graph.output] == ["y", "k"]
    _assert_same_outputs(model, res.model, {"x": np.ones(2, np.float32)})


def test_unnamed_and_duplicate_nodes_get_op_index_names():
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"], name="Relu_1"),
            helper.make_node("Abs", ["b"], ["c"]),
            helper.make_node("Sqrt", ["c"], ["y"], name="Relu_1"),  # duplicate name
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = _make_model(graph)
    res = canonicalize(model)
    assert [n.name for n in res.model.graph.node] == ["Relu_0", "Relu_1", "Abs_2", "Sqrt_3"]
    assert any("named 3" in c for c in res.changes)
    _assert_same_outputs(res.model, res.model, {"x": np.ones(2, np.float32)})  # runs: names are unique


def test_already_canonical_model_is_unchanged():
    w = numpy_helper.from_array(RNG.standard_normal((2, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )
    model = _make_model(graph)
    res = canonicalize(model)
    assert not res.changed and res.warnings == ()
    assert res.model is not model
    assert res.model.graph.node[0] == model.graph.node[0]


def test_fold_can_be_disabled():
    res = canonicalize(paddle_style_model(), fold=False)
    assert _ops(res.model)["Mul"] == 2 and not any("folded" in c for c in res.changes)


def test_random_ops_are_not_folded():
    graph = helper.make_graph(
        [
            helper.make_node("RandomNormal", [], ["noise"], name="rnd", shape=[2], dtype=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "noise"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    res = canonicalize(_make_model(graph))
    assert _ops(res.model) == Counter({"RandomNormal": 1, "Add": 1})
