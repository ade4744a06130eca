"""Turn channel scores into a :class:`PruningPlan` that meets a target.

Rules, in order:
1. Candidates: groups that are prunable (not blocked), scored by the criterion (a
   criterion may leave a group unscored, e.g. ``bn`` where no BN exists), and with no
   member node matching an ``exclude`` pattern.
2. Global scope: channels of all candidates are ranked by normalised score (each
   group's scores divided by their mean, unless the criterion is already globally
   normalised), and the k lowest are taken; layer scope: every group loses the same
   fraction of its channels.
3. Per group the count is capped (``max_layer_ratio``, ``min_channels``, never the last
   channel) and rounded so the kept count is a multiple of ``round_to`` and of the
   group's grouped-conv blocks; the lowest-scored channels go (per block, in grouped
   groups).
4. For MACs/params targets, k (or the layer fraction) is found by bisection on the
   exact predicted count; when even the largest removal misses the target, the plan
   keeps that largest removal and records the reachable fraction and a warning. With
   rounding steps above one channel, whole steps are then given back (highest-scored
   first) while the target still holds, so rounding does not overshoot it.
5. Latency targets need a latency model (:class:`LatencyPredictor`, e.g.
   :class:`onnxprune.runtime.latency_model.LatencyModel`): channels are ranked by normalised
   score divided by the latency their removal alone saves (``saved_ms``; a channel that
   saves nothing ranks last), within a group too, and k is bisected on the predicted
   latency fraction ``predict_ms(removed) / total_ms`` against ``latency_goal``
   (default: the target's value). Whether the *measured* latency meets the target is
   the caller's business (:mod:`onnxprune.runtime.latency_search`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from onnxprune.analysis.groups import Analysis, ChannelGroup
from onnxprune.errors import PlanError
from onnxprune.planning.plan import ROUND_TO_AUTO, PlanOptions, PruningPlan, Scope, Target, TargetKind


class LatencyPredictor(Protocol):
    """What the planner needs of a latency model (times in ms, group ids of the analysis)."""

    @property
    def total_ms(self) -> float: ...

    def predict_ms(self, removed: Mapping[int, np.ndarray]) -> float: ...

    def saved_ms(self) -> list[np.ndarray]: ...


def _excluded(g: ChannelGroup, patterns: tuple[str, ...]) -> bool:
    names = (g.name,) + g.nodes()
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _max_removal(g: ChannelGroup, opts: PlanOptions) -> int:
    cap = int(math.floor(g.size * opts.max_layer_ratio + 1e-9))
    # a kept count that is a positive multiple of round_to is at least round_to, so a
    # group of round_to channels or fewer is left whole
    min_keep = max(opts.min_channels, g.blocks, opts.round_to)
    return max(0, min(cap, g.size - min_keep))


def _round_removal(g: ChannelGroup, r: int, cap: int, opts: PlanOptions) -> int:
    """Largest removal <= min(r, cap) whose kept count honours round_to and blocks."""
    step = math.lcm(g.blocks, opts.round_to)
    r = min(r, cap)
    while r > 0 and (g.size - r) % step != 0:
        r -= 1
    return r


def _lowest(candidates: np.ndarray, scores: np.ndarray, r: int, sets: list[np.ndarray]) -> list[int]:
    """Up to ``r`` of ``candidates``, lowest score first, never the last kept of a set."""
    left = [len(s) for s in sets]
    member = [[k for k, st in enumerate(sets) if c in st] for c in range(len(scores))] if sets else None
    out: list[int] = []
    for c in candidates[np.argsort(scores[candidates], kind="stable")].tolist():
        if len(out) == r:
            break
        if member is not None and any(left[k] == 1 for k in member[c]):
            continue
        if member is not None:
            for k in member[c]:
                left[k] -= 1
        out.append(c)
    return out


def _choose(g: ChannelGroup, scores: np.ndarray, r: int) -> np.ndarray:
    """The ``r`` lowest-scored channels (``r / blocks`` per block in grouped groups),
    skipping any channel whose removal would empty a tensor holding part of the group
    (:attr:`ChannelGroup.keep_one_of`)."""
    if r <= 0:
        return np.zeros(0, dtype=np.int64)
    sets = [set(s.tolist()) for s in g.keep_one_of]
    per = g.size // g.blocks
    out: list[int] = []
    for b in range(g.blocks):
        out += _lowest(np.arange(b * per, (b + 1) * per), scores, r // g.blocks, sets)
    if g.blocks > 1:  # every block must lose the same number
        counts = np.bincount(np.asarray(out, dtype=np.int64) // per, minlength=g.blocks)
        k = int(counts.min())
        out = [c for b in range(g.blocks) for c in [x for x in out if x // per == b][:k]]
    return np.sort(np.asarray(out, dtype=np.int64))


def make_plan(analysis: Analysis, scores: Mapping[int, np.ndarray | None], target: Target,
              options: PlanOptions = PlanOptions(), *, normalize: bool = True,
              latency: LatencyPredictor | None = None, latency_goal: float | None = None) -> PruningPlan:
    """Plan which channels to remove to meet ``target``.

    Args:
        analysis: the model's channel analysis.
        scores: ``{group id: float [size]}``, higher = more important; None or a
            missing id leaves the group whole.
        target: channels removed (``ratio``), MACs/params kept, or latency kept.
        options: planner options (scope, round_to, caps, exclusions).
        normalize: divide each group's scores by their mean before global ranking
            (False for criteria that are already comparable across groups).
        latency: latency model, required by latency targets (rule 5).
        latency_goal: predicted latency fraction to reach (latency targets; default
            ``target.value``), in (0, 1].

    Returns:
        The plan, with predicted MACs/params and, when the target is out of reach, the
        reachable fraction and a warning.

    Raises:
        PlanError: a latency target without a latency model, a goal outside (0, 1], or
            an unresolved ``round_to="auto"``.
        ValueError: a score array whose length is not its group's size.
    """
    if options.round_to == ROUND_TO_AUTO:
        raise PlanError("round_to 'auto' must be resolved by a channel sweep before planning "
                        "(onnxprune.runtime.sweep.channel_sweep)")
    by_latency = target.kind is TargetKind.LATENCY
    if by_latency and latency is None:
        raise PlanError("a latency target needs a latency model (measured with onnxruntime)")
    goal_latency = target.value if latency_goal is None else float(latency_goal)
    if by_latency and not 0.0 < goal_latency <= 1.0:
        raise PlanError(f"latency goal {goal_latency} must lie in (0, 1]")
    cands = [g for g in analysis.groups
             if g.prunable and scores.get(g.id) is not None and not _excluded(g, options.exclude)]
    caps = {g.id: _max_removal(g, options) for g in cands}
    cands = [g for g in cands if caps[g.id] > 0]
    sc = {g.id: np.asarray(scores[g.id], dtype=np.float64).reshape(-1) for g in cands}
    for g in cands:
        if sc[g.id].shape != (g.size,):
            raise ValueError(f"criterion gave {sc[g.id].shape} scores for group {g.name} of size {g.size}")
    if by_latency:
        sc = _per_latency(sc, latency.saved_ms(), normalize)
        normalize = False

    if options.scope is Scope.GLOBAL:
        keys, owners = [], []
        for g in cands:
            s = sc[g.id]
            mean = float(np.abs(s).mean())
            norm = s / mean if (normalize and mean > 0) else s
            # the channels a group can lose are its lowest-scored ones, in order
            order = np.sort(norm)[: caps[g.id]]
            order = order[np.isfinite(order)]  # latency keys: channels that save nothing stay
            keys.append(order)
            owners.append(np.full(len(order), g.id))
        keys_a = np.concatenate(keys) if keys else np.zeros(0)
        owners_a = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        rank = owners_a[np.argsort(keys_a, kind="stable")]
        n_max = len(rank)

        def counts_for(k: int) -> dict[int, int]:
            return dict(zip(*np.unique(rank[:k], return_counts=True))) if k else {}
    else:
        n_max = 10_000

        def counts_for(k: int) -> dict[int, int]:
            f = k / n_max
            return {g.id: int(math.floor(g.size * f + 1e-9)) for g in cands}

    def removal(k: int) -> dict[int, np.ndarray]:
        out = {}
        for gid, r in counts_for(k).items():
            g = analysis.groups[int(gid)]
            r = _round_removal(g, int(r), caps[g.id], options)
            if r > 0:
                out[g.id] = _choose(g, sc[g.id], r)
        return out

    macs0, params0 = analysis.count("macs"), analysis.count("params")
    total = sum(g.size for g in analysis.groups if g.prunable) or 1

    def measure(rem: dict[int, np.ndarray]) -> float:
        if target.kind is TargetKind.RATIO:
            return 1.0 - sum(len(v) for v in rem.values()) / total  # fraction kept
        if by_latency:
            return latency.predict_ms(rem) / max(latency.total_ms, 1e-12)
        elems = analysis.removed_elements(rem)
        if target.kind is TargetKind.MACS:
            return analysis.count("macs", elems) / max(macs0, 1)
        return analysis.count("params", elems) / max(params0, 1)

    goal = 1.0 - target.value if target.kind is TargetKind.RATIO else (goal_latency if by_latency else target.value)
    k = _bisect(lambda k: measure(removal(k)) <= goal + 1e-12, n_max)
    warnings: list[str] = []
    reachable = None
    rem = removal(k)
    if options.scope is Scope.GLOBAL and not by_latency:
        rem = _fill_back(analysis, rem, sc, normalize, options, lambda r: measure(r) <= goal + 1e-12)
    achieved = measure(rem)
    if achieved > goal + 1e-9:
        reachable = 1.0 - achieved if target.kind is TargetKind.RATIO else achieved
        warnings.append(
            f"target {target} is out of reach: blocked or capped groups allow at best "
            f"{target.kind.value}={reachable:.3f}")
    elems = analysis.removed_elements(rem)
    return PruningPlan(
        removed={gid: tuple(int(i) for i in v) for gid, v in rem.items()},
        group_names={g.id: g.name for g in analysis.groups},
        group_sizes={g.id: g.size for g in analysis.groups},
        macs_before=macs0, macs_after=analysis.count("macs", elems),
        params_before=params0, params_after=analysis.count("params", elems),
        target=target, reachable=reachable, warnings=tuple(warnings))


def _fill_back(analysis: Analysis, rem: dict[int, np.ndarray], sc: Mapping[int, np.ndarray], normalize: bool,
               options: PlanOptions, ok: Callable[[dict[int, np.ndarray]], bool]) -> dict[int, np.ndarray]:
    """Rule 4's refinement: give back whole rounding steps while the target still holds.

    Rounding every group's removal down to its step (``lcm(blocks, round_to)``) makes the
    bisection over k jump past the target (a 0.5 MACs target cut to 0.3 with round_to 8 on
    a small network). Here, one step of channels at a time (the highest-scored of those a
    group lost, by normalised score) is put back, best first, as long as ``ok`` still
    holds. Groups of step 1 are left as the bisection made them (it is exact for them).
    """
    steps = {gid: math.lcm(analysis.groups[gid].blocks, options.round_to) for gid in rem}
    if all(st == 1 for st in steps.values()):
        return rem
    norm = {}
    for gid in rem:
        s = sc[gid]
        mean = float(np.abs(s).mean())
        norm[gid] = s / mean if (normalize and mean > 0) else s
    rem = dict(rem)
    for _ in range(4 * len(rem) + 8):
        best = None
        for gid, chosen in rem.items():
            st = steps[gid]
            if st == 1 or len(chosen) == 0:
                continue
            g = analysis.groups[gid]
            smaller = _choose(g, sc[gid], len(chosen) - st)
            back = np.setdiff1d(chosen, smaller)
            if len(back) == 0:
                continue
            key = float(norm[gid][back].mean())
            if best is not None and key <= best[0]:
                continue
            trial = dict(rem)
            if len(smaller):
                trial[gid] = smaller
            else:
                del trial[gid]
            if ok(trial):
                best = (key, trial)
        if best is None:
            break
        rem = best[1]
    return rem


def _per_latency(sc: dict[int, np.ndarray], saved: list[np.ndarray], normalize: bool) -> dict[int, np.ndarray]:
    """Ranking keys of rule 5: (normalised) score per ms saved; channels saving nothing get
    ``inf`` (removed last, and never for latency's sake)."""
    out = {}
    for gid, s in sc.items():
        mean = float(np.abs(s).mean())
        norm = s / mean if (normalize and mean > 0) else s
        ms = np.asarray(saved[gid], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[gid] = np.where(ms > 0, norm / np.where(ms > 0, ms, 1.0), np.inf)
    return out


def _bisect(ok: Callable[[int], bool], n_max: int) -> int:
    """Smallest k in [0, n_max] with ok(k), assuming monotonicity; n_max when none."""
    if ok(0):
        return 0
    if not ok(n_max):
        return n_max
    lo, hi = 0, n_max  # ok(lo) false, ok(hi) true
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
