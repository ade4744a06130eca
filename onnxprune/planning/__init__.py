"""Planning: from channel scores and a target to a :class:`PruningPlan`."""

from onnxprune.planning.plan import ROUND_TO_AUTO, PlanOptions, PruningPlan, Scope, Target, TargetKind
from onnxprune.planning.planner import LatencyPredictor, make_plan

__all__ = ["ROUND_TO_AUTO", "LatencyPredictor", "PlanOptions", "PruningPlan", "Scope", "Target", "TargetKind",
           "make_plan"]
