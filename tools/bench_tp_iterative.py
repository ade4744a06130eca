"""Torch-Pruning's ``iterative_steps`` on LeNet5 with the recovery budget onnxprune's progressive run uses.

The side-by-side of issue 9 (compare with ``tools/bench_progressive.py --bench lenet5``):
the same trained advertorch LeNet5 (PyTorch source, which Torch-Pruning needs and onnxprune
does not), the same unlabelled training rows (each MNIST-5k class's first 250) and test rows
(the other 250 per class), the same number of steps as ``onnxprune compress --steps auto``
(one per 15 % of the MACs removed, at most 6) and the same distillation budget per step
(about 4096 sample passes: 2 epochs of the 2250 rows onnxprune trains on after its held-out
split), Adam, cosine learning rate, KL to the original's softmax. Torch-Pruning prunes
toward the pruning ratio that gives the MACs target in one shot (bisection), split into
``iterative_steps`` equal steps by its own scheduler; ``taylor`` takes its gradients from
cross-entropy on the original's argmax (no labels are used anywhere).

    pip install -e ".[bench]"          # torch-pruning (torch + numpy only)
    python tools/bench_tp_iterative.py --targets 0.2 0.1 --importance l1 taylor
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import bench_data  # noqa: E402
from bench_progressive import auto_steps_for  # noqa: E402
from bench_recovery import _tp_to_target, _torch_accuracy, conv_linear_macs  # noqa: E402


def _distill(model, teacher, x: np.ndarray, epochs: int, lr: float, batch: int, seed: int):
    import torch
    import torch.nn.functional as F

    model.train()
    params = list(model.parameters())
    n = len(x)
    total = max(1, math.ceil(n / batch) * epochs)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).numpy()
        for i in range(0, n, batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[np.sort(order[i:i + batch])]))
            with torch.no_grad():
                ref = teacher(xb)
            loss = F.kl_div(F.log_softmax(model(xb), 1), F.log_softmax(ref, 1), log_target=True,
                            reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def run(tp, importance: str, target: float, x: np.ndarray, tx: np.ndarray, ty: np.ndarray,
        args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    teacher = assets.load_lenet5()
    example = torch.zeros(1, 1, 28, 28)
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else tp.importance.TaylorImportance()
    _, ratio, _ = _tp_to_target(tp, copy.deepcopy(teacher), tp.importance.MagnitudeImportance(p=1), target, example)
    steps = auto_steps_for(target)
    n_train = int(round(len(x) * 0.9))  # what onnxprune trains on after its 10 % held-out split
    epochs = int(min(8, max(1, round(4096 / n_train))))
    model = copy.deepcopy(teacher)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=ratio,
                                  iterative_steps=steps, ignored_layers=[model.linear2])
    t0 = time.perf_counter()
    xt = torch.from_numpy(x[:512])
    for k in range(steps):
        if importance == "taylor":
            model.zero_grad()
            with torch.no_grad():
                pseudo = teacher(xt).argmax(1)
            F.cross_entropy(model(xt), pseudo).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
        model = _distill(model, teacher, x[:n_train], epochs, args.lr, args.batch_size, seed=k)
    wall = time.perf_counter() - t0
    return {"tool": "torch-pruning", "importance": importance, "target": target, "steps": steps,
            "epochs_per_step": epochs, "pruning_ratio": ratio,
            "macs_ratio": conv_linear_macs(model, example) / conv_linear_macs(teacher, example),
            "accuracy": 100.0 * _torch_accuracy(model, tx, ty), "original": 100.0 * _torch_accuracy(teacher, tx, ty),
            "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="*", type=float, default=[0.2, 0.1])
    ap.add_argument("--importance", nargs="*", default=["l1", "taylor"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit("needs torch-pruning: pip install -e '.[bench]'") from None
    x, _ = bench_data.mnist_split(first=True)
    x = x[np.random.default_rng(0).permutation(len(x))]  # rows are sorted by class
    tx, ty = bench_data.mnist_split(first=False)
    rows = []
    for target in args.targets:
        for imp in args.importance:
            r = run(tp, imp, target, x, tx, ty, args)
            rows.append(r)
            print(f"torch-pruning {imp:6s} macs {target}: {r['steps']} steps x {r['epochs_per_step']} epochs, "
                  f"accuracy {r['original']:.1f} -> {r['accuracy']:.1f}, MACs kept {r['macs_ratio']:.3f}, "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
