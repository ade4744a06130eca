"""Lazy samples: a source that decodes one sample on demand, and an array view over it.

- :class:`Source`: N samples of one shape, each read (decoded, preprocessed) only when
  asked for. Subclasses implement :meth:`Source.read` (one sample) and may override
  :meth:`Source.read_many` (a batch at once, e.g. one fancy index into a memory map).
  Every sample that comes back is checked: float32, the source's sample shape, finite.
  A sample that fails (unreadable file, wrong size after preprocessing, NaN) is reported
  as *bad* (position and reason), never raised, so a batch skips it.
- :class:`LazyArray`: the numpy-like face of a source (``shape``, ``dtype`` float32,
  ``len``, indexing with an int, a slice, an int or bool index array, or a tuple whose
  first item is one of those), optionally through an index (``take`` makes views, no
  reads). Plain indexing returns a float32 ``np.ndarray`` and raises
  :class:`~onnxprune.errors.DataError` naming the file on a bad sample; batch readers use
  :meth:`LazyArray.read`, which skips them.
- :class:`Concat`: several sources end to end (sharded files), in the given order.

Sources hold paths and small per-sample metadata only (no decoded data), and drop any open
file handle or memory map when pickled, so DataLoader worker processes reopen them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxprune.errors import DataError
from onnxprune.safety import check_allocation, format_bytes

__all__ = ["BadSample", "Concat", "LazyArray", "ReadResult", "Source"]


class BadSample(Exception):
    """One sample cannot be used; the message is the reason (``cannot be read as an image (...)``)."""


#: (good samples float32 [k, ...], their positions in the request int64 [k],
#:  bad samples as (position in the request, reason))
ReadResult = tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]


class Source:
    """N samples of shape :attr:`sample_shape`, read on demand (see the module docstring).

    Attributes:
        sample_shape: the shape of one sample (e.g. (C, H, W)).
    """

    sample_shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """Where sample ``i`` comes from, for messages (a path, ``path row 7``)."""
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        """Sample ``i`` (any float dtype, :attr:`sample_shape`). Raises :class:`BadSample`."""
        raise NotImplementedError

    def read_many(self, idx: np.ndarray) -> ReadResult:
        """The samples ``idx`` (int [k], source indices, any order, repeats allowed).

        Returns:
            (good float32 [k', *sample_shape], positions of the good ones in ``idx``
            int64 [k'], [(position, reason) of each bad one]).
        """
        rows, kept, bad = [], [], []
        for pos, i in enumerate(np.asarray(idx, dtype=np.int64).tolist()):
            try:
                rows.append(self.checked(self.read(i)))
                kept.append(pos)
            except BadSample as e:
                bad.append((pos, str(e)))
        x = np.stack(rows) if rows else np.empty((0, *self.sample_shape), dtype=np.float32)
        return x, np.asarray(kept, dtype=np.int64), bad

    def checked(self, a: np.ndarray) -> np.ndarray:
        """``a`` as float32 after the per-sample checks. Raises :class:`BadSample`."""
        if tuple(a.shape) != tuple(self.sample_shape):
            raise BadSample(f"has shape {list(a.shape)} after preprocessing, expected {list(self.sample_shape)}")
        a = np.asarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise BadSample("contains NaN or infinite values")
        return a


class Concat(Source):
    """Sources end to end: sample ``i`` of the whole is sample ``i - start`` of the part
    that holds it. All parts must have the same sample shape (checked by the loader)."""

    def __init__(self, parts: Sequence[Source]) -> None:
        self.parts = list(parts)
        self.sample_shape = tuple(self.parts[0].sample_shape)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, int(i - self.starts[k])

    def name(self, i: int) -> str:
        k, j = self._locate(i)
        return self.parts[k].name(j)

    def read(self, i: int) -> np.ndarray:
        k, j = self._locate(i)
        return self.parts[k].read(j)

    def read_many(self, idx: np.ndarray) -> ReadResult:
        idx = np.asarray(idx, dtype=np.int64)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        x = np.empty((len(idx), *self.sample_shape), dtype=np.float32)
        good = np.zeros(len(idx), dtype=bool)
        bad: list[tuple[int, str]] = []
        for k in np.unique(part).tolist():  # one call per part (a memory map reads its rows at once)
            where = np.flatnonzero(part == k)
            px, pkept, pbad = self.parts[k].read_many(idx[where] - self.starts[k])
            x[where[pkept]] = px
            good[where[pkept]] = True
            bad.extend((int(where[p]), r) for p, r in pbad)
        kept = np.flatnonzero(good).astype(np.int64)
        return x[kept], kept, sorted(bad)


class LazyArray:
    """float32 [N, *sample_shape] decoded on access from a :class:`Source` (see the module
    docstring); ``index`` (int64 [N] of source indices, or None for all in order) makes it
    a view."""

    dtype = np.dtype(np.float32)

    def __init__(self, source: Source, index: np.ndarray | None = None) -> None:
        self.source = source
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.source.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.source.sample_shape)

    def __len__(self) -> int:
        return len(self.source) if self.index is None else len(self.index)

    def __repr__(self) -> str:
        return f"LazyArray(shape={list(self.shape)}, dtype=float32, source={type(self.source).__name__})"

    def positions(self, key) -> np.ndarray:
        """View positions int64 [k] for an int, slice, or int / bool index array.

        Raises:
            DataError: an index out of range or of another kind.
        """
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise DataError(f"boolean index of shape {list(arr.shape)} for {n} samples")
            return np.flatnonzero(arr).astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"samples are indexed by ints, slices or int arrays, got {arr.dtype}")
        pos = arr.astype(np.int64).reshape(-1)
        pos = np.where(pos < 0, pos + n, pos)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            raise DataError(f"sample index out of range [0, {n})")
        return pos

    def source_index(self, positions: np.ndarray) -> np.ndarray:
        """Source indices of view ``positions`` (int64, in range)."""
        return positions if self.index is None else self.index[positions]

    def take(self, key) -> "LazyArray":
        """A view of the samples ``key`` selects (nothing is read)."""
        return LazyArray(self.source, self.source_index(self.positions(key)))

    def read(self, positions: np.ndarray) -> ReadResult:
        """The samples at view ``positions``, bad ones skipped (:meth:`Source.read_many`)."""
        return self.source.read_many(self.source_index(np.asarray(positions, dtype=np.int64)))

    def __getitem__(self, key) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        scalar = isinstance(key, (int, np.integer))
        pos = self.positions(key)
        x, kept, bad = self.read(pos)
        if bad:
            p, reason = bad[0]
            raise DataError(f"{self.source.name(int(self.source_index(pos)[p]))}: {reason}")
        out = x[0] if scalar else x
        return out[rest] if rest and scalar else (out[(slice(None),) + rest] if rest else out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every sample, decoded (checked against the memory budget first)."""
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * 4
        check_allocation(nbytes, f"all {len(self)} samples as one array ({format_bytes(nbytes)})")
        x = self[:]
        return x if dtype is None else x.astype(dtype)
