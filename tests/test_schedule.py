"""Progressive compression (onnxprune.schedule and the pipeline's accuracy guard)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.criteria import get_criterion
from onnxprune.evaluate import evaluate
from onnxprune.holdout import split_holdout
from onnxprune.pipeline import CompressOptions, compress, prepare, weights_of
from onnxprune.planning import PlanOptions, Target, TargetKind
from onnxprune.recover.training import FinetuneOptions
from onnxprune.schedule import (Milestone, StepSetup, auto_steps, initial_state, milestones, plan_of_original,
                                run_step)
from onnxprune.surgery import apply_plan
from onnxprune.surgery.oracle import zeroed_reference
from planted import argmax_data
from tiny_models import INPUT_NAME, INPUT_SHAPES, build_lenet, build_residual, random_input


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# ---- milestones ------------------------------------------------------------------------
def test_auto_steps():
    assert auto_steps(Target(TargetKind.MACS, 0.5), recovering=True) == 4
    assert auto_steps(Target(TargetKind.MACS, 0.9), recovering=True) == 1
    assert auto_steps(Target(TargetKind.RATIO, 0.3), recovering=True) == 2
    assert auto_steps(Target(TargetKind.MACS, 0.05), recovering=True) == 6
    assert auto_steps(Target(TargetKind.MACS, 0.5), recovering=False) == 1


def test_milestones_are_geometric_and_end_at_the_target():
    ms = milestones(Target(TargetKind.MACS, 0.5), 4)
    kept = [m.kept for m in ms]
    assert kept[-1] == pytest.approx(0.5)
    ratios = [kept[0]] + [b / a for a, b in zip(kept, kept[1:])]
    assert ratios == pytest.approx([0.5 ** 0.25] * 4)  # every step removes the same share of what is left
    assert milestones(Target(TargetKind.RATIO, 0.3), 2)[-1].kept == pytest.approx(0.7)  # channels kept


# ---- steps on the tiny models ----------------------------------------------------------
def _setup(model_name: str, model: onnx.ModelProto, **kw) -> StepSetup:
    prep_model = model
    from onnxprune.analysis import analyze
    from onnxprune.shapes import measure_shapes

    shapes = {INPUT_NAME: INPUT_SHAPES[model_name]}
    a = analyze(prep_model, measure_shapes(prep_model, shapes))
    crit = get_criterion("l1")
    return StepSetup(prep_model, a, shapes, lambda m, an: (crit.score(an, weights_of(m)), {}), crit.normalize,
                     PlanOptions(round_to=1), **kw)


def _removed_in_parent(parent_kept, new_kept, parent_analysis):
    out = {}
    for g in parent_analysis.groups:
        if g.name in parent_kept:
            gone = np.flatnonzero(~np.isin(parent_kept[g.name], new_kept[g.name]))
            if len(gone):
                out[g.id] = gone
    return out


@pytest.mark.parametrize("name,builder", [("residual", build_residual), ("lenet", build_lenet)])
def test_each_step_passes_the_oracle_against_its_parent_and_the_plans_compose(name, builder):
    model = builder(seed=0)
    setup = _setup(name, model)
    state = initial_state(model, setup.original_analysis)
    feeds = random_input(name, seed=3)
    for i, m in enumerate(milestones(Target(TargetKind.MACS, 0.4), 3), start=1):
        new, rec, _ = run_step(i, m, state, setup, 1)
        assert rec.macs_fraction <= m.kept + 0.03
        removed = _removed_in_parent(state.kept, new.kept, state.analysis)
        assert removed, f"step {i} removed nothing"
        ref = zeroed_reference(state.model, state.analysis, removed)
        for got, want in zip(_run(new.model, feeds), _run(ref, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        state = new
    # the final plan is a plan of the *original* model: applying it gives the final model
    plan = plan_of_original(setup.original_analysis, state, Target(TargetKind.MACS, 0.4))
    plan.validate(setup.original_analysis)
    direct = apply_plan(model, setup.original_analysis, {g: np.asarray(v) for g, v in plan.removed.items()})
    for got, want in zip(_run(direct, feeds), _run(state.model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert plan.macs_after == state.macs


def _conv_out_channels(m: onnx.ModelProto) -> list[int]:
    """Output channels of every 4-D Conv weight (the tiny models name them ``*.weight``)."""
    return [onnx.numpy_helper.to_array(i).shape[0] for i in m.graph.initializer
            if i.name.endswith(".weight") and len(i.dims) == 4]


def test_a_cut_that_is_not_faster_is_replanned_coarser():
    model = build_residual(seed=0)
    seen = []

    def fake_ms(m: onnx.ModelProto) -> float:
        """Slower than the original (1 ms) unless every conv's output channels are a multiple of 4."""
        counts = _conv_out_channels(m)
        seen.append(counts)
        return 0.5 if all(c % 4 == 0 for c in counts) else 1.2

    setup = _setup("residual", model, measure=fake_ms, original_ms=1.0, round_to_fixed=False)
    state = initial_state(model, setup.original_analysis, 1.0)
    new, rec, rt = run_step(1, Milestone(TargetKind.MACS, 0.6), state, setup, 1)
    assert rt == 4 and rec.round_to == 4 and rec.latency_ms == 0.5
    assert any("round_to 2" in n for n in rec.notes) and any("round_to 4" in n for n in rec.notes)
    assert len(seen) == 3  # round_to 1, 2, 4
    fixed = dataclasses.replace(setup, round_to_fixed=True)
    seen.clear()
    _, rec, rt = run_step(1, Milestone(TargetKind.MACS, 0.6), state, fixed, 1)
    assert rt == 1 and len(seen) == 1  # the user's round_to is kept


@pytest.mark.parametrize("fast_multiple,expected", [(4, 4), (2, 2), (None, 1)])
def test_round_to_probe_measures_whole_cuts_and_takes_the_smallest_fast_one(fast_multiple, expected):
    """A fake runtime fast only when every conv keeps a multiple of ``fast_multiple``
    channels (flat when None): the probe must pick that multiple (1 when all are alike)."""
    from onnxprune.schedule import probe_round_to

    model = build_residual(seed=0)
    setup = _setup("residual", model)
    a = setup.original_analysis
    seen = []

    def fake_ms(m: onnx.ModelProto) -> float:
        counts = _conv_out_channels(m)
        seen.append(counts)
        if fast_multiple is None:
            return 0.8
        return 0.5 if all(c % fast_multiple == 0 for c in counts) else 1.2

    l1 = get_criterion("l1")
    probe = probe_round_to(model, a, Target(TargetKind.MACS, 0.6), PlanOptions(),
                           l1.score(a, weights_of(model)), fake_ms, 1.0, (1, 2, 4))
    assert probe.chosen == expected
    assert sorted(probe.ms) == [1, 2, 4] and len(seen) == 3  # one measured cut per candidate
    assert all(v <= 0.6 + 1e-9 for v in probe.macs.values())  # every probed cut meets the target
    assert probe.to_json()["chosen"] == expected


# ---- the whole pipeline ----------------------------------------------------------------
def _lenet_file(tmp_path):
    path = tmp_path / "lenet.onnx"
    onnx.save(build_lenet(seed=0), str(path))
    return path


def test_scoring_and_recovery_never_see_held_out_rows(tmp_path, monkeypatch):
    path = _lenet_file(tmp_path)
    data = argmax_data(build_lenet(seed=0), 40, seed=0)
    data.x[:, 0, 0, 0] = np.arange(40)  # row ids
    seen = {"score": set(), "recover": set()}
    crit_cls = type(get_criterion("taylor"))
    real_score = crit_cls.score_with_data

    def score_spy(self, analysis, model, d, **kw):
        seen["score"].update(d.x[:, 0, 0, 0].astype(int).tolist())
        return real_score(self, analysis, model, d, **kw)

    import onnxprune.recover as recover_mod
    real_recover = recover_mod.recover

    def recover_spy(original, pruned, analysis, removed, d, **kw):
        seen["recover"].update(d.x[:, 0, 0, 0].astype(int).tolist())
        return real_recover(original, pruned, analysis, removed, d, **kw)

    monkeypatch.setattr(crit_cls, "score_with_data", score_spy)
    monkeypatch.setattr(recover_mod, "recover", recover_spy)
    res = compress(path, tmp_path / "out.onnx", CompressOptions(
        criterion="taylor", target=Target(TargetKind.MACS, 0.6), data=data, val_split=0.25, steps=2, bench=False,
        recalibrate_bn=True, finetune=FinetuneOptions(epochs=1, batch_size=8), batch_size=8))
    val = set(split_holdout(data, 0.25, 0).val_index.tolist())
    assert len(val) == 10
    assert seen["score"] and seen["recover"]
    assert not (seen["score"] | seen["recover"]) & val
    assert len(res.report.schedule) == 2
    assert res.report.held_out["samples"] == 10


def test_accuracy_guard_never_returns_a_model_that_breaks_the_bound(tmp_path):
    path = _lenet_file(tmp_path)
    model = build_lenet(seed=0)
    data = argmax_data(model, 60, seed=1)  # labels = the original's argmax: it scores 100 %
    opts = CompressOptions(criterion="l1", target=Target(TargetKind.MACS, 0.05), data=data, val_split=0.5,
                           steps=4, bench=False, max_drop=0.0, batch_size=16)
    res = compress(path, tmp_path / "out.onnx", opts)
    rep = res.report
    steps = rep.schedule
    assert any(not s["accepted"] for s in steps), "the guard never acted: the test proves nothing"
    assert rep.reachable is not None  # the target was not reached, and the report says so
    assert any("accuracy guard" in w for w in rep.warnings)
    # the written model, measured independently on the same held-out rows, holds the bound
    val = split_holdout(data, 0.5, 0).val
    written = onnx.load(str(tmp_path / "out.onnx"))
    acc = evaluate(written, val, batch_size=16).accuracy
    assert 100.0 * acc >= rep.held_out["original"] - 0.0 - 1e-9
    assert rep.held_out["final"] == pytest.approx(100.0 * acc)
    assert rep.macs_after <= rep.macs_before


def test_max_drop_alone_compresses_as_far_as_the_bound_allows(tmp_path):
    path = _lenet_file(tmp_path)
    data = argmax_data(build_lenet(seed=0), 60, seed=2)
    res = compress(path, tmp_path / "out.onnx", CompressOptions(
        criterion="l1", target=None, data=data, val_split=0.5, bench=False, max_drop=20.0, batch_size=16))
    rep = res.report
    assert rep.held_out["drop"] <= 20.0
    assert rep.macs_after < rep.macs_before  # it did compress
    assert rep.schedule[-1]["accepted"] is False or rep.schedule[-1]["macs_fraction"] < 0.06


def test_options_that_cannot_run_are_refused_before_loading(tmp_path):
    from onnxprune.errors import OnnxPruneError

    path = _lenet_file(tmp_path)
    with pytest.raises(OnnxPruneError, match="--max-drop needs held-out data"):
        compress(path, tmp_path / "o.onnx", CompressOptions(max_drop=1.0))
    with pytest.raises(OnnxPruneError, match="give a target"):
        compress(path, tmp_path / "o.onnx", CompressOptions(target=None))
    with pytest.raises(OnnxPruneError, match="--steps"):
        compress(path, tmp_path / "o.onnx", CompressOptions(steps=0))
    assert not (tmp_path / "o.onnx").exists()


def test_one_step_without_recovery_is_the_one_shot_cut(tmp_path):
    path = _lenet_file(tmp_path)
    res = compress(path, tmp_path / "o.onnx", CompressOptions(target=Target(TargetKind.MACS, 0.5), bench=False))
    prep = prepare(path)
    crit = get_criterion("l1")
    from onnxprune.planning import make_plan

    plan = make_plan(prep.analysis, crit.score(prep.analysis, weights_of(prep.model)), Target(TargetKind.MACS, 0.5))
    assert {k: tuple(v) for k, v in res.plan.removed.items()} == {k: tuple(v) for k, v in plan.removed.items()}
    assert len(res.report.schedule) == 1 and res.report.held_out is None


# ---- round_to auto, cached -------------------------------------------------------------
def test_round_to_sweep_is_cached_per_setup(tmp_path, monkeypatch):
    import onnxprune.runtime.sweep as sweep
    from onnxprune.runtime.sweep_cache import cached_channel_sweep

    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = sweep.channel_sweep

    def counting(*a, **kw):
        calls.append(kw.get("threads"))
        return real(*a, **kw)

    monkeypatch.setattr(sweep, "channel_sweep", counting)
    path = tmp_path / "m.onnx"
    onnx.save(build_residual(seed=0), str(path))
    prep = prepare(path)
    a = prep.analysis
    first = cached_channel_sweep(prep.model, a.shapes, a, threads=1, window=8)
    again = cached_channel_sweep(prep.model, a.shapes, a, threads=1, window=8)
    other = cached_channel_sweep(prep.model, a.shapes, a, threads=2, window=8)  # another setup: swept
    assert calls == [1, 2]
    assert not first.info["cached"] and again.info["cached"] and not other.info["cached"]
    assert again.round_to == first.round_to and again.info["tables"] == first.info["tables"]
    (tmp_path / "cache" / "round_to.json").write_text("{not json")
    broken = cached_channel_sweep(prep.model, a.shapes, a, threads=1, window=8)  # never a failure
    assert "unreadable" in broken.info["cache_note"] and calls == [1, 2, 1]


def test_only_the_final_cut_is_coarsened_and_gradual_steps_are_capped():
    model = build_residual(seed=0)
    calls = []

    def slow_ms(m: onnx.ModelProto) -> float:
        calls.append(1)
        return 2.0  # never faster than the original's 1 ms

    setup = _setup("residual", model, measure=slow_ms, original_ms=1.0, round_to_fixed=False, final_kept=0.3,
                   gradual=True)
    state = initial_state(model, setup.original_analysis, 1.0)
    new, rec, rt = run_step(1, Milestone(TargetKind.MACS, 0.8), state, setup, 1)
    assert rt == 1 and len(calls) == 1  # an intermediate cut is measured, not coarsened
    for g in state.analysis.groups:  # and no group lost more than half its channels in one step
        if g.prunable:
            assert len(new.kept[g.name]) >= g.size / 2
    calls.clear()
    _, rec, rt = run_step(2, Milestone(TargetKind.MACS, 0.3), new, setup, 1, final=True)
    assert len(calls) > 1 and any("no round_to up to 32" in n for n in rec.notes)
