"""Latency targets: the planner on a synthetic latency table, the per-node latency model,
kernel-name mapping, and the measure-and-correct search with a deterministic fake clock.
No test asserts a wall-clock time."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import onnxprune.runtime.latency_search as search_mod
from onnxprune.analysis import analyze
from onnxprune.runtime.latency import LatencyStats
from onnxprune.criteria import get_criterion
from onnxprune.errors import PlanError
from onnxprune.runtime.latency_model import LatencyModel
from onnxprune.runtime.profile import NodeProfile, map_kernel, profile_nodes
from onnxprune.runtime.latency_search import LatencyRound, next_goal, search_latency
from onnxprune.pipeline import count_model, weights_of
from onnxprune.planning import PlanOptions, PruningPlan, Target, TargetKind, make_plan
from onnxprune.shapes import measure_shapes
from tiny_models import ALL_BUILDERS, INPUT_SHAPES


@functools.lru_cache(maxsize=None)
def tiny(name: str):
    m = ALL_BUILDERS[name]()
    shapes = {"x": INPUT_SHAPES[name]}
    return m, analyze(m, measure_shapes(m, shapes)), shapes


class TableLatency:
    """Synthetic latency: fixed_ms plus a per-channel cost (ms) for every kept channel."""

    def __init__(self, costs: dict[int, np.ndarray], fixed_ms: float = 0.0) -> None:
        self.costs, self.fixed = costs, fixed_ms

    @property
    def total_ms(self) -> float:
        return self.fixed + sum(float(c.sum()) for c in self.costs.values())

    def predict_ms(self, removed) -> float:
        gone = sum(float(self.costs[g][np.asarray(v, dtype=np.int64)].sum()) for g, v in removed.items())
        return self.total_ms - gone

    def saved_ms(self) -> list[np.ndarray]:
        return [self.costs[g] for g in sorted(self.costs)]


def synthetic(name="lenet", seed=0):
    _, a, _ = tiny(name)
    rng = np.random.default_rng(seed)
    costs = {g.id: (rng.uniform(0.1, 2.0, g.size) if g.prunable else np.zeros(g.size)) for g in a.groups}
    scores = {g.id: rng.uniform(0.1, 1.0, g.size) for g in a.groups if g.prunable}
    return a, TableLatency(costs, fixed_ms=5.0), scores


@pytest.mark.parametrize("t", [0.8, 0.6, 0.4])
def test_latency_target_met_minimally_in_score_per_ms_order(t):
    a, lat, scores = synthetic()
    plan = make_plan(a, scores, Target(TargetKind.LATENCY, t), normalize=False, latency=lat)
    plan.validate(a)
    assert plan.reachable is None and plan.target.kind is TargetKind.LATENCY
    assert lat.predict_ms(plan.removed) / lat.total_ms <= t + 1e-12
    keys = {(g, c): scores[g][c] / lat.costs[g][c] for g in scores for c in range(len(scores[g]))}
    removed = {(g, c) for g, v in plan.removed.items() for c in v}
    kept = set(keys) - removed
    # every removed channel ranks before every channel kept (in score per ms saved);
    # only the channel a group must keep to stay non-empty may rank lower
    worst_removed = max(keys[k] for k in removed)
    lower_kept = [k for k in kept if keys[k] < worst_removed]
    assert all(len(plan.removed[g]) == a.groups[g].size - 1 for g, _ in lower_kept)
    # minimal: putting back the last channel of the ranking misses the target
    last = max(removed, key=keys.get)
    fewer = {g: [c for c in v if (g, c) != last] for g, v in plan.removed.items()}
    assert lat.predict_ms(fewer) / lat.total_ms > t


def test_latency_ranking_differs_from_score_ranking():
    """Two channels of equal score: the one that saves more latency goes first."""
    a, lat, scores = synthetic()
    g = next(g for g in a.groups if g.prunable and g.size >= 4)
    scores = {k: np.full_like(v, 1.0) for k, v in scores.items()}
    lat.costs = {k: np.full_like(v, 1.0) for k, v in lat.costs.items()}
    lat.costs[g.id] = np.ones(g.size)
    lat.costs[g.id][2] = 50.0  # one channel of g is by far the slowest
    others = {k: v for k, v in lat.costs.items() if k != g.id}
    for k in others:
        others[k][:] = 0.01
    plan = make_plan(a, scores, Target(TargetKind.LATENCY, 0.99), normalize=False, latency=lat)
    assert plan.removed == {g.id: (2,)}


def test_channels_that_save_nothing_are_never_removed():
    a, lat, scores = synthetic()
    g = next(g for g in a.groups if g.prunable)
    lat.costs[g.id] = np.zeros(g.size)
    scores[g.id] = np.full(g.size, 1e-9)  # the least important channels of all
    lat.fixed = lat.total_ms  # half the time never shrinks: 0.05 is out of reach
    plan = make_plan(a, scores, Target(TargetKind.LATENCY, 0.05), normalize=False, latency=lat)
    assert g.id not in plan.removed
    assert plan.reachable is not None and "latency" in plan.warnings[0]


def test_latency_goal_overrides_target_value_and_is_checked():
    a, lat, scores = synthetic()
    t = Target(TargetKind.LATENCY, 0.6)
    deeper = make_plan(a, scores, t, normalize=False, latency=lat, latency_goal=0.4)
    assert lat.predict_ms(deeper.removed) / lat.total_ms <= 0.4 + 1e-12
    assert deeper.num_removed > make_plan(a, scores, t, normalize=False, latency=lat).num_removed
    with pytest.raises(PlanError, match="latency model"):
        make_plan(a, scores, t)
    with pytest.raises(PlanError, match="goal"):
        make_plan(a, scores, t, latency=lat, latency_goal=1.5)


def test_latency_plan_json_round_trip():
    a, lat, scores = synthetic()
    plan = make_plan(a, scores, Target(TargetKind.LATENCY, 0.5), PlanOptions(round_to=2), normalize=False,
                     latency=lat)
    back = PruningPlan.from_json(plan.to_json())
    assert back.target == Target(TargetKind.LATENCY, 0.5) and back.target.kind is TargetKind.LATENCY
    assert dict(back.removed) == dict(plan.removed)
    back.validate(a)


# ------------------------------------------------------------------ latency model


def test_latency_model_predictions_follow_macs_and_activations():
    m, a, _ = tiny("lenet")
    macs = a.count_by_node("macs")
    relu = next(n.name for n in m.graph.node if n.op_type == "Relu")
    node_ms = {**{n: v / 1e6 for n, v in macs.items()}, relu: 1.0, "not-a-node": 3.0}
    lm = LatencyModel.from_node_times(a, m, node_ms, total_ms=sum(node_ms.values()) + 2.0)
    assert "not-a-node" not in lm.node_ms and lm.fixed_ms == pytest.approx(5.0)
    assert lm.total_ms == pytest.approx(sum(node_ms.values()) + 2.0)
    assert lm.predict_ms({}) == pytest.approx(lm.total_ms)
    # MACs nodes: predicted time of the MACs part equals MACs after / 1e6
    half = {g.id: np.arange(g.size // 2) for g in a.groups if g.prunable}
    relu_elems = lm.outputs[relu]
    mask = a.removed_elements({g: np.asarray(v) for g, v in half.items()})
    relu_kept = float((~mask[relu_elems]).sum()) / len(relu_elems)
    want = lm.fixed_ms + a.count("macs", mask) / 1e6 + 1.0 * relu_kept
    assert lm.predict_ms(half) == pytest.approx(want)
    # saved_ms is the exact drop for one channel removed alone
    saved = lm.saved_ms()
    for g in a.groups:
        if g.prunable:
            assert saved[g.id][0] == pytest.approx(lm.total_ms - lm.predict_ms({g.id: [0]}))
            assert saved[g.id][0] > 0


def test_map_kernel_follows_onnxruntime_renaming():
    lookup = {"conv1": "conv1", "bn1": "bn1", "relu1": "relu1", "bn1_out": "bn1", "conv1_out": "conv1",
              "/m/act/Mul": "/m/act/Mul"}
    first_input = {"bn1": "conv1", "relu1": "bn1", "conv1": None}
    macs = {"conv1"}
    assert map_kernel("conv1", "Conv", lookup, first_input, macs) == "conv1"
    assert map_kernel("bn1_out_nchwc", "Conv", lookup, first_input, macs) == "conv1"  # fused, named by output
    assert map_kernel("relu1_token_12", "FusedConv", lookup, first_input, macs) == "conv1"  # two steps up
    assert map_kernel("/m/act/Mul/QuickGeluFusion/", "QuickGelu", lookup, first_input, macs) == "/m/act/Mul"
    assert map_kernel("relu1", "Relu", lookup, first_input, macs) == "relu1"  # not a matrix kernel: stays
    assert map_kernel("ReorderOutput_token_3", "ReorderOutput", lookup, first_input, macs) is None
    assert map_kernel("conv10", "Conv", lookup, first_input, macs) is None  # no partial-word matches


def test_profile_maps_every_conv_of_a_tiny_model():
    m, a, shapes = tiny("residual")
    prof = profile_nodes(m, shapes, macs_nodes=set(a.count_by_node("macs")), threads=1, warmup=1, runs=3)
    names = {n.name for n in m.graph.node}
    assert set(prof.node_ms) <= names and prof.runs == 3
    convs = {n.name for n in m.graph.node if n.op_type == "Conv"}
    assert convs <= set(prof.node_ms)
    assert all(v >= 0 for v in prof.node_ms.values()) and prof.total_ms > 0


# ------------------------------------------------------------------ search


def test_next_goal_rules():
    t = 0.6
    # missed: rescaled by measured / predicted, at least a 3 % step
    assert next_goal([LatencyRound(0.6, 0.6, 0.9, 1)], t) == pytest.approx(0.6 * 0.6 / 0.9)
    assert next_goal([LatencyRound(0.6, 0.6, 0.61, 1)], t, tolerance=0.0) == pytest.approx(0.97 * 0.6)
    # reached within the band: stop
    assert next_goal([LatencyRound(0.6, 0.6, 0.58, 1)], t) is None
    # overshot: prune less, but stay below the smallest goal that missed
    rounds = [LatencyRound(0.6, 0.6, 0.9, 1), LatencyRound(0.4, 0.4, 0.3, 1)]
    g = next_goal(rounds, t)
    assert 0.4 < g < 0.6 and g == pytest.approx(0.5)  # rescaled 0.8 is out of the bracket: midpoint
    assert next_goal([LatencyRound(0.5, 0.5, 0.45, 1)], t) == pytest.approx(0.5 * 0.6 / 0.45)


def fake_clock(monkeypatch, overhead: float):
    """measure_latency -> MACs-proportional time plus a fixed overhead share (ms); profile ->
    per-node MACs (so the latency model predicts pure MACs and is too optimistic)."""
    m, a, shapes = tiny("lenet")
    macs0 = a.count("macs")
    calls = []

    def measure(model, input_shapes, **kw):
        macs, _ = count_model(model, input_shapes)
        ms = overhead + (1 - overhead) * macs / macs0
        calls.append(ms)
        return LatencyStats(ms, ms, ms, ms, kw.get("repeat", 1), "CPUExecutionProvider", None, 1)

    def profile(model, input_shapes, **kw):
        by_node = a.count_by_node("macs")
        return NodeProfile({n: v / macs0 for n, v in by_node.items()}, 0.0, 1.0, 1, {})

    monkeypatch.setattr(search_mod, "measure_latency", measure)
    monkeypatch.setattr(search_mod, "profile_nodes", profile)
    return m, a, shapes, calls


@pytest.mark.parametrize("overhead", [0.0, 0.25])
def test_search_corrects_until_the_measured_target(monkeypatch, overhead):
    m, a, shapes, calls = fake_clock(monkeypatch, overhead)
    crit = get_criterion("l1")
    scores = crit.score(a, weights_of(m))
    res = search_latency(m, m, a, shapes, scores, Target(TargetKind.LATENCY, 0.6), normalize=crit.normalize,
                         tolerance=0.0)
    assert res.reached and res.measured_fraction <= 0.6
    assert res.measurements == len(res.rounds) == len(calls) - 1  # one baseline + one per round
    assert res.plan.reachable is None and res.plan.warnings == ()
    if overhead == 0:  # the model is exact: one measurement
        assert res.measurements == 1
    else:  # the model is too optimistic: it had to correct
        assert res.measurements > 1 and res.rounds[0].measured > 0.6
        assert res.rounds[1].goal < res.rounds[0].goal
    assert res.measurements <= 4
    assert res.after.median_ms == pytest.approx(res.measured_fraction * res.before.median_ms)


def test_search_reports_an_unreachable_target(monkeypatch):
    m, a, shapes, _ = fake_clock(monkeypatch, overhead=0.7)  # 70 % of the time never shrinks
    crit = get_criterion("l1")
    res = search_latency(m, m, a, shapes, crit.score(a, weights_of(m)), Target(TargetKind.LATENCY, 0.5),
                         normalize=crit.normalize)
    assert not res.reached and res.measured_fraction > 0.5
    assert res.plan.reachable == pytest.approx(res.measured_fraction)
    assert "out of reach" in res.plan.warnings[0]
    assert 1 <= res.measurements <= 4
    assert res.to_dict()["reached"] is False


def test_search_needs_a_latency_target():
    m, a, shapes = tiny("lenet")
    with pytest.raises(PlanError, match="latency target"):
        search_latency(m, m, a, shapes, {}, Target(TargetKind.MACS, 0.5))
