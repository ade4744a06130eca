"""Pruning targets, options and the resulting plan (with its JSON round trip)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from onnxprune.analysis.groups import Analysis
from onnxprune.errors import PlanError


#: ``PlanOptions.round_to`` value asking for a measured round_to (``--round-to auto``).
ROUND_TO_AUTO = "auto"


class TargetKind(str, Enum):
    """What a target fraction measures."""

    RATIO = "ratio"  # fraction of prunable channels removed
    MACS = "macs"  # fraction of MACs kept
    PARAMS = "params"  # fraction of params kept
    LATENCY = "latency"  # fraction of the original's measured latency kept (needs a latency model)


class Scope(str, Enum):
    """How channels compete: across the whole network (normalised scores) or per group."""

    GLOBAL = "global"
    LAYER = "layer"


def _enum(cls, value, what: str):
    try:
        return cls(value)
    except ValueError:
        raise PlanError(f"unknown {what} {value!r}; choose from {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class Target:
    """A pruning target: ``kind`` and a fraction in (0, 1).

    Raises:
        PlanError: when ``value`` is not strictly between 0 and 1.
    """

    kind: TargetKind
    value: float

    def __post_init__(self) -> None:
        # the planner compares kinds with `is`: a plain string ("macs") must become the enum
        object.__setattr__(self, "kind", _enum(TargetKind, self.kind, "target kind"))
        if not 0.0 < float(self.value) < 1.0:
            raise PlanError(f"target {self.kind.value}={self.value} must lie strictly between 0 and 1")

    def __str__(self) -> str:
        return f"{self.kind.value}={self.value:g}"


@dataclass(frozen=True)
class PlanOptions:
    """How the planner turns scores into removals.

    Attributes:
        scope: global ranking of normalised scores, or the same fraction in every group.
        round_to: kept channel counts are multiples of this (hardware alignment); groups
            smaller than it are left whole. :data:`ROUND_TO_AUTO` (``"auto"``) asks for
            a measured choice, which must be resolved to an int
            (:func:`onnxprune.runtime.sweep.channel_sweep`) before planning.
        max_layer_ratio: at most this fraction of any group's channels is removed.
        min_channels: every group keeps at least this many channels (at least 1).
        exclude: fnmatch patterns of node names; groups with a member node matching
            one are never pruned.
    """

    scope: Scope = Scope.GLOBAL
    round_to: int | str = 1
    max_layer_ratio: float = 1.0
    min_channels: int = 1
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", _enum(Scope, self.scope, "scope"))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.round_to != ROUND_TO_AUTO and (isinstance(self.round_to, (bool, str)) or
                                               not isinstance(self.round_to, int) or self.round_to < 1):
            raise PlanError(f"round_to must be an integer >= 1 or {ROUND_TO_AUTO!r}, got {self.round_to!r}")
        if not 0.0 < self.max_layer_ratio <= 1.0:
            raise PlanError(f"max_layer_ratio must lie in (0, 1], got {self.max_layer_ratio}")
        if self.min_channels < 1:
            raise PlanError(f"min_channels must be >= 1, got {self.min_channels}")


@dataclass(frozen=True, eq=False)
class PruningPlan:
    """Which channels each group loses, and the predicted effect.

    Attributes:
        removed: ``{group id: sorted removed channel indices}`` (only groups that lose some).
        group_names / group_sizes: per group id, to check the plan against an analysis.
        macs_before / macs_after / params_before / params_after: predicted counts.
        target: the target the plan was made for (None for hand-written plans).
        reachable: when the target cannot be met, the fraction that could be reached
            (MACs or params kept, or channels removed); None when it was met.
        warnings: human-readable notes (unreachable target, skipped groups).
    """

    removed: Mapping[int, tuple[int, ...]]
    group_names: Mapping[int, str]
    group_sizes: Mapping[int, int]
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    target: Target | None = None
    reachable: float | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def kept(self, gid: int) -> tuple[int, ...]:
        """Kept channel indices of group ``gid``."""
        gone = set(self.removed.get(gid, ()))
        return tuple(i for i in range(self.group_sizes[gid]) if i not in gone)

    @property
    def num_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    def validate(self, analysis: Analysis) -> None:
        """Check the plan against ``analysis``.

        Raises:
            PlanError: unknown group, size mismatch, blocked group, index out of range,
                a group left without channels, a Split/Slice output left without channels
                (:attr:`ChannelGroup.keep_one_of`), or unequal removal across grouped-conv blocks.
        """
        for gid, idx in self.removed.items():
            if gid >= len(analysis.groups) or analysis.groups[gid].name != self.group_names.get(gid):
                raise PlanError(f"plan names group {self.group_names.get(gid, gid)} which the model does not have")
            g = analysis.groups[gid]
            if g.size != self.group_sizes.get(gid):
                raise PlanError(f"group {g.name} has {g.size} channels, the plan expects {self.group_sizes.get(gid)}")
            if len(idx) and g.blocked_reason:
                raise PlanError(f"group {g.name} is blocked ({g.blocked_reason})")
            arr = np.asarray(idx, dtype=np.int64)
            if len(arr) and (arr.min() < 0 or arr.max() >= g.size or len(set(idx)) != len(idx)):
                raise PlanError(f"group {g.name}: removed indices must be distinct and in [0, {g.size})")
            if len(idx) >= g.size:
                raise PlanError(f"group {g.name} would lose all its {g.size} channels")
            gone = set(idx)
            for part in g.keep_one_of:
                if gone.issuperset(part.tolist()):
                    raise PlanError(f"group {g.name} would lose all of channels {part.tolist()}, "
                                    f"which one tensor holds alone (Split/Slice output)")
            if g.blocks > 1:
                per = np.bincount(arr // (g.size // g.blocks), minlength=g.blocks)
                if len(set(per.tolist())) > 1:
                    raise PlanError(f"group {g.name} must lose the same number of channels in each of its {g.blocks} blocks")

    def to_json(self) -> str:
        """JSON text: groups by name with kept indices, predicted counts and target."""
        return json.dumps({
            "target": None if self.target is None else {"kind": self.target.kind.value, "value": self.target.value},
            "reachable": self.reachable,
            "predicted": {"macs_before": self.macs_before, "macs_after": self.macs_after,
                          "params_before": self.params_before, "params_after": self.params_after},
            "warnings": list(self.warnings),
            "groups": [{"id": gid, "name": self.group_names[gid], "size": self.group_sizes[gid],
                        "kept": list(self.kept(gid))} for gid in sorted(self.group_names)],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        """Inverse of :meth:`to_json`. Raises PlanError on malformed JSON."""
        try:
            d = json.loads(text)
            names, sizes, removed = {}, {}, {}
            for g in d["groups"]:
                gid = int(g["id"])
                names[gid], sizes[gid] = str(g["name"]), int(g["size"])
                kept = {int(i) for i in g["kept"]}
                if any(not 0 <= i < sizes[gid] for i in kept):
                    raise ValueError(f"group {names[gid]}: kept indices must lie in [0, {sizes[gid]})")
                gone = sorted(set(range(sizes[gid])) - kept)
                if gone:
                    removed[gid] = tuple(gone)
            t = d.get("target")
            p = d.get("predicted", {})
            return cls(removed, names, sizes, int(p.get("macs_before", 0)), int(p.get("macs_after", 0)),
                       int(p.get("params_before", 0)), int(p.get("params_after", 0)),
                       None if t is None else Target(TargetKind(t["kind"]), float(t["value"])),
                       d.get("reachable"), tuple(d.get("warnings", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan JSON: {e}") from None
