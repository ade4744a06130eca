"""Calibration data: every source loads to the right arrays, every bad input is a DataError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from onnxprune.data import from_arrays, load_calibration
from onnxprune.errors import DataError


def test_npz_with_labels_round_trips(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "c.npz", x=x, y=y)
    d = load_calibration(tmp_path / "c.npz")
    np.testing.assert_array_equal(d.x, x)
    np.testing.assert_array_equal(d.y, y)
    assert d.y.dtype == np.int64 and len(d) == 5
    d.check([None, 3, 4, 4], num_classes=3)


def test_npy_is_unlabelled(tmp_path):
    x = np.ones((2, 1, 3, 3), dtype=np.float32)
    np.save(tmp_path / "c.npy", x)
    d = load_calibration(tmp_path / "c.npy")
    assert d.y is None and d.x.shape == (2, 1, 3, 3)


def test_batches_cover_all_samples_in_order():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    d = from_arrays(x, np.arange(10))
    got = list(d.batches(4))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), np.arange(10))


def test_from_iterable_of_tensors_and_subset_is_seeded():
    d = from_arrays([torch.ones(3, 2), torch.zeros(2, 2)])
    assert d.x.shape == (5, 2) and d.x.dtype == np.float32
    a, b = d.subset(3, seed=1), d.subset(3, seed=1)
    np.testing.assert_array_equal(a.x, b.x)
    assert len(a) == 3 and d.subset(None) is d


def test_image_folder_with_classes(tmp_path):
    for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        Image.new("RGB", (10, 6), color).save(tmp_path / label / "a.png")
    d = load_calibration(tmp_path, image_size=(4, 5), mean=(0.5,), std=(0.5,))
    assert d.x.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(d.y, [0, 1])
    # red image: R channel (1 - 0.5) / 0.5 = 1, others (0 - 0.5) / 0.5 = -1
    np.testing.assert_allclose(d.x[0, :, 0, 0], [1, -1, -1], atol=1e-6)
    bgr = load_calibration(tmp_path, image_size=(4, 5), channel_order="BGR")
    np.testing.assert_allclose(bgr.x[0, :, 0, 0], [0, 0, 1], atol=1e-6)


def test_flat_image_folder_is_unlabelled(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "a.png")
    d = load_calibration(tmp_path, image_size=(8, 8), grayscale=True)
    assert d.y is None and d.x.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(d.x, 128 / 255, rtol=1e-6)


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "no such file"),
    (lambda p: np.savez(p / "d.npz", z=np.ones(2)), "no array 'x'"),
    (lambda p: np.savez(p / "d.npz", x=np.ones((2, 3), dtype=np.int64)), "dtype int64"),
    (lambda p: np.savez(p / "d.npz", x=np.full((2, 3), np.nan, dtype=np.float32)), "NaN"),
    (lambda p: np.savez(p / "d.npz", x=np.ones((0, 3), dtype=np.float32)), "no samples"),
    (lambda p: np.savez(p / "d.npz", x=np.ones((2, 3), dtype=np.float32), y=np.ones(3, dtype=np.int64)),
     "one label per sample"),
    (lambda p: (p / "d.npz").write_bytes(b"not numpy"), "cannot be read"),
])
def test_bad_files_raise_data_error(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(DataError, match=needle):
        load_calibration(tmp_path / "d.npz")


def test_empty_folder_and_missing_size(tmp_path):
    with pytest.raises(DataError, match="needs --image-size"):
        load_calibration(tmp_path)
    with pytest.raises(DataError, match="no images"):
        load_calibration(tmp_path, image_size=(4, 4))


def test_check_rejects_wrong_shape_and_labels():
    d = from_arrays(np.ones((2, 3, 8, 8), dtype=np.float32), np.array([0, 5]))
    with pytest.raises(DataError, match="rank"):
        d.check([None, 3, 8])
    with pytest.raises(DataError, match="dim 1 differs"):
        d.check([None, 1, 8, 8])
    with pytest.raises(DataError, match=r"labels range over \[0, 5\].*3 classes"):
        d.check([None, 3, 8, 8], num_classes=3)
