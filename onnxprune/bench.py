"""onnxruntime latency of a model, before and after pruning.

Rules :func:`measure_latency` follows:

- the session uses ``ORT_ENABLE_ALL`` graph optimisation (what a deployment uses) and
  ``intra_op_num_threads = threads`` when ``threads`` is given (ORT's default otherwise);
- one random input set (:func:`onnxprune.inputs.make_inputs`, seeded) is built before
  timing and reused for every run;
- ``warmup`` untimed runs, then ``repeat`` runs each timed alone with
  :func:`time.perf_counter`; the median is the headline figure, p90 / mean / min are
  kept alongside;
- an execution provider that onnxruntime does not offer is an :class:`OnnxPruneError`
  naming it and the available ones (never a silent fall-back to CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import ModelLoadError, OnnxPruneError
from onnxprune.inputs import graph_inputs, make_inputs
from onnxprune.verify import Provider, ort_message, check_providers, make_session, model_source

__all__ = ["LatencyStats", "measure_latency", "speedup"]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model in milliseconds over ``runs`` timed runs."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    provider: str
    threads: int | None
    batch: int

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready form with the unit dropped from the keys (``median``, ``p90``, ...)."""
        return {
            "median": self.median_ms,
            "p90": self.p90_ms,
            "mean": self.mean_ms,
            "min": self.min_ms,
            "runs": self.runs,
            "provider": self.provider,
            "threads": self.threads,
            "batch": self.batch,
        }


def _load_header(path: str | os.PathLike) -> onnx.ModelProto:
    """The model's graph without external weights: enough to build inputs."""
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file not found: {path}") from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc


def _batch(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    first = next((i.name for i in graph_inputs(model)), None)
    shape = shapes.get(first) if first is not None else None
    if shape is None and shapes:
        shape = next(iter(shapes.values()))
    return int(shape[0]) if shape else 1


def measure_latency(
    model: onnx.ModelProto | str | Path,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
    warmup: int = 5,
    repeat: int = 30,
    threads: int | None = None,
    seed: int = 0,
) -> LatencyStats:
    """Median (and p90, mean, min) onnxruntime latency of ``model`` in milliseconds.

    ``model`` may be a ModelProto or a path (external data next to it is found by
    onnxruntime). ``input_shapes`` gives the concrete shape of every graph input;
    ``batch`` in the result is dim 0 of the first one.
    """
    if repeat < 1:
        raise OnnxPruneError(f"repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise OnnxPruneError(f"warmup must not be negative, got {warmup}")
    if threads is not None and threads < 1:
        raise OnnxPruneError(f"threads must be at least 1, got {threads}")
    check_providers(providers)

    proto = model if isinstance(model, onnx.ModelProto) else _load_header(model)
    shapes = dict(input_shapes)
    feeds = make_inputs(proto, shapes, seed=seed)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # graph optimisers log through the default logger, not the session's
    ort.set_default_logger_severity(3)
    if threads is not None:
        options.intra_op_num_threads = threads

    with model_source(model) as source:  # the session is used inside: it may map the file
        sess = make_session(source, providers, options=options, label="model")
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        missing = sorted(wanted - set(feeds))
        if missing:
            raise OnnxPruneError(f"no input shape for model input {missing[0]!r}")
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        try:
            for _ in range(warmup):
                sess.run(names, feeds)
            times = np.empty(repeat, dtype=np.float64)
            for i in range(repeat):
                t0 = time.perf_counter()
                sess.run(names, feeds)
                times[i] = time.perf_counter() - t0
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime failed to run the model: {ort_message(exc)}") from exc
        provider = sess.get_providers()[0]
    times *= 1e3

    return LatencyStats(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        mean_ms=float(times.mean()),
        min_ms=float(times.min()),
        runs=repeat,
        provider=provider,
        threads=threads,
        batch=_batch(proto, shapes),
    )


def speedup(before: LatencyStats, after: LatencyStats) -> float:
    """Measured speedup ``before.median_ms / after.median_ms`` (> 1 means faster after).

    ``inf`` if ``after`` rounds to zero time while ``before`` does not; 1.0 if both do.
    """
    if after.median_ms <= 0:
        return 1.0 if before.median_ms <= 0 else float("inf")
    return before.median_ms / after.median_ms
