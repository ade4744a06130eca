"""Shared fixtures of the criterion tests: the tiny LeNet with planted channels.

conv2 channel ``dead`` gets an all-zero filter and bias (removing it provably does not
change anything); channel ``dominant`` gets its fc1 columns scaled x10 (after the
Flatten, conv2 channel c is read by fc1 columns [25c, 25c + 25)).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxprune.analysis import Analysis, analyze
from onnxprune.data import CalibrationData
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.shapes import measure_shapes
from tiny_models import INPUT_NAME, INPUT_SHAPES, build_lenet


def analyze_tiny(model: onnx.ModelProto, name: str) -> Analysis:
    """Analysis of tiny model ``name`` at its test input shape."""
    return analyze(model, measure_shapes(model, {INPUT_NAME: INPUT_SHAPES[name]}))


def get_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    """A copy of initializer ``name``."""
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name).copy()


def set_weight(model: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    """Replace initializer ``name`` by ``arr`` as float32."""
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))


def planted_lenet(dead: int, dominant: int) -> onnx.ModelProto:
    """The tiny LeNet (seed 0) with conv2 channel ``dead`` zeroed and ``dominant``'s fc1 columns x10."""
    model = build_lenet(seed=0)
    w, b = get_weight(model, "conv2.weight"), get_weight(model, "conv2.bias")
    w[dead] = 0.0
    b[dead] = 0.0
    set_weight(model, "conv2.weight", w)
    set_weight(model, "conv2.bias", b)
    fc1 = get_weight(model, "fc1.weight")  # [200, 1600]
    fc1[:, 25 * dominant:25 * dominant + 25] *= 10.0
    set_weight(model, "fc1.weight", fc1)
    return model


def argmax_data(model: onnx.ModelProto, n: int, seed: int) -> CalibrationData:
    """``n`` N(0, 1) LeNet inputs [n, 1, 28, 28] labelled with ``model``'s own argmax."""
    x = np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        y = TorchGraph(model, requires_grad=False)(torch.from_numpy(x))[0].argmax(1).numpy().astype(np.int64)
    return CalibrationData(x, y)
