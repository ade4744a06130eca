"""``--data``: which source a path names, loaded as :class:`~onnxprune.data.CalibrationData`.

| path | source | read |
|---|---|---|
| ``x.npz`` | ``x`` (float [N, ...]) and optional ``y`` (int [N]) | into memory, checked whole |
| ``x.npy`` | ``x`` only | memory-mapped, rows on demand |
| a folder of images | sub-folders = classes, else unlabelled (recursive) | decoded on demand |
| a list file (``.txt``, ``.lst``, ``.list``) | image paths [+ labels] | decoded on demand |
| a folder of ``.npz`` / ``.npy`` files, or a glob | shards end to end, sorted | rows on demand |

Lazy sources keep only paths, offsets and labels in memory; see
:mod:`onnxprune.data.images` and :mod:`onnxprune.data.arrays` for their rules.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxprune.data.arrays import check_npy_size, find_shards, load_shards, npy_source
from onnxprune.data.calibration import CalibrationData, check_labels, validated
from onnxprune.data.images import IMAGE_SUFFIXES, LIST_SUFFIXES, ImageFiles, Preprocess, read_list, scan_folder
from onnxprune.data.lazy import LazyArray
from onnxprune.data.loader import warn
from onnxprune.errors import DataError, OnnxPruneError, first_line
from onnxprune.io import read_user_file
from onnxprune.safety import check_allocation

__all__ = ["load_calibration"]


def load_calibration(path: str | os.PathLike, *, image_size: tuple[int, int] | None = None,
                     mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), scale: float = 1 / 255,
                     channel_order: str = "RGB", grayscale: bool = False, workers: int | None = None,
                     strict: bool = False) -> CalibrationData:
    """Calibration data from the file, folder or glob ``path`` (see the module docstring).

    Args:
        path: the ``.npz``, ``.npy``, list file, folder or glob pattern.
        image_size: (H, W) images are resized to (required for images).
        mean, std: per-channel normalisation after scaling (one value = all channels).
        scale: factor applied to the 0-255 pixel values first.
        channel_order: ``"RGB"`` or ``"BGR"``.
        grayscale: load images as one channel.
        workers: DataLoader worker processes for reading (None: auto, see
            :class:`~onnxprune.data.CalibrationData`).
        strict: a bad sample (unreadable image, NaN row) is an error, not skipped.

    Returns:
        The data; images give float32 [N, C, H, W]. Nothing but headers, file names and
        labels is read for lazy sources.

    Raises:
        DataError: missing or unreadable path, unknown kind, no samples, bad headers,
            shapes or labels, bad preprocessing options; the message names the file.
    """
    p = Path(path)
    if not str(path):
        raise DataError("--data: the path is empty")
    kw = dict(workers=workers, strict=strict)
    try:
        is_dir = p.is_dir()
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e.strerror or first_line(e)})") from None
    if is_dir or (glob.has_magic(str(path)) and not p.exists()):
        shards = find_shards(str(path))
        if shards is not None and (not is_dir or not _has_images(p)):
            source, y = load_shards(shards, str(path))
            return _lazy(source, y, str(path), kw)
        if not is_dir:  # pragma: no cover - find_shards raises for a pattern without matches
            raise DataError(f"{path}: no such file or folder")
        if image_size is None:
            raise DataError(f"{p}: a folder of images needs --image-size H,W")
        paths, y, left_out = scan_folder(p)
        if left_out:
            warn(f"{p}: {left_out} image(s) directly in the folder are not used: its sub-folders are the classes")
        return _images(paths, y, str(p), image_size, mean, std, scale, channel_order, grayscale, kw)
    suffix = p.suffix.lower()
    if suffix in LIST_SUFFIXES:
        paths, y = read_list(p)
        return _images(paths, y, str(p), image_size, mean, std, scale, channel_order, grayscale, kw)
    if suffix == ".npy":
        if not p.exists():
            raise DataError(f"{p}: no such file")
        return _lazy(npy_source(p), None, str(p), kw)
    if suffix != ".npz":
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        raise DataError(f"{p}: calibration data must be a .npz, a .npy, a list file ({', '.join(LIST_SUFFIXES)}), "
                        "a folder of images or of .npz/.npy shards, or a glob of shards")
    return _npz_in_memory(p, kw)


def _has_images(folder: Path) -> bool:
    try:
        return any(not e.name.startswith(".") and (e.is_dir() or e.name.lower().endswith(IMAGE_SUFFIXES))
                   for e in os.scandir(folder))
    except OSError:
        return False


def _images(paths, y, label, image_size, mean, std, scale, channel_order, grayscale, kw) -> CalibrationData:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:  # pragma: no cover
        raise DataError("reading images needs Pillow: pip install pillow") from None
    if image_size is None:
        raise DataError(f"{label}: reading images needs --image-size H,W")
    pre = Preprocess(tuple(int(v) for v in image_size), tuple(mean), tuple(std), scale, channel_order, grayscale)
    return _lazy(ImageFiles(paths, pre), check_labels(y, len(paths), label), label, kw)


def _lazy(source, y, label: str, kw: dict) -> CalibrationData:
    """Streamed data over ``source``; one decoded sample must fit in the memory budget."""
    shape = list(source.sample_shape)
    # the decoded sample and a preprocessing temporary of its size
    check_allocation(int(np.prod(shape, dtype=np.int64)) * 4 * 2, f"{label}: one sample of shape {shape} (float32)")
    return CalibrationData(LazyArray(source), y, label, **kw)


def _npz_in_memory(p: Path, kw: dict) -> CalibrationData:
    raw = read_user_file(p, DataError, "a .npz or .npy file")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            if "x" not in z:
                raise DataError(f"{p}: the .npz has no array 'x' (arrays: {', '.join(z.files) or 'none'})")
            for key in ("x", "y"):
                if key in z:
                    with z.zip.open(f"{key}.npy") as member:
                        check_npy_size(member, f"{p}: array {key!r}")
            return validated(z["x"], z["y"] if "y" in z else None, str(p), **kw)
    except OnnxPruneError:
        raise
    except Exception as e:  # numpy and zipfile raise many types (BadZipFile, EOFError, ...)
        raise DataError(f"{p}: cannot be read as numpy data ({type(e).__name__}: {first_line(e)})") from None
