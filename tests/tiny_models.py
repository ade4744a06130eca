"""Small, deterministic float32 ONNX models for tests.

Every builder ``build_<name>(seed=0) -> onnx.ModelProto`` returns a model with opset 17,
IR version 8, weights stored as initializers (random from ``np.random.default_rng(seed)``,
He-scaled so activations stay O(1)), one graph input named ``"x"`` (shape
``[1, 3, 16, 16]`` unless stated) and one named graph output ``"y"``. Every node has a
unique name; initializers are named ``<node>.weight`` / ``<node>.bias`` / ... after the
node that owns them, intermediate tensors ``<node>_out``.

Channel widths are small and mostly distinct so that an off-by-one in channel
bookkeeping shows up as a shape error rather than passing silently.

``ALL_BUILDERS`` maps a model name (variants included) to a zero-argument builder;
``OUTPUT_SHAPES`` and ``INPUT_SHAPES`` give the expected graph output / input shape for
each name.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
INPUT_NAME = "x"
OUTPUT_NAME = "y"
DEFAULT_INPUT_SHAPE = (1, 3, 16, 16)


class _GraphBuilder:
    """Tiny helper that accumulates nodes and initializers with unique names."""

    def __init__(self, graph_name: str, seed: int) -> None:
        self.graph_name = graph_name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- primitives -------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r} in {self.graph_name}")
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self._claim(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name=name))
        return name

    def const_f32(self, name: str, array) -> str:
        return self.init(name, np.asarray(array, dtype=np.float32))

    def const_i64(self, name: str, array) -> str:
        return self.init(name, np.asarray(array, dtype=np.int64))

    def node(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[str],
        n_outputs: int = 1,
        outputs: Sequence[str] | None = None,
        **attrs,
    ) -> str | list[str]:
        """Add a node; returns its output name (or list of names if several)."""
        self._claim(name)
        if outputs is None:
            outputs = [f"{name}_out"] if n_outputs == 1 else [f"{name}_out{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def normal(self, shape: Sequence[int], std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)

    def uniform(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, size=shape).astype(np.float32)

    # -- layers -----------------------------------------------------------------------
    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = True,
        output: str | None = None,
    ) -> str:
        if pad is None:
            pad = k // 2
        fan_in = (cin // group) * k * k
        w = self.const_f32(f"{name}.weight", self.normal((cout, cin // group, k, k), np.sqrt(2.0 / fan_in)))
        inputs = [x, w]
        if bias:
            inputs.append(self.const_f32(f"{name}.bias", self.normal((cout,), 0.1)))
        return self.node(
            "Conv",
            name,
            inputs,
            outputs=[output] if output else None,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
            dilations=[1, 1],
            group=group,
        )

    def bn(self, name: str, x: str, c: int) -> str:
        scale = self.const_f32(f"{name}.scale", self.uniform((c,), 0.5, 1.5))
        b = self.const_f32(f"{name}.bias", self.normal((c,), 0.1))
        mean = self.const_f32(f"{name}.mean", self.normal((c,), 0.1))
        var = self.const_f32(f"{name}.var", self.uniform((c,), 0.5, 1.5))
        return self.node("BatchNormalization", name, [x, scale, b, mean, var], epsilon=1e-5)

    def act(self, op_type: str, name: str, x: str, **attrs) -> str:
        return self.node(op_type, name, [x], **attrs)

    def gemm(self, name: str, x: str, fin: int, fout: int, output: str | None = None) -> str:
        w = self.const_f32(f"{name}.weight", self.normal((fout, fin), np.sqrt(2.0 / fin)))
        b = self.const_f32(f"{name}.bias", self.normal((fout,), 0.1))
        return self.node("Gemm", name, [x, w, b], outputs=[output] if output else None, transB=1)

    # -- finish -----------------------------------------------------------------------
    def model(
        self,
        output: str,
        output_shape: Sequence[int],
        input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.graph_name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(output_shape))],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="onnxprune-tests",
            ir_version=IR_VERSION,
        )
        return model


# -------------------------------------------------------------------------------------
# builders
# -------------------------------------------------------------------------------------


def build_chain(seed: int = 0) -> onnx.ModelProto:
    """Plain chain.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3, pad 1, bias) -> bn1 BatchNormalization -> relu1 Relu
      -> conv2 Conv(8->12, 3x3, pad 1) -> relu2 Relu
      -> conv3 Conv(12->16, 1x1) -> y[1,16,16,16]   (graph output: channels fixed)
    """
    g = _GraphBuilder("chain", seed)
    t = g.conv("conv1", INPUT_NAME, 3, 8, 3)
    t = g.bn("bn1", t, 8)
    t = g.act("Relu", "relu1", t)
    t = g.conv("conv2", t, 8, 12, 3)
    t = g.act("Relu", "relu2", t)
    g.conv("conv3", t, 12, 16, 1, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 16, 16, 16])


def build_residual(seed: int = 0) -> onnx.ModelProto:
    """Two residual blocks sharing one 8-channel group.

    x[1,3,16,16]
      -> stem Conv(3->8, 3x3) -> stem_relu Relu                         = s0
      block1: b1_conv1 Conv(8->8) -> b1_bn1 BN -> b1_relu Relu
              -> b1_conv2 Conv(8->8) -> b1_bn2 BN
      b1_add Add(block1, s0) -> b1_out_relu Relu                          = s1
      block2: same layout (b2_*) on s1
      b2_add Add(block2, s1) -> b2_out_relu Relu
      -> head Conv(8->4, 1x1) -> gap GlobalAveragePool -> flatten Flatten -> y[1,4]
    """
    g = _GraphBuilder("residual", seed)
    t = g.conv("stem", INPUT_NAME, 3, 8, 3)
    s = g.act("Relu", "stem_relu", t)
    for b in ("b1", "b2"):
        t = g.conv(f"{b}_conv1", s, 8, 8, 3, bias=False)
        t = g.bn(f"{b}_bn1", t, 8)
        t = g.act("Relu", f"{b}_relu", t)
        t = g.conv(f"{b}_conv2", t, 8, 8, 3, bias=False)
        t = g.bn(f"{b}_bn2", t, 8)
        t = g.node("Add", f"{b}_add", [t, s])
        s = g.act("Relu", f"{b}_out_relu", t)
    t = g.conv("head", s, 8, 4, 1)
    t = g.node("GlobalAveragePool", "gap", [t])
    g.node("Flatten", "flatten", [t], outputs=[OUTPUT_NAME], axis=1)
    return g.model(OUTPUT_NAME, [1, 4])


def build_concat(seed: int = 0) -> onnx.ModelProto:
    """Two branches concatenated on the channel axis.

    x[1,3,16,16]
      -> stem Conv(3->8, 3x3) -> stem_relu Relu
         -> branch_a Conv(8->6, 3x3) -> relu_a Relu  --\\
         -> branch_b Conv(8->10, 1x1) -> relu_b Relu --+-> concat Concat(axis=1) [16 ch]
      -> head Conv(16->8, 3x3) -> y[1,8,16,16]
    """
    g = _GraphBuilder("concat", seed)
    t = g.conv("stem", INPUT_NAME, 3, 8, 3)
    s = g.act("Relu", "stem_relu", t)
    a = g.act("Relu", "relu_a", g.conv("branch_a", s, 8, 6, 3))
    b = g.act("Relu", "relu_b", g.conv("branch_b", s, 8, 10, 1))
    t = g.node("Concat", "concat", [a, b], axis=1)
    g.conv("head", t, 16, 8, 3, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 8, 16, 16])


def build_depthwise(seed: int = 0) -> onnx.ModelProto:
    """MobileNet-style depthwise-separable block.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3) -> relu1 Relu
      -> dw Conv(8->8, 3x3, group=8, no bias) -> dw_bn BN -> relu6 Clip(0, 6)
      -> pw Conv(8->12, 1x1) -> relu2 Relu
      -> head Conv(12->4, 1x1) -> y[1,4,16,16]
    """
    g = _GraphBuilder("depthwise", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 8, 3))
    t = g.conv("dw", t, 8, 8, 3, group=8, bias=False)
    t = g.bn("dw_bn", t, 8)
    lo = g.const_f32("relu6.min", np.float32(0.0))
    hi = g.const_f32("relu6.max", np.float32(6.0))
    t = g.node("Clip", "relu6", [t, lo, hi])
    t = g.act("Relu", "relu2", g.conv("pw", t, 8, 12, 1))
    g.conv("head", t, 12, 4, 1, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 4, 16, 16])


def build_grouped(seed: int = 0) -> onnx.ModelProto:
    """Grouped (non-depthwise) convolution.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3) -> relu1 Relu
      -> gconv Conv(8->12, 3x3, group=4, bias)  (2 in / 3 out channels per group)
      -> relu2 Relu
      -> head Conv(12->6, 1x1) -> y[1,6,16,16]
    """
    g = _GraphBuilder("grouped", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 8, 3))
    t = g.act("Relu", "relu2", g.conv("gconv", t, 8, 12, 3, group=4, bias=True))
    g.conv("head", t, 12, 6, 1, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 6, 16, 16])


def build_se_block(seed: int = 0, activation: str = "hardswish") -> onnx.ModelProto:
    """Squeeze-and-excitation block.

    activation="hardswish" (MobileNetV3 style):
    x[1,3,16,16]
      -> conv1 Conv(3->16, 3x3) -> act HardSwish                        = f
      SE: se_pool GlobalAveragePool -> se_reduce Conv(16->4, 1x1, bias) -> se_relu Relu
          -> se_expand Conv(4->16, 1x1, bias) -> se_gate HardSigmoid   = s
      se_mul Mul(f, s) -> head Conv(16->8, 3x3) -> y[1,8,16,16]

    activation="silu" (EfficientNet style): act is act_sigmoid Sigmoid + act_mul Mul(f, .)
    and se_gate is Sigmoid instead of HardSigmoid.
    """
    if activation not in ("hardswish", "silu"):
        raise ValueError(f"activation must be 'hardswish' or 'silu', got {activation!r}")
    g = _GraphBuilder(f"se_block_{activation}", seed)
    t = g.conv("conv1", INPUT_NAME, 3, 16, 3)
    if activation == "hardswish":
        f = g.act("HardSwish", "act", t)
    else:
        sig = g.act("Sigmoid", "act_sigmoid", t)
        f = g.node("Mul", "act_mul", [t, sig])
    s = g.node("GlobalAveragePool", "se_pool", [f])
    s = g.conv("se_reduce", s, 16, 4, 1, bias=True)
    s = g.act("Relu", "se_relu", s)
    s = g.conv("se_expand", s, 4, 16, 1, bias=True)
    if activation == "hardswish":
        s = g.act("HardSigmoid", "se_gate", s, alpha=1.0 / 6.0, beta=0.5)
    else:
        s = g.act("Sigmoid", "se_gate", s)
    t = g.node("Mul", "se_mul", [f, s])
    g.conv("head", t, 16, 8, 3, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 8, 16, 16])


def build_split(seed: int = 0) -> onnx.ModelProto:
    """C2f-like Split / Concat.

    x[1,3,16,16]
      -> conv1 Conv(3->12, 3x3) -> relu1 Relu
      -> split Split(axis=1, split=[4, 8] as int64 input)
         part a [4 ch]: conv_a Conv(4->6, 3x3)      --\\
         part b [8 ch]: relu_b Relu                  --+-> concat Concat(axis=1) [14 ch]
      -> head Conv(14->5, 1x1) -> y[1,5,16,16]
    """
    g = _GraphBuilder("split", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 12, 3))
    sizes = g.const_i64("split.split", [4, 8])
    a, b = g.node("Split", "split", [t, sizes], n_outputs=2, axis=1)
    a = g.conv("conv_a", a, 4, 6, 3)
    b = g.act("Relu", "relu_b", b)
    t = g.node("Concat", "concat", [a, b], axis=1)
    g.conv("head", t, 14, 5, 1, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 5, 16, 16])


def build_flatten_gemm(seed: int = 0, flatten: str = "flatten", linear: str = "gemm") -> onnx.ModelProto:
    """Conv feature map flattened into fully connected layers.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3, stride 2, pad 1) [8,8,8] -> relu1 Relu
      -> pool MaxPool(2x2, stride 2) [8,4,4]
      -> flatten Flatten(axis=1)              (flatten="flatten")
         | flatten Reshape(shape=[1,-1])      (flatten="reshape")       [1,128]
      -> fc1 Gemm(128->10, transB=1)          (linear="gemm")
         | fc1 MatMul(W[128,10]) -> fc1_add Add(b[10])   (linear="matmul")
      -> relu2 Relu
      -> fc2 (same kind as fc1, 10->5) -> y[1,5]
    Channel c of conv1 maps to Flatten columns [16c, 16c+16).
    """
    if flatten not in ("flatten", "reshape"):
        raise ValueError(f"flatten must be 'flatten' or 'reshape', got {flatten!r}")
    if linear not in ("gemm", "matmul"):
        raise ValueError(f"linear must be 'gemm' or 'matmul', got {linear!r}")
    g = _GraphBuilder(f"flatten_gemm_{flatten}_{linear}", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 8, 3, stride=2, pad=1))
    t = g.node("MaxPool", "pool", [t], kernel_shape=[2, 2], strides=[2, 2])
    if flatten == "flatten":
        t = g.node("Flatten", "flatten", [t], axis=1)
    else:
        shape = g.const_i64("flatten.shape", [1, -1])
        t = g.node("Reshape", "flatten", [t, shape])

    def linear_layer(name: str, x: str, fin: int, fout: int, output: str | None = None) -> str:
        if linear == "gemm":
            return g.gemm(name, x, fin, fout, output=output)
        w = g.const_f32(f"{name}.weight", g.normal((fin, fout), np.sqrt(2.0 / fin)))
        b = g.const_f32(f"{name}.bias", g.normal((fout,), 0.1))
        t = g.node("MatMul", name, [x, w])
        return g.node("Add", f"{name}_add", [t, b], outputs=[output] if output else None)

    t = linear_layer("fc1", t, 8 * 4 * 4, 10)
    t = g.act("Relu", "relu2", t)
    linear_layer("fc2", t, 10, 5, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 5])


def build_conv_transpose(seed: int = 0) -> onnx.ModelProto:
    """Down- then up-sampling with ConvTranspose.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3, stride 2, pad 1) [8,8,8] -> relu1 Relu
      -> deconv ConvTranspose(8->6, 2x2, stride 2, bias) [6,16,16] -> relu2 Relu
         (weight layout [C_in=8, C_out=6, 2, 2])
      -> head Conv(6->4, 3x3) -> y[1,4,16,16]
    """
    g = _GraphBuilder("conv_transpose", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 8, 3, stride=2, pad=1))
    w = g.const_f32("deconv.weight", g.normal((8, 6, 2, 2), np.sqrt(2.0 / 8)))
    b = g.const_f32("deconv.bias", g.normal((6,), 0.1))
    t = g.node("ConvTranspose", "deconv", [t, w, b], kernel_shape=[2, 2], strides=[2, 2], group=1)
    t = g.act("Relu", "relu2", t)
    g.conv("head", t, 6, 4, 3, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 4, 16, 16])


def build_per_channel_ops(seed: int = 0) -> onnx.ModelProto:
    """Per-channel constants that must be sliced along with the channels.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3)
      -> scale Mul(const [1,8,1,1]) -> shift Add(const [8,1,1]) -> prelu PRelu(slope [8,1,1])
      -> conv2 Conv(8->6, 3x3) -> lrelu LeakyRelu(0.1)
      -> avgpool AveragePool(2x2, stride 2) [6,8,8]
      -> pad Pad(constant 0, pads 1 on H and W) [6,10,10]
      -> head Conv(6->4, 3x3, pad 1) -> y[1,4,10,10]
    """
    g = _GraphBuilder("per_channel_ops", seed)
    t = g.conv("conv1", INPUT_NAME, 3, 8, 3)
    t = g.node("Mul", "scale", [t, g.const_f32("scale.value", g.uniform((1, 8, 1, 1), 0.5, 1.5))])
    t = g.node("Add", "shift", [t, g.const_f32("shift.value", g.normal((8, 1, 1), 0.1))])
    t = g.node("PRelu", "prelu", [t, g.const_f32("prelu.slope", g.uniform((8, 1, 1), 0.05, 0.3))])
    t = g.act("LeakyRelu", "lrelu", g.conv("conv2", t, 8, 6, 3), alpha=0.1)
    t = g.node("AveragePool", "avgpool", [t], kernel_shape=[2, 2], strides=[2, 2])
    pads = g.const_i64("pad.pads", [0, 0, 1, 1, 0, 0, 1, 1])
    t = g.node("Pad", "pad", [t, pads], mode="constant")
    g.conv("head", t, 6, 4, 3, pad=1, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 4, 10, 10])


def build_resize_pad(seed: int = 0) -> onnx.ModelProto:
    """Channel-preserving spatial ops.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3) -> relu1 Relu
      -> resize Resize(scales [1,1,2,2], nearest) [8,32,32]
      -> pad Pad(constant 0, pads 1 on H and W) [8,34,34]
      -> head Conv(8->4, 3x3, pad 0) -> y[1,4,32,32]
    """
    g = _GraphBuilder("resize_pad", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 8, 3))
    scales = g.const_f32("resize.scales", [1.0, 1.0, 2.0, 2.0])
    t = g.node("Resize", "resize", [t, "", scales], mode="nearest")
    pads = g.const_i64("pad.pads", [0, 0, 1, 1, 0, 0, 1, 1])
    t = g.node("Pad", "pad", [t, pads], mode="constant")
    g.conv("head", t, 8, 4, 3, pad=0, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 4, 32, 32])


def build_barrier(seed: int = 0) -> onnx.ModelProto:
    """An op that mixes channels (Softmax over axis 1) blocks its group.

    x[1,3,16,16]
      -> conv1 Conv(3->8, 3x3) -> relu1 Relu
      -> softmax Softmax(axis=1)        (8-channel group must be blocked)
      -> conv2 Conv(8->6, 3x3) -> relu2 Relu   (6-channel group stays prunable)
      -> head Conv(6->4, 1x1) -> y[1,4,16,16]
    """
    g = _GraphBuilder("barrier", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 8, 3))
    t = g.node("Softmax", "softmax", [t], axis=1)
    t = g.act("Relu", "relu2", g.conv("conv2", t, 8, 6, 3))
    g.conv("head", t, 6, 4, 1, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 4, 16, 16])


def build_lenet(seed: int = 0) -> onnx.ModelProto:
    """LeNet-like classifier on MNIST-shaped input.

    x[1,1,28,28]
      -> conv1 Conv(1->32, 3x3, pad 0) [32,26,26] -> relu1 Relu -> pool1 MaxPool2 [32,13,13]
      -> conv2 Conv(32->64, 3x3, pad 0) [64,11,11] -> relu2 Relu -> pool2 MaxPool2 [64,5,5]
      -> flatten Flatten [1,1600]
      -> fc1 Gemm(1600->200, transB=1) -> relu3 Relu
      -> fc2 Gemm(200->10, transB=1) -> y[1,10]
    """
    g = _GraphBuilder("lenet", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 1, 32, 3, pad=0))
    t = g.node("MaxPool", "pool1", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = g.act("Relu", "relu2", g.conv("conv2", t, 32, 64, 3, pad=0))
    t = g.node("MaxPool", "pool2", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = g.node("Flatten", "flatten", [t], axis=1)
    t = g.act("Relu", "relu3", g.gemm("fc1", t, 64 * 5 * 5, 200))
    g.gemm("fc2", t, 200, 10, output=OUTPUT_NAME)
    return g.model(OUTPUT_NAME, [1, 10], input_shape=[1, 1, 28, 28])


def build_const_channel(seed: int = 0, linear: str = "gemm") -> onnx.ModelProto:
    """A classifier with a symbolic batch and two channels that are exactly constant.

    x[N,3,8,8]
      -> conv1 Conv(3->4, 3x3, pad 1) -> bn1 BN (scale[1] = 0, bias[1] = 0.7) -> relu1 Relu
         (channel 1 is 0.7 everywhere)
      -> conv2 Conv(4->6, 1x1) -> relu2 Relu -> pool MaxPool 2x2 [6,4,4]
      -> conv3 Conv(6->5, 3x3, pad 0) [5,2,2] -> bn3 BN (scale[2] = 0, bias[2] = 0.5) -> relu3 Relu
         (channel 2 is 0.5 everywhere) -> flatten Flatten [N,20]
      -> fc Gemm(20->7, transB=1)                       (linear="gemm")
         | fc MatMul(W[20,7]) -> fc_add Add(b[7])       (linear="matmul")
         | fc MatMul(W[20,7])                           (linear="matmul_nobias")
      -> y[N,7]
    Every reader of the constant channels is unpadded (1x1 conv, Flatten + Gemm/MatMul), so
    folding them into the readers' biases is exact. Not in ``ALL_BUILDERS``.
    """
    if linear not in ("gemm", "matmul", "matmul_nobias"):
        raise ValueError(f"linear must be gemm, matmul or matmul_nobias, got {linear!r}")
    g = _GraphBuilder(f"const_channel_{linear}", seed)

    def bn_const(name: str, x: str, c: int, channel: int, beta: float) -> str:
        scale = g.uniform((c,), 0.5, 1.5)
        bias = g.normal((c,), 0.1)
        scale[channel], bias[channel] = 0.0, beta
        ins = [g.const_f32(f"{name}.scale", scale), g.const_f32(f"{name}.bias", bias),
               g.const_f32(f"{name}.mean", g.normal((c,), 0.1)), g.const_f32(f"{name}.var", g.uniform((c,), 0.5, 1.5))]
        return g.node("BatchNormalization", name, [x, *ins], epsilon=1e-5)

    t = g.act("Relu", "relu1", bn_const("bn1", g.conv("conv1", INPUT_NAME, 3, 4, 3), 4, 1, 0.7))
    t = g.act("Relu", "relu2", g.conv("conv2", t, 4, 6, 1))
    t = g.node("MaxPool", "pool", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = g.act("Relu", "relu3", bn_const("bn3", g.conv("conv3", t, 6, 5, 3, pad=0), 5, 2, 0.5))
    t = g.node("Flatten", "flatten", [t], axis=1)
    if linear == "gemm":
        g.gemm("fc", t, 20, 7, output=OUTPUT_NAME)
    else:
        w = g.const_f32("fc.weight", g.normal((20, 7), np.sqrt(2.0 / 20)))
        if linear == "matmul":
            t = g.node("MatMul", "fc", [t, w])
            g.node("Add", "fc_add", [t, g.const_f32("fc.bias", g.normal((7,), 0.1))], outputs=[OUTPUT_NAME])
        else:
            g.node("MatMul", "fc", [t, w], outputs=[OUTPUT_NAME])
    return g.model(OUTPUT_NAME, ["N", 7], input_shape=["N", 3, 8, 8])


def build_saturated_sigmoid(seed: int = 0, bias: float = -16.0) -> onnx.ModelProto:
    """A probability map whose Sigmoid is saturated near 0 (like a text detector's on noise).

    x[1,3,32,32]
      -> conv1 Conv(3->32, 3x3, pad 1) -> relu1 Relu
      -> conv2 Conv(32->1, 3x3, pad 1, bias = ``bias``) -> sig Sigmoid -> y[1,1,32,32]
    With bias -16 every output is about 1e-7, where onnxruntime's Sigmoid is accurate to an
    absolute 1.7e-7 only. Not in ``ALL_BUILDERS``.
    """
    g = _GraphBuilder("saturated_sigmoid", seed)
    t = g.act("Relu", "relu1", g.conv("conv1", INPUT_NAME, 3, 32, 3))
    t = g.conv("conv2", t, 32, 1, 3)
    b = next(i for i in g.initializers if i.name == "conv2.bias")
    b.CopyFrom(numpy_helper.from_array(np.array([bias], dtype=np.float32), b.name))
    g.node("Sigmoid", "sig", [t], outputs=[OUTPUT_NAME])
    return g.model(OUTPUT_NAME, [1, 1, 32, 32], input_shape=(1, 3, 32, 32))


# -------------------------------------------------------------------------------------
# registry
# -------------------------------------------------------------------------------------

ALL_BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "chain": build_chain,
    "residual": build_residual,
    "concat": build_concat,
    "depthwise": build_depthwise,
    "grouped": build_grouped,
    "se_block": build_se_block,
    "se_block_silu": functools.partial(build_se_block, activation="silu"),
    "split": build_split,
    "flatten_gemm": build_flatten_gemm,
    "flatten_reshape_gemm": functools.partial(build_flatten_gemm, flatten="reshape", linear="gemm"),
    "flatten_flatten_matmul": functools.partial(build_flatten_gemm, flatten="flatten", linear="matmul"),
    "flatten_reshape_matmul": functools.partial(build_flatten_gemm, flatten="reshape", linear="matmul"),
    "conv_transpose": build_conv_transpose,
    "per_channel_ops": build_per_channel_ops,
    "resize_pad": build_resize_pad,
    "barrier": build_barrier,
    "lenet": build_lenet,
}
"""Name -> builder; each accepts an optional ``seed`` keyword and returns a fresh model."""

OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "chain": (1, 16, 16, 16),
    "residual": (1, 4),
    "concat": (1, 8, 16, 16),
    "depthwise": (1, 4, 16, 16),
    "grouped": (1, 6, 16, 16),
    "se_block": (1, 8, 16, 16),
    "se_block_silu": (1, 8, 16, 16),
    "split": (1, 5, 16, 16),
    "flatten_gemm": (1, 5),
    "flatten_reshape_gemm": (1, 5),
    "flatten_flatten_matmul": (1, 5),
    "flatten_reshape_matmul": (1, 5),
    "conv_transpose": (1, 4, 16, 16),
    "per_channel_ops": (1, 4, 10, 10),
    "resize_pad": (1, 4, 32, 32),
    "barrier": (1, 4, 16, 16),
    "lenet": (1, 10),
}
"""Expected shape of the single graph output ``"y"`` for each registry name."""

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    name: ((1, 1, 28, 28) if name == "lenet" else DEFAULT_INPUT_SHAPE) for name in ALL_BUILDERS
}
"""Shape of the graph input ``"x"`` for each registry name."""


def random_input(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed dict ``{"x": array}`` of standard-normal float32 data for model ``name``."""
    rng = np.random.default_rng(seed)
    return {INPUT_NAME: rng.standard_normal(INPUT_SHAPES[name]).astype(np.float32)}
