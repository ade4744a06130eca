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
  naming it and the available ones (never a silent fall-back to CPU); a provider that
  onnxruntime lists but cannot start (e.g. CUDA without a GPU), so that the session falls
  back to another, is an error too;
- peak memory (``memory=True``): the process's resident set size (RSS, via psutil) is
  sampled every millisecond by a background thread during session creation and the
  warm-up runs (one extra untimed run when ``warmup`` is 0), never during the timed runs;
  the figure is the peak RSS minus the RSS just before the session was created, in MiB.
  It counts CPU memory only (weights, onnxruntime's arena, activations), not GPU memory,
  and memory the process freed earlier and reuses is not seen as an increase (so the
  first model measured in a process also pays onnxruntime's one-time initialisation).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import InputShapeError, ModelLoadError, OnnxPruneError
from onnxprune.inputs import graph_inputs, make_inputs, resolve_input_shapes
from onnxprune.runtime.verify import Provider, ort_message, check_providers, make_session, model_source

__all__ = ["PROVIDER_NAMES", "LatencyStats", "available_providers", "batch_shapes", "measure_interleaved",
           "measure_latency", "reference_session", "resolve_provider", "speedup"]

#: Short provider names accepted on the command line -> onnxruntime names, in bench order.
PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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
    peak_memory_mb: float | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready form with the unit dropped from the time keys (``median``, ``p90``, ...);
        ``peak_memory_mb`` is MiB (None when not measured)."""
        return {
            "median": self.median_ms,
            "p90": self.p90_ms,
            "mean": self.mean_ms,
            "min": self.min_ms,
            "runs": self.runs,
            "provider": self.provider,
            "threads": self.threads,
            "batch": self.batch,
            "peak_memory_mb": self.peak_memory_mb,
        }


def resolve_provider(name: str) -> str:
    """onnxruntime name of a provider given as ``cpu``/``cuda``/``tensorrt`` (any case) or in
    full (``CUDAExecutionProvider``).

    Raises:
        OnnxPruneError: an unknown name (the message lists the accepted ones).
    """
    key = name.strip()
    if key.lower() in PROVIDER_NAMES:
        return PROVIDER_NAMES[key.lower()]
    if key in PROVIDER_NAMES.values() or key in ort.get_all_providers():
        return key
    raise OnnxPruneError(f"unknown execution provider {name!r}; choose from {', '.join(PROVIDER_NAMES)} "
                         "or a full onnxruntime provider name")


def available_providers() -> tuple[list[str], list[str]]:
    """(usable, skipped) among CPU, CUDA and TensorRT: ``usable`` lists the onnxruntime names
    this onnxruntime build offers (CPU always); ``skipped`` has one message per other one,
    saying why it is left out."""
    offered = set(ort.get_available_providers())
    usable, skipped = [], []
    for short, full in PROVIDER_NAMES.items():
        if full in offered:
            usable.append(full)
        else:
            skipped.append(f"{full} skipped: not offered by this onnxruntime (needs onnxruntime-gpu and a GPU)")
    return usable, skipped


def batch_shapes(model: onnx.ModelProto, batch: int,
                 overrides: Mapping[str, tuple[int, ...]] | None = None, *,
                 label: str = "model") -> dict[str, tuple[int, ...]]:
    """Concrete input shapes with dim 0 of every input of rank >= 1 set to ``batch``.

    Other dims come from ``overrides`` or the declared shape (symbolic ones: 224, see
    :func:`onnxprune.inputs.resolve_input_shapes`).

    Raises:
        InputShapeError: ``batch`` < 1, or an input declares a fixed dim 0 other than
            ``batch`` (the message names ``label``, the input and both sizes).
    """
    if batch < 1:
        raise InputShapeError(f"batch size {batch} must be at least 1")
    shapes = resolve_input_shapes(model, overrides, batch=batch)
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else ()
        shape = shapes[vi.name]
        if not shape:
            continue
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 and dims[0].dim_value != batch:
            raise InputShapeError(f"{label}: input {vi.name!r} has a fixed batch dim of {dims[0].dim_value}; "
                                  f"it cannot run at batch {batch}")
        shapes[vi.name] = (batch,) + tuple(shape[1:])
    return shapes


class _PeakRss:
    """Context manager: peak RSS increase (MiB) of this process, sampled by a thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.base = self.peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "_PeakRss":
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def increase_mb(self) -> float:
        return max(0, self.peak - self.base) / 2**20


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


class _Timed:
    """One model's onnxruntime session, ready to run: built and warmed up on entry."""

    def __init__(self, model, input_shapes, providers, warmup, threads, seed, memory, tick) -> None:
        self.model, self.shapes = model, dict(input_shapes)
        self.providers, self.warmup, self.threads = providers, warmup, threads
        self.seed, self.memory, self.tick = seed, memory, tick
        self.peak = _PeakRss() if memory else contextlib.nullcontext()
        self.times: list[float] = []

    def __enter__(self) -> "_Timed":
        self._stack = contextlib.ExitStack()
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self) -> None:
        self.proto = (self.model if isinstance(self.model, onnx.ModelProto) else _load_header(self.model))
        feeds = make_inputs(self.proto, self.shapes, seed=self.seed)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # graph optimisers log through the default logger, not the session's
        ort.set_default_logger_severity(3)
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        source = self._stack.enter_context(model_source(self.model))  # the session may map the file
        with self.peak:
            self.sess = make_session(source, self.providers, options=options, label="model")
            self.provider = self.sess.get_providers()[0]
            first = self.providers[0]
            wanted_provider = first if isinstance(first, str) else first[0]
            if self.provider != wanted_provider:
                raise OnnxPruneError(f"onnxruntime could not use {wanted_provider} for this model "
                                     f"(it fell back to {self.provider}); is the device present?")
            self.names = [o.name for o in self.sess.get_outputs()]
            wanted = {i.name for i in self.sess.get_inputs()}
            missing = sorted(wanted - set(feeds))
            if missing:
                raise OnnxPruneError(f"no input shape for model input {missing[0]!r}")
            self.feeds = {k: v for k, v in feeds.items() if k in wanted}
            for _ in range(max(self.warmup, 1 if self.memory else 0)):
                self._run()
                self.tick()

    def _run(self) -> None:
        try:
            self.sess.run(self.names, self.feeds)
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime failed to run the model: {ort_message(exc)}") from exc

    def timed_run(self) -> None:
        t0 = time.perf_counter()
        self._run()
        self.times.append((time.perf_counter() - t0) * 1e3)
        self.tick()

    def stats(self) -> LatencyStats:
        times = np.asarray(self.times, dtype=np.float64)
        return LatencyStats(
            median_ms=float(np.median(times)),
            p90_ms=float(np.percentile(times, 90)),
            mean_ms=float(times.mean()),
            min_ms=float(times.min()),
            runs=len(times),
            provider=self.provider,
            threads=self.threads,
            batch=_batch(self.proto, self.shapes),
            peak_memory_mb=self.peak.increase_mb if self.memory else None,
        )


def _check_args(repeat: int, warmup: int, threads: int | None, providers) -> None:
    if repeat < 1:
        raise OnnxPruneError(f"repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise OnnxPruneError(f"warmup must not be negative, got {warmup}")
    if threads is not None and threads < 1:
        raise OnnxPruneError(f"threads must be at least 1, got {threads}")
    check_providers(providers)


def measure_latency(
    model: onnx.ModelProto | str | Path,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
    warmup: int = 5,
    repeat: int = 30,
    threads: int | None = None,
    seed: int = 0,
    memory: bool = False,
    on_run: Callable[[], None] | None = None,
) -> LatencyStats:
    """Median (and p90, mean, min) onnxruntime latency of ``model`` in milliseconds.

    ``model`` may be a ModelProto or a path (external data next to it is found by
    onnxruntime). ``input_shapes`` gives the concrete shape of every graph input;
    ``batch`` in the result is dim 0 of the first one. ``memory=True`` also measures
    the peak memory (see the module docstring); ``on_run`` is called after every run,
    warm-up included (progress bars).

    Raises:
        ModelLoadError: the file is missing or unreadable.
        OnnxPruneError: bad ``repeat``/``warmup``/``threads``, a provider that is not
            available or falls back to another, a missing input shape, or a failed run.
    """
    _check_args(repeat, warmup, threads, providers)
    with _Timed(model, input_shapes, providers, warmup, threads, seed, memory, on_run or (lambda: None)) as t:
        for _ in range(repeat):
            t.timed_run()
        return t.stats()


@contextlib.contextmanager
def reference_session(model: onnx.ModelProto | str | Path, input_shapes: Mapping[str, tuple[int, ...]], *,
                      providers: Sequence[Provider] = ("CPUExecutionProvider",), warmup: int = 5,
                      repeat: int = 30, threads: int | None = None,
                      seed: int = 0) -> Iterator[Callable[[onnx.ModelProto], tuple[LatencyStats, LatencyStats]]]:
    """A warmed onnxruntime session of ``model`` kept open for a series of comparisons.

    Yields ``compare(other) -> (reference stats, other stats)``: ``other`` timed
    interleaved with the kept session (as :func:`measure_interleaved`), without building
    and warming the reference again for every comparison (the round_to probe compares
    five cuts with the original). The session is closed when the block ends.

    Raises:
        As :func:`measure_latency`.
    """
    _check_args(repeat, warmup, threads, providers)
    with _Timed(model, input_shapes, providers, warmup, threads, seed, False, lambda: None) as ref:
        def compare(other: onnx.ModelProto) -> tuple[LatencyStats, LatencyStats]:
            ref.times.clear()
            with _Timed(other, input_shapes, providers, warmup, threads, seed, False, lambda: None) as t:
                for _ in range(repeat):
                    ref.timed_run()
                    t.timed_run()
                return ref.stats(), t.stats()

        yield compare


def measure_interleaved(
    models: Sequence[onnx.ModelProto | str | Path],
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
    warmup: int = 5,
    repeat: int = 30,
    threads: int | None = None,
    seed: int = 0,
) -> list[LatencyStats]:
    """:func:`measure_latency` of several models at once, their timed runs interleaved
    (A, B, A, B, ...), one :class:`LatencyStats` per model in order.

    Comparing two models measured one after the other on a machine whose load changes
    (other processes, frequency scaling) compares the load as much as the models; with
    interleaved runs both see the same conditions, so their ratio (a speedup, the
    never-slower decision) is what it claims to be. All sessions are built and warmed up
    before the first timed run; the same seeded inputs feed every model.

    Raises:
        As :func:`measure_latency`; OnnxPruneError for an empty ``models``.
    """
    if not models:
        raise OnnxPruneError("measure_interleaved needs at least one model")
    _check_args(repeat, warmup, threads, providers)
    with contextlib.ExitStack() as stack:
        timed = [stack.enter_context(_Timed(m, input_shapes, providers, warmup, threads, seed, False, lambda: None))
                 for m in models]
        for _ in range(repeat):
            for t in timed:
                t.timed_run()
        return [t.stats() for t in timed]


def speedup(before: LatencyStats, after: LatencyStats) -> float:
    """Measured speedup ``before.median_ms / after.median_ms`` (> 1 means faster after).

    ``inf`` if ``after`` rounds to zero time while ``before`` does not; 1.0 if both do.
    """
    if after.median_ms <= 0:
        return 1.0 if before.median_ms <= 0 else float("inf")
    return before.median_ms / after.median_ms
