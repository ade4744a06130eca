"""Held-out split (disjoint, stratified, seeded) and the held-out figure (onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnxprune.data import CalibrationData
from onnxprune.errors import DataError
from onnxprune.holdout import HeldOutMetric, MetricKind, split_holdout
from tiny_models import build_chain, build_const_channel


def _data(n: int, labels: bool, classes: int = 4, seed: int = 0) -> CalibrationData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n)  # row id, to check which rows went where
    y = np.sort(np.arange(n) % classes).astype(np.int64) if labels else None  # sorted by label, like MNIST-5k
    return CalibrationData(x, y, "test")


@pytest.mark.parametrize("labels", [True, False])
def test_split_is_disjoint_and_covers_everything(labels):
    d = _data(103, labels)
    s = split_holdout(d, 0.2, seed=3)
    assert len(np.intersect1d(s.train_index, s.val_index)) == 0
    assert sorted(np.concatenate([s.train_index, s.val_index]).tolist()) == list(range(103))
    # the parts hold exactly the rows their indices name
    assert np.array_equal(s.train.x[:, 0, 0, 0].astype(int), s.train_index)
    assert np.array_equal(s.val.x[:, 0, 0, 0].astype(int), s.val_index)
    assert abs(len(s.val) - 0.2 * 103) <= 4


def test_split_is_stratified_on_sorted_labels():
    d = _data(400, True)
    s = split_holdout(d, 0.1, seed=0)
    assert np.bincount(s.val.y).tolist() == [10, 10, 10, 10]  # never a row range of one class
    assert np.bincount(s.train.y).tolist() == [90, 90, 90, 90]


def test_split_is_seeded():
    d = _data(50, False)
    a, b, c = split_holdout(d, 0.2, 1), split_holdout(d, 0.2, 1), split_holdout(d, 0.2, 2)
    assert np.array_equal(a.val_index, b.val_index)
    assert not np.array_equal(a.val_index, c.val_index)


def test_val_data_of_its_own_keeps_all_training_rows():
    d, v = _data(20, False), _data(5, False, seed=1)
    s = split_holdout(d, 0.5, 0, val_data=v)
    assert len(s.train) == 20 and s.val is v and s.val_index is None


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(DataError, match="--val-split"):
        split_holdout(_data(10, False), fraction)


def test_one_sample_cannot_be_split():
    with pytest.raises(DataError, match="cannot be split"):
        split_holdout(_data(1, False), 0.1)


def _ort_logits(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_accuracy_with_labels_matches_a_count_in_onnxruntime():
    model = build_const_channel(seed=0)  # classifier [N, 7], symbolic batch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 7, 40)
    m = HeldOutMetric(model, CalibrationData(x, y))
    assert m.kind is MetricKind.ACCURACY
    expected = 100.0 * np.mean(_ort_logits(model, x).argmax(1) == y)
    assert m.original_value == pytest.approx(expected)
    assert m.measure(model) == pytest.approx(expected)


def test_agreement_without_labels():
    model = build_const_channel(seed=0)
    other = build_const_channel(seed=1)
    x = np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32)
    m = HeldOutMetric(model, CalibrationData(x, None))
    assert m.kind is MetricKind.AGREEMENT and m.original_value == 100.0
    expected = 100.0 * np.mean(_ort_logits(model, x).argmax(1) == _ort_logits(other, x).argmax(1))
    assert m.measure(other) == pytest.approx(expected)
    assert m.drop(m.measure(other)) == pytest.approx(100.0 - expected)


def _wilson_bounds(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval's bounds (Wilson 1927), as textbooks write them."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("n", [8, 40, 400])
def test_interval_is_the_wilson_interval_and_small_sets_are_flagged(n):
    model = build_const_channel(seed=0)
    x = np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)
    m = HeldOutMetric(model, CalibrationData(x, None))  # agreement: the original scores 100
    lo, hi = _wilson_bounds(1.0, n)
    assert m.interval == pytest.approx(100 * (hi - lo) / 2)
    assert m.interval > 0 and m.sample_points == pytest.approx(100 / n)
    w = m.resolution_warning(1.0)  # one sample is > 1 point below 100 samples
    assert (w is not None) == (n < 100 or m.interval > 2.0)
    if w:
        assert f"{n} samples" in w and "--max-drop 1" in w and "--val-data" in w
    assert (m.resolution_warning(None) is not None) == (m.interval > 5.0)
    assert m.to_dict()["interval95"] == m.interval


def test_fidelity_for_non_classifiers():
    model = build_chain(seed=0)  # y[1, 4, 16, 16]: not a classifier
    other = build_chain(seed=1)
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    data = CalibrationData(x, None)
    m = HeldOutMetric(model, data, batch_size=1)
    assert m.kind is MetricKind.FIDELITY and m.interval is None and m.resolution_warning(1.0) is None
    assert m.measure(model) == pytest.approx(100.0)
    ref = np.concatenate([_ort_logits(model, x[i:i + 1]) for i in range(3)])
    out = np.concatenate([_ort_logits(other, x[i:i + 1]) for i in range(3)])
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert m.measure(other) == pytest.approx(max(0.0, 100.0 * (1 - rel)), rel=1e-4)


def test_the_quickstart_samples_are_the_example_models_held_out_digits():
    from pathlib import Path

    from onnxprune.data import load_calibration

    root = Path(__file__).resolve().parent.parent / "models"
    d = load_calibration(root / "mnist_cnn_samples.npz")
    assert d.x.shape == (1000, 1, 28, 28) and d.x.dtype == np.float32
    assert 0.0 <= d.x.min() and d.x.max() <= 1.0
    assert np.bincount(d.y).tolist() == [100] * 10
    import onnx

    model = onnx.load(str(root / "mnist_cnn.onnx"))
    acc = np.mean(_ort_logits(model, d.x).argmax(1) == d.y)
    assert acc >= 0.95  # models/README.md: 97.8 % on these held-out digits


def test_names_the_readme_shows_import_as_shown():
    import onnxprune.executor
    from onnxprune import CompressOptions, compress
    from onnxprune.executor import TorchGraph
    from onnxprune.holdout import HeldOutMetric, split_holdout
    from onnxprune.surgery.oracle import masked_reference

    assert TorchGraph.__module__ == "onnxprune.executor.graph_module"
    assert all(callable(f) for f in (compress, CompressOptions, HeldOutMetric, split_holdout, masked_reference))
    with pytest.raises(AttributeError, match="NoSuchName"):
        onnxprune.executor.NoSuchName
