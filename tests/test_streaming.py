"""Streaming data: lazy sources give the same values as in-memory arrays, read only what is
asked for, skip and count bad samples (or fail with --strict-data), and feed scoring,
fine-tuning and the CLI through a DataLoader with worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from onnxprune.cli import main
from onnxprune.data import CalibrationData, LazyArray, from_arrays, load_calibration
from onnxprune.data.images import Preprocess
from onnxprune.errors import DataError
from onnxprune.recover.training import FinetuneOptions, finetune
from tiny_models import build_const_channel

CLASSES = ("cat", "dog", "owl")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _reference(path: Path, size=(8, 8)) -> np.ndarray:
    """The documented preprocessing, written out here: RGB, bilinear resize, /255, mean/std."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
    a = a.transpose(2, 0, 1) / 255.0
    return ((a - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """300 small images in three class folders (some one folder deeper: recursion), PNG and JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c / "deeper").mkdir(parents=True)
        for i in range(100):
            arr = rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8)
            sub = root / c / ("deeper" if i % 4 == 0 else "")
            Image.fromarray(arr).save(sub / f"{i:03d}.{'jpg' if i % 5 == 0 else 'png'}")
    return root


def _files(root: Path) -> list[Path]:
    """The images in the documented order: class folders sorted, paths sorted within each."""
    return [f for c in CLASSES for f in sorted((root / c).rglob("*"), key=str) if f.is_file()]


def _load(path, **kw) -> CalibrationData:
    return load_calibration(path, image_size=(8, 8), mean=MEAN, std=STD, **kw)


@pytest.fixture(scope="module")
def in_memory(folder) -> CalibrationData:
    files = _files(folder)
    y = np.repeat(np.arange(len(CLASSES)), 100)
    return from_arrays(np.stack([_reference(f) for f in files]), y)


def _concat(batches):
    xs, ys = zip(*batches)
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches_equal_in_memory_batches_for_a_seed(folder, in_memory, workers):
    lazy = _load(folder, workers=workers)
    assert isinstance(lazy.x, LazyArray) and lazy.x.shape == (300, 3, 8, 8) and len(lazy) == 300
    np.testing.assert_array_equal(lazy.y, in_memory.y)
    a, b = lazy.subset(100, seed=7), in_memory.subset(100, seed=7)
    got, want = list(a.batches(16)), list(b.batches(16))
    assert [len(x) for x, _ in got] == [len(x) for x, _ in want] == [16] * 6 + [4]
    for (gx, gy), (wx, wy) in zip(got, want):
        assert gx.dtype == np.float32
        np.testing.assert_allclose(gx, wx, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(gy, wy)
    # plain indexing and the views agree too
    np.testing.assert_allclose(lazy.x[[5, 299, 5]], in_memory.x[[5, 299, 5]], atol=1e-6)
    np.testing.assert_allclose(lazy.take([3, 1]).x[1], in_memory.x[1], atol=1e-6)
    np.testing.assert_allclose(lazy.shard(1, 3).x[:2], in_memory.x[[1, 4]], atol=1e-6)


def test_subset_reads_only_the_drawn_files(folder, monkeypatch):
    opened: list[str] = []
    real = Preprocess.__call__

    def counting(self, path):
        opened.append(str(path))
        return real(self, path)

    monkeypatch.setattr(Preprocess, "__call__", counting)
    d = _load(folder, workers=0)
    assert opened == []  # loading lists files, decodes none
    sub = d.subset(20, seed=1)
    assert opened == []
    n = sum(len(x) for x, _ in sub.batches(8))
    assert n == 20 and len(opened) == 20
    assert set(opened) == {sub.x.source.name(int(i)) for i in sub.x.index}


def test_list_file_with_labels_relative_paths_and_comments(folder, in_memory, tmp_path):
    files = _files(folder)
    lines = ["# path label"]
    for k, f in enumerate(files[:40]):
        rel = Path("..") / f.relative_to(folder.parent) if k % 2 else f  # relative to the list's folder
        lines.append(f"{rel},{k // 20}" if k % 3 else f"{rel} {k // 20}")
        if k == 10:
            lines.append("")
    sub = folder.parent / f"lists-{tmp_path.name}"  # beside the images: "../images0/..." reaches them
    sub.mkdir()
    (sub / "train.txt").write_text("\n".join(lines) + "\n")
    d = _load(sub / "train.txt", workers=0)
    np.testing.assert_array_equal(d.y, np.repeat([0, 1], 20))
    np.testing.assert_allclose(_concat(d.batches(16))[0], in_memory.x[:40], atol=1e-6)

    (sub / "flat.lst").write_text("\n".join(str(f) for f in files[:3]))
    assert _load(sub / "flat.lst").y is None and len(_load(sub / "flat.lst")) == 3

    (sub / "mixed.txt").write_text(f"{files[0]} 1\n{files[1]}\n")
    with pytest.raises(DataError, match=r"mixed.txt line 2: some lines have a label"):
        _load(sub / "mixed.txt")
    (sub / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="names no image"):
        _load(sub / "empty.txt")


def test_npy_is_memory_mapped_and_nan_rows_are_skipped(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(50, 2, 3, 3)).astype(np.float64)
    x[7, 1, 2, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    d = load_calibration(tmp_path / "x.npy", workers=0)
    assert d.lazy and d.x.shape == (50, 2, 3, 3) and d.y is None
    got = _concat(d.batches(8))[0]
    assert got.dtype == np.float32 and len(got) == 49
    np.testing.assert_array_equal(got, np.delete(x, 7, axis=0).astype(np.float32))
    assert isinstance(d.x.source._arr, np.memmap)
    assert d.bad.count == 1 and "x.npy row 7: contains NaN" in capsys.readouterr().err
    assert "1 bad sample(s) skipped (first: " in d.bad.summary()
    with pytest.raises(DataError, match=r"x.npy row 7: contains NaN"):
        d.x[5:9]
    strict = load_calibration(tmp_path / "x.npy", strict=True, workers=0)
    with pytest.raises(DataError, match=r"x.npy row 7: contains NaN.*--strict-data"):
        list(strict.batches(8))


def test_sharded_npz_and_npy_in_a_folder_or_a_glob(tmp_path):
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 3, 4, 4)).astype(np.float32) for n in (5, 7, 4)]
    ys = [rng.integers(0, 3, n) for n in (5, 7, 4)]
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "part-0.npz", x=xs[0], y=ys[0])
    np.savez_compressed(shards / "part-1.npz", x=xs[1], y=ys[1])  # compressed: read whole when touched
    np.savez(shards / "part-2.npz", x=xs[2], y=ys[2])
    for path in (shards, str(shards / "part-*.npz")):
        d = load_calibration(path, workers=0)
        assert d.lazy and d.x.shape == (16, 3, 4, 4)
        np.testing.assert_array_equal(d.y, np.concatenate(ys))
        idx = np.array([15, 0, 6, 5, 11, 4])
        np.testing.assert_array_equal(d.x[idx], np.concatenate(xs)[idx])
        gx, gy = _concat(d.subset(9, seed=2).batches(4))
        want = from_arrays(np.concatenate(xs), np.concatenate(ys)).subset(9, seed=2)
        np.testing.assert_array_equal(gx, want.x)
        np.testing.assert_array_equal(gy, want.y)
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a.npy", xs[0])
    np.save(npy / "b.npy", xs[2])
    d = load_calibration(npy)
    assert d.y is None and len(d) == 9
    np.testing.assert_array_equal(d.x[:], np.concatenate([xs[0], xs[2]]))


def test_shard_errors_name_the_shard(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    np.savez(a / "0.npz", x=np.ones((2, 3), np.float32), y=np.zeros(2, np.int64))
    np.savez(a / "1.npz", x=np.ones((2, 4), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"1.npz: samples of shape \[4\].*same sample shape"):
        load_calibration(a)
    np.savez(b / "0.npz", x=np.ones((2, 3), np.float32), y=np.zeros(2, np.int64))
    np.save(b / "1.npy", np.ones((2, 3), np.float32))
    with pytest.raises(DataError, match=r"shard .*0.npz has labels y but .*1.npy has none"):
        load_calibration(b)
    with pytest.raises(DataError, match="matches no .npz or .npy"):
        load_calibration(str(tmp_path / "nothing-*.npz"))
    np.save(tmp_path / "int.npy", np.ones((2, 3), np.int32))
    with pytest.raises(DataError, match="int.npy: x has dtype int32"):
        load_calibration(tmp_path / "int.npy")
    np.save(tmp_path / "whole.npy", np.ones((2, 3), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match="cut.npy: the file is truncated"):
        load_calibration(tmp_path / "cut.npy")


@pytest.fixture
def with_bad_files(folder, tmp_path) -> Path:
    """20 good images and two bad ones (a text file named .png, a truncated JPEG)."""
    root = tmp_path / "mixed"
    root.mkdir()
    for f in _files(folder)[:20]:
        (root / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    (root / "broken.png").write_text("not an image")
    jpg = next(f for f in _files(folder) if f.suffix == ".jpg")
    (root / "truncated.jpg").write_bytes(jpg.read_bytes()[:40])
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_named(with_bad_files, capsys, workers):
    d = _load(with_bad_files, workers=workers)
    assert len(d) == 22 and d.y is None
    x, _ = _concat(d.batches(5))
    assert len(x) == 20 and d.bad.count == 2
    err = capsys.readouterr().err
    assert "broken.png: cannot be read as an image" in err and "truncated.jpg" in err and "skipped" in err
    list(d.batches(5))  # a second pass counts each bad file once
    assert d.bad.count == 2
    assert d.bad.summary().startswith(f"{with_bad_files}: 2 bad sample(s) skipped")


def test_strict_data_and_all_bad_are_errors(with_bad_files, tmp_path):
    with pytest.raises(DataError, match=r"broken.png: cannot be read as an image .*--strict-data"):
        list(_load(with_bad_files, strict=True, workers=2).batches(8))
    bad = tmp_path / "allbad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(DataError, match=r"allbad: every sample read \(3\) is bad"):
        list(_load(bad, workers=0).batches(2))


def test_materialize_drops_bad_samples(with_bad_files):
    d = _load(with_bad_files, workers=0).materialize()
    assert not d.lazy and isinstance(d.x, np.ndarray) and d.x.shape == (20, 3, 8, 8)


def test_finetune_reads_through_workers_with_the_same_augmented_views(folder):
    """Fine-tuning with augmentation from a lazy folder, 0 or 2 workers, and from the same
    samples in memory: identical trained weights (the views are seeded per batch)."""
    student = build_const_channel(seed=0)
    opts = FinetuneOptions(epochs=2, batch_size=16, augment=("shift", "noise"), seed=3, lr=1e-2)
    lazy = _load(folder).subset(64, seed=0)
    results = [finetune(student, CalibrationData(lazy.x, lazy.y, "lazy", workers=w), options=opts,
                        measure_loss=False) for w in (0, 2)]
    results.append(finetune(student, lazy.materialize(), options=opts, measure_loss=False))
    weights = [{t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer} for r in results]
    before = {t.name: onnx.numpy_helper.to_array(t) for t in student.graph.initializer}
    assert any(not np.array_equal(before[k], weights[0][k]) for k in before)  # it trained
    for w in weights[1:]:
        for k in before:
            np.testing.assert_array_equal(w[k], weights[0][k])
    assert results[0].steps == results[1].steps == 8


def test_finetune_skips_bad_rows_and_names_them_when_all_are_bad(tmp_path, capsys):
    """Bad rows of a memory-mapped .npy are dropped from their batch (the step trains on the
    rest, a batch left empty takes no step); when every row is bad the error names the file."""
    student = build_const_channel(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 3, 8, 8)).astype(np.float32)
    x[:8] = np.nan  # a third of the rows: the shuffled batches lose some, a batch left empty takes no step
    np.save(tmp_path / "x.npy", x)
    data = load_calibration(tmp_path / "x.npy")
    opts = FinetuneOptions(epochs=1, batch_size=8, seed=0, lr=1e-2)
    res = finetune(student, data, teacher=student, options=opts, measure_loss=False)
    assert 1 <= res.steps <= 3 and data.bad.count == 8
    reference = finetune(student, from_arrays(x[8:]), teacher=student, options=opts, measure_loss=False)
    assert reference.steps == 2
    np.save(tmp_path / "bad.npy", np.full((16, 3, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match=r"bad.npy.*every sample.*bad"):
        finetune(student, load_calibration(tmp_path / "bad.npy"), teacher=student, options=opts, measure_loss=False)


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(build_const_channel(seed=0), str(path))
    return path


def _compress(model: Path, data: Path, tmp_path: Path, *extra: str):
    args = ["compress", model, "--data", data, "--image-size", "8,8", "--criterion", "taylor",
            "--score-samples", "24", "--steps", "1", "--no-recover", "--no-bench", "--val-split", "0",
            "--target-macs", "0.6", "--round-to", "1", "--batch-size", "8", "-o", tmp_path / "out.onnx",
            "--report", tmp_path / "report.json", "--plan-out", tmp_path / "plan.json", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_compress_streams_a_folder(tiny_model, folder, tmp_path):
    res = _compress(tiny_model, folder, tmp_path, "--workers", "2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.onnx").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["criterion"] == "taylor" and not any("bad sample" in w for w in report["warnings"])
    plan2 = tmp_path / "again"
    plan2.mkdir()
    res = _compress(tiny_model, folder, plan2, "--workers", "0", "--samples", "24")  # the alias, in-process
    assert res.exit_code == 0, res.output
    assert (plan2 / "plan.json").read_text() == (tmp_path / "plan.json").read_text()


def test_cli_bad_files_warn_or_fail_with_strict_data(tiny_model, with_bad_files, tmp_path):
    res = _compress(tiny_model, with_bad_files, tmp_path, "--score-samples", "22", "--workers", "0")
    assert res.exit_code == 0, res.output
    assert "broken.png: cannot be read as an image" in res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("2 bad sample(s) skipped" in w for w in report["warnings"])
    out = tmp_path / "strict"
    out.mkdir()
    res = _compress(tiny_model, with_bad_files, out, "--score-samples", "22", "--strict-data")
    assert res.exit_code == 2
    assert "error: " in res.output and "broken.png: cannot be read as an image" in res.output
    assert "Traceback" not in res.output and not (out / "out.onnx").exists()
    res = _compress(tiny_model, with_bad_files, out, "--workers", "two")
    assert res.exit_code == 2 and "--workers must be 'auto' or an integer" in res.output
