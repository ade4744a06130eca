"""numpy sources: ``.npy`` memory-mapped, and shards (``.npz`` / ``.npy`` files end to end).

Rules:

- A ``.npy`` is memory-mapped read-only (``x`` float [N, ...], any float dtype, converted
  to float32 per batch); only the rows a batch asks for are read from disk.
- Shards: a folder of ``.npz`` / ``.npy`` files (no images in it) or a glob pattern
  (``'data/part-*.npz'``), concatenated in sorted path order. A ``.npz`` shard holds ``x``
  and optionally ``y`` (int labels [N]); either every shard has labels or none (a ``.npy``
  shard has none). Labels are read into memory at load time, inputs never.
- An uncompressed ``.npz`` member (``np.savez``) is memory-mapped inside the zip file;
  a compressed one (``np.savez_compressed``) cannot be read by rows, so it is decompressed
  whole when a batch first touches it, and at most :data:`CACHED_MEMBERS` such members are
  kept per process.
- Checked at load time (headers only): ``x`` exists, has a float dtype, at least one
  sample, the file is long enough for its header's shape, every shard has the same sample
  shape; ``y`` is 1-D, integer, one per sample. A row with NaN or infinite values is a bad
  sample, found when it is read.
"""

from __future__ import annotations

import glob
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from onnxprune.data.lazy import BadSample, Concat, ReadResult, Source
from onnxprune.errors import DataError, first_line
from onnxprune.safety import check_allocation

__all__ = ["CACHED_MEMBERS", "Mapped", "ZippedMember", "find_shards", "load_shards", "npy_source"]

#: compressed .npz members held decompressed at once, per process
CACHED_MEMBERS = 2
_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()


def _header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(fh)
    return tuple(int(d) for d in shape), bool(fortran), dtype


def check_npy_size(fileobj, what: str) -> None:
    """Read a .npy header and check the array against the memory budget (as float32 too)."""
    shape, _, dtype = _header(fileobj)
    n = 1
    for d in shape:
        n *= int(d)
    check_allocation(n * (max(dtype.itemsize, 4) + 4), f"{what} of shape {list(shape)} ({dtype})")


class _Rows(Source):
    """Rows of an array of full shape ``shape`` opened lazily (per process) by :meth:`_open`."""

    def __init__(self, label: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.label, self.shape, self.dtype = label, tuple(shape), np.dtype(dtype)
        self.sample_shape = self.shape[1:]
        self._arr = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}  # a worker process reopens the file

    def __len__(self) -> int:
        return self.shape[0]

    def name(self, i: int) -> str:
        return f"{self.label} row {i}"

    def _open(self) -> np.ndarray:
        raise NotImplementedError

    def _array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = self._open()
        return self._arr

    def read(self, i: int) -> np.ndarray:
        x, _, bad = self.read_many(np.array([i]))
        if bad:
            raise BadSample(bad[0][1])
        return x[0]

    def read_many(self, idx: np.ndarray) -> ReadResult:
        idx = np.asarray(idx, dtype=np.int64)
        try:
            rows = np.asarray(self._array()[idx], dtype=np.float32)
        except (OSError, ValueError) as e:  # the file changed or vanished since it was loaded
            raise DataError(f"{self.label}: cannot be read ({type(e).__name__}: {first_line(e)})") from None
        finite = np.isfinite(rows.reshape(len(idx), -1)).all(axis=1)
        kept = np.flatnonzero(finite).astype(np.int64)
        bad = [(int(p), "contains NaN or infinite values") for p in np.flatnonzero(~finite)]
        return rows[kept], kept, bad


class Mapped(_Rows):
    """Rows of an uncompressed array at byte ``offset`` of ``path`` (a .npy, or a stored
    .npz member), memory-mapped read-only."""

    def __init__(self, path: str, offset: int, shape, dtype, fortran: bool, label: str) -> None:
        super().__init__(label, shape, dtype)
        self.path, self.offset, self.fortran = str(path), int(offset), bool(fortran)

    def _open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                         order="F" if self.fortran else "C")


class ZippedMember(_Rows):
    """Rows of a compressed .npz member: decompressed whole on first read, kept in a small
    per-process cache (:data:`CACHED_MEMBERS`)."""

    def __init__(self, path: str, key: str, shape, dtype, label: str) -> None:
        super().__init__(label, shape, dtype)
        self.path, self.key = str(path), key

    def _array(self) -> np.ndarray:
        k = (self.path, self.key)
        if k in _cache:
            _cache.move_to_end(k)
            return _cache[k]
        n = 1
        for d in self.shape:
            n *= int(d)
        check_allocation(n * max(np.dtype(self.dtype).itemsize, 4), f"{self.label}: compressed member {self.key!r}")
        with np.load(self.path, allow_pickle=False) as z:
            arr = z[self.key]
        _cache[k] = arr
        while len(_cache) > CACHED_MEMBERS:
            _cache.popitem(last=False)
        return arr


def _check_x(shape, dtype, label: str, file_size: int | None = None, offset: int = 0) -> None:
    if len(shape) < 1 or shape[0] == 0:
        raise DataError(f"{label}: no samples")
    if not np.issubdtype(dtype, np.floating):
        raise DataError(f"{label}: x has dtype {dtype}, expected float32")
    if file_size is not None:
        need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if file_size < need:
            raise DataError(f"{label}: the file is truncated ({file_size} bytes, its header needs {need})")


def npy_source(path: Path) -> Mapped:
    """A .npy file as a memory-mapped source (header checked now, rows read on demand).

    Raises:
        DataError: not a .npy, unreadable, not float, no samples, truncated.
    """
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = _header(fh)
            offset = fh.tell()
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:  # numpy's header parser raises ValueError and others
        raise DataError(f"{path}: cannot be read as numpy data ({type(e).__name__}: {first_line(e)})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects, expected float32")
    _check_x(shape, dtype, str(path), size, offset)
    return Mapped(str(path), offset, shape, dtype, fortran, str(path))


def _npz_member(zf: zipfile.ZipFile, path: Path, key: str) -> tuple[_Rows, tuple[int, ...], np.dtype]:
    info = zf.getinfo(f"{key}.npy")
    with zf.open(info) as member:
        shape, fortran, dtype = _header(member)
        header_len = member.tell()
    label = f"{path}:{key}"
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as fh:  # the member's data follow its local header
            fh.seek(info.header_offset + 26)
            lens = fh.read(4)
        start = info.header_offset + 30 + int.from_bytes(lens[:2], "little") + int.from_bytes(lens[2:], "little")
        return Mapped(str(path), start + header_len, shape, dtype, fortran, label), shape, dtype
    return ZippedMember(str(path), key, shape, dtype, label), shape, dtype


def _npz_shard(path: Path) -> tuple[_Rows, np.ndarray | None]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            if "x" not in names:
                raise DataError(f"{path}: the .npz has no array 'x' (arrays: {', '.join(sorted(names)) or 'none'})")
            x, shape, dtype = _npz_member(zf, path, "x")
            if dtype.hasobject:
                raise DataError(f"{path}: x holds Python objects, expected float32")
            _check_x(shape, dtype, str(path))
            y = None
            if "y" in names:
                with zf.open("y.npy") as fh:
                    y = np.lib.format.read_array(fh, allow_pickle=False)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:  # zipfile and numpy raise many types (BadZipFile, ValueError, ...)
        raise DataError(f"{path}: cannot be read as numpy data ({type(e).__name__}: {first_line(e)})") from None
    if y is not None:
        if y.ndim != 1 or len(y) != shape[0]:
            raise DataError(f"{path}: y has shape {list(y.shape)}, expected [{shape[0]}] (one label per sample)")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y has dtype {y.dtype}, expected integer class labels")
        y = y.astype(np.int64)
    return x, y


def find_shards(path: str) -> list[Path] | None:
    """The shard files ``path`` names: a folder of .npz/.npy files (None when it holds
    images or no such file), or a glob pattern (sorted matches).

    Raises:
        DataError: a pattern that matches no .npz / .npy file.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".npz", ".npy") and f.is_file()
                       and not f.name.startswith("."))
        return files or None
    if glob.has_magic(path) and not p.exists():
        files = sorted(Path(f) for f in glob.glob(path) if f.lower().endswith((".npz", ".npy")) and os.path.isfile(f))
        if not files:
            raise DataError(f"{path}: the pattern matches no .npz or .npy file")
        return files
    return None


def load_shards(files: list[Path], label: str) -> tuple[Source, np.ndarray | None]:
    """The shards end to end and their labels (int64 [N] or None).

    Raises:
        DataError: see the module docstring; the message names the shard.
    """
    parts: list[Source] = []
    ys: list[np.ndarray | None] = []
    for f in files:
        if f.suffix.lower() == ".npy":
            src, y = npy_source(f), None
        else:
            src, y = _npz_shard(f)
        if parts and tuple(src.sample_shape) != tuple(parts[0].sample_shape):
            raise DataError(f"{f}: samples of shape {list(src.sample_shape)}, but {files[0]} has "
                            f"{list(parts[0].sample_shape)}; every shard needs the same sample shape")
        if ys and (y is None) != (ys[0] is None):
            has, lacks = (f, files[0]) if y is not None else (files[0], f)
            raise DataError(f"{label}: shard {has} has labels y but {lacks} has none; give labels in every "
                            "shard or in none")
        parts.append(src)
        ys.append(y)
    source = parts[0] if len(parts) == 1 else Concat(parts)
    return source, (None if ys[0] is None else np.concatenate(ys))
