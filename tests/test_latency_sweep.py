"""--round-to auto: the decision rule on synthetic step tables (no timing), conv shape
extraction, the single-node sweep model, and PlanOptions' 'auto'."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.analysis import analyze
from onnxprune.errors import PlanError
from onnxprune.latency.sweep import (ConvShape, StepTable, alignment_gain, choose_round_to, conv_model, conv_shapes,
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
    windows = sum(min(c, 4) for s in shapes[:2] for c in ((s.cout, s.cin) if not s.depthwise else (s.cout,)))
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
