"""A progressive compress run: the held-out split, the schedule of steps under the accuracy
guard, and the held-out summary (the part of :func:`onnxprune.pipeline.compress` between
analysis and verification).

:class:`ProgressiveRun` turns :class:`~onnxprune.pipeline.CompressOptions` into a
:class:`~onnxprune.schedule.StepSetup` (criterion, recovery, held-out metric, latency
measurement), runs the milestones of :mod:`onnxprune.schedule` and applies the guard: a
step whose held-out figure drops more than ``max_drop`` points is rejected, retried once
halfway, and the run stops at the last step that holds the bound.

In a multi-process run (:mod:`onnxprune.distributed`) scoring and recovery are
data-parallel (every rank runs them), while every measurement a decision rests on (the
original's and every cut's latency, the latency search, the held-out figures) is taken
by rank 0 alone and broadcast, so every rank takes the same decisions and holds the same
model after every step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.analysis import Analysis
from onnxprune.distributed import current, fault_point
from onnxprune.holdout import HeldOutMetric, Split, split_holdout
from onnxprune.planning import ROUND_TO_AUTO, PlanOptions, Target, TargetKind
from onnxprune.runtime.latency import measure_interleaved, measure_latency, reference_session
from onnxprune.runtime.latency_search import search_latency
from onnxprune.schedule import (PROBE_ROUND_TO, Milestone, State, StepRecord, StepSetup, auto_steps, guard_milestones,
                                initial_state, milestones, probe_round_to, run_step)

if TYPE_CHECKING:
    from onnxprune.pipeline import CompressOptions, Prepared

__all__ = ["AUTO_SAMPLES_PER_STEP", "ProgressiveRun", "auto_epochs", "held_out_split", "reached", "timed"]


@contextmanager
def timed(times: dict[str, float], stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0


#: recovery sample passes per step that :func:`auto_epochs` aims at
AUTO_SAMPLES_PER_STEP = 4096
#: the last step's recovery gets this many times the per-step budget (what is returned is
#: recovered there; earlier steps only need to hand a healthy model to the next cut)
AUTO_FINAL_FACTOR = 3
#: at most this many training samples are evaluated for the report's training-set figure
TRAIN_EVAL_SAMPLES = 256


def auto_epochs(n_train: int) -> int:
    """Fine-tuning epochs per step for ``--finetune-epochs auto``: about
    :data:`AUTO_SAMPLES_PER_STEP` sample passes, 1 to 8 epochs (early stopping on the
    held-out figure ends it sooner when it stops helping)."""
    return int(min(8, max(1, round(AUTO_SAMPLES_PER_STEP / max(n_train, 1)))))


class ProgressiveRun:
    """One compress run's schedule: builds the :class:`~onnxprune.schedule.StepSetup` from
    the options, runs the steps under the accuracy guard and summarises the held-out figures."""

    def __init__(self, prep: Prepared, options: CompressOptions, criterion, split: Split | None,
                 metric: HeldOutMetric | None, times: dict[str, float]) -> None:
        self.prep, self.options, self.criterion = prep, options, criterion
        self.split, self.metric, self.times = split, metric, times
        train = split.train if split is not None else None
        self.score_data = None if train is None else train.subset(options.samples, options.seed)
        self.rec_data = None if train is None else train.subset(options.train_samples, options.seed)
        self.original_ms: float | None = None
        self.last_search = None
        self.probe = None  # the whole-cut round_to probe, when the run made one
        self._compare = None  # the original's kept session (reference_session), while one is open
        self.measure = None
        latency_target = options.target is not None and options.target.kind is TargetKind.LATENCY
        if options.bench or latency_target:
            kw = dict(warmup=options.bench_warmup, repeat=options.bench_repeat, threads=options.threads,
                      seed=options.seed, providers=(options.provider,))
            self._bench_kw = kw
            self.measure = current().on_main(self._measure)
        # held-out figures: rank 0 measures, every rank decides on its figure (world 1: the method itself)
        self.held_out = None if metric is None else current().on_main(metric.measure)

    def _measure(self, model: onnx.ModelProto) -> float:
        """Median latency (ms) of ``model``; once the original's is known, timed interleaved
        with the original and scaled to the original's first figure, so that every cut is
        compared with the original under the same load (never-slower, the round_to probe).
        Inside :meth:`_kept_reference` the original's session is reused."""
        kw = self._bench_kw
        if self.original_ms is None:
            return measure_latency(model, self.prep.input_shapes, **kw).median_ms
        if self._compare is not None:
            orig, cut = self._compare(model)
        else:
            orig, cut = measure_interleaved([self.prep.model, model], self.prep.input_shapes, **kw)
        return cut.median_ms * self.original_ms / max(orig.median_ms, 1e-12)

    @contextmanager
    def _kept_reference(self):
        """The original's warmed session kept open for a series of measurements (rank 0
        alone measures; other ranks and runs without measurement keep nothing)."""
        if self.measure is None or not current().is_main:
            yield
            return
        with reference_session(self.prep.model, self.prep.input_shapes, **self._bench_kw) as compare:
            self._compare = compare
            try:
                yield
            finally:
                self._compare = None

    # ---- the pieces of a step ---------------------------------------------------------
    def _score(self, model: onnx.ModelProto, analysis: Analysis):
        o = self.options
        if self.criterion.requires_data:
            from onnxprune.executor.device import resolve_device

            scores = self.criterion.score_with_data(analysis, model, self.score_data, batch_size=o.batch_size,
                                                    device=resolve_device(o.device), seed=o.seed)
        else:
            from onnxprune.pipeline import weights_of

            scores = self.criterion.score(analysis, weights_of(model))
        fault_point("score")
        return scores, getattr(scores, "info", {})

    def _recover(self, parent: onnx.ModelProto, parent_analysis: Analysis, pruned: onnx.ModelProto,
                 removed: Mapping[int, np.ndarray], *, final: bool = False):
        from onnxprune.recover import recover

        o = self.options
        ft = o.finetune
        if ft is not None and o.auto_epochs:
            epochs = auto_epochs(len(self.rec_data))
            ft = dataclasses.replace(ft, epochs=epochs * (AUTO_FINAL_FACTOR if final else 1))
        rec = recover(parent, pruned, parent_analysis, removed, self.rec_data, recalibrate=o.recalibrate_bn,
                      finetune_options=ft, batch_size=o.batch_size, device=o.device, teacher=self.prep.model,
                      validate=self.held_out)
        return rec.model, dict(rec.info)

    def _latency_search(self, state: State, target: Target, scores, opts: PlanOptions):
        o = self.options
        search = current().on_main(search_latency)  # measured by rank 0; every rank gets its plan and model
        self.last_search = search(
            state.model, state.model, state.analysis, self.prep.input_shapes, scores, target, opts,
            normalize=self.criterion.normalize, provider=o.provider, threads=o.threads, warmup=o.bench_warmup,
            repeat=o.bench_repeat, seed=o.seed)
        return self.last_search

    # ---- the schedule ------------------------------------------------------------------
    def schedule(self, plan_opts: PlanOptions, *, fixed: bool):
        """Run the steps; returns (state, records, warnings, last latency search, complete)."""
        o, prep = self.options, self.prep
        if self.measure is not None:
            with timed(self.times, "bench"):
                self.original_ms = self.measure(prep.model)
        recovering = o.recalibrate_bn or o.finetune is not None
        setup = StepSetup(prep.model, prep.analysis, prep.input_shapes, self._score, self.criterion.normalize,
                          plan_opts, round_to_fixed=fixed or self.measure is None,
                          recover=self._recover if recovering else None,
                          metric=self.held_out,
                          measure=self.measure, original_ms=self.original_ms,
                          latency_search=self._latency_search)
        if o.target is None:
            plan_ms = guard_milestones()
        else:
            n = auto_steps(o.target, recovering=recovering) if o.steps == "auto" else int(o.steps)
            plan_ms = milestones(o.target, n)
        setup = dataclasses.replace(setup, final_kept=None if o.target is None else plan_ms[-1].kept,
                                    gradual=o.target is None or len(plan_ms) > 1)
        if (not setup.round_to_fixed and self.original_ms is not None and o.target is not None
                and o.target.kind is not TargetKind.LATENCY and o.plan.round_to == ROUND_TO_AUTO):
            from onnxprune.criteria import get_criterion
            from onnxprune.pipeline import weights_of

            with timed(self.times, "round_to_probe"), self._kept_reference():
                l1 = get_criterion("l1")
                self.probe = probe_round_to(prep.model, prep.analysis, o.target, plan_opts,
                                            l1.score(prep.analysis, weights_of(prep.model)), self.measure,
                                            self.original_ms, tuple(sorted({*PROBE_ROUND_TO, int(plan_opts.round_to)})),
                                            normalize=l1.normalize)
            plan_opts = dataclasses.replace(plan_opts, round_to=self.probe.chosen)
            setup = dataclasses.replace(setup, plan=plan_opts)
        state = initial_state(prep.model, prep.analysis, self.original_ms)
        guard = self.metric is not None and o.max_drop is not None
        records: list[StepRecord] = []
        warnings: list[str] = []
        round_to = int(plan_opts.round_to)
        complete = True
        last = None if o.target is None else len(plan_ms)
        for i, m in enumerate(plan_ms, start=1):
            with timed(self.times, "steps"):
                new, rec, rt = run_step(i, m, state, setup, round_to, final=i == last)
            warnings += [f"step {i}: {n}" for n in rec.notes if "already met" not in n]
            if guard and rec.held_out is not None and self.metric.drop(rec.held_out) > o.max_drop:
                records.append(dataclasses.replace(rec, accepted=False))
                complete = False
                warnings.append(f"accuracy guard: step {i} ({m}) lost {self.metric.drop(rec.held_out):.2f} points "
                                f"of {self.metric.label} (bound {o.max_drop:g}); the last step that held it is "
                                "returned")
                retry = self._retry(i, m, state, setup, round_to)
                if retry is not None:
                    new2, rec2, rt2 = retry
                    held = rec2.held_out is not None and self.metric.drop(rec2.held_out) <= o.max_drop
                    records.append(dataclasses.replace(rec2, accepted=held))
                    if held:
                        state, round_to = new2, rt2
                break
            records.append(rec)
            state, round_to = new, rt
            if rec.reachable is not None:
                complete = False
                break
        if self.metric is not None:
            coarse = self.metric.resolution_warning(o.max_drop)
            if coarse:
                warnings.append(coarse)
        if guard and not any(r.accepted and r.macs < prep.analysis.count("macs") for r in records):
            warnings.append("accuracy guard: no cut held the bound; the written model is the unpruned original")
        return state, records, warnings, self.last_search, complete

    def _retry(self, i: int, m: Milestone, state: State, setup: StepSetup, round_to: int):
        """The failed step ``i`` once more, halfway from the current model to its milestone."""
        now = reached(Target(m.kind, 0.5), state, self.prep.analysis, self.original_ms)
        if now is None:
            return None
        if m.kind is TargetKind.RATIO:
            now = 1.0 - now  # channels kept
        if now - m.kept <= 0.02:
            return None
        with timed(self.times, "steps"):
            return run_step(i, Milestone(m.kind, (now + m.kept) / 2), state, setup, round_to, final=True)

    def held_out_summary(self, state: State, records) -> dict | None:
        """The report's ``held_out`` entry: kind, original, final, drop, bound, training figure
        (measured here, without collectives: in a multi-process run rank 0 alone calls this)."""
        if self.metric is None:
            return None
        m = self.metric
        kept = [r for r in records if r.accepted and r.held_out is not None]
        final = kept[-1].held_out if kept else m.measure(state.model)
        train = None
        if self.rec_data is not None and len(self.rec_data):
            sub = self.rec_data.subset(TRAIN_EVAL_SAMPLES, self.options.seed)
            tm = HeldOutMetric(self.prep.original, sub, batch_size=self.options.batch_size,
                               providers=(self.options.provider,))
            train = {"samples": len(sub), "original": tm.original_value, "final": tm.measure(state.model)}
        return {**m.to_dict(), "source": self.split.source, "final": final, "drop": m.drop(final),
                "max_drop": self.options.max_drop, "train": train}


def held_out_split(prep: Prepared, options: CompressOptions) -> tuple[Split | None, HeldOutMetric | None]:
    """The split (before anything else sees the data) and the held-out metric."""
    from onnxprune.batching import declared_input_shape

    declared = declared_input_shape(prep.model)
    options.data.check(declared)
    if options.val_data is not None:
        options.val_data.check(declared)
    if options.val_split == 0 and options.val_data is None:
        return Split(options.data, options.data, np.arange(len(options.data)), None, "none"), None
    split = split_holdout(options.data, options.val_split, options.seed, options.val_data)
    metric = HeldOutMetric(prep.original, split.val, batch_size=options.batch_size, providers=(options.provider,))
    metric.original_value = current().broadcast(metric.original_value)  # rank 0's figure is the reference
    return split, metric


def reached(target: Target, state: State, a: Analysis, original_ms: float | None) -> float | None:
    """The fraction of ``target``'s kind that ``state`` reaches (of the original)."""
    if target.kind is TargetKind.MACS:
        return state.macs / max(a.count("macs"), 1)
    if target.kind is TargetKind.PARAMS:
        return state.params / max(a.count("params"), 1)
    if target.kind is TargetKind.LATENCY:
        return None if state.latency_ms is None or not original_ms else state.latency_ms / original_ms
    total = sum(g.size for g in a.groups if g.prunable)
    kept = sum(len(state.kept.get(g.name, ())) for g in a.groups if g.prunable)
    return 1.0 - kept / max(total, 1)
