"""Tests of the data-free criteria (onnxprune.criteria) on hand-built models whose
scores can be worked out by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis import analyze
from onnxprune.criteria import BN, CPMC, L1, L2, Random, get_criterion
from onnxprune.errors import OnnxPruneError
from onnxprune.planning import Target, TargetKind, make_plan
from onnxprune.shapes import measure_shapes
from tiny_models import ALL_BUILDERS, INPUT_SHAPES, build_lenet

H = W = 8  # spatial size everywhere (3x3 convs with pad 1 keep it)
C0, C1, C2, C3 = 3, 6, 5, 4  # x -> conv1 -> conv2 -> conv3 (graph output)


def _conv(name, x, w, b=None, stride=1, pad=None):
    k = w.shape[-1]
    pad = k // 2 if pad is None else pad
    inputs = [x, f"{name}.weight"] + ([f"{name}.bias"] if b is not None else [])
    return helper.make_node("Conv", inputs, [f"{name}_out"], name=name, kernel_shape=[k, k],
                            strides=[stride, stride], pads=[pad] * 4)


def chain_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of :func:`chain_model`: every |w| in [0.5, 1.5] so no channel is accidentally small."""
    rng = np.random.default_rng(seed)

    def u(*shape):
        return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)

    return {
        "conv1.weight": u(C1, C0, 3, 3), "conv1.bias": u(C1),
        "bn1.scale": u(C1), "bn1.bias": u(C1),
        "bn1.mean": u(C1), "bn1.var": np.abs(u(C1)),
        "conv2.weight": u(C2, C1, 3, 3), "conv2.bias": u(C2),
        "conv3.weight": u(C3, C2, 1, 1), "conv3.bias": u(C3),
    }


def chain_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x[1,3,8,8] -> conv1(3->6,3x3) -> bn1 -> relu1 -> conv2(6->5,3x3) -> relu2 -> conv3(5->4,1x1) -> y.

    Groups: conv1 (6 channels, with BN), conv2 (5 channels, no BN), conv3 (blocked: graph output).
    """
    nodes = [
        _conv("conv1", "x", weights["conv1.weight"], b=True),
        helper.make_node("BatchNormalization", ["conv1_out", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"],
                         ["bn1_out"], name="bn1"),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        _conv("conv2", "relu1_out", weights["conv2.weight"], b=True),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        _conv("conv3", "relu2_out", weights["conv3.weight"], b=True),
    ]
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, "crit_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C0, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C3, H, W])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def analysed(weights):
    m = chain_model(weights)
    a = analyze(m, measure_shapes(m, {"x": (1, C0, H, W)}))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return a, init


@pytest.fixture(scope="module")
def base():
    return analysed(chain_weights())


def test_model_groups_are_what_the_tests_assume(base):
    a, _ = base
    g1, g2 = a.group("conv1"), a.group("conv2")
    assert (g1.size, g2.size) == (C1, C2)
    assert g1.prunable and g2.prunable
    assert not a.group("conv3").prunable


@pytest.mark.parametrize("crit", [L1(), L2(), CPMC()], ids=lambda c: c.name)
def test_zero_channel_scores_lowest(crit):
    w = chain_weights()
    w["conv1.weight"][2] = 0.0  # producer filter of channel 2
    w["conv2.weight"][:, 2] = 0.0  # its consumer slice
    a, init = analysed(w)
    s = crit.score(a, init)[a.group("conv1").id]
    assert s.shape == (C1,)
    assert int(np.argmin(s)) == 2
    assert s[2] == 0.0
    assert np.all(np.delete(s, 2) > 0)


@pytest.mark.parametrize("crit", [L1(), L2()], ids=lambda c: c.name)
def test_scaled_up_channel_scores_highest(crit):
    w = chain_weights()
    w["conv1.weight"][4] *= 10
    w["conv2.weight"][:, 4] *= 10
    a, init = analysed(w)
    s = crit.score(a, init)[a.group("conv1").id]
    assert int(np.argmax(s)) == 4
    # by hand: the channel's producer filter and consumer slice
    f, cons = init["conv1.weight"][4].astype(np.float64), init["conv2.weight"][:, 4].astype(np.float64)
    if crit.name == "l1":
        assert s[4] == pytest.approx(np.abs(f).sum() + np.abs(cons).sum(), rel=1e-12)
    else:
        assert s[4] == pytest.approx(np.sqrt((f ** 2).sum() + (cons ** 2).sum()), rel=1e-12)


def test_l1_l2_by_hand_every_channel(base):
    a, init = base
    s1, s2 = L1().score(a, init), L2().score(a, init)
    w1, w2, w3 = (init[f"conv{i}.weight"].astype(np.float64) for i in (1, 2, 3))
    g1, g2 = a.group("conv1").id, a.group("conv2").id
    exp1 = np.abs(w1).sum(axis=(1, 2, 3)) + np.abs(w2).sum(axis=(0, 2, 3))
    exp2 = np.abs(w2).sum(axis=(1, 2, 3)) + np.abs(w3).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(s1[g1], exp1, rtol=1e-12)
    np.testing.assert_allclose(s1[g2], exp2, rtol=1e-12)
    np.testing.assert_allclose(s2[g1], np.sqrt((w1 ** 2).sum(axis=(1, 2, 3)) + (w2 ** 2).sum(axis=(0, 2, 3))),
                               rtol=1e-12)
    # blocked groups are not scored
    assert a.group("conv3").id not in s1 and a.group("x").id not in s1


def test_bn_scores_abs_gamma_and_none_without_bn(base):
    a, init = base
    s = BN().score(a, init)
    gamma = init["bn1.scale"]
    assert np.array_equal(s[a.group("conv1").id], np.abs(gamma).astype(np.float64))
    assert s[a.group("conv2").id] is None
    assert a.group("conv3").id not in s


def test_bn_unscored_group_is_never_planned(base):
    a, init = base
    s = BN().score(a, init)
    plan = make_plan(a, s, Target(TargetKind.RATIO, 0.5), normalize=True)
    assert set(plan.removed) <= {a.group("conv1").id}
    # the lowest |gamma| go first
    removed = plan.removed[a.group("conv1").id]
    g = np.abs(init["bn1.scale"])
    assert max(g[list(removed)]) <= min(np.delete(g, removed))


# ---------------------------------------------------------------- cpmc


def _cpmc_by_hand(init, a_exp, b_exp):
    """The CPMC score of every prunable channel of the chain model, computed from the model's
    definition (not from Analysis)."""
    w1, w2, w3 = (np.abs(init[f"conv{i}.weight"].astype(np.float64)) for i in (1, 2, 3))
    hw = H * W
    # (1) weight term: mean |w| of the producer filter + mean |w| of the consumer slice
    wt = {1: w1.mean(axis=(1, 2, 3)) + w2.mean(axis=(0, 2, 3)),
          2: w2.mean(axis=(1, 2, 3)) + w3.mean(axis=(0, 2, 3))}
    # (2) MACs freed: the channel's output plane in its producer + its input slice in the consumer
    macs = {1: np.full(C1, hw * C0 * 9 + hw * C2 * 9, np.float64),
            2: np.full(C2, hw * C1 * 9 + hw * C3 * 1, np.float64)}
    # (3) params freed: filter + bias (+ 4 BN params) + consumer slice
    params = {1: np.full(C1, C0 * 9 + 1 + 4 + C2 * 9, np.float64),
              2: np.full(C2, C1 * 9 + 1 + C3 * 1, np.float64)}

    def gmax(d):
        return max(v.max() for v in d.values())

    wm, mm, pm = gmax(wt), gmax(macs), gmax(params)
    return {k: (wt[k] / wm) / ((macs[k] / mm) ** a_exp * (params[k] / pm) ** b_exp) for k in wt}, macs, params


@pytest.mark.parametrize("ab", [(0.5, 0.5), (1.0, 0.0), (0.0, 2.0)])
def test_cpmc_formula_by_hand(base, ab):
    a, init = base
    exp, macs, params = _cpmc_by_hand(init, *ab)
    s = CPMC(a=ab[0], b=ab[1]).score(a, init)
    g1, g2 = a.group("conv1").id, a.group("conv2").id
    np.testing.assert_allclose(s[g1], exp[1], rtol=1e-9)
    np.testing.assert_allclose(s[g2], exp[2], rtol=1e-9)
    # the freed counts CPMC uses are Analysis.freed, and they match the hand count
    np.testing.assert_allclose(a.freed("macs")[g1], macs[1])
    np.testing.assert_allclose(a.freed("macs")[g2], macs[2])
    np.testing.assert_allclose(a.freed("params")[g1], params[1])
    np.testing.assert_allclose(a.freed("params")[g2], params[2])


def test_cpmc_freed_is_count_difference_for_one_channel(base):
    a, _ = base
    for kind in ("macs", "params"):
        full = a.count(kind)
        freed = a.freed(kind)
        for gname in ("conv1", "conv2"):
            g = a.group(gname)
            for c in (0, g.size - 1):
                left = a.count(kind, a.removed_elements({g.id: np.array([c])}))
                assert full - left == pytest.approx(freed[g.id][c])


def test_cpmc_is_globally_normalised(base):
    """a = b = 0: the score is the weight term divided by its maximum over the whole network."""
    a, init = base
    s = CPMC(a=0.0, b=0.0).score(a, init)
    allv = np.concatenate([v for v in s.values()])
    assert allv.max() == pytest.approx(1.0)
    assert CPMC().normalize is False


def _two_resolution_model():
    """conv1 at 16x16 with large weights; conv2 (stride 4) at 4x4 with small weights.

    Channels of conv1 have large weight terms and large MACs; channels of conv2 small
    weight terms and small MACs, so a = 0 ranks conv2 lowest and a large a ranks conv1 lowest.
    """
    rng = np.random.default_rng(1)

    def u(scale, *shape):
        return (scale * rng.uniform(0.9, 1.1, shape)).astype(np.float32)

    w = {"conv1.weight": u(4.0, 4, 3, 3, 3), "conv2.weight": u(1.0, 4, 4, 3, 3), "conv3.weight": u(1.0, 2, 4, 1, 1)}
    nodes = [_conv("conv1", "x", w["conv1.weight"]),
             _conv("conv2", "conv1_out", w["conv2.weight"], stride=4),
             _conv("conv3", "conv2_out", w["conv3.weight"])]
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, "two_res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return analyze(m, measure_shapes(m, {"x": (1, 3, 16, 16)})), w


def test_cpmc_exponent_a_changes_ranking():
    a, w = _two_resolution_model()
    g1, g2 = a.group("conv1").id, a.group("conv2").id

    def lowest_group(crit):
        s = crit.score(a, w)
        plan = make_plan(a, s, Target(TargetKind.RATIO, 0.1), normalize=crit.normalize)  # one channel
        assert plan.num_removed == 1
        return next(iter(plan.removed))

    assert lowest_group(CPMC(a=0.0, b=0.0)) == g2
    assert lowest_group(CPMC(a=2.0, b=0.0)) == g1


def test_cpmc_flatten_consumer_mean_over_whole_slice():
    """After Flatten, a channel owns H*W Gemm columns: its consumer term is the mean |w|
    over all of them (one slice), not a sum of per-column means."""
    m = build_lenet()
    a = analyze(m, measure_shapes(m, {"x": (1, 1, 28, 28)}))
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}
    s = CPMC(a=0.0, b=0.0).score(a, init)
    w2, fc1, fc2 = np.abs(init["conv2.weight"]), np.abs(init["fc1.weight"]), np.abs(init["fc2.weight"])
    w1 = np.abs(init["conv1.weight"])
    wt = {
        "conv1": w1.mean(axis=(1, 2, 3)) + w2.mean(axis=(0, 2, 3)),
        "conv2": w2.mean(axis=(1, 2, 3)) + fc1.reshape(200, 64, 25).mean(axis=(0, 2)),
        "fc1": fc1.mean(axis=1) + fc2.mean(axis=0),
    }
    top = max(v.max() for v in wt.values())
    for name, v in wt.items():
        np.testing.assert_allclose(s[a.group(name).id], v / top, rtol=1e-9)


# ---------------------------------------------------------------- random, registry


def test_random_seeded(base):
    a, init = base
    s0, s0b, s1 = Random(seed=0).score(a, init), Random(seed=0).score(a, init), Random(seed=1).score(a, init)
    assert set(s0) == {a.group("conv1").id, a.group("conv2").id}
    for gid in s0:
        assert np.array_equal(s0[gid], s0b[gid])
        assert not np.array_equal(s0[gid], s1[gid])
        assert s0[gid].shape == (a.groups[gid].size,)
        assert np.all((s0[gid] >= 0) & (s0[gid] < 1))


def test_get_criterion():
    assert isinstance(get_criterion("l1"), L1)
    assert isinstance(get_criterion("l2"), L2)
    assert isinstance(get_criterion("bn"), BN)
    c = get_criterion("cpmc", a=0.25, b=1.0)
    assert isinstance(c, CPMC) and (c.a, c.b) == (0.25, 1.0)
    assert get_criterion("random", seed=7).seed == 7
    for crit in (L1(), L2(), BN(), CPMC(), Random()):
        assert crit.requires_data is False


def test_get_criterion_taylor():
    c = get_criterion("taylor", batch_size=8, seed=3)
    assert c.name == "taylor" and c.requires_data is True and c.normalize is True
    assert (c.batch_size, c.seed) == (8, 3)
    with pytest.raises(OnnxPruneError, match="taylor"):
        c.score(None, {})


def test_get_criterion_unknown_name_lists_the_choices():
    with pytest.raises(OnnxPruneError, match="unknown criterion 'bogus'.*ifso.*infcp.*taylor"):
        get_criterion("bogus")


@pytest.mark.parametrize("name, cls", [("taylor", "Taylor"), ("infcp", "InfCP"), ("ifso", "IFSO")])
def test_data_driven_criteria_are_registered_lazily(name, cls):
    import onnxprune.criteria as criteria

    c = get_criterion(name, seed=4)
    assert type(c) is getattr(criteria, cls)
    assert c.name == name and c.requires_data is True and c.seed == 4
    with pytest.raises(OnnxPruneError, match=name):
        c.score(None, {})


def test_member_sum_equals_member_reduce() -> None:
    """member_sum (one pass per weight, l1 / l2 / bn) gives member_reduce's sums: |w| bit
    for bit, w^2 to float64 rounding; equal channels stay equal (ties keep their order)."""
    from onnxprune.criteria.base import WEIGHT_ROLES, member_reduce, member_sum

    for name in ("lenet", "residual", "concat", "flatten_gemm"):
        model = ALL_BUILDERS[name]()
        analysis = analyze(model, measure_shapes(model, {"x": INPUT_SHAPES[name]}))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        weights = {k: (np.full_like(v, 0.25) if k.startswith("W") and v.ndim == 4 else v) for k, v in weights.items()}
        for g in analysis.groups:
            if not g.prunable:
                continue
            a = member_reduce(g, weights, WEIGHT_ROLES, lambda w: np.abs(w).sum(axis=1))
            np.testing.assert_array_equal(member_sum(g, weights, WEIGHT_ROLES, np.abs), a)
            b = member_reduce(g, weights, WEIGHT_ROLES, lambda w: (w * w).sum(axis=1))
            np.testing.assert_allclose(member_sum(g, weights, WEIGHT_ROLES, np.square), b, rtol=1e-12)
