"""Prune to a fraction of the *measured* latency: plan on a latency model, measure, correct.

Rules :func:`search_latency` follows:

1. The original model is measured once (:func:`onnxprune.runtime.latency.measure_latency`); its
   canonical form is profiled once (:func:`onnxprune.runtime.profile.profile_nodes`) and
   turned into a :class:`~onnxprune.runtime.latency_model.LatencyModel`.
2. Round r plans with the model to a predicted latency fraction ``goal_r``
   (``goal_1`` = the target T), applies the plan and measures the pruned model: the
   measured fraction ``m_r = median(pruned) / median(original)``.
3. The target is reached when ``m_r <= T * (1 + tolerance)`` (tolerance default 0.02,
   for timer noise). The search stops when a round reaches it without overshooting,
   ``m_r >= T * (1 - band)`` (band default 0.10).
4. Otherwise the model was off by ``m_r / p_r`` (``p_r`` the predicted fraction of the
   plan), so the next goal is the latency model rescaled by measured / predicted,
   ``p_r * T / m_r``: when the target was missed, at most ``0.97 * goal_r`` (at least a
   3 % step, so rounding to channel counts cannot stall it); when it was overshot
   (pruned much more than needed), at most 1, and the search stops if that does not
   raise the goal.
5. At most ``max_rounds`` rounds (default 4); a missed round whose plan cannot remove
   more (it reports a reachable fraction) stops the search too. The result is the
   reaching round with the highest measured fraction (the least pruning that meets the
   target), else the measured fastest round, with every round's goal, prediction and
   measurement. A round whose plan equals an earlier one is not measured again (the
   search stops). The chosen plan's ``reachable`` is None when the target was reached,
   else the measured fraction.

The profile's kernel times drive the model; session overhead the profiler does not
attribute (``total - kernels``, inflated on a busy machine) is left out of it, so the
prediction is a fraction of the kernel time and the measurement corrects the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.runtime.latency import LatencyStats, measure_latency
from onnxprune.runtime.latency_model import LatencyModel
from onnxprune.runtime.profile import profile_nodes
from onnxprune.planning import PlanOptions, PruningPlan, Target, TargetKind, make_plan

__all__ = ["LatencyRound", "LatencySearch", "next_goal", "search_latency"]


@dataclass(frozen=True)
class LatencyRound:
    """One plan-apply-measure round: goal and prediction (fractions of the predicted
    original) and the measured fraction of the original's median latency."""

    goal: float
    predicted: float
    measured: float
    median_ms: float

    def to_dict(self) -> dict[str, float]:
        return {"goal": self.goal, "predicted": self.predicted, "measured": self.measured,
                "median_ms": self.median_ms}


@dataclass(frozen=True)
class LatencySearch:
    """Outcome of :func:`search_latency`.

    Attributes:
        plan / model: the chosen plan and the pruned model it gives.
        before / after: measured latency of the original and of the chosen pruned model.
        target: the latency fraction asked for.
        measured_fraction: ``after.median_ms / before.median_ms``.
        reached: whether ``measured_fraction <= target * (1 + tolerance)``.
        measurements: pruned models measured (one per round).
        rounds: every round, in order.
        profiled_ms / predicted_ms: the profiled original's kernel time and the model's
            prediction for the chosen plan (ms).
    """

    plan: PruningPlan
    model: onnx.ModelProto
    before: LatencyStats
    after: LatencyStats
    target: float
    measured_fraction: float
    reached: bool
    measurements: int
    rounds: tuple[LatencyRound, ...]
    profiled_ms: float
    predicted_ms: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the report's ``latency_target`` entry)."""
        return {"target": self.target, "measured_fraction": self.measured_fraction, "reached": self.reached,
                "measurements": self.measurements, "baseline_measurements": 1,
                "profiled_ms": self.profiled_ms, "predicted_ms": self.predicted_ms,
                "rounds": [r.to_dict() for r in self.rounds]}


def search_latency(original: onnx.ModelProto, model: onnx.ModelProto, analysis, input_shapes: Mapping[str, tuple],
                   scores: Mapping[int, np.ndarray | None], target: Target, options: PlanOptions = PlanOptions(), *,
                   normalize: bool = True, provider: str = "CPUExecutionProvider", threads: int | None = None,
                   warmup: int = 5, repeat: int = 30, seed: int = 0, max_rounds: int = 4,
                   tolerance: float = 0.02, band: float = 0.10) -> LatencySearch:
    """Find a plan whose pruned model measures at most ``target.value`` of the original's latency.

    Args:
        original: the model as loaded (the latency baseline).
        model / analysis: its canonical form and channel analysis (what is cut).
        input_shapes: concrete shape of every graph input.
        scores: channel scores per group id (as for :func:`onnxprune.planning.make_plan`).
        target: a :attr:`TargetKind.LATENCY` target.
        options: planner options (round_to already resolved to an int).
        provider / threads / warmup / repeat / seed: measurement settings.
        max_rounds: most pruned models measured (>= 1).
        tolerance: relative slack on the target for timer noise (>= 0).
        band: a reaching round below ``target * (1 - band)`` is re-planned to prune less.

    Raises:
        PlanError: ``target`` is not a latency target.
        OnnxPruneError: measurement, profiling or surgery failures.
    """
    from onnxprune.errors import PlanError
    from onnxprune.surgery import apply_plan

    if target.kind is not TargetKind.LATENCY:
        raise PlanError(f"search_latency needs a latency target, got {target}")
    if max_rounds < 1 or tolerance < 0 or not 0 <= band < 1:
        raise PlanError(f"need max_rounds >= 1, tolerance >= 0 and band in [0, 1), got {max_rounds}, "
                        f"{tolerance}, {band}")
    kw = dict(providers=(provider,), warmup=warmup, repeat=repeat, threads=threads, seed=seed)
    before = measure_latency(original, input_shapes, **kw)
    prof = profile_nodes(model, input_shapes, macs_nodes=set(analysis.count_by_node("macs")), provider=provider,
                         threads=threads, seed=seed)
    kernels_ms = sum(prof.node_ms.values()) + prof.unmapped_ms
    lm = LatencyModel.from_node_times(analysis, model, prof.node_ms, kernels_ms)
    goal, rounds, tried = target.value, [], []
    for _ in range(max_rounds):
        plan = make_plan(analysis, scores, target, options, normalize=normalize, latency=lm, latency_goal=goal)
        plan.validate(analysis)
        if any(dict(plan.removed) == dict(t[0].removed) for t in tried):
            break  # the planner gives a plan already measured: nothing new to learn
        pruned = apply_plan(model, analysis, {g: np.asarray(v) for g, v in plan.removed.items()})
        after = measure_latency(pruned, input_shapes, **kw)
        predicted = lm.predict_ms(plan.removed)
        m = after.median_ms / max(before.median_ms, 1e-12)
        p = predicted / max(lm.total_ms, 1e-12)
        rounds.append(LatencyRound(goal, p, m, after.median_ms))
        tried.append((plan, pruned, after, predicted))
        nxt = next_goal(rounds, target.value, tolerance=tolerance, band=band)
        if nxt is None or (m > target.value * (1 + tolerance) and plan.reachable is not None):
            break
        goal = nxt
    reached = [i for i, r in enumerate(rounds) if r.measured <= target.value * (1 + tolerance)]
    if reached:
        pick = max(reached, key=lambda i: rounds[i].measured)
    else:
        pick = int(np.argmin([r.measured for r in rounds]))
    plan, pruned, after, predicted = tried[pick]
    # the plan's own reachable figure is about its predicted goal; what counts is the measurement
    plan = dataclasses.replace(
        plan, reachable=None if reached else rounds[pick].measured,
        warnings=() if reached else (f"target {target} is out of reach: measured latency fraction "
                                     f"{rounds[pick].measured:.3f} after {len(rounds)} measurements",))
    return LatencySearch(plan, pruned, before, after, target.value, rounds[pick].measured, bool(reached),
                         len(rounds), tuple(rounds), lm.total_ms, predicted)


def next_goal(rounds: Sequence[LatencyRound], target: float, *, tolerance: float = 0.02,
              band: float = 0.10) -> float | None:
    """The next round's predicted-latency goal after ``rounds`` (rules 3-4), or None to stop.

    Goals, predictions and measurements are fractions of the original's latency. Beyond
    rule 4, the new goal stays strictly between the largest goal that reached the target
    and the smallest that missed it (when it would not, the midpoint of that bracket is
    taken, and the search stops once the bracket is narrower than 0.02).
    """
    last = rounds[-1]
    if last.measured <= 0 or last.predicted <= 0:
        return None
    hit = lambda r: r.measured <= target * (1 + tolerance)  # noqa: E731
    rescaled = last.predicted * target / last.measured
    if not hit(last):  # missed: push further
        cand = max(min(rescaled, 0.97 * last.goal), 1e-3)
    elif last.measured >= target * (1 - band):  # reached, close enough
        return None
    else:  # overshot: prune less
        cand = min(rescaled, 1.0)
        if cand <= last.goal * 1.01:
            return None
    lo = max((r.goal for r in rounds if hit(r)), default=0.0)
    hi = min((r.goal for r in rounds if not hit(r)), default=1.0 + 1e-9)
    if lo < cand < hi:
        return cand
    return (lo + hi) / 2 if hi - lo > 0.02 else None
