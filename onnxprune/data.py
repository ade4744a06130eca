"""Calibration data for data-driven criteria and recovery.

Sources (:func:`load_calibration`):
- ``.npz`` with ``x`` (float32 [N, ...], the model's input layout) and optional ``y``
  (int64 [N] class labels);
- ``.npy`` holding ``x`` only;
- a folder of images: sub-folders are classes (labels = sorted folder names' indices),
  a flat folder is unlabelled. Images are resized to ``image_size`` (H, W), scaled by
  ``scale``, normalised with ``mean``/``std`` per channel, in ``channel_order`` (RGB or
  BGR), and laid out NCHW.
From Python, :func:`from_arrays` takes any iterable of arrays or tensors.

Every problem (missing file, wrong shape or dtype, NaN, empty folder, labels out of
range) raises :class:`~onnxprune.errors.DataError` before any scoring starts.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.errors import DataError, OnnxPruneError, first_line
from onnxprune.io import read_user_file
from onnxprune.safety import check_allocation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """Inputs and optional labels.

    Attributes:
        x: float32 [N, ...] in the model's input layout.
        y: int64 [N] class labels, or None (then the original model is the teacher).
        source: where the data came from (for messages and reports).
    """

    x: np.ndarray
    y: np.ndarray | None
    source: str = "<arrays>"

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Consecutive (x, y) batches of at most ``batch_size`` samples (views, no copies)."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], None if self.y is None else self.y[i:i + batch_size]

    def take(self, indices: np.ndarray | Sequence[int]) -> "CalibrationData":
        """The samples at ``indices`` (int [K], in that order), labels alike.

        Raises:
            DataError: an index outside [0, N).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"{self.source}: sample index out of range [0, {len(self)})")
        return CalibrationData(self.x[idx], None if self.y is None else self.y[idx], self.source)

    def shard(self, rank: int, world: int) -> "CalibrationData":
        """Rank ``rank``'s share of ``world`` (samples ``rank, rank + world, ...``): the
        split a data-parallel stage gives each process; world 1 returns self."""
        if world <= 1:
            return self
        return self.take(np.arange(rank, len(self), world))

    def without_labels(self) -> "CalibrationData":
        """The same inputs with ``y`` dropped."""
        return self if self.y is None else CalibrationData(self.x, None, self.source)

    def subset(self, samples: int | None, seed: int = 0) -> "CalibrationData":
        """At most ``samples`` samples, drawn without replacement with ``seed`` (all when None)."""
        if samples is None or samples >= len(self):
            return self
        if samples < 1:
            raise DataError(f"--samples must be >= 1, got {samples}")
        return self.take(np.sort(np.random.default_rng(seed).choice(len(self), samples, replace=False)))

    def check(self, input_shape: Sequence[int | None] | None, num_classes: int | None = None) -> "CalibrationData":
        """Check against the model's input shape (None = any dim; None for the whole shape
        when the model declares none) and class count; returns self.

        Dim 0 (the batch) is never compared: a model with a fixed batch B takes any N, fed
        in micro-batches of B (:mod:`onnxprune.batching`).

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


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _validate(x: np.ndarray, y: np.ndarray | None, source: str) -> CalibrationData:
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{source}: no samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{source}: x has dtype {x.dtype}, expected float32")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: x contains NaN or infinite values")
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{source}: y has shape {y.shape}, expected [{len(x)}] (one label per sample)")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: y has dtype {y.dtype}, expected integer class labels")
        y = y.astype(np.int64)
    return CalibrationData(x, y, source)


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

    return _validate(stack(samples), None if labels is None else stack(labels), "<arrays>")


def load_calibration(path: str | os.PathLike, *, image_size: tuple[int, int] | None = None,
                     mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), scale: float = 1 / 255,
                     channel_order: str = "RGB", grayscale: bool = False) -> CalibrationData:
    """Load calibration data from a ``.npz``, a ``.npy`` or a folder of images.

    Args:
        path: the file or folder.
        image_size: (H, W) images are resized to (required for folders).
        mean, std: per-channel normalisation after scaling (one value = all channels).
        scale: factor applied to the 0-255 pixel values first.
        channel_order: ``"RGB"`` or ``"BGR"``.
        grayscale: load images as one channel.

    Returns:
        The data; images give float32 [N, C, H, W].

    Raises:
        DataError: see the module docstring.
    """
    p = Path(path)
    if not str(path):
        raise DataError("--data: the path is empty")
    try:
        is_dir = p.is_dir()
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e.strerror or first_line(e)})") from None
    if is_dir:
        return _load_images(p, image_size, mean, std, scale, channel_order, grayscale)
    if p.suffix not in (".npz", ".npy"):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        raise DataError(f"{p}: calibration data must be a .npz, a .npy or a folder of images")
    raw = read_user_file(p, DataError, "a .npz or .npy file")
    try:
        if p.suffix == ".npz":
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                if "x" not in z:
                    raise DataError(f"{p}: the .npz has no array 'x' (arrays: {', '.join(z.files) or 'none'})")
                for key in ("x", "y"):
                    if key in z:
                        with z.zip.open(f"{key}.npy") as member:
                            _check_npy_size(member, f"{p}: array {key!r}")
                return _validate(z["x"], z["y"] if "y" in z else None, str(p))
        _check_npy_size(io.BytesIO(raw), f"{p}: array 'x'")
        return _validate(np.load(io.BytesIO(raw), allow_pickle=False), None, str(p))
    except OnnxPruneError:
        raise
    except Exception as e:  # numpy and zipfile raise many types (BadZipFile, EOFError, ...)
        raise DataError(f"{p}: cannot be read as numpy data ({type(e).__name__}: {first_line(e)})") from None


def _check_npy_size(fileobj, what: str) -> None:
    """Read a .npy header and check the array against the memory budget (as float32 too)."""
    fmt = np.lib.format
    version = fmt.read_magic(fileobj)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(fileobj)
    n = 1
    for d in shape:
        n *= int(d)
    check_allocation(n * (max(dtype.itemsize, 4) + 4), f"{what} of shape {list(shape)} ({dtype})")


def _per_channel(values: Sequence[float], c: int, option: str) -> np.ndarray:
    """``--mean`` / ``--std`` as float32 [c, 1, 1]: one value for all channels or one per channel.

    Raises:
        DataError: another count of values, or a value that is not finite.
    """
    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size not in (1, c):
        raise DataError(f"{option} has {v.size} values; the images have {c} channel(s): give 1 or {c}")
    if not np.isfinite(v).all():
        raise DataError(f"{option}: values must be finite numbers")
    return np.broadcast_to(v, (c,)).reshape(c, 1, 1)


def _load_images(folder: Path, image_size, mean, std, scale, channel_order, grayscale) -> CalibrationData:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise DataError("reading image folders needs Pillow: pip install pillow") from None
    if image_size is None:
        raise DataError(f"{folder}: a folder of images needs --image-size H,W")
    if channel_order not in ("RGB", "BGR"):
        raise DataError(f"channel order must be RGB or BGR, got {channel_order!r}")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if subdirs:
        files = [(f, label) for label, d in enumerate(subdirs) for f in sorted(d.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, None) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    h, w = image_size
    c = 1 if grayscale else 3
    if h < 1 or w < 1:
        raise DataError(f"--image-size {h},{w}: both sizes must be positive")
    check_allocation(len(files) * c * h * w * 4, f"{folder}: {len(files)} images at --image-size {h},{w}")
    m = _per_channel(mean, c, "--mean")
    s = _per_channel(std, c, "--std")
    if not np.all(s != 0):
        raise DataError(f"--std {','.join(str(v) for v in std)}: a standard deviation is zero")
    if not np.isfinite(scale) or scale == 0:
        raise DataError(f"--scale {scale}: must be a finite, nonzero number")
    x = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("L" if grayscale else "RGB").resize((w, h), Image.BILINEAR),
                                 dtype=np.float32)
        except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
            raise DataError(f"{f}: cannot be read as an image ({type(e).__name__}: {first_line(e)})") from None
        arr = arr[None] if grayscale else arr.transpose(2, 0, 1)
        if channel_order == "BGR" and not grayscale:
            arr = arr[::-1]
        x[i] = (arr * scale - m) / s
    y = None if not subdirs else np.array([label for _, label in files], dtype=np.int64)
    return _validate(x, y, str(folder))
