"""onnxprune: channel pruning of CNNs at the ONNX level.

Each stage is usable alone; the CLI (``onnxprune``) is a thin wrapper over them
(``canonicalize`` and ``verify`` live in the modules of the same name)::

    load_model -> canonicalize -> analyze -> Criterion.score -> make_plan -> apply_plan
    -> verify -> measure_latency -> CompressReport

:func:`compress` chains them all, as ``onnxprune compress`` does.
"""

__version__ = "0.1.0"

from onnxprune.analysis import Analysis, ChannelGroup, analyze
from onnxprune.runtime.latency import LatencyStats, measure_latency
from onnxprune.criteria import get_criterion
from onnxprune.errors import OnnxPruneError
from onnxprune.io import load_model, save_model
from onnxprune.pipeline import CompressOptions, compress, prepare
from onnxprune.planning import PlanOptions, PruningPlan, Scope, Target, TargetKind, make_plan
from onnxprune.report import CompressReport
from onnxprune.shapes import measure_shapes
from onnxprune.surgery import apply_plan

__all__ = [
    "Analysis", "ChannelGroup", "CompressOptions", "CompressReport", "LatencyStats", "OnnxPruneError",
    "PlanOptions", "PruningPlan", "Scope", "Target", "TargetKind", "analyze", "apply_plan",
    "compress", "get_criterion", "load_model", "make_plan", "measure_latency", "measure_shapes", "prepare",
    "save_model",
]
