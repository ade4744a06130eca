"""Held-out validation: the split made before anything else, and the figure measured on it.

Rules:

- :func:`split_holdout` splits the calibration data into a training part (scoring,
  recovery) and a held-out part (validation only) *before* any other stage sees the
  data. With labels the split is stratified: every class gives ``round(fraction * n_c)``
  samples (at least one when it has two or more), so a data set sorted by label is never
  split by row range. The draw is seeded. The indices of both parts are kept, so that
  their disjointness can be checked (and is, in the tests).
- :class:`HeldOutMetric` is the figure the report and the accuracy guard use, in percent
  (higher is better), always measured in onnxruntime on the held-out part:

  * ``accuracy``: top-1 accuracy against the labels (data with labels and a
    classifier output [N, classes]);
  * ``agreement``: top-1 agreement with the original model (no labels, classifier);
  * ``fidelity``: ``100 * (1 - mean over outputs of the relative L2 error)`` against the
    original model, clipped at 0 (anything else: detectors, segmenters, OCR). The
    original scores 100 by definition.

  The original model's own figure is measured once, so a drop is ``original - figure``
  in points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx

from onnxprune.data import CalibrationData
from onnxprune.errors import DataError

__all__ = ["HeldOutMetric", "MetricKind", "Split", "split_holdout"]


@dataclass(frozen=True, eq=False)
class Split:
    """Training and held-out parts of the calibration data.

    Attributes:
        train / val: the two parts (float32 [N, ...] inputs, optional int64 labels).
        train_index / val_index: int64 row indices of each part in the source data
            (disjoint; None for ``val`` when it came from its own source).
        source: how the held-out part was made, for the report.
    """

    train: CalibrationData
    val: CalibrationData
    train_index: np.ndarray
    val_index: np.ndarray | None
    source: str


def split_holdout(data: CalibrationData, fraction: float, seed: int = 0,
                  val_data: CalibrationData | None = None) -> Split:
    """Split ``data`` into training and held-out parts (see the module rules).

    Args:
        data: the calibration data (N >= 2 when ``val_data`` is None).
        fraction: share of ``data`` held out, in (0, 1); ignored with ``val_data``.
        seed: seed of the draw.
        val_data: a held-out set of its own (``--val-data``); then all of ``data`` trains.

    Returns:
        :class:`Split`.

    Raises:
        DataError: ``fraction`` outside (0, 1), or too few samples for both parts.
    """
    n = len(data)
    if val_data is not None:
        return Split(data, val_data, np.arange(n, dtype=np.int64), None, f"--val-data {val_data.source}")
    if not 0.0 < float(fraction) < 1.0:
        raise DataError(f"--val-split must lie strictly between 0 and 1, got {fraction}")
    if n < 2:
        raise DataError(f"{data.source}: {n} sample(s) cannot be split into training and held-out parts; "
                        "give more data or --val-data")
    rng = np.random.default_rng(seed)
    if data.y is not None:
        val: list[np.ndarray] = []
        for c in np.unique(data.y):
            rows = np.flatnonzero(data.y == c)
            k = int(round(fraction * len(rows)))
            if len(rows) >= 2:
                k = min(max(k, 1), len(rows) - 1)
            else:
                k = 0
            val.append(rng.choice(rows, k, replace=False))
        val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    else:
        k = min(max(int(round(fraction * n)), 1), n - 1)
        val_idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    if len(val_idx) == 0 or len(val_idx) == n:
        raise DataError(f"{data.source}: cannot hold out {fraction:g} of {n} samples with one per class at least; "
                        "give more data or --val-data")
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    train_idx = np.flatnonzero(mask).astype(np.int64)

    return Split(data.take(train_idx), data.take(val_idx), train_idx, val_idx,
                 f"{len(val_idx)} of {n} samples of {data.source} held out (seed {seed})")


class MetricKind(str, Enum):
    """What the held-out figure measures (see the module docstring)."""

    ACCURACY = "accuracy"
    AGREEMENT = "agreement"
    FIDELITY = "fidelity"


def _first_output_is_classifier(model: onnx.ModelProto) -> bool:
    from onnxprune.criteria.calibration import first_output_rank

    return first_output_rank(model) == 2


class HeldOutMetric:
    """The held-out figure of a model, in percent, and the original's (see module rules).

    Args:
        original: the unpruned model (reference for agreement and fidelity).
        val: the held-out data.
        batch_size: onnxruntime batch size.
        providers: onnxruntime execution providers.

    Raises:
        OnnxPruneError / DataError / VerificationError: from :func:`onnxprune.evaluate.evaluate`.
    """

    def __init__(self, original: onnx.ModelProto, val: CalibrationData, *, batch_size: int = 32,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.original = original
        self.val = val
        self.batch_size = int(batch_size)
        self.providers = tuple(providers)
        cls = _first_output_is_classifier(original)
        if val.y is not None and cls:
            self.kind = MetricKind.ACCURACY
        elif cls:
            self.kind = MetricKind.AGREEMENT
        else:
            self.kind = MetricKind.FIDELITY
        self.original_value = 100.0 if self.kind is not MetricKind.ACCURACY else self.measure(original)

    @property
    def label(self) -> str:
        """Human name of the figure, e.g. ``held-out accuracy (200 samples)``."""
        what = {MetricKind.ACCURACY: "top-1 accuracy", MetricKind.AGREEMENT: "top-1 agreement with the original",
                MetricKind.FIDELITY: "fidelity 100*(1 - rel. L2 error) to the original"}[self.kind]
        return f"held-out {what} ({len(self.val)} samples)"

    def measure(self, model: onnx.ModelProto) -> float:
        """The held-out figure of ``model`` in percent (higher is better)."""
        from onnxprune.evaluate import evaluate

        if self.kind is MetricKind.ACCURACY:
            res = evaluate(model, self.val, batch_size=self.batch_size, providers=self.providers)
            return 100.0 * float(res.accuracy)
        res = evaluate(model, self.val, reference=self.original, batch_size=self.batch_size,
                       providers=self.providers)
        if self.kind is MetricKind.AGREEMENT:
            return 100.0 * float(res.agreement)
        errs = [m.rel_l2_error for m in res.outputs.values() if np.isfinite(m.rel_l2_error)]
        return max(0.0, 100.0 * (1.0 - float(np.mean(errs)))) if errs else 0.0

    def drop(self, value: float) -> float:
        """Points lost against the original (negative when better)."""
        return self.original_value - value

    @property
    def sample_points(self) -> float | None:
        """Points one sample is worth (100 / N) for accuracy / agreement; None for fidelity."""
        return None if self.kind is MetricKind.FIDELITY else 100.0 / max(len(self.val), 1)

    @property
    def interval(self) -> float | None:
        """Half-width (points) of the 95 % Wilson score interval of the original's figure
        on N held-out samples (accuracy / agreement; None for fidelity, a mean of errors).

        Source: E. B. Wilson, "Probable inference, the law of succession, and statistical
        inference", JASA 1927. With p the original's figure, the interval is
        ``z / (1 + z^2/N) * sqrt(p (1 - p) / N + z^2 / (4 N^2))``, z = 1.96; it stays
        above zero at p = 100 %, where the normal approximation would say 0.
        """
        if self.kind is MetricKind.FIDELITY:
            return None
        n, z = max(len(self.val), 1), 1.96
        p = min(max(self.original_value / 100.0, 0.0), 1.0)
        return 100.0 * z / (1 + z * z / n) * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))

    def resolution_warning(self, max_drop: float | None) -> str | None:
        """A warning when the held-out set is too small to mean much: one sample is worth
        more than ``max_drop`` points, or (without a bound) the 95 % interval is wider than
        5 points. None otherwise."""
        if self.interval is None:
            return None
        n, one, ci = len(self.val), self.sample_points, self.interval
        if max_drop is not None and (one > max_drop or ci > 2 * max(max_drop, 1e-9)):
            return (f"the held-out set has {n} samples: one sample is {one:.2g} points and the 95 % interval of "
                    f"the {self.kind.value} is +-{ci:.1f} points, too coarse for --max-drop {max_drop:g}; hold "
                    "out more samples (--val-split, --val-data) for a bound that means something")
        if max_drop is None and ci > 5.0:
            return (f"the held-out set has {n} samples: its {self.kind.value} is known to +-{ci:.1f} points "
                    "(95 % interval); hold out more samples (--val-split, --val-data) for a sharper figure")
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "label": self.label, "samples": len(self.val),
                "original": self.original_value, "interval95": self.interval}
