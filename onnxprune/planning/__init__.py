"""Planning: from channel scores and a target to a :class:`PruningPlan`."""

from onnxprune.planning.plan import PlanOptions, PruningPlan, Scope, Target, TargetKind
from onnxprune.planning.planner import make_plan

__all__ = ["PlanOptions", "PruningPlan", "Scope", "Target", "TargetKind", "make_plan"]
