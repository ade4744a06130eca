"""Tests of onnxprune.inputs: CLI shape parsing, shape resolution, random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputShapeError, UnsupportedModelError
from onnxprune.inputs import DEFAULT_SPATIAL, graph_inputs, make_inputs, parse_input_shape, resolve_input_shapes


def _vi(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def _model(*inputs: onnx.ValueInfoProto, initializers=()) -> onnx.ModelProto:
    """A model whose graph just declares the given inputs (the nodes are irrelevant here)."""
    first = inputs[0].name
    graph = helper.make_graph(
        [helper.make_node("Identity", [first], ["y"], name="id")],
        "g",
        list(inputs),
        [helper.make_tensor_value_info("y", inputs[0].type.tensor_type.elem_type, None)],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


# ----------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("x:1,3,224,224", ("x", (1, 3, 224, 224))),
        (" images : 2, 3,320 ,320 ", ("images", (2, 3, 320, 320))),
        ("input:0:1,3,8,8", ("input:0", (1, 3, 8, 8))),
        ("len:", ("len", ())),
        ("x:7", ("x", (7,))),
    ],
)
def test_parse_input_shape(spec, expected):
    assert parse_input_shape(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x", "expected NAME"),
        (":1,3", "name is empty"),
        ("x:1,a,3", "not an integer"),
        ("x:1,,3", "not an integer"),
        ("x:1,0,3", "must be positive"),
        ("x:1,-3,3", "must be positive"),
        ("x:1.5,3", "not an integer"),
    ],
)
def test_parse_input_shape_errors(spec, message):
    with pytest.raises(InputShapeError, match=message) as info:
        parse_input_shape(spec)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- resolve


def test_resolve_symbolic_and_unknown_dims():
    x = _vi("x", TensorProto.FLOAT, ["N", 3, "H", None])
    m = _model(x)
    m.graph.input[0].type.tensor_type.shape.dim[3].Clear()  # neither dim_value nor dim_param
    assert resolve_input_shapes(m) == {"x": (1, 3, DEFAULT_SPATIAL, DEFAULT_SPATIAL)}
    assert resolve_input_shapes(m, batch=4) == {"x": (4, 3, 224, 224)}


def test_resolve_paddle_minus_one_dim():
    m = _model(_vi("x", TensorProto.FLOAT, [-1, 3, "?", "?"]))
    assert resolve_input_shapes(m, batch=2) == {"x": (2, 3, 224, 224)}


def test_resolve_static_and_skips_initializers():
    w = numpy_helper.from_array(np.ones((3,), np.float32), "w")
    m = _model(_vi("x", TensorProto.FLOAT, [1, 3, 32, 32]), _vi("w", TensorProto.FLOAT, [3]), initializers=[w])
    assert [i.name for i in graph_inputs(m)] == ["x"]
    assert resolve_input_shapes(m, batch=8) == {"x": (1, 3, 32, 32)}


def test_resolve_overrides():
    m = _model(_vi("x", TensorProto.FLOAT, [1, 3, "H", "W"]), _vi("ids", TensorProto.INT64, ["N", 16]))
    shapes = resolve_input_shapes(m, {"x": (2, 3, 48, 192)}, batch=5)
    assert shapes == {"x": (2, 3, 48, 192), "ids": (5, 16)}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"y": (1, 3, 8, 8)}, "unknown input 'y'"),
        ({"x": (1, 3, 8)}, "rank 3"),
        ({"x": (1, 4, 8, 8)}, "fixes it to 3"),
        ({"x": (1, 3, 0, 8)}, "non-positive"),
    ],
)
def test_resolve_override_errors(override, message):
    m = _model(_vi("x", TensorProto.FLOAT, [1, 3, "H", "W"]))
    with pytest.raises(InputShapeError, match=message):
        resolve_input_shapes(m, override)


def test_resolve_batch_of_fixed_dim0_may_be_overridden():
    m = _model(_vi("x", TensorProto.FLOAT, [1, 3, 8, 8]))
    assert resolve_input_shapes(m, {"x": (4, 3, 8, 8)}) == {"x": (4, 3, 8, 8)}


def test_resolve_unknown_rank_needs_override():
    m = _model(_vi("x", TensorProto.FLOAT, None))
    with pytest.raises(InputShapeError, match="no declared shape"):
        resolve_input_shapes(m)
    assert resolve_input_shapes(m, {"x": (2, 2)}) == {"x": (2, 2)}


def test_resolve_bad_batch():
    with pytest.raises(InputShapeError, match="batch"):
        resolve_input_shapes(_model(_vi("x", TensorProto.FLOAT, ["N"])), batch=0)


# ----------------------------------------------------------------------------- make_inputs


def test_make_inputs_dtypes_and_seed():
    m = _model(
        _vi("x", TensorProto.FLOAT, ["N", 3]),
        _vi("h", TensorProto.FLOAT16, [2]),
        _vi("ids", TensorProto.INT64, [4]),
        _vi("mask", TensorProto.BOOL, [4]),
    )
    shapes = {"x": (2, 3), "h": (2,), "ids": (4,), "mask": (4,)}
    a = make_inputs(m, shapes, seed=3)
    b = make_inputs(m, shapes, seed=3)
    c = make_inputs(m, shapes, seed=4)
    assert a["x"].dtype == np.float32 and a["x"].shape == (2, 3)
    assert a["h"].dtype == np.float16
    assert a["ids"].dtype == np.int64 and not a["ids"].any()
    assert a["mask"].dtype == np.bool_ and not a["mask"].any()
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    assert a["x"].std() > 0


def test_make_inputs_standard_normal():
    m = _model(_vi("x", TensorProto.FLOAT, [1, 3, 64, 64]))
    x = make_inputs(m, {"x": (1, 3, 64, 64)})["x"]
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


def test_make_inputs_errors():
    m = _model(_vi("x", TensorProto.FLOAT, [1]))
    with pytest.raises(InputShapeError, match="no shape given for input 'x'"):
        make_inputs(m, {})
    s = _model(_vi("s", TensorProto.STRING, [1]))
    with pytest.raises(UnsupportedModelError, match="STRING"):
        make_inputs(s, {"s": (1,)})
