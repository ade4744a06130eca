"""Calibration data: inputs (in memory or lazy) and optional labels, read in batches.

:class:`CalibrationData` is what every data-driven stage takes. Its ``x`` is either a numpy
array in memory (:func:`from_arrays`, a ``.npz``) or a :class:`~onnxprune.data.lazy.LazyArray`
(image folders, list files, ``.npy``, shards: :func:`onnxprune.data.load_calibration`)
that decodes samples when they are read. Both behave alike:

- ``len``, ``x.shape``, ``x[i]`` / ``x[a:b]`` / ``x[idx]`` (float32 arrays);
- :meth:`CalibrationData.batches` reads consecutive batches (through a DataLoader with
  workers for lazy data, :mod:`onnxprune.data.loader`); bad samples of lazy sources
  (unreadable file, NaN row) are skipped and counted in :attr:`CalibrationData.bad`, or
  raise with ``strict``;
- :meth:`~CalibrationData.take`, :meth:`~CalibrationData.shard`,
  :meth:`~CalibrationData.subset`, :meth:`~CalibrationData.without_labels` make views
  (for lazy data: index arrays, nothing is read); labels live in memory.

In-memory arrays are checked whole when made (float dtype, finite, labels one per
sample); lazy ones per sample as they are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.data.lazy import LazyArray
from onnxprune.data.loader import BadSamples, BatchRequest, fetch_batches, resolve_workers
from onnxprune.errors import DataError
from onnxprune.safety import check_allocation, format_bytes

__all__ = ["CalibrationData", "data_warnings", "from_arrays"]


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """Inputs and optional labels.

    Attributes:
        x: float32 [N, ...] in the model's input layout: an ``np.ndarray`` or a
            :class:`~onnxprune.data.lazy.LazyArray` (decoded on access).
        y: int64 [N] class labels, or None (then the original model is the teacher).
        source: where the data came from (for messages and reports).
        workers: DataLoader worker processes for reading batches; None = auto (0 for
            arrays in memory, :func:`~onnxprune.data.loader.default_workers` for lazy x).
        strict: a bad sample raises :class:`~onnxprune.errors.DataError` instead of
            being skipped.
        bad: the log of bad samples met so far, shared by all views of this data.
    """

    x: np.ndarray | LazyArray
    y: np.ndarray | None
    source: str = "<arrays>"
    workers: int | None = None
    strict: bool = False
    bad: BadSamples = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.bad is None:
            object.__setattr__(self, "bad", BadSamples(self.source, self.strict))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def lazy(self) -> bool:
        """True when ``x`` is decoded on access (not an array in memory)."""
        return isinstance(self.x, LazyArray)

    @property
    def resolved_workers(self) -> int:
        """The worker processes a pass uses (:func:`~onnxprune.data.loader.resolve_workers`)."""
        return resolve_workers(self.workers, self.lazy)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Consecutive (x float32 [<= batch_size, ...], y int64 [same] or None) batches.

        In-memory data without workers gives views (no copies). Lazy data is read through
        :func:`~onnxprune.data.loader.fetch_batches`: a batch lacks its bad samples (a
        batch with none left is not yielded).

        Raises:
            DataError: ``batch_size`` < 1; strict mode and a bad sample; every sample bad.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        n = len(self)
        if not self.lazy and self.resolved_workers == 0:
            for i in range(0, n, batch_size):
                yield self.x[i:i + batch_size], None if self.y is None else self.y[i:i + batch_size]
            return
        requests = [BatchRequest(np.arange(i, min(i + batch_size, n), dtype=np.int64))
                    for i in range(0, n, batch_size)]
        for f in fetch_batches(self, requests):
            if len(f.x):
                yield f.x, f.y

    def _check_index(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"{self.source}: sample index out of range [0, {len(self)})")
        return idx

    def take(self, indices: np.ndarray | Sequence[int]) -> "CalibrationData":
        """The samples at ``indices`` (int [K], in that order), labels alike; lazy data
        gives a view (nothing is read).

        Raises:
            DataError: an index outside [0, N).
        """
        idx = self._check_index(indices)
        x = self.x.take(idx) if self.lazy else self.x[idx]
        return dataclasses.replace(self, x=x, y=None if self.y is None else self.y[idx])

    def shard(self, rank: int, world: int) -> "CalibrationData":
        """Rank ``rank``'s share of ``world`` (samples ``rank, rank + world, ...``): the
        split a data-parallel stage gives each process; world 1 returns self."""
        if world <= 1:
            return self
        return self.take(np.arange(rank, len(self), world))

    def without_labels(self) -> "CalibrationData":
        """The same inputs with ``y`` dropped."""
        return self if self.y is None else dataclasses.replace(self, y=None)

    def subset(self, samples: int | None, seed: int = 0) -> "CalibrationData":
        """At most ``samples`` samples, drawn without replacement with ``seed`` (all when
        None), in data order; for lazy data only these are ever read.

        Raises:
            DataError: ``samples`` < 1.
        """
        if samples is None or samples >= len(self):
            return self
        if samples < 1:
            raise DataError(f"--samples must be >= 1, got {samples}")
        return self.take(np.sort(np.random.default_rng(seed).choice(len(self), samples, replace=False)))

    def materialize(self) -> "CalibrationData":
        """The same data with ``x`` read into memory (bad samples dropped, labels alike);
        self when it is in memory already.

        Raises:
            DataError: more than the memory budget, strict mode and a bad sample, or every
                sample bad.
        """
        if not self.lazy:
            return self
        nbytes = int(np.prod(self.x.shape, dtype=np.int64)) * 4
        check_allocation(nbytes, f"{self.source}: {len(self)} samples in memory ({format_bytes(nbytes)})")
        xs, ys = [], []
        requests = [BatchRequest(np.arange(i, min(i + 256, len(self)), dtype=np.int64))
                    for i in range(0, len(self), 256)]
        for f in fetch_batches(self, requests):
            xs.append(f.x)
            ys.append(f.y)
        x = np.concatenate(xs)
        return dataclasses.replace(self, x=x, y=None if self.y is None else np.concatenate(ys))

    def check(self, input_shape: Sequence[int | None] | None, num_classes: int | None = None) -> "CalibrationData":
        """Check against the model's input shape (None = any dim; None for the whole shape
        when the model declares none) and class count; returns self.

        Dim 0 (the batch) is never compared: a model with a fixed batch B takes any N, fed
        in micro-batches of B (:mod:`onnxprune.batching`). Reads no sample.

        Raises:
            DataError: rank or a fixed dim differs, labels outside [0, num_classes).
        """
        shp = tuple(self.x.shape)
        if input_shape is None:
            input_shape = (None,) * len(shp)
        if len(shp) != len(input_shape):
            raise DataError(f"{self.source}: x has shape {shp}, the model's input has rank {len(input_shape)} "
                            f"({_fmt(input_shape)})")
        for i, (got, want) in enumerate(zip(shp[1:], input_shape[1:]), start=1):
            if want is not None and got != want:
                raise DataError(f"{self.source}: x has shape {shp}, the model expects {_fmt(input_shape)} "
                                f"(dim {i} differs)")
        if self.y is not None and num_classes is not None and len(self.y):
            lo, hi = int(self.y.min()), int(self.y.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(f"{self.source}: labels range over [{lo}, {hi}] but the model has "
                                f"{num_classes} classes")
        return self


def data_warnings(*datas: CalibrationData | None) -> list[str]:
    """One line per source whose bad samples were skipped (None entries and repeats of a
    source ignored): for the report's warnings."""
    out: list[str] = []
    for d in datas:
        line = None if d is None else d.bad.summary()
        if line and line not in out:
            out.append(line)
    return out


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_labels(y, n: int, source: str) -> np.ndarray | None:
    """``y`` as int64 [n] (None stays None).

    Raises:
        DataError: not one label per sample, or not integers.
    """
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{source}: y has shape {y.shape}, expected [{n}] (one label per sample)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: y has dtype {y.dtype}, expected integer class labels")
    return y.astype(np.int64)


def validated(x: np.ndarray, y: np.ndarray | None, source: str, **kw) -> CalibrationData:
    """In-memory data checked whole (``kw``: ``workers``, ``strict``).

    Raises:
        DataError: no samples, a non-float dtype, NaN / infinite values, bad labels.
    """
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{source}: no samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{source}: x has dtype {x.dtype}, expected float32")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: x contains NaN or infinite values")
    return CalibrationData(x, check_labels(y, len(x), source), source, **kw)


def from_arrays(samples: Iterable, labels: Iterable | None = None) -> CalibrationData:
    """Calibration data from an array [N, ...], or any iterable of arrays / torch tensors
    (each a batch [B, ...]), with optional labels likewise.

    Raises:
        DataError: empty, non-float, NaN, or batches of different sample shapes.
    """
    def to_np(v):
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

    def stack(it):
        if isinstance(it, np.ndarray) or hasattr(it, "detach"):
            return to_np(it)
        parts = [to_np(v) for v in it]
        if not parts:
            raise DataError("<arrays>: no samples")
        try:
            return np.concatenate(parts, axis=0)
        except ValueError as e:
            raise DataError(f"<arrays>: batches do not fit together ({e})") from None

    return validated(stack(samples), None if labels is None else stack(labels), "<arrays>")
