"""--round-to auto: the decision rule on synthetic step tables (no timing), chain extraction
from the analysis groups, the chain models (plain, strided, depthwise) run in onnxruntime,
the single-node fallback, and PlanOptions' 'auto'. No test asserts a wall-clock time."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.analysis import analyze
from onnxprune.errors import PlanError
from onnxprune.runtime.sweep import (Activation, ConvChain, ConvShape, StepTable, alignment_gain, chain_model,
                                     channel_sweep, choose_round_to, conv_chains, conv_model, conv_shapes, sweep_chain,
                                     sweep_points)
from onnxprune.planning import ROUND_TO_AUTO, PlanOptions, Target, TargetKind, make_plan
from onnxprune.shapes import measure_shapes
from tiny_models import ALL_BUILDERS, INPUT_SHAPES

COUNTS = np.arange(33, 129)


def table(fn, counts=COUNTS, label="t") -> StepTable:
    return StepTable(label, "out", counts, np.array([fn(int(c)) for c in counts], dtype=np.float64))


def steps(n: int, base: float = 0.0):
    return lambda c: base + 0.01 * n * -(-c // n)  # latency of ceil(c / n) * n channels


@pytest.mark.parametrize("step", [4, 8, 16, 32])
def test_steps_give_their_size(step):
    n, gains = choose_round_to([table(steps(step))])
    assert n == step
    assert gains[step] == max(gains.values())


def test_steps_of_two_pay_only_on_small_counts():
    assert choose_round_to([table(steps(2))])[0] == 1  # gains 0.7 % of latency at 33..128 channels
    assert choose_round_to([table(steps(2), counts=np.arange(3, 20))])[0] == 2


def test_proportional_or_affine_latency_gives_one():
    assert choose_round_to([table(lambda c: 0.01 * c)])[0] == 1
    n, gains = choose_round_to([table(lambda c: 0.3 + 0.01 * c)])
    assert n == 1 and all(g <= 1e-12 for g in gains.values())  # a fixed overhead makes rounding pay less


def test_slow_fallback_at_non_multiples_gives_eight():
    # NCHWc-like: counts that are not multiples of 8 take a kernel twice as slow
    n, gains = choose_round_to([table(lambda c: 0.01 * c * (1 if c % 8 == 0 else 2))])
    assert n == 8
    assert gains[8] > 0.3 and gains[4] < 0.75 * gains[8]


def test_padding_to_the_block_size_beats_the_fallback_step():
    # ORT NCHWc on AVX-512: non-multiples of 4 take a slow path (2x), multiples of 4 are
    # padded up to the block of 16. Rounding to 4 captures most of the gain, but rounding to
    # 16 also saves the padding: the rule must not stop at 4.
    n, gains = choose_round_to([table(lambda c: 0.01 * (-(-c // 16) * 16) * (1 if c % 4 == 0 else 2))])
    assert gains[4] > 0.75 * gains[16]  # the old ratio rule (near=0.75) picked 4 here
    assert gains[16] - gains[4] > 0.01 and n == 16
    assert choose_round_to([table(lambda c: 0.01 * (-(-c // 16) * 16) * (1 if c % 4 == 0 else 2))], tol=0.2)[0] == 4


def test_small_gains_are_not_worth_aligning():
    # steps of 8 at ~1000 channels: rounding down gains well under 1 % of the latency
    big = table(steps(8), counts=np.arange(1000, 1096))
    n, gains = choose_round_to([big])
    assert 0 < max(gains.values()) < 0.01 and n == 1
    assert choose_round_to([big], min_gain=1e-4)[0] == 8


def test_tables_are_averaged_with_equal_weight():
    eight, flat = table(steps(8)), table(lambda c: 0.01 * c)
    n, gains = choose_round_to([eight, flat])
    assert n == 8
    assert gains[8] == pytest.approx((alignment_gain(eight, 8) + alignment_gain(flat, 8)) / 2)


def test_robust_to_moderate_noise():
    rng = np.random.default_rng(0)
    noisy = [table(lambda c: steps(8)(c) * (1 + 0.02 * rng.standard_normal())) for _ in range(3)]
    assert choose_round_to(noisy)[0] == 8


def test_alignment_gain_formula_and_references():
    t = StepTable("t", "out", np.array([4, 5, 6, 7, 8, 9, 10, 11, 12]),
                  np.array([4.0, 8, 8, 8, 8, 12, 12, 12, 12]))
    # N = 4: counts round down to 4, 8 or 12; m/c - t(m)/t(c) averaged over counts
    want = np.mean([0, 4 / 5 - 4 / 8, 4 / 6 - 4 / 8, 4 / 7 - 4 / 8, 0, 8 / 9 - 8 / 12, 8 / 10 - 8 / 12,
                    8 / 11 - 8 / 12, 0])
    assert alignment_gain(t, 4) == pytest.approx(want)
    assert alignment_gain(t, 8) is None  # only one multiple of 8 to round down to: too few references
    assert choose_round_to([]) == (1, {})


def test_bad_inputs():
    with pytest.raises(ValueError, match="increasing"):
        StepTable("t", "out", np.array([3, 2]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        StepTable("t", "out", np.array([1, 2]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError):
        choose_round_to([table(steps(8))], candidates=(0, 2))
    with pytest.raises(ValueError, match="tol"):
        choose_round_to([table(steps(8))], tol=-0.1)


def test_conv_shapes_of_a_tiny_model_are_distinct_and_sorted():
    m = ALL_BUILDERS["residual"]()
    a = analyze(m, measure_shapes(m, {"x": INPUT_SHAPES["residual"]}))
    shapes = conv_shapes(m, a.shapes, top=10)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert sum(len(s.nodes) for s in shapes) == len(convs)  # every conv counted once
    assert len({s.key() for s in shapes}) == len(shapes)
    assert [s.macs for s in shapes] == sorted((s.macs for s in shapes), reverse=True)
    by_node = a.count_by_node("macs")
    for s in shapes:
        assert s.macs == sum(by_node[n] for n in s.nodes)
    assert conv_shapes(m, a.shapes, top=1) == shapes[:1]


def test_single_node_fallback_points():
    m = ALL_BUILDERS["lenet"]()  # pooling between its convs: no chain, so single-node sweeps
    a = analyze(m, measure_shapes(m, {"x": INPUT_SHAPES["lenet"]}))
    assert conv_chains(m, a.shapes, a) == []
    shapes = conv_shapes(m, a.shapes, top=2)
    windows = sum(min(c, 4) for s in shapes for c in ((s.cout, s.cin) if not s.depthwise else (s.cout,)))
    assert sweep_points(m, a.shapes, top=2, window=4) == windows


def test_depthwise_shape_is_swept_as_one_axis():
    m = ALL_BUILDERS["depthwise"]()
    a = analyze(m, measure_shapes(m, {"x": INPUT_SHAPES["depthwise"]}))
    dw = [s for s in conv_shapes(m, a.shapes, top=10) if s.group > 1]
    assert dw and all(s.depthwise for s in dw)


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_model_runs_with_the_swept_count(depthwise):
    s = ConvShape(1, 6, 6, 9, 9, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 6 if depthwise else 1)
    m = conv_model(s, 5 if depthwise else 6, 5)
    assert m.ir_version == 8
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 5 if depthwise else 6, 9, 9), np.float32)
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (1, 5, 5, 5)


def test_plan_options_auto():
    assert PlanOptions(round_to=ROUND_TO_AUTO).round_to == "auto"
    for bad in (0, "eight", 2.5, True):
        with pytest.raises(PlanError, match="round_to"):
            PlanOptions(round_to=bad)
    m = ALL_BUILDERS["lenet"]()
    a = analyze(m, measure_shapes(m, {"x": INPUT_SHAPES["lenet"]}))
    scores = {g.id: np.ones(g.size) for g in a.groups if g.prunable}
    with pytest.raises(PlanError, match="channel sweep"):
        make_plan(a, scores, Target(TargetKind.MACS, 0.5), PlanOptions(round_to="auto"))


# ------------------------------------------------------------------ chains


def analysed(name):
    m = ALL_BUILDERS[name]()
    return m, analyze(m, measure_shapes(m, {"x": INPUT_SHAPES[name]}))


def test_chains_follow_the_groups_producer_and_consumer():
    m, a = analysed("chain")
    chains = conv_chains(m, a.shapes, a, top=10)
    by_group = {ch.groups[0]: ch for ch in chains}
    assert set(by_group) == {"conv1", "conv2"}  # conv3 feeds the graph output: its group is blocked
    c1 = by_group["conv1"]  # conv1(3->8, 3x3) -> bn -> relu -> conv2(8->12, 3x3)
    assert (c1.producer.cin, c1.c0, c1.consumer.cin, c1.consumer.cout) == (3, 8, 8, 12)
    assert c1.act == Activation("Relu") and c1.depthwise is None and c1.axis == "chain"
    assert (c1.producer.kernel, c1.consumer.kernel, c1.producer.pads) == ((3, 3), (3, 3), (1, 1, 1, 1))
    macs = a.count_by_node("macs")
    assert c1.macs == macs["conv1"] + macs["conv2"]
    assert [ch.macs for ch in chains] == sorted((ch.macs for ch in chains), reverse=True)
    assert conv_chains(m, a.shapes, a, top=1) == chains[:1]
    assert conv_chains(m, a.shapes) == chains[:3]  # the analysis is computed when not given
    assert sweep_points(m, a.shapes, top=10, window=5) == sum(min(ch.c0, 5) for ch in chains)


def test_identical_chains_are_one_with_summed_macs():
    m, a = analysed("residual")
    chains = conv_chains(m, a.shapes, a, top=10)
    assert len({ch.key() for ch in chains}) == len(chains)
    inner = [ch for ch in chains if ch.producer.cin == 8]  # b1_conv1 -> b1_conv2 and b2_conv1 -> b2_conv2
    assert len(inner) == 1 and len(inner[0].groups) == 2
    macs = a.count_by_node("macs")
    assert inner[0].macs == sum(macs[n] for n in ("b1_conv1", "b1_conv2", "b2_conv1", "b2_conv2"))


def test_depthwise_chain_and_activations():
    m, a = analysed("depthwise")
    dw = next(ch for ch in conv_chains(m, a.shapes, a, top=10) if ch.depthwise is not None)
    # conv1(3->8) -> relu -> dw(8, 3x3) -> bn -> Clip(0, 6) -> pw(8->12)
    assert dw.axis == "depthwise" and dw.act == Activation("Relu") and dw.dw_act == Activation("Clip", clip=(0.0, 6.0))
    assert (dw.producer.cin, dw.c0, dw.depthwise.group, dw.consumer.cout) == (3, 8, 8, 12)
    for name, op in (("se_block_silu", "Swish"), ("se_block", "HardSwish")):
        m, a = analysed(name)
        assert op in {ch.act.op for ch in conv_chains(m, a.shapes, a, top=10)}


def plain(cin, cout, hw, k, s=1, group=1):
    p = k // 2
    return ConvShape(1, cin, cout, hw, hw, (k, k), (s, s), (p, p, p, p), (1, 1), group)


CHAINS = {
    # producer 5->12 3x3 @9x9, consumer 12->7 1x1: y [1, 7, 9, 9]
    "plain": (ConvChain(plain(5, 12, 9, 3), Activation("Relu"), plain(12, 7, 9, 1)), (1, 7, 9, 9)),
    # stride 2 in both: 9 -> 5 -> 3
    "strided": (ConvChain(plain(5, 12, 9, 3, 2), Activation("Swish"), plain(12, 7, 5, 3, 2)), (1, 7, 3, 3)),
    # 1x1 expand -> depthwise 3x3 s2 (group = c) -> 1x1 project: 9 -> 5
    "depthwise": (ConvChain(plain(5, 12, 9, 1), Activation("HardSwish"), plain(12, 7, 5, 1), plain(12, 12, 9, 3, 2, 12),
                            Activation("Clip", clip=(0.0, 6.0))), (1, 7, 5, 5)),
    "no_activation": (ConvChain(plain(5, 12, 9, 3), Activation("None"), plain(12, 7, 9, 3)), (1, 7, 9, 9)),
}


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("c", [1, 10, 12])
def test_chain_model_is_valid_and_runs(name, c):
    chain, y_shape = CHAINS[name]
    m = chain_model(chain, c)
    assert m.ir_version == 8
    onnx.checker.check_model(m, full_check=True)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    assert len(convs) == (3 if chain.depthwise is not None else 2)
    assert inits[convs[0].input[1]][:2] == (c, 5) and inits[convs[-1].input[1]][:2] == (7, c)
    if chain.depthwise is not None:
        assert inits[convs[1].input[1]][:2] == (c, 1)
        assert next(at.i for at in convs[1].attribute if at.name == "group") == c
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((1, 5, 9, 9), np.float32)})
    assert y.shape == y_shape and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match=">= 1"):
        chain_model(chain, 0)


def test_sweep_chain_and_channel_sweep_give_tables():
    chain = CHAINS["depthwise"][0]
    points = []
    t = sweep_chain(chain, window=3, threads=1, warmup=1, repeat=2, on_point=lambda: points.append(1))
    assert t.axis == "depthwise" and t.counts.tolist() == [10, 11, 12] and np.all(t.ms > 0) and len(points) == 3
    with pytest.raises(ValueError, match="window"):
        sweep_chain(chain, window=0)
    m, a = analysed("depthwise")
    res = channel_sweep(m, a.shapes, top=2, window=2, threads=1, warmup=0, repeat=1, analysis=a)
    assert res.method == "chain" and len(res.tables) == len(res.chains) == 2 and res.shapes == ()
    assert [t.label for t in res.tables] == [ch.label() for ch in res.chains]
    d = res.to_dict()
    assert d["method"] == "chain" and len(d["chains"]) == 2 and d["round_to"] == res.round_to
