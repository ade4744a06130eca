"""Throughput of the data-parallel stages at 1, 2, ... processes on this machine's CPU.

For each process count P (``--procs``, default 1 2) the script launches itself through
``python -m torch.distributed.run --standalone --nproc-per-node P`` with
``OMP_NUM_THREADS`` = CPU cores // P (so P x threads = cores), and every rank, in a
gloo process group (:func:`onnxprune.distributed.session`):

1. scores ``--samples`` calibration samples with ``ifso`` (batches of ``--batch-size``,
   whole batches per rank, one all-reduce at the end);
2. fine-tunes the model on the same samples for ``--epochs`` (global batch
   ``--batch-size``, each step split by rank, DistributedDataParallel, Adam, labels).

Each stage runs once untimed on a small subset first (warm-up), then ``--repeat`` times,
each timed by rank 0 between two barriers; the fastest repetition counts (on a shared
machine the others measure the neighbours). Reported: samples per second of each stage (samples x epochs for
fine-tuning) and the speed-up over one process. The default model is
models/mnist_cnn.onnx with models/mnist_cnn_samples.npz (1 x 28 x 28 inputs: small, so
collective latency weighs more than on a real model).

    python tools/bench_distributed.py                         # 1 and 2 processes
    python tools/bench_distributed.py --procs 1 2 4 --samples 2048 --json dist.json

On a machine shared with other jobs the figures vary from run to run; run it twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    """One rank: warm up, then time ifso scoring and fine-tuning; rank 0 writes the figures."""
    import numpy as np
    import torch

    from onnxprune.criteria.ifso import IFSO
    from onnxprune.data import load_calibration
    from onnxprune.distributed import session
    from onnxprune.pipeline import prepare
    from onnxprune.recover import FinetuneOptions, finetune

    with session("cpu") as ctx:
        prep = prepare(args.model)
        data = load_calibration(args.data).subset(args.samples, 0)
        ifso = IFSO(batch_size=args.batch_size, device="cpu")
        opts = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, device="cpu", augment=("none",))
        warm = data.take(np.arange(min(len(data), 2 * args.batch_size * ctx.world)))

        def timed(fn) -> float:
            best = float("inf")
            for _ in range(args.repeat):
                ctx.barrier()
                t0 = time.perf_counter()
                fn()
                ctx.barrier()
                best = min(best, time.perf_counter() - t0)
            return best

        ifso.score_with_data(prep.analysis, prep.model, warm)
        t_ifso = timed(lambda: ifso.score_with_data(prep.analysis, prep.model, data))
        finetune(prep.model, warm, options=opts, measure_loss=False)
        t_ft = timed(lambda: finetune(prep.model, data, options=opts, measure_loss=False))
        if ctx.is_main:
            out = {"processes": ctx.world, "threads_per_process": torch.get_num_threads(), "samples": len(data),
                   "batch_size": args.batch_size, "epochs": args.epochs,
                   "ifso_seconds": t_ifso, "ifso_samples_per_s": len(data) / t_ifso,
                   "finetune_seconds": t_ft, "finetune_samples_per_s": len(data) * args.epochs / t_ft}
            Path(args.worker).write_text(json.dumps(out))


def _launch(procs: int, args: argparse.Namespace, cores: int) -> dict:
    """Run the worker in ``procs`` processes; returns rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // procs)))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(Path(__file__).resolve()), "--worker", str(result), "--model", str(args.model),
               "--data", str(args.data), "--samples", str(args.samples), "--batch-size", str(args.batch_size),
               "--epochs", str(args.epochs), "--repeat", str(args.repeat)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"error: the {procs}-process run failed:\n{res.stderr[-2000:]}")
        return json.loads(result.read_text())


def main() -> None:
    """Parse the options; as the launcher, run every process count and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mnist_cnn.onnx")
    p.add_argument("--data", type=Path, default=ROOT / "models" / "mnist_cnn_samples.npz")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions per stage (the fastest counts)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores shared by the processes")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        _worker(args)
        return
    rows = [_launch(n, args, args.cores) for n in args.procs]
    base = rows[0]
    print(f"{'procs':>5} {'threads':>7} {'ifso samples/s':>15} {'speed-up':>8} {'finetune samples/s':>19} "
          f"{'speed-up':>8}")
    for r in rows:
        r["ifso_speedup"] = r["ifso_samples_per_s"] / base["ifso_samples_per_s"]
        r["finetune_speedup"] = r["finetune_samples_per_s"] / base["finetune_samples_per_s"]
        print(f"{r['processes']:>5} {r['threads_per_process']:>7} {r['ifso_samples_per_s']:>15.1f} "
              f"{r['ifso_speedup']:>8.2f} {r['finetune_samples_per_s']:>19.1f} {r['finetune_speedup']:>8.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
