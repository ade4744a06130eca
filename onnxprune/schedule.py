"""Progressive compression: a schedule of steps, each score -> plan -> apply -> recover -> measure.

One-shot pruning at 50 % of the MACs destroys small networks that survive the same cut
taken in steps with recovery in between (Torch-Pruning's ``iterative_steps``, NNCF's
schedules; the IFSO authors prune during training). Rules the schedule follows:

1. **Milestones** are fractions of the *original* model (MACs, params or latency kept;
   channels kept for a ratio target), geometric so that every step removes the same
   share of what is left: ``m_k = t ** (k / N)`` for a target ``t`` and ``N`` steps.
   :func:`auto_steps` picks ``N = ceil((1 - t) / 0.15)``, 1..6, when the run recovers
   (data given); one step otherwise (re-scoring without recovery changes little).
   Without a target and with an accuracy guard, the milestones go on as ``0.85 ** k``
   (down to 0.05) until the guard stops them (:func:`guard_milestones`).
2. **A step** (:func:`run_step`) starts from the previous step's recovered model:
   re-scores its channels with the criterion, plans the cut from its size to the
   milestone (a local target ``m_k * original / current``), applies it, and recovers:
   bias compensation and BN re-calibration against the previous model, then
   distillation from the *original* model with early stopping on the held-out figure
   (the input of fine-tuning counts too, so recovery never makes a step worse).
3. **Never slower**: with ``round_to`` left to the tool, :func:`probe_round_to` first plans
   the final target on the original once per round_to of 1, 2, 4, 8, 16, measures each
   cut, and every step uses the smallest round_to whose cut is within 5 % of the fastest.
   Then a step's cut is measured (onnxruntime, the provider of the run)
   before recovery; when it is the final cut (the last milestone, or a cut that already
   reaches it; every cut of a run driven by the accuracy guard alone) and is not faster
   than the original, and ``round_to`` was not fixed by the user, it is re-planned with
   the next coarser ``round_to`` of 2, 4, 8, 16, 32, and the fastest cut is kept (a note
   says so if none is faster). Intermediate cuts are not coarsened: coarser counts make
   big jumps, and only the returned model has to be fast.
4. **Gradual**: in a schedule of several steps no step removes more than
   :data:`STEP_LAYER_CAP` of any group's current channels (on top of the user's
   ``max_layer_ratio``), so that a criterion cannot empty a cheap layer in one step.
5. Every step records MACs, params, latency (when measured) and the held-out figure.
   The pipeline's accuracy guard (:mod:`onnxprune.pipeline`) decides which step is
   returned; :func:`compose_kept` maps each step's removals back to the original
   channel numbering, so the final plan is a plan of the original model.
6. **Multi-process runs** (:mod:`onnxprune.distributed`): every rank runs every step;
   the plan of each cut is rank 0's, broadcast (so every rank applies the same cut), and
   the measurements in :class:`StepSetup` are expected to be rank 0's, broadcast
   (:meth:`~onnxprune.distributed.DistContext.on_main`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis import Analysis, analyze
from onnxprune.distributed import current
from onnxprune.planning import PlanOptions, PruningPlan, Target, TargetKind, make_plan
from onnxprune.shapes import measure_shapes

__all__ = ["Milestone", "RoundToProbe", "State", "StepRecord", "StepSetup", "auto_steps", "compose_kept", "guard_milestones",
           "initial_state", "milestones", "plan_of_original", "probe_round_to", "run_step"]

#: share of what is left that one auto step removes at most
AUTO_STEP_SHARE = 0.15
#: at most this many auto steps
AUTO_MAX_STEPS = 6
#: kept fraction per step when only an accuracy guard drives the schedule
GUARD_STEP = 0.85
GUARD_FLOOR = 0.05
#: at most this share of a group's current channels goes in one step of a multi-step schedule
STEP_LAYER_CAP = 0.5
#: round_to values tried, coarser and coarser, when a cut is not faster than the original
COARSER = (2, 4, 8, 16, 32)


#: round_to values the whole-cut probe measures (with the sweep's choice)
PROBE_ROUND_TO = (1, 2, 4, 8, 16)
#: a probed round_to within this share of the fastest cut counts as fast (the smallest such wins)
PROBE_TOLERANCE = 0.05


@dataclass(frozen=True)
class RoundToProbe:
    """What :func:`probe_round_to` measured.

    Attributes:
        chosen: the round_to the schedule uses.
        ms: round_to -> median latency (ms) of the target's cut planned with it.
        macs: round_to -> MACs kept (fraction of the original) by that cut.
        original_ms: the original model's median latency (ms).
    """

    chosen: int
    ms: dict[int, float]
    macs: dict[int, float]
    original_ms: float

    def to_json(self) -> dict:
        """JSON form (the report's ``round_to.probe``): keys are round_to values as strings."""
        return {"chosen": self.chosen, "ms": {str(k): v for k, v in self.ms.items()},
                "macs_kept": {str(k): v for k, v in self.macs.items()}, "original_ms": self.original_ms}


def probe_round_to(model: onnx.ModelProto, analysis: Analysis, target: Target, plan: PlanOptions,
                   scores: Mapping[int, np.ndarray], measure: Callable[[onnx.ModelProto], float],
                   original_ms: float, candidates: tuple[int, ...] = PROBE_ROUND_TO, *,
                   normalize: bool = True) -> RoundToProbe:
    """Pick ``round_to`` by measuring the whole final cut (rule 3's first half).

    The per-chain sweep (:mod:`onnxprune.runtime.sweep`) times conv chains in isolation;
    on small networks its differences drown in noise, and the cut it suggests can run
    slower than the original (onnxruntime's CPU convolutions are blocked by 8 or 16
    channels). Here ``target`` is planned on ``model`` once per candidate (with
    ``scores``, usually the data-free l1 scores: the latency depends on the kept counts,
    not on which channels), each cut is applied and measured, and the smallest candidate
    whose cut is within :data:`PROBE_TOLERANCE` of the fastest is chosen (smaller steps
    keep the plan closer to the criterion's choice). Candidates no group can take
    (round_to above every group's size) and those whose cut misses the target are skipped.

    Args:
        model, analysis: the canonical original and its analysis.
        target: the run's final MACs / params / ratio target (not latency).
        plan: planner options (round_to is replaced per candidate).
        scores: group id -> float scores [size].
        measure: model -> median latency in ms (onnxruntime, the run's provider).
        original_ms: the original's median latency in ms.
        candidates: round_to values to try.

    Returns:
        :class:`RoundToProbe`.

    Raises:
        OnnxPruneError subclasses: from planning, surgery or measurement.
    """
    from onnxprune.surgery import apply_plan

    largest = max((g.size for g in analysis.groups if g.prunable), default=1)
    ms: dict[int, float] = {}
    macs: dict[int, float] = {}
    macs0 = max(analysis.count("macs"), 1)
    for n in sorted(set(int(c) for c in candidates)):
        if n > 1 and n >= largest:
            continue
        p = make_plan(analysis, scores, target, replace(plan, round_to=n), normalize=normalize)
        if not p.removed or p.reachable is not None:  # a cut that misses the target is no candidate
            continue
        pruned = apply_plan(model, analysis, {g: np.asarray(v) for g, v in p.removed.items()})
        ms[n] = float(measure(pruned))
        macs[n] = p.macs_after / macs0
    if not ms:
        return RoundToProbe(int(plan.round_to), ms, macs, original_ms)
    fastest = min(ms.values())
    chosen = min(n for n, t in ms.items() if t <= fastest * (1 + PROBE_TOLERANCE))
    return RoundToProbe(chosen, ms, macs, original_ms)


def auto_steps(target: Target | None, *, recovering: bool) -> int:
    """Number of steps for ``--steps auto`` (rule 1)."""
    if not recovering or target is None:
        return 1
    removed = target.value if target.kind is TargetKind.RATIO else 1.0 - target.value
    return int(min(AUTO_MAX_STEPS, max(1, math.ceil(removed / AUTO_STEP_SHARE - 1e-9))))


@dataclass(frozen=True)
class Milestone:
    """A step's goal: ``kind`` and the fraction of the original kept (channels for ratio)."""

    kind: TargetKind
    kept: float

    def __str__(self) -> str:
        return f"{self.kind.value} {self.kept:.3f}"


def milestones(target: Target, steps: int) -> list[Milestone]:
    """Geometric milestones toward ``target`` in ``steps`` steps (rule 1)."""
    t = 1.0 - target.value if target.kind is TargetKind.RATIO else target.value
    n = max(1, int(steps))
    return [Milestone(target.kind, t ** ((k + 1) / n)) for k in range(n)]


def guard_milestones(kind: TargetKind = TargetKind.MACS) -> Iterator[Milestone]:
    """Open-ended milestones ``0.85 ** k`` for a run driven by the accuracy guard alone."""
    k = 1
    while GUARD_STEP ** k >= GUARD_FLOOR:
        yield Milestone(kind, GUARD_STEP ** k)
        k += 1


@dataclass(frozen=True, eq=False)
class State:
    """The schedule's current model.

    Attributes:
        model: canonical model (the original's, cut and recovered by the steps so far).
        analysis: its channel analysis (at the run's input shapes).
        kept: original group name -> int64 indices of the original channels it keeps.
        macs / params: its counts.
        latency_ms: its measured median latency, or None when not measured.
    """

    model: onnx.ModelProto
    analysis: Analysis
    kept: Mapping[str, np.ndarray]
    macs: int
    params: int
    latency_ms: float | None = None


def initial_state(model: onnx.ModelProto, analysis: Analysis, latency_ms: float | None = None) -> State:
    """The state before any step: every channel of every group kept."""
    kept = {g.name: np.arange(g.size, dtype=np.int64) for g in analysis.groups}
    return State(model, analysis, kept, analysis.count("macs"), analysis.count("params"), latency_ms)


def compose_kept(kept: Mapping[str, np.ndarray], analysis: Analysis,
                 removed: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Original indices kept after removing ``removed`` (ids of ``analysis``, a later
    model's analysis whose group names are original group names) from ``kept``."""
    out = {k: np.asarray(v) for k, v in kept.items()}
    for gid, idx in removed.items():
        name = analysis.groups[gid].name
        if name in out and len(idx):
            out[name] = np.delete(out[name], np.asarray(idx, dtype=np.int64))
    return out


def plan_of_original(original: Analysis, state: State, target: Target | None, *, reachable: float | None = None,
                     warnings: tuple[str, ...] = ()) -> PruningPlan:
    """The plan of the original model that the schedule's removals add up to."""
    removed, names, sizes = {}, {}, {}
    for g in original.groups:
        names[g.id], sizes[g.id] = g.name, g.size
        kept = state.kept.get(g.name, np.arange(g.size))
        gone = np.setdiff1d(np.arange(g.size), kept)
        if len(gone):
            removed[g.id] = tuple(int(i) for i in gone)
    return PruningPlan(removed, names, sizes, original.count("macs"), state.macs, original.count("params"),
                       state.params, target, reachable, warnings)


@dataclass(frozen=True)
class StepSetup:
    """What every step of one run shares (built once by the pipeline).

    Attributes:
        original: the canonical unpruned model (teacher of the distillation).
        original_analysis: its analysis; input_shapes: concrete graph input shapes.
        score: ``score(model, analysis) -> ({group id: scores}, info)``, the criterion.
        normalize: whether the criterion's scores are mean-normalised before ranking.
        plan: planner options (``round_to`` resolved to an int).
        round_to_fixed: the user chose ``round_to``: no coarser re-plan (rule 3).
        recover: ``recover(parent, parent_analysis, pruned, removed, final=bool) ->
            (model, info)``, or None for no recovery.
        metric: held-out figure ``metric(model) -> percent``, or None.
        measure: ``measure(model) -> median ms``, or None (no latency measured).
        original_ms: the original's median latency (with ``measure``).
        latency_search: ``search(state, target) -> LatencySearch`` for latency milestones.
        final_kept: the last milestone's kept fraction (a cut reaching it is final), or
            None for an open-ended run (every cut is checked by rule 3).
        gradual: a schedule of several steps (rule 4's cap applies).
    """

    original: onnx.ModelProto
    original_analysis: Analysis
    input_shapes: Mapping[str, tuple[int, ...]]
    score: Callable[[onnx.ModelProto, Analysis], tuple[Mapping[int, Any], Mapping[str, Any]]]
    normalize: bool
    plan: PlanOptions
    round_to_fixed: bool = True
    recover: Callable | None = None
    metric: Callable[[onnx.ModelProto], float] | None = None
    measure: Callable[[onnx.ModelProto], float] | None = None
    original_ms: float | None = None
    latency_search: Callable | None = None
    final_kept: float | None = None
    gradual: bool = False


@dataclass(frozen=True)
class StepRecord:
    """What one step did (JSON via :meth:`to_dict`).

    Attributes:
        index: 1-based step number; milestone: its goal.
        macs / params: counts after the step; macs_fraction / params_fraction: of the original.
        latency_ms: measured median after the step (None when not measured).
        held_out: held-out figure after recovery (percent), None without data.
        held_out_before_recovery: the same right after the cut.
        round_to: the round_to the step's cut used.
        reachable: the kept fraction the step could reach when its milestone was out of
            reach, else None.
        accepted: the step holds the accuracy guard (set by the pipeline).
        seconds: wall time per stage of the step.
        recovery / criterion_info / notes: details for the report.
    """

    index: int
    milestone: Milestone
    macs: int
    params: int
    macs_fraction: float
    params_fraction: float
    latency_ms: float | None
    held_out: float | None
    held_out_before_recovery: float | None
    round_to: int
    reachable: float | None
    accepted: bool = True
    seconds: Mapping[str, float] = field(default_factory=dict)
    recovery: Mapping[str, Any] | None = None
    criterion_info: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.index, "milestone": {"kind": self.milestone.kind.value, "kept": self.milestone.kept},
                "macs": self.macs, "params": self.params, "macs_fraction": self.macs_fraction,
                "params_fraction": self.params_fraction, "latency_ms": self.latency_ms, "held_out": self.held_out,
                "held_out_before_recovery": self.held_out_before_recovery, "round_to": self.round_to,
                "reachable": self.reachable, "accepted": self.accepted, "seconds": dict(self.seconds),
                "recovery": None if self.recovery is None else dict(self.recovery),
                "criterion_info": dict(self.criterion_info), "notes": list(self.notes)}


def _local_target(m: Milestone, state: State, setup: StepSetup) -> Target | None:
    """The target of this step relative to the current model, None when already met."""
    oa = setup.original_analysis
    if m.kind is TargetKind.MACS:
        frac = m.kept * oa.count("macs") / max(state.macs, 1)
    elif m.kind is TargetKind.PARAMS:
        frac = m.kept * oa.count("params") / max(state.params, 1)
    elif m.kind is TargetKind.RATIO:  # channels of the original's prunable groups
        prunable0 = [g for g in oa.groups if g.prunable]
        total = sum(g.size for g in prunable0)
        kept_now = sum(len(state.kept.get(g.name, ())) for g in prunable0)
        now = sum(g.size for g in state.analysis.groups if g.prunable)
        remove = kept_now - m.kept * total
        if remove < 0.5 or now == 0:
            return None
        return Target(TargetKind.RATIO, min(max(remove / now, 1e-6), 1 - 1e-6))
    else:
        if state.latency_ms is None or setup.original_ms is None:
            return None
        frac = m.kept * setup.original_ms / state.latency_ms
    if frac >= 1.0 - 1e-9:
        return None
    return Target(m.kind, min(max(frac, 1e-6), 1 - 1e-6))


def _cut(state: State, target: Target, scores, setup: StepSetup, round_to: int):
    """(plan, pruned model, latency search or None) for one round_to."""
    from onnxprune.surgery import apply_plan

    opts = replace(setup.plan, round_to=round_to)
    if setup.gradual:
        opts = replace(opts, max_layer_ratio=min(opts.max_layer_ratio, STEP_LAYER_CAP))
    if target.kind is TargetKind.LATENCY:
        search = setup.latency_search(state, target, scores, opts)
        return search.plan, search.model, search
    plan = make_plan(state.analysis, scores, target, opts, normalize=setup.normalize)
    plan = current().broadcast(plan)  # multi-process runs: rank 0's plan is every rank's
    plan.validate(state.analysis)
    pruned = apply_plan(state.model, state.analysis, {g: np.asarray(v) for g, v in plan.removed.items()})
    return plan, pruned, None


def run_step(index: int, m: Milestone, state: State, setup: StepSetup, round_to: int, *,
             final: bool = False) -> tuple[State, StepRecord, int]:
    """One step of the schedule (rule 2): returns the new state, its record and the
    round_to later steps use (coarser when rule 3 had to coarsen it). ``final``: the last
    planned step (its recovery may get a larger budget, see ``StepSetup.recover``).

    Raises:
        OnnxPruneError subclasses: from scoring, planning, surgery, recovery, measurement.
    """
    times: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    target = _local_target(m, state, setup)
    if target is None:
        notes.append(f"milestone {m} already met")
        rec = StepRecord(index, m, state.macs, state.params, _frac(state.macs, setup, "macs"),
                         _frac(state.params, setup, "params"), state.latency_ms, None, None, round_to, None,
                         notes=tuple(notes))
        return state, rec, round_to
    scores, info = setup.score(state.model, state.analysis)
    times["score"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    plan, pruned, search = _cut(state, target, scores, setup, round_to)
    latency = None
    if search is not None:
        latency = search.after.median_ms
    elif setup.measure is not None:
        latency = setup.measure(pruned)
        tried = [(latency, round_to, plan, pruned)]
        final = final or _reaches_final(plan, m, state, setup)
        check = final or setup.final_kept is None
        coarser = [n for n in COARSER if n > round_to] if check else []
        while (not setup.round_to_fixed and setup.original_ms is not None and latency >= setup.original_ms
               and coarser):
            prev, prev_n, round_to = latency, round_to, coarser.pop(0)
            plan, pruned, _ = _cut(state, target, scores, setup, round_to)
            latency = setup.measure(pruned)
            tried.append((latency, round_to, plan, pruned))
            notes.append(f"the cut with round_to {prev_n} measured {prev:.3f} ms, not faster than the original's "
                         f"{setup.original_ms:.3f} ms: re-planned with round_to {round_to} ({latency:.3f} ms)")
        latency, round_to, plan, pruned = min(tried, key=lambda t: t[0])
        if check and setup.original_ms is not None and latency >= setup.original_ms and not setup.round_to_fixed:
            notes.append(f"no round_to up to {COARSER[-1]} made the cut faster than the original "
                         f"({latency:.3f} vs {setup.original_ms:.3f} ms); kept the fastest, round_to {round_to}")
    else:
        final = final or _reaches_final(plan, m, state, setup)
    times["plan_apply"] = time.perf_counter() - t1

    removed = {g: np.asarray(v) for g, v in plan.removed.items()}
    before = None
    model, recovery = pruned, None
    if setup.metric is not None:
        t2 = time.perf_counter()
        before = setup.metric(pruned)
        times["held_out"] = time.perf_counter() - t2
    if setup.recover is not None:
        t3 = time.perf_counter()
        model, recovery = setup.recover(state.model, state.analysis, pruned, removed, final=final)
        times["recover"] = time.perf_counter() - t3
    after = before
    if setup.metric is not None and setup.recover is not None:
        val = (recovery or {}).get("finetune", {}).get("val_by_epoch")
        if val:
            after = max(val)
        else:
            t4 = time.perf_counter()
            after = setup.metric(model)
            times["held_out"] += time.perf_counter() - t4

    t5 = time.perf_counter()
    shapes = measure_shapes(model, setup.input_shapes)
    analysis = analyze(model, shapes)
    times["analyze"] = time.perf_counter() - t5
    new = State(model, analysis, compose_kept(state.kept, state.analysis, removed), analysis.count("macs"),
                analysis.count("params"), latency)
    reach = None
    if plan.reachable is not None:
        reach = plan.reachable
        notes.append(plan.warnings[0] if plan.warnings else f"milestone {m} out of reach")
    rec = StepRecord(index, m, new.macs, new.params, _frac(new.macs, setup, "macs"),
                     _frac(new.params, setup, "params"), latency, after, before, round_to, reach,
                     seconds=times, recovery=recovery, criterion_info=dict(info or {}), notes=tuple(notes))
    return new, rec, round_to


def _reaches_final(plan: PruningPlan, m: Milestone, state: State, setup: StepSetup) -> bool:
    """Whether a MACs / params cut already reaches the last milestone (later steps are moot)."""
    if setup.final_kept is None or m.kind not in (TargetKind.MACS, TargetKind.PARAMS):
        return False
    what = "macs" if m.kind is TargetKind.MACS else "params"
    after = plan.macs_after if what == "macs" else plan.params_after
    return after / max(setup.original_analysis.count(what), 1) <= setup.final_kept + 1e-3


def _frac(count: int, setup: StepSetup, what: str) -> float:
    return count / max(setup.original_analysis.count(what), 1)
