"""Sanity checks for the tiny ONNX test models in tiny_models.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tiny_models import (
    ALL_BUILDERS,
    INPUT_NAME,
    INPUT_SHAPES,
    IR_VERSION,
    OPSET,
    OUTPUT_NAME,
    OUTPUT_SHAPES,
    random_input,
)

NAMES = sorted(ALL_BUILDERS)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run([OUTPUT_NAME], feed)
    return out


def test_registry_tables_agree():
    assert set(OUTPUT_SHAPES) == set(ALL_BUILDERS) == set(INPUT_SHAPES)


@pytest.mark.parametrize("name", NAMES)
def test_model_is_valid(name):
    model = ALL_BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]

    g = model.graph
    assert [i.name for i in g.input] == [INPUT_NAME]
    dims = tuple(d.dim_value for d in g.input[0].type.tensor_type.shape.dim)
    assert dims == INPUT_SHAPES[name]
    assert [o.name for o in g.output] == [OUTPUT_NAME]

    node_names = [n.name for n in g.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    init_names = [i.name for i in g.initializer]
    assert len(set(init_names)) == len(init_names)
    for init in g.initializer:
        assert init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)

    # strict shape inference must give the declared output shape
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out_dims = tuple(d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim)
    assert out_dims == OUTPUT_SHAPES[name]


@pytest.mark.parametrize("name", NAMES)
def test_model_runs(name):
    model = ALL_BUILDERS[name]()
    out = _run(model, random_input(name, seed=1))
    assert out.dtype == np.float32
    assert out.shape == OUTPUT_SHAPES[name]
    assert np.all(np.isfinite(out))
    assert float(out.std()) > 1e-3, f"{name}: output is (nearly) constant"
    # the output must depend on the input
    out2 = _run(model, random_input(name, seed=2))
    assert not np.allclose(out, out2)


@pytest.mark.parametrize("name", NAMES)
def test_builders_are_deterministic(name):
    a = ALL_BUILDERS[name]().SerializeToString()
    b = ALL_BUILDERS[name]().SerializeToString()
    c = ALL_BUILDERS[name](seed=1).SerializeToString()
    assert a == b
    assert a != c
