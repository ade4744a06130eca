"""Tests of the planner (onnxprune.planning): targets met exactly and minimally, caps,
rounding, exclusions, blocked groups, grouped convolutions, and the plan's JSON/validate."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest

from onnxprune.analysis import analyze
from onnxprune.criteria import get_criterion
from onnxprune.errors import PlanError
from onnxprune.pipeline import prepare, weights_of
from onnxprune.planning import PlanOptions, PruningPlan, Scope, Target, TargetKind, make_plan
from onnxprune.shapes import measure_shapes
from onnxprune.surgery import apply_plan
from tiny_models import ALL_BUILDERS, INPUT_SHAPES

MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"
TOL = 1e-9


@functools.lru_cache(maxsize=None)
def model_and_analysis(name: str):
    """(model, analysis, input shapes) of a tiny model, or of ``mnist_cnn`` (canonical form)."""
    if name == "mnist_cnn":
        if not MNIST.exists():
            pytest.skip(f"{MNIST} not present")
        p = prepare(MNIST)
        return p.model, p.analysis, dict(p.input_shapes)
    m = ALL_BUILDERS[name]()
    shapes = {"x": INPUT_SHAPES[name]}
    return m, analyze(m, measure_shapes(m, shapes)), shapes


def scores_of(name: str, crit: str):
    m, a, _ = model_and_analysis(name)
    c = get_criterion(crit)
    return c.score(a, weights_of(m)), c.normalize


def plan_of(name, target, options=PlanOptions(), crit="l1", scores=None, normalize=None):
    _, a, _ = model_and_analysis(name)
    if scores is None:
        scores, norm = scores_of(name, crit)
        normalize = norm if normalize is None else normalize
    plan = make_plan(a, scores, target, options, normalize=True if normalize is None else normalize)
    plan.validate(a)
    return a, plan


def removed_counts(plan):
    return {gid: len(v) for gid, v in plan.removed.items()}


def norm_keys(scores, normalize):
    out = {}
    for gid, s in scores.items():
        if s is None:
            continue
        s = np.asarray(s, np.float64)
        mean = np.abs(s).mean()
        out[gid] = s / mean if normalize and mean > 0 else s
    return out


def macs_fraction(a, removed):
    return a.count("macs", a.removed_elements(removed)) / a.count("macs")


# ------------------------------------------------------------------ MACs / params targets

MACS_CASES = [(n, t, c) for n in ("lenet", "residual", "chain", "mnist_cnn")
              for t in (0.5, 0.7) for c in ("l1", "cpmc")]


@pytest.mark.parametrize("name,t,crit", MACS_CASES)
def test_macs_target_met_minimally(name, t, crit):
    scores, normalize = scores_of(name, crit)
    a, plan = plan_of(name, Target(TargetKind.MACS, t), crit=crit)
    assert plan.reachable is None and plan.warnings == ()
    assert plan.macs_before == a.count("macs")
    frac = plan.macs_after / plan.macs_before
    assert frac <= t + TOL
    if name in ("lenet", "mnist_cnn"):  # fine-grained enough to land close to the target
        assert frac > t - 0.1
    # prediction = the analysis' own count of the removed channels
    elems = a.removed_elements({g: np.asarray(v) for g, v in plan.removed.items()})
    assert plan.macs_after == a.count("macs", elems)
    assert plan.params_after == a.count("params", elems)
    assert plan.params_before == a.count("params")
    # minimal: putting back the last channel of the global ranking misses the target
    keys = norm_keys(scores, normalize)
    gid, c = max(((g, c) for g, v in plan.removed.items() for c in v), key=lambda gc: keys[gc[0]][gc[1]])
    fewer = {g: np.asarray([i for i in v if (g, i) != (gid, c)]) for g, v in plan.removed.items()}
    assert macs_fraction(a, fewer) > t


@pytest.mark.parametrize("name", ["lenet", "residual", "chain", "mnist_cnn"])
@pytest.mark.parametrize("kind,t", [(TargetKind.MACS, 0.5), (TargetKind.PARAMS, 0.6)])
def test_prediction_equals_pruned_model(name, kind, t):
    m, a, shapes = model_and_analysis(name)
    _, plan = plan_of(name, Target(kind, t))
    assert plan.removed
    pruned = apply_plan(m, a, {g: np.asarray(v) for g, v in plan.removed.items()})
    a2 = analyze(pruned, measure_shapes(pruned, shapes))
    assert a2.count("macs") == plan.macs_after
    assert a2.count("params") == plan.params_after
    got = (plan.macs_after / plan.macs_before) if kind is TargetKind.MACS else plan.params_after / plan.params_before
    assert got <= t + TOL
    # the kept counts are the re-analysed group sizes
    for gid, idx in plan.removed.items():
        assert a2.group(a.groups[gid].name).size == a.groups[gid].size - len(idx)


@pytest.mark.parametrize("name", ["lenet", "residual", "concat", "depthwise", "flatten_flatten_matmul"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_ratio_target_removes_that_fraction_of_prunable_channels(name, ratio):
    a, plan = plan_of(name, Target(TargetKind.RATIO, ratio), crit="random")
    total = sum(g.size for g in a.groups if g.prunable)
    assert plan.reachable is None
    assert plan.num_removed == math.ceil(ratio * total - 1e-9)
    assert abs(plan.num_removed - round(ratio * total)) <= 1


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("name", ["chain", "residual", "lenet", "se_block", "grouped", "concat", "mnist_cnn"])
@pytest.mark.parametrize("t", [0.5, 0.01])
def test_round_to_four(name, t):
    a, plan = plan_of(name, Target(TargetKind.MACS, t), PlanOptions(round_to=4), crit="random")
    for gid in plan.removed:
        g = a.groups[gid]
        kept = g.size - len(plan.removed[gid])
        assert kept % 4 == 0 and kept >= 4, (g.name, g.size, kept)
        assert g.size > 4
    if name == "se_block":  # se_reduce has 4 channels: no multiple of 4 below 4
        assert a.group("se_reduce").id not in plan.removed


@pytest.mark.parametrize("name", ["chain", "residual", "lenet", "grouped", "mnist_cnn"])
@pytest.mark.parametrize("t", [0.5, 0.3])
@pytest.mark.parametrize("round_to", [4, 8])
def test_rounding_gives_back_whole_steps_while_the_target_holds(name, t, round_to):
    """Rounding down must not overshoot: the plan meets the MACs target, and putting back one
    more rounding step of any pruned group would break it (the plan is maximal)."""
    opts = PlanOptions(round_to=round_to)
    a, plan = plan_of(name, Target(TargetKind.MACS, t), opts)
    if plan.reachable is not None:
        pytest.skip("target out of reach at this round_to")
    macs0 = a.count("macs")
    assert plan.macs_after <= t * macs0 + 1e-9
    for gid, chosen in plan.removed.items():
        g = a.groups[gid]
        step = math.lcm(g.blocks, round_to)
        if len(chosen) < step:
            continue
        rem = {k: np.asarray(v) for k, v in plan.removed.items()}
        rem[gid] = np.asarray(chosen)[: len(chosen) - step]
        if g.blocks == 1:  # any step-sized give-back is a valid plan; grouped ones need per-block counts
            assert a.count("macs", a.removed_elements(rem)) > t * macs0, (g.name, len(chosen))


def test_round_to_equal_to_group_size_leaves_group_whole():
    a, plan = plan_of("chain", Target(TargetKind.MACS, 0.3), PlanOptions(round_to=8), crit="random")
    assert a.group("conv1").id not in plan.removed  # 8 channels: only 8 is a multiple of 8
    assert len(plan.removed[a.group("conv2").id]) == 4  # 12 -> 8
    assert plan.reachable is not None


@pytest.mark.parametrize("name", ["lenet", "residual", "concat", "grouped", "mnist_cnn"])
def test_max_layer_ratio(name):
    a, plan = plan_of(name, Target(TargetKind.MACS, 0.01), PlanOptions(max_layer_ratio=0.25), crit="random")
    # grouped: 25% of 8 or 12 channels in 4 blocks is less than one channel per block
    assert bool(plan.removed) == (name != "grouped")
    for gid, idx in plan.removed.items():
        assert len(idx) <= 0.25 * a.groups[gid].size
    assert plan.reachable is not None


def test_min_channels():
    a, plan = plan_of("lenet", Target(TargetKind.MACS, 0.01), PlanOptions(min_channels=5), crit="random")
    for g in a.groups:
        if g.id in plan.removed:
            assert g.size - len(plan.removed[g.id]) == 5


def test_exclude_protects_matching_groups():
    # groups are named after their first node; a group whose members include a
    # matching node (e.g. as consumer) is protected too
    a, plan = plan_of("lenet", Target(TargetKind.MACS, 0.5), PlanOptions(exclude=("conv*",)))
    assert set(plan.removed) == {a.group("fc1").id}
    a, plan = plan_of("lenet", Target(TargetKind.MACS, 0.5), PlanOptions(exclude=("fc1",)))
    assert set(plan.removed) == {a.group("conv1").id}  # conv2's channels are read by fc1
    a, free = plan_of("lenet", Target(TargetKind.MACS, 0.5))
    assert len(free.removed) == 3


@pytest.mark.parametrize("name", sorted(n for n in ALL_BUILDERS))
def test_never_the_last_channel_and_unreachable_reported(name):
    a, plan = plan_of(name, Target(TargetKind.MACS, 0.001), crit="random")
    for gid, idx in plan.removed.items():
        assert len(idx) < a.groups[gid].size
        assert a.groups[gid].blocked_reason is None
    assert plan.reachable is not None and plan.reachable > 0.001
    assert plan.reachable == pytest.approx(plan.macs_after / plan.macs_before)
    assert len(plan.warnings) == 1 and f"{plan.reachable:.3f}" in plan.warnings[0]
    # at this extreme every prunable group is down to its minimum: one channel per
    # grouped-conv block, and one per tensor that holds part of the group (Split outputs)
    for g in a.groups:
        if g.prunable:
            kept = set(plan.kept(g.id))
            assert len(kept) == max(g.blocks, len(g.keep_one_of))
            assert all(kept & set(s.tolist()) for s in g.keep_one_of)


def test_unreachable_ratio_reports_fraction_removed():
    a, plan = plan_of("chain", Target(TargetKind.RATIO, 0.99), crit="random")
    total = sum(g.size for g in a.groups if g.prunable)
    assert plan.reachable == pytest.approx(plan.num_removed / total)
    assert plan.num_removed == total - 2  # conv1 and conv2 keep one channel each


def test_blocked_groups_never_removed():
    _, a, _ = model_and_analysis("barrier")
    blocked = {g.id for g in a.groups if g.blocked_reason}
    assert blocked and any(g.prunable for g in a.groups)
    # blocked groups get the lowest scores of all: they must still be left alone
    scores = {g.id: (np.full(g.size, 1e-6) if g.id in blocked else np.arange(1.0, g.size + 1)) for g in a.groups}
    plan = make_plan(a, scores, Target(TargetKind.MACS, 0.01), normalize=False)
    assert plan.removed and not (set(plan.removed) & blocked)


def test_layer_scope_same_fraction_everywhere():
    for target in (Target(TargetKind.RATIO, 0.3), Target(TargetKind.RATIO, 0.5), Target(TargetKind.MACS, 0.6)):
        a, plan = plan_of("lenet", target, PlanOptions(scope=Scope.LAYER), crit="random")
        sizes = {g.id: g.size for g in a.groups if g.prunable}
        r = {gid: len(plan.removed.get(gid, ())) for gid in sizes}
        # one fraction f with r_g = floor(f * size_g) for every group
        lo = max(r[g] / sizes[g] for g in sizes)
        hi = min((r[g] + 1) / sizes[g] for g in sizes)
        assert lo < hi, r
        assert all(v > 0 for v in r.values())
    # same-fraction differs from global: global l1 on lenet does not cut every group alike
    a, plan = plan_of("lenet", Target(TargetKind.RATIO, 0.5), PlanOptions(scope=Scope.LAYER), crit="random")
    fr = [len(plan.removed[g.id]) / g.size for g in a.groups if g.prunable]
    assert max(fr) - min(fr) <= 1 / 32


@pytest.mark.parametrize("target", [Target(TargetKind.RATIO, 0.3), Target(TargetKind.MACS, 0.5),
                                    Target(TargetKind.MACS, 0.01)])
@pytest.mark.parametrize("scope", [Scope.GLOBAL, Scope.LAYER])
def test_grouped_conv_same_count_per_block(target, scope):
    a, plan = plan_of("grouped", target, PlanOptions(scope=scope), crit="random")
    grouped = [g for g in a.groups if g.blocks > 1]
    assert grouped
    assert any(g.id in plan.removed for g in grouped)
    for g in grouped:
        idx = np.asarray(plan.removed.get(g.id, ()), dtype=np.int64)
        per = np.bincount(idx // (g.size // g.blocks), minlength=g.blocks)
        assert len(set(per.tolist())) == 1, (g.name, per)
        assert per[0] < g.size // g.blocks  # each block keeps at least one


def test_grouped_conv_removes_lowest_per_block():
    _, a, _ = model_and_analysis("grouped")
    g = a.group("gconv")
    s = np.array([3, 1, 2, 9, 8, 7, 0.5, 5, 6, 4, 11, 10], float)  # 4 blocks of 3
    scores = {g.id: s}
    plan = make_plan(a, scores, Target(TargetKind.RATIO, 0.1), normalize=False)
    assert plan.removed == {g.id: (1, 5, 6, 9)}  # the lowest of each block


def test_lowest_scored_channels_are_removed():
    _, a, _ = model_and_analysis("lenet")
    rng = np.random.default_rng(3)
    scale = {1: 1.0, 2: 100.0, 3: 0.001}  # very different scales: only normalisation makes them compare
    scores = {g.id: (rng.permutation(g.size) + 1.0) * scale[g.id] for g in a.groups if g.prunable}
    for normalize in (True, False):
        plan = make_plan(a, scores, Target(TargetKind.RATIO, 0.4), normalize=normalize)
        keys = norm_keys(scores, normalize)
        rem = [keys[g][i] for g, v in plan.removed.items() for i in v]
        kept = [keys[g][i] for g in keys for i in plan.kept(g)]
        assert max(rem) < min(kept)
        for gid, idx in plan.removed.items():  # per group: exactly its lowest
            assert set(idx) == set(np.argsort(scores[gid])[: len(idx)].tolist())
    # without normalisation the 0.001-scaled group (scores <= 0.2) goes first
    plan = make_plan(a, scores, Target(TargetKind.RATIO, 0.4), normalize=False)
    assert set(plan.removed) == {3} and len(plan.removed[3]) == math.ceil(0.4 * (32 + 64 + 200))
    # with it the removal spreads over all three groups
    plan = make_plan(a, scores, Target(TargetKind.RATIO, 0.4), normalize=True)
    assert set(plan.removed) == {1, 2, 3}


def test_unscored_groups_left_whole():
    _, a, _ = model_and_analysis("lenet")
    scores = {1: np.arange(32.0) + 1, 2: None}
    plan = make_plan(a, scores, Target(TargetKind.RATIO, 0.05))
    assert set(plan.removed) == {1}


def test_wrong_score_shape_raises():
    _, a, _ = model_and_analysis("lenet")
    with pytest.raises(ValueError):
        make_plan(a, {1: np.ones(31)}, Target(TargetKind.RATIO, 0.1))


# ------------------------------------------------------------------ plan, JSON, validate


def test_json_round_trip():
    a, plan = plan_of("residual", Target(TargetKind.MACS, 0.01), crit="random")
    assert plan.warnings
    back = PruningPlan.from_json(plan.to_json())
    assert dict(back.removed) == dict(plan.removed)
    assert dict(back.group_names) == dict(plan.group_names)
    assert dict(back.group_sizes) == dict(plan.group_sizes)
    assert back.target == plan.target
    assert (back.macs_before, back.macs_after, back.params_before, back.params_after) == \
        (plan.macs_before, plan.macs_after, plan.params_before, plan.params_after)
    assert back.reachable == plan.reachable and back.warnings == plan.warnings
    back.validate(a)
    assert back.to_json() == plan.to_json()


def test_from_json_malformed():
    good = PruningPlan({}, {0: "conv1"}, {0: 4}).to_json()
    assert PruningPlan.from_json(good).kept(0) == (0, 1, 2, 3)
    for text in ("not json", "{}", "[]", '{"groups": [{"id": 0}]}', good.replace('"kept": [\n    0', '"kept": [\n    9'),
                 good.replace('"target": null', '"target": {"kind": "macs", "value": 2}')):
        with pytest.raises(PlanError):
            PruningPlan.from_json(text)


def _hand_plan(a, removed, **over):
    names = {g.id: g.name for g in a.groups}
    sizes = {g.id: g.size for g in a.groups}
    names.update(over.get("names", {}))
    sizes.update(over.get("sizes", {}))
    return PruningPlan(removed, names, sizes)


def test_validate():
    _, a, _ = model_and_analysis("grouped")
    conv1, gconv = a.group("conv1"), a.group("gconv")  # 8 ch / 4 blocks, 12 ch / 4 blocks
    head = a.group("head")  # blocked (graph output)
    _hand_plan(a, {conv1.id: (0, 2, 4, 6)}).validate(a)  # one per block: fine
    _hand_plan(a, {}).validate(a)
    bad = {
        "does not have": _hand_plan(a, {99: (0,)}, names={99: "nope"}, sizes={99: 4}),
        "which the model": _hand_plan(a, {conv1.id: (0,)}, names={conv1.id: "renamed"}),
        "channels, the plan expects": _hand_plan(a, {conv1.id: (0, 2, 4, 6)}, sizes={conv1.id: 16}),
        "blocked": _hand_plan(a, {head.id: (0,)}),
        "distinct and in": _hand_plan(a, {gconv.id: (0, 12)}),
        "distinct": _hand_plan(a, {gconv.id: (0, 0)}),
        "in \\[0": _hand_plan(a, {gconv.id: (-1,)}),
        "lose all": _hand_plan(a, {conv1.id: tuple(range(8))}),
        "same number": _hand_plan(a, {conv1.id: (0, 1)}),  # two from block 0
    }
    for msg, plan in bad.items():
        with pytest.raises(PlanError, match=msg):
            plan.validate(a)

    # numpy index arrays are accepted like tuples
    _hand_plan(a, {conv1.id: np.array([1, 3, 5, 7]), gconv.id: np.array([], dtype=np.int64)}).validate(a)
    with pytest.raises(PlanError, match="blocked"):
        _hand_plan(a, {head.id: np.array([0])}).validate(a)

    _, lenet, _ = model_and_analysis("lenet")
    with pytest.raises(PlanError, match="lose all"):
        _hand_plan(lenet, {1: tuple(range(32))}).validate(lenet)


def test_partial_tensors_keep_a_channel():
    """split: conv1's 12 channels are split 4 + 8; neither part may become empty."""
    _, a, _ = model_and_analysis("split")
    g = a.group("conv1")
    parts = [p.tolist() for p in g.keep_one_of]
    assert [0, 1, 2, 3] in parts
    # part a scored lowest: the planner still keeps one of its channels
    scores = {g.id: np.r_[np.arange(4.0), np.arange(10.0, 18.0)]}
    plan = make_plan(a, scores, Target(TargetKind.MACS, 0.001), normalize=False)
    plan.validate(a)
    for p in g.keep_one_of:
        assert set(p.tolist()) - set(plan.removed[g.id])
    assert len(plan.removed[g.id]) == 10  # one kept in each part
    with pytest.raises(PlanError, match="Split"):
        _hand_plan(a, {g.id: (0, 1, 2, 3)}).validate(a)


def test_kept_and_num_removed():
    _, a, _ = model_and_analysis("chain")
    plan = _hand_plan(a, {1: (0, 3), 2: (5,)})
    assert plan.kept(1) == (1, 2, 4, 5, 6, 7)
    assert plan.kept(3) == tuple(range(16))
    assert plan.num_removed == 3


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.5, -0.2, float("nan")])
@pytest.mark.parametrize("kind", list(TargetKind))
def test_target_out_of_range(kind, value):
    with pytest.raises(PlanError):
        Target(kind, value)


def test_string_kinds_become_enums():
    """The planner compares kinds with `is`: strings from Python callers must not silently
    turn a MACs target into a params one, or a global scope into a layer one."""
    t = Target("macs", 0.5)
    assert t.kind is TargetKind.MACS
    assert PlanOptions(scope="global").scope is Scope.GLOBAL
    assert PlanOptions(exclude=["a*"]).exclude == ("a*",)
    a, by_str = plan_of("lenet", t, PlanOptions(scope="global"))
    _, by_enum = plan_of("lenet", Target(TargetKind.MACS, 0.5))
    assert dict(by_str.removed) == dict(by_enum.removed)
    with pytest.raises(PlanError, match="bogus"):
        Target("bogus", 0.5)
    with pytest.raises(PlanError, match="sideways"):
        PlanOptions(scope="sideways")


def test_target_str():
    assert str(Target(TargetKind.MACS, 0.5)) == "macs=0.5"


@pytest.mark.parametrize("kwargs", [dict(round_to=0), dict(max_layer_ratio=0), dict(max_layer_ratio=1.5),
                                    dict(min_channels=0)])
def test_plan_options_checked(kwargs):
    with pytest.raises(PlanError):
        PlanOptions(**kwargs)
