"""onnxprune: channel pruning of CNNs at the ONNX level.

Each stage is usable alone; the CLI (``onnxprune``) is a thin wrapper over them
(``canonicalize`` and ``verify`` live in the modules of the same name)::

    load_model -> canonicalize -> analyze -> Criterion.score -> make_plan -> apply_plan
    -> verify -> measure_latency -> CompressReport

:func:`compress` chains them all, as ``onnxprune compress`` does.
"""

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``python -m onnxprune`` installs its signal
# handlers before numpy/onnx load and a data-free run never imports torch.
_EXPORTS = {
    "Analysis": "onnxprune.analysis", "ChannelGroup": "onnxprune.analysis", "analyze": "onnxprune.analysis",
    "LatencyStats": "onnxprune.runtime.latency", "measure_latency": "onnxprune.runtime.latency",
    "get_criterion": "onnxprune.criteria", "OnnxPruneError": "onnxprune.errors",
    "load_model": "onnxprune.io", "save_model": "onnxprune.io",
    "CompressOptions": "onnxprune.pipeline", "compress": "onnxprune.pipeline", "prepare": "onnxprune.pipeline",
    "PlanOptions": "onnxprune.planning", "PruningPlan": "onnxprune.planning", "Scope": "onnxprune.planning",
    "Target": "onnxprune.planning", "TargetKind": "onnxprune.planning", "make_plan": "onnxprune.planning",
    "CompressReport": "onnxprune.report", "measure_shapes": "onnxprune.shapes", "apply_plan": "onnxprune.surgery",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "Analysis", "ChannelGroup", "CompressOptions", "CompressReport", "LatencyStats", "OnnxPruneError",
    "PlanOptions", "PruningPlan", "Scope", "Target", "TargetKind", "analyze", "apply_plan",
    "compress", "get_criterion", "load_model", "make_plan", "measure_latency", "measure_shapes", "prepare",
    "save_model",
]
