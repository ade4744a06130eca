"""Batches read through a torch ``DataLoader``: decoding, preprocessing and augmentation in
worker processes, bad samples skipped and counted.

Rules:

- A pass over the data is a list of :class:`BatchRequest` (view positions + an optional
  augmentation seed), the DataLoader's ``batch_sampler``: each request is read by one
  worker (:meth:`_Reader.__getitems__`), packed and augmented there (:meth:`_Reader.collate`)
  and handed back in request order (:func:`fetch_batches`). Batches are numpy arrays (no
  shared-memory tensors, so a small ``/dev/shm`` is no limit).
- Workers (:func:`resolve_workers`): ``None`` (auto) is 0 for arrays in memory (read in the
  process, as fast as before) and :func:`default_workers` for lazy sources; a pass of a
  single batch never starts a worker. Workers are forked on Linux (the data is not
  copied), started by the platform's default elsewhere.
- Augmentation is seeded per batch (``BatchRequest.seed``, e.g. :func:`batch_seed` of the
  run's seed, epoch and step), so the views are the same for any number of workers.
- Bad samples (:class:`~onnxprune.data.lazy.BadSample`) are dropped from their batch and
  recorded in the data's :class:`BadSamples` log in the main process: the first
  :attr:`BadSamples.SHOW` are named in warnings on stderr, all are counted; in strict mode
  the first is a :class:`~onnxprune.errors.DataError` naming the file. A pass in which
  every sample read was bad is a DataError. A dead worker process is a DataError too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import DataError, OnnxPruneError, first_line

__all__ = ["BadSamples", "BatchRequest", "Fetched", "batch_seed", "default_workers", "fetch_batches",
           "resolve_workers"]


def default_workers() -> int:
    """Worker processes for lazy sources by default: half the usable CPUs, 1 to 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return int(min(4, max(1, cpus // 2)))


def resolve_workers(workers: int | None, lazy: bool) -> int:
    """``workers`` as a count: None is 0 for in-memory data and :func:`default_workers` for lazy.

    Raises:
        DataError: a negative count.
    """
    if workers is None:
        return default_workers() if lazy else 0
    if int(workers) < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    return int(workers)


def batch_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one batch from the run's ``seed`` and ``keys`` (epoch, step)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class BatchRequest:
    """One batch to read: view positions int64 [k] and the augmentation seed (None: none)."""

    index: np.ndarray
    seed: int | None = None


@dataclass
class Fetched:
    """One batch as read.

    Attributes:
        x: float32 [k', ...] the good samples, augmented when the request had a seed.
        y: int64 [k'] their labels, or None.
        kept: int64 [k'] positions in ``request.index`` of the good samples.
        bad: (source index, name, reason) of each bad sample.
    """

    x: np.ndarray
    y: np.ndarray | None
    kept: np.ndarray
    bad: list[tuple[int, str, str]] = field(default_factory=list)


class BadSamples:
    """The bad samples met in one source (shared by its views: ``take``, ``subset``, ...).

    Attributes:
        source: the data's name, for messages.
        strict: the first bad sample raises instead of being skipped.
    """

    #: how many bad samples are named
    SHOW = 3

    def __init__(self, source: str, strict: bool = False) -> None:
        self.source, self.strict = source, bool(strict)
        self._seen: set[int] = set()
        self.names: list[str] = []

    @property
    def count(self) -> int:
        return len(self._seen)

    @property
    def keys(self) -> list[int]:
        """Source indices of the bad samples seen, sorted."""
        return sorted(self._seen)

    def record(self, key: int, name: str, reason: str) -> None:
        """Note bad sample ``key`` (its source index); warns for the first :attr:`SHOW`.

        Raises:
            DataError: in strict mode, naming the file and the reason.
        """
        if self.strict:
            raise DataError(f"{name}: {reason} (--strict-data: bad samples are errors; without it they are "
                            "skipped and counted)")
        if key in self._seen:
            return
        self._seen.add(key)
        if len(self.names) < self.SHOW:
            self.names.append(name)
            more = "; further bad samples are counted, not named" if len(self.names) == self.SHOW else ""
            warn(f"{name}: {reason}; skipped{more}")

    def merge(self, keys, names) -> None:
        """Add another process's bad samples (their source indices and first names), without
        warning again: the report of a multi-process run counts every rank's."""
        self._seen.update(int(k) for k in keys)
        for name in names:
            if len(self.names) < self.SHOW and name not in self.names:
                self.names.append(name)

    def summary(self) -> str | None:
        """One line for the report (None when every sample read was good)."""
        if not self._seen:
            return None
        return (f"{self.source}: {self.count} bad sample(s) skipped (first: {', '.join(self.names)}); "
                "--strict-data makes them errors")


def warn(message: str) -> None:
    """``warning: message`` in yellow on stderr."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


@dataclass(frozen=True)
class _Failure:
    """An OnnxPruneError raised while reading in a worker, re-raised in the main process."""

    error: OnnxPruneError


class _Reader:
    """The map-style dataset of a pass: reads a :class:`BatchRequest`'s samples (bad ones
    dropped) and packs them (labels, augmentation)."""

    def __init__(self, x, y: np.ndarray | None, augment=None) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.__getitems__(BatchRequest(np.array([i], dtype=np.int64)))

    def __getitems__(self, request: BatchRequest):
        idx = np.asarray(request.index, dtype=np.int64)
        if isinstance(self.x, np.ndarray):
            return request, self.x[idx], np.arange(len(idx), dtype=np.int64), []
        try:
            x, kept, bad = self.x.read(idx)
        except OnnxPruneError as e:
            return _Failure(e)
        src = self.x.source_index(idx) if bad else idx
        named = [(int(src[p]), self.x.source.name(int(src[p])), reason) for p, reason in bad]
        return request, x, kept, named

    def collate(self, item) -> Fetched | _Failure:
        if isinstance(item, _Failure):
            return item
        request, x, kept, bad = item
        if self.augment is not None and request.seed is not None and len(x):
            import torch

            xt = torch.from_numpy(np.ascontiguousarray(x))
            x = self.augment(xt, torch.Generator().manual_seed(int(request.seed))).numpy()
        y = None if self.y is None else self.y[np.asarray(request.index, dtype=np.int64)[kept]]
        return Fetched(np.ascontiguousarray(x, dtype=np.float32), y, kept, bad)


def _context():
    return "fork" if sys.platform.startswith("linux") else None


def _through_loader(reader: _Reader, requests: list[BatchRequest], workers: int, source: str) -> Iterator:
    from torch.utils.data import DataLoader

    loader = DataLoader(reader, batch_sampler=requests, num_workers=workers, collate_fn=reader.collate,
                        multiprocessing_context=_context(), prefetch_factor=2)
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except RuntimeError as e:  # a worker killed (out of memory, signal) or failing to start
            raise DataError(f"{source}: a data-loading worker process failed ({first_line(e)}); "
                            "try fewer --workers or --workers 0") from None
        yield item


def fetch_batches(data, requests: Sequence[BatchRequest], *, augment=None,
                  check_all_bad: bool = True) -> Iterator[Fetched]:
    """Read ``requests`` from ``data`` (a :class:`~onnxprune.data.CalibrationData`) in order.

    Args:
        data: the data; its ``workers`` and bad-sample log are used.
        requests: the batches (positions in ``data``), e.g. an epoch's permutation chunks.
        augment: an :class:`~onnxprune.recover.augment.Augmenter` applied to the requests
            that carry a seed (in the workers), or None.
        check_all_bad: raise when every sample of the pass is bad (False: the caller
            decides, e.g. on the count of every rank).

    Yields:
        One :class:`Fetched` per request (possibly with no sample, when all were bad).

    Raises:
        DataError: strict mode and a bad sample; every sample of the pass bad; a worker
            process that died; a file that vanished.
    """
    requests = list(requests)
    reader = _Reader(data.x, data.y, augment)
    workers = min(data.resolved_workers, len(requests)) if len(requests) > 1 else 0
    items = (reader.collate(reader.__getitems__(r)) for r in requests) if workers == 0 else \
        _through_loader(reader, requests, workers, data.source)
    good = read = 0
    for item in items:
        if isinstance(item, _Failure):
            raise item.error
        for key, name, reason in item.bad:
            data.bad.record(key, name, reason)
        good += len(item.x)
        read += len(item.x) + len(item.bad)
        yield item
    if check_all_bad and read and not good:
        raise DataError(f"{data.source}: every sample read ({read}) is bad; the first: "
                        f"{', '.join(data.bad.names) or 'none named'}")
