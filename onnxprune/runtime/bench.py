"""Benchmark several models on several execution providers and batch sizes.

Rules :func:`bench_models` follows:

- every (model, provider, batch) cell is one :func:`onnxprune.runtime.latency.measure_latency` call
  with ``memory=True``, in the order models x providers x batches;
- input shapes come from :func:`onnxprune.runtime.latency.batch_shapes`: a symbolic batch dim gets
  the batch size, a fixed batch dim of another size is an :class:`InputShapeError`
  naming the model and input (checked for every model before anything is timed);
- the speedup of a cell is the first model's median latency on the same provider and
  batch divided by this cell's (> 1: faster than the first model); the first model's
  cells have speedup 1.0.

JSON schema of :meth:`BenchResult.to_dict`::

    {"settings": {"warmup", "repeat", "threads", "providers": [str], "batches": [int],
                  "skipped": [str]},
     "results": [{"model": str, "provider": str, "batch": int,
                  "input_shapes": {name: [dims]},
                  "latency_ms": {"median", "p90", "mean", "min"}, "runs": int,
                  "peak_memory_mb": float | null, "speedup_vs_first": float | null}]}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxprune.runtime.latency import LatencyStats, _load_header, batch_shapes, measure_latency, speedup

__all__ = ["BenchCell", "BenchResult", "bench_models"]


@dataclass(frozen=True)
class BenchCell:
    """One measurement: ``model`` on ``provider`` at ``batch``; ``speedup_vs_first`` as in the
    module docstring (None when the first model has no cell with this provider and batch)."""

    model: str
    provider: str
    batch: int
    input_shapes: Mapping[str, tuple[int, ...]]
    stats: LatencyStats
    speedup_vs_first: float | None

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {"model": self.model, "provider": self.provider, "batch": self.batch,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "latency_ms": {"median": s.median_ms, "p90": s.p90_ms, "mean": s.mean_ms, "min": s.min_ms},
                "runs": s.runs, "peak_memory_mb": s.peak_memory_mb, "speedup_vs_first": self.speedup_vs_first}


@dataclass(frozen=True)
class BenchResult:
    """All cells of one :func:`bench_models` call and the settings used."""

    cells: tuple[BenchCell, ...]
    providers: tuple[str, ...]
    batches: tuple[int, ...]
    warmup: int
    repeat: int
    threads: int | None
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (schema in the module docstring)."""
        return {"settings": {"warmup": self.warmup, "repeat": self.repeat, "threads": self.threads,
                             "providers": list(self.providers), "batches": list(self.batches),
                             "skipped": list(self.skipped)},
                "results": [c.to_dict() for c in self.cells]}


def bench_models(models: Sequence[str | os.PathLike], providers: Sequence[str], batches: Sequence[int], *,
                 warmup: int = 5, repeat: int = 30, threads: int | None = None,
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0,
                 skipped: Sequence[str] = (), on_run: Callable[[], None] | None = None) -> BenchResult:
    """Measure every model on every provider at every batch size.

    Args:
        models: ONNX files; the first is the reference for speedups.
        providers: onnxruntime provider names (see :func:`onnxprune.runtime.latency.resolve_provider`).
        batches: batch sizes (each >= 1).
        warmup / repeat / threads / seed: as in :func:`onnxprune.runtime.latency.measure_latency`.
        input_shapes: shape overrides applied to every model (dim 0 is replaced by the batch).
        skipped: messages about providers left out, carried into the result.
        on_run: called after every onnxruntime run (progress bars).

    Raises:
        ModelLoadError: a model file is missing or unreadable.
        InputShapeError: a fixed batch dim differs from a requested batch size.
        OnnxPruneError: as :func:`measure_latency`.
    """
    if not models:
        raise ValueError("bench_models needs at least one model")
    headers = [_load_header(m) for m in models]
    plan = [(i, str(m), p, b, batch_shapes(h, b, input_shapes, label=str(m)))
            for i, (m, h) in enumerate(zip(models, headers)) for p in providers for b in batches]
    first: dict[tuple[str, int], LatencyStats] = {}
    cells = []
    for index, name, provider, batch, shapes in plan:
        stats = measure_latency(name, shapes, providers=(provider,), warmup=warmup, repeat=repeat,
                                threads=threads, seed=seed, memory=True, on_run=on_run)
        ref = first.setdefault((provider, batch), stats) if index == 0 else first.get((provider, batch))
        cells.append(BenchCell(name, provider, batch, shapes, stats, None if ref is None else speedup(ref, stats)))
    return BenchResult(tuple(cells), tuple(providers), tuple(batches), warmup, repeat, threads, tuple(skipped))
