"""Image sources: a folder (recursive) or a list file of paths, decoded one image at a time.

Rules:

- Folder: non-hidden sub-folders are classes (label = index of the sub-folder among them,
  sorted by name), each searched recursively; without sub-folders holding images the
  folder is flat and unlabelled (its images, recursively). Images directly in a folder
  that has class sub-folders are not used (a warning says how many). Files are taken in
  sorted order of their path; suffixes :data:`IMAGE_SUFFIXES` (any case).
- List file (``.txt``, ``.lst``, ``.list``): one image path per line, optionally followed
  by an integer label after whitespace or a comma (``a.jpg 3``, ``a.jpg,3``); relative
  paths are relative to the list file's folder; empty lines and lines starting with ``#``
  are skipped. Either every line has a label or none.
- Decoding (:class:`Preprocess`): Pillow, converted to RGB (or L with ``grayscale``),
  resized to (H, W) bilinearly, times ``scale``, minus ``mean``, divided by ``std`` per
  channel, channels in ``channel_order``, laid out [C, H, W] float32. A file that Pillow
  cannot decode is a bad sample (:class:`~onnxprune.data.lazy.BadSample`), found when it
  is read, not before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.data.lazy import BadSample, Source
from onnxprune.errors import DataError, first_line
from onnxprune.io import read_user_file

__all__ = ["IMAGE_SUFFIXES", "LIST_SUFFIXES", "ImageFiles", "Preprocess", "read_list", "scan_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".list")


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


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a float32 [C, H, W] sample (see the module docstring).

    Raises:
        DataError: (on construction) a size that is not positive, a mean / std count
            that fits neither 1 nor C channels, a zero std, a zero or non-finite scale,
            a channel order other than RGB / BGR.
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    channel_order: str = "RGB"
    grayscale: bool = False

    def __post_init__(self) -> None:
        h, w = self.size
        if h < 1 or w < 1:
            raise DataError(f"--image-size {h},{w}: both sizes must be positive")
        if self.channel_order not in ("RGB", "BGR"):
            raise DataError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        _per_channel(self.mean, self.channels, "--mean")
        s = _per_channel(self.std, self.channels, "--std")
        if not np.all(s != 0):
            raise DataError(f"--std {','.join(str(v) for v in self.std)}: a standard deviation is zero")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise DataError(f"--scale {self.scale}: must be a finite, nonzero number")

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, int(self.size[0]), int(self.size[1]))

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        """The image at ``path`` as float32 [C, H, W]. Raises :class:`BadSample`."""
        from PIL import Image

        h, w = self.size
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if self.grayscale else "RGB").resize((w, h), Image.BILINEAR),
                                 dtype=np.float32)
        except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
            raise BadSample(f"cannot be read as an image ({type(e).__name__}: {first_line(e)})") from None
        arr = arr[None] if self.grayscale else arr.transpose(2, 0, 1)
        if self.channel_order == "BGR" and not self.grayscale:
            arr = arr[::-1]
        c = self.channels
        return (arr * self.scale - _per_channel(self.mean, c, "--mean")) / _per_channel(self.std, c, "--std")


class ImageFiles(Source):
    """Image files decoded on read by ``preprocess`` (one sample per path)."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocess) -> None:
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.sample_shape = preprocess.sample_shape

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> np.ndarray:
        return self.preprocess(self.paths[i])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk_images(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively (symlinked folders followed once), sorted
    by path; hidden entries skipped."""
    out: list[str] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise DataError(f"{d}: cannot be listed ({e.strerror or first_line(e)})") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    stack.append(Path(e.path))
                elif _is_image(e.name) and e.is_file():
                    out.append(e.path)
            except OSError:  # a dangling link: not an image we can read
                continue
    return sorted(out)


def scan_folder(folder: Path) -> tuple[list[str], np.ndarray | None, int]:
    """The images of ``folder`` and their labels (see the module docstring).

    Returns:
        (paths, int64 labels [N] or None for a flat folder, number of images directly in
        ``folder`` left out because it has class sub-folders).

    Raises:
        DataError: the folder cannot be listed, or holds no image.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot be listed ({e.strerror or first_line(e)})") from None
    subdirs = [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
    per_class = [_walk_images(d) for d in subdirs]
    top = [e.path for e in entries if not e.name.startswith(".") and _is_image(e.name) and e.is_file()]
    if any(per_class):
        paths = [p for files in per_class for p in files]
        labels = np.concatenate([np.full(len(files), k, dtype=np.int64) for k, files in enumerate(per_class)])
        return paths, labels, len(top)
    if not top:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(top), None, 0


def _split_label(line: str) -> tuple[str, int | None]:
    """(path, label or None) of one stripped list-file line: the text after the last comma
    (or else the last whitespace) is the label when it is an integer."""
    if "," in line:
        head, _, tail = line.rpartition(",")
    else:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            return line, None
        head, tail = parts
    try:
        return head.strip(), int(tail.strip())
    except ValueError:
        return line, None


def read_list(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Paths and labels of a list file (see the module docstring).

    Raises:
        DataError: unreadable, not text, no entries, a label that is negative, or lines
            with and without labels mixed (naming the line).
    """
    raw = read_user_file(path, DataError, "a list file of image paths")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: a list file must be UTF-8 text") from None
    base = path.parent
    paths: list[str] = []
    labels: list[int] = []
    first_kind: tuple[int, bool] | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        name, label = _split_label(s)
        if label is not None and label < 0:
            raise DataError(f"{path} line {lineno}: label {label} is negative")
        if first_kind is None:
            first_kind = (lineno, label is not None)
        elif first_kind[1] != (label is not None):
            with_label = lineno if label is not None else first_kind[0]
            without = first_kind[0] if label is not None else lineno
            raise DataError(f"{path} line {lineno}: some lines have a label (line {with_label}) and some "
                            f"do not (line {without}); give a label on every line or on none")
        p = Path(name)
        paths.append(str(p if p.is_absolute() else base / p))
        if label is not None:
            labels.append(label)
    if not paths:
        raise DataError(f"{path}: the list file names no image")
    return paths, (np.asarray(labels, dtype=np.int64) if first_kind and first_kind[1] else None)
