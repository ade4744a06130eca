"""Make ``models/mnist_cnn_samples.npz``: the quickstart's calibration data.

The 1,000 MNIST-5k digits that ``mnist_cnn.onnx`` never saw in training (the last 100 of
each class; the first 400 trained it, see make_mnist_cnn.py), in the model's input
layout: ``x`` float32 [1000, 1, 28, 28] = pixel / 255, ``y`` int64 [1000] digit labels.
``onnxprune compress`` holds out 10 % of them (stratified) before scoring and recovery
see the rest, so the accuracy it reports is measured on digits nothing trained on.

    python tools/fetch_assets.py        # mnist_5k.csv.gz into the asset cache
    python models/make_mnist_samples.py [--out models/mnist_cnn_samples.npz]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_mnist_cnn import N_TRAIN_PER_CLASS, _assets  # noqa: E402  (the rows after these per class were held out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "mnist_cnn_samples.npz")
    parser.add_argument("--data", type=Path, default=None, help="mnist_5k.csv.gz (default: the asset cache)")
    args = parser.parse_args(argv)
    assets = _assets()
    images, labels = assets.load_mnist_5k(args.data)
    _, held = assets.split_per_class(labels, N_TRAIN_PER_CLASS)
    x = (images[held].astype(np.float32) / 255.0)[:, None]
    y = labels[held].astype(np.int64)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"wrote {args.out}: x {x.shape} {x.dtype}, y {y.shape}, {args.out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
