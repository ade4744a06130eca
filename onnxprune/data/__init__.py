"""Calibration data for data-driven criteria and recovery, in memory or streamed.

- :func:`load_calibration` (``--data``): ``.npz`` (in memory), ``.npy`` (memory-mapped),
  image folders and list files (decoded on demand), folders or globs of ``.npz`` /
  ``.npy`` shards (rows on demand): :mod:`onnxprune.data.loading`.
- :func:`from_arrays`: arrays or tensors from Python, in memory.
- :class:`CalibrationData`: the one type every stage takes (:mod:`onnxprune.data.calibration`);
  batches are read through a torch DataLoader with worker processes for lazy sources
  (:mod:`onnxprune.data.loader`), bad samples skipped and counted or, with ``strict``,
  a :class:`~onnxprune.errors.DataError` naming the file.

Memory does not grow with the number of samples of a lazy source beyond its file names
(or offsets) and labels.
"""

from onnxprune.data.calibration import CalibrationData, data_warnings, from_arrays
from onnxprune.data.images import IMAGE_SUFFIXES, LIST_SUFFIXES, Preprocess
from onnxprune.data.lazy import BadSample, LazyArray, Source
from onnxprune.data.loader import BadSamples, BatchRequest, Fetched, batch_seed, default_workers, fetch_batches
from onnxprune.data.loading import load_calibration

__all__ = ["BadSample", "BadSamples", "BatchRequest", "CalibrationData", "Fetched", "data_warnings", "IMAGE_SUFFIXES",
           "LIST_SUFFIXES", "LazyArray", "Preprocess", "Source", "batch_seed", "default_workers",
           "fetch_batches", "from_arrays", "load_calibration"]
