"""Structure of the channel analysis on the tiny models: groups, members, blocks, costs."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis import Analysis, analyze
from onnxprune.analysis.context import Role
from onnxprune.shapes import measure_shapes
from tiny_models import ALL_BUILDERS, INPUT_NAME, INPUT_SHAPES


@functools.lru_cache(maxsize=None)
def _cached(name: str) -> tuple[onnx.ModelProto, Analysis]:
    model = ALL_BUILDERS[name]()
    return model, analyze(model, measure_shapes(model, {INPUT_NAME: INPUT_SHAPES[name]}))


def analysis_of(name: str) -> Analysis:
    return _cached(name)[1]


def members(g, tensor: str, role: Role | None = None):
    return [m for m in g.members if m.tensor == tensor and (role is None or m.role is role)]


def group_of_tensor(a: Analysis, tensor: str) -> set[int]:
    return set(a.elem_group[a.channels[tensor].elems].tolist())


# ------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------


def test_chain_groups():
    a = analysis_of("chain")
    g1, g2 = a.group("conv1"), a.group("conv2")
    assert (g1.size, g2.size) == (8, 12) and g1.prunable and g2.prunable
    assert {m.tensor for m in g1.members} == {"conv1.weight", "conv1.bias", "bn1.scale", "bn1.bias", "bn1.mean",
                                               "bn1.var", "conv2.weight"}
    (prod,) = members(g1, "conv1.weight", Role.PRODUCER)
    (cons,) = members(g1, "conv2.weight", Role.CONSUMER)
    assert (prod.axis, cons.axis) == (0, 1)
    np.testing.assert_array_equal(cons.positions, np.arange(8))
    np.testing.assert_array_equal(cons.channels, np.arange(8))
    assert members(g1, "bn1.scale")[0].role is Role.NORM
    assert {m.role for m in members(g1, "bn1.var")} == {Role.NORM_STAT}
    assert members(g1, "conv1.bias")[0].role is Role.BIAS


def test_residual_add_merges_stem_and_block_outputs():
    a = analysis_of("residual")
    g = a.group("stem")
    assert g.size == 8 and g.prunable
    producers = {m.node for m in g.members if m.role is Role.PRODUCER}
    assert producers == {"stem", "b1_conv2", "b2_conv2"}
    # every tensor on the residual path is in the one group, channel c = stem channel c
    for t in ("stem_out", "b1_bn2_out", "b1_add_out", "b1_out_relu_out", "b2_add_out", "b2_out_relu_out"):
        assert group_of_tensor(a, t) == {g.id}, t
        np.testing.assert_array_equal(a.elem_channel[a.channels[t].elems], np.arange(8))
    # inner block convs stay separate groups
    for b in ("b1_conv1", "b2_conv1"):
        inner = a.group(b)
        assert inner.id != g.id and inner.prunable and inner.size == 8
    assert {m.node for m in g.members if m.role is Role.CONSUMER} == {"b1_conv1", "b2_conv1", "head"}


def test_concat_offsets():
    a = analysis_of("concat")
    ga, gb = a.group("branch_a"), a.group("branch_b")
    (ma,) = members(ga, "head.weight", Role.CONSUMER)
    (mb,) = members(gb, "head.weight", Role.CONSUMER)
    assert ma.axis == mb.axis == 1
    np.testing.assert_array_equal(ma.positions, np.arange(0, 6))
    np.testing.assert_array_equal(ma.channels, np.arange(6))
    np.testing.assert_array_equal(mb.positions, np.arange(6, 16))
    np.testing.assert_array_equal(mb.channels, np.arange(10))
    assert ga.prunable and gb.prunable and (ga.size, gb.size) == (6, 10)
    assert not ga.keep_one_of and not gb.keep_one_of
    stem = a.group("stem")
    assert {m.node for m in stem.members if m.role is Role.CONSUMER} == {"branch_a", "branch_b"}


def test_depthwise_joins_its_input_group():
    a = analysis_of("depthwise")
    g = a.group("conv1")
    (dw,) = members(g, "dw.weight")
    assert dw.role is Role.PRODUCER and dw.axis == 0
    np.testing.assert_array_equal(dw.channels, np.arange(8))
    with pytest.raises(KeyError):
        a.group("dw")
    assert all(m.tensor != "dw.weight" for h in a.groups if h.id != g.id for m in h.members)
    assert group_of_tensor(a, "dw_out") == {g.id}
    assert {m.tensor for m in g.members} >= {"dw_bn.scale", "dw_bn.var", "pw.weight"}
    assert g.blocks == 1 and g.prunable


@pytest.mark.parametrize("name", ["se_block", "se_block_silu"])
def test_se_block(name):
    a = analysis_of(name)
    g = a.group("conv1")
    assert g.size == 16 and g.prunable
    (ex,) = members(g, "se_expand.weight", Role.PRODUCER)
    assert ex.axis == 0
    np.testing.assert_array_equal(ex.channels, np.arange(16))
    assert members(g, "se_expand.bias", Role.BIAS)
    assert members(g, "se_reduce.weight", Role.CONSUMER)
    assert members(g, "head.weight", Role.CONSUMER)
    for t in ("se_expand_out", "se_gate_out", "se_mul_out"):
        assert group_of_tensor(a, t) == {g.id}
    sq = a.group("se_reduce")
    assert sq.size == 4 and sq.prunable and sq.id != g.id
    assert {(m.tensor, m.role) for m in sq.members} == {
        ("se_reduce.weight", Role.PRODUCER), ("se_reduce.bias", Role.BIAS), ("se_expand.weight", Role.CONSUMER)}


def test_split_halves_in_producer_group():
    a = analysis_of("split")
    g = a.group("conv1")
    assert g.size == 12 and g.prunable
    assert group_of_tensor(a, "split_out0") == group_of_tensor(a, "split_out1") == {g.id}
    np.testing.assert_array_equal(a.elem_channel[a.channels["split_out0"].elems], np.arange(4))
    np.testing.assert_array_equal(a.elem_channel[a.channels["split_out1"].elems], np.arange(4, 12))
    (ca,) = members(g, "conv_a.weight", Role.CONSUMER)
    np.testing.assert_array_equal(ca.channels, np.arange(4))
    (hd,) = members(g, "head.weight", Role.CONSUMER)
    np.testing.assert_array_equal(hd.positions, np.arange(6, 14))
    np.testing.assert_array_equal(hd.channels, np.arange(4, 12))
    # neither half may become empty
    assert sorted(s.tolist() for s in g.keep_one_of) == [list(range(4)), list(range(4, 12))]


@pytest.mark.parametrize("name", ["flatten_gemm", "flatten_reshape_gemm", "flatten_flatten_matmul",
                                  "flatten_reshape_matmul"])
def test_flatten_maps_channel_to_feature_range(name):
    a = analysis_of(name)
    g = a.group("conv1")
    (fc,) = members(g, "fc1.weight", Role.CONSUMER)
    assert fc.axis == (1 if "gemm" in name else 0)  # Gemm W is [10, 128] (transB); MatMul W [128, 10]
    np.testing.assert_array_equal(fc.positions, np.arange(128))
    np.testing.assert_array_equal(fc.channels, np.repeat(np.arange(8), 16))
    for c in range(8):
        np.testing.assert_array_equal(fc.positions[fc.channels == c], np.arange(16 * c, 16 * c + 16))
    fc1 = a.group("fc1")
    assert fc1.size == 10 and fc1.prunable
    assert members(fc1, "fc1.weight", Role.PRODUCER)[0].axis == (0 if "gemm" in name else 1)
    bias_role = Role.BIAS if "gemm" in name else Role.CONSTANT
    assert members(fc1, "fc1.bias", bias_role)


def test_grouped_conv_blocks():
    a = analysis_of("grouped")
    gin, gout = a.group("conv1"), a.group("gconv")
    assert (gin.size, gin.blocks) == (8, 4) and (gout.size, gout.blocks) == (12, 4)
    assert gin.prunable and gout.prunable
    cons = members(gin, "gconv.weight", Role.CONSUMER)
    assert sorted(m.rows for m in cons) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    for m in cons:
        b = m.rows[0] // 3
        np.testing.assert_array_equal(m.positions, [0, 1])
        np.testing.assert_array_equal(m.channels, [2 * b, 2 * b + 1])


def test_barrier_blocks_softmax_group():
    a = analysis_of("barrier")
    g = a.group("conv1")
    assert not g.prunable
    assert "Softmax" in g.blocked_reason and "softmax" in g.blocked_reason
    conv2 = a.group("conv2")  # the group of conv2's own output channels
    assert conv2.op == "Conv" and conv2.size == 6 and conv2.prunable
    # conv2's input channels (softmax's output) are fixed, in a group named after softmax
    fixed = a.group("softmax")
    assert fixed.op == "Softmax" and not fixed.prunable and "conv2" in fixed.blocked_reason
    assert members(fixed, "conv2.weight", Role.CONSUMER)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_graph_input_and_output_blocked(name):
    a = analysis_of(name)
    (gin,) = [g for g in a.groups if g.name == INPUT_NAME]
    assert not gin.prunable and "graph input" in gin.blocked_reason
    assert gin.size == INPUT_SHAPES[name][1]
    out = a.channels["y"]
    for gid in np.unique(a.elem_group[out.elems]).tolist():
        g = a.groups[gid]
        assert not g.prunable and "graph output" in g.blocked_reason
    names = [g.name for g in a.groups]
    assert len(names) == len(set(names))


# ------------------------------------------------------------------------------------
# costs
# ------------------------------------------------------------------------------------


def _float_init_sizes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).size for i in model.graph.initializer
               if np.issubdtype(numpy_helper.to_array(i).dtype, np.floating))


def test_chain_macs_by_hand():
    a = analysis_of("chain")
    hw = 16 * 16
    conv1, conv2, conv3 = hw * 9 * 3 * 8, hw * 9 * 8 * 12, hw * 1 * 12 * 16
    assert a.count("macs") == conv1 + conv2 + conv3
    assert a.count_by_node("macs") == {"conv1": conv1, "conv2": conv2, "conv3": conv3}
    # 3 channels off conv1, 5 off conv2
    g1, g2 = a.group("conv1"), a.group("conv2")
    gone = a.removed_elements({g1.id: np.array([0, 2, 7]), g2.id: np.array([1, 3, 5, 7, 9])})
    assert a.count("macs", gone) == hw * 9 * 3 * 5 + hw * 9 * 5 * 7 + hw * 1 * 7 * 16


def test_chain_params_by_hand():
    a = analysis_of("chain")
    assert a.count("params") == (216 + 8) + 4 * 8 + (864 + 12) + (192 + 16)
    g1 = a.group("conv1")
    gone = a.removed_elements({g1.id: np.array([0, 1, 2])})
    assert a.count("params", gone) == (5 * 27 + 5) + 4 * 5 + (12 * 5 * 9 + 12) + (192 + 16)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_params_equal_float_initializers(name):
    model, a = _cached(name)
    assert a.count("params") == _float_init_sizes(model)


def test_other_macs_by_hand():
    a = analysis_of("depthwise")
    hw = 256
    assert a.count_by_node("macs")["dw"] == hw * 9 * 8
    a = analysis_of("grouped")
    assert a.count_by_node("macs")["gconv"] == hw * 9 * 2 * 12
    a = analysis_of("flatten_reshape_matmul")
    assert a.count_by_node("macs")["fc1"] == 128 * 10
    a = analysis_of("conv_transpose")
    assert a.count_by_node("macs")["deconv"] == 8 * 8 * 4 * 8 * 6


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_freed_matches_count(name, kind):
    """Removing one channel alone frees what ``freed`` says, for every prunable group."""
    a = analysis_of(name)
    base = a.count(kind)
    freed = a.freed(kind)
    for g in a.groups:
        if not g.prunable:
            continue
        for c in sorted({0, g.size - 1}):
            after = a.count(kind, a.removed_elements({g.id: np.array([c])}))
            assert base - after == pytest.approx(freed[g.id][c]), (g.name, c)


# ------------------------------------------------------------------------------------
# analysis corner cases
# ------------------------------------------------------------------------------------


def _model(nodes, inits, out_shape, in_shape=(1, 3, 8, 8)):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _w(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_conv_reading_channels_on_another_axis_blocks_them():
    """Conv over a transposed tensor: its channel axis is a spatial axis of the conv."""
    m = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["a"], ["t"], name="tr", perm=[0, 2, 1, 3]),
        helper.make_node("Conv", ["t", "w2"], ["y"], name="c2", kernel_shape=[1, 1]),
    ], {"w1": _w(6, 3, 1, 1), "w2": _w(4, 8, 1, 1)}, (1, 4, 6, 8))
    a = analyze(m, measure_shapes(m, {"x": (1, 3, 8, 8)}))
    g = a.group("c1")
    assert not g.prunable and "c2" in g.blocked_reason


def test_untracked_tensor_read_twice_is_one_group():
    m = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="c2", kernel_shape=[1, 1]),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ], {"w1": _w(6, 3, 1, 1), "w2": _w(6, 3, 1, 1)}, (1, 6, 8, 8))
    a = analyze(m, measure_shapes(m, {"x": (1, 3, 8, 8)}))
    assert [g.name for g in a.groups] == ["x", "c1"]
    assert {m.node for m in a.group("c1").members if m.role is Role.PRODUCER} == {"c1", "c2"}


def test_blocked_products_still_count_macs():
    """Products that cannot be pruned (two activations, channels on Gemm's M axis) cost MACs."""
    m = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),  # [1,6,8,8]
        helper.make_node("Transpose", ["a"], ["at"], name="tr", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["a", "at"], ["aa"], name="mm"),  # [1,6,8,8] @ [1,6,8,8]
        helper.make_node("GlobalAveragePool", ["aa"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="fl"),  # [1,6]
        helper.make_node("Transpose", ["f"], ["ft"], name="trf", perm=[1, 0]),  # [6,1]
        helper.make_node("Gemm", ["ft", "w2"], ["y"], name="fc"),  # [6,1] @ [1,5]: channels on M
    ], {"w1": _w(6, 3, 1, 1), "w2": _w(1, 5)}, (6, 5))
    a = analyze(m, measure_shapes(m, {"x": (1, 3, 8, 8)}))
    macs = a.count_by_node("macs")
    assert macs == {"c1": 64 * 3 * 6, "mm": 6 * 8 * 8 * 8, "fc": 6 * 5 * 1}
    assert not a.group("c1").prunable and "mm" in a.group("c1").blocked_reason


def test_flatten_of_a_single_channel_keeps_the_feature_axis():
    """[1, 1, 4, 4] -> [1, 16]: the one channel spans the 16 features (a pruned-to-one layer)."""
    m = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["a"], ["f"], name="fl", axis=1),
        helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1),
    ], {"w1": _w(1, 3, 2, 2), "w2": _w(5, 16)}, (1, 5))
    a = analyze(m, measure_shapes(m, {"x": (1, 3, 8, 8)}))
    assert a.channels["f"].axis == 1
    (fc,) = members(a.group("c1"), "w2", Role.CONSUMER)
    np.testing.assert_array_equal(fc.positions, np.arange(16))
    assert a.count_by_node("macs")["fc"] == 16 * 5


def test_conv_with_computed_weights_blocks_the_weight_channels():
    """A Conv whose W is an activation: the channels W comes from cannot be cut."""
    m = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),  # [1,3,8,8]
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["wk"], name="sl"),  # [1,3,3,3]
        helper.make_node("Conv", ["x", "wk"], ["y"], name="dyn", kernel_shape=[3, 3]),  # y [1,1,6,6]
    ], {"w1": _w(3, 3, 1, 1), "st": np.array([0, 0], np.int64), "en": np.array([3, 3], np.int64),
        "ax": np.array([2, 3], np.int64)}, (1, 1, 6, 6))
    a = analyze(m, measure_shapes(m, {"x": (1, 3, 8, 8)}))
    g = a.group("c1")
    assert not g.prunable and "dyn" in g.blocked_reason
    assert a.count_by_node("macs")["dyn"] == 36 * 27
