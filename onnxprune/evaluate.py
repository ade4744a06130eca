"""Evaluation of a model on data in onnxruntime: accuracy and fidelity to a reference.

Rules :func:`evaluate` follows:

- Runs in onnxruntime (CPUExecutionProvider unless told, full graph optimisation), in
  batches of ``batch_size`` samples. A symbolic batch dim takes the batch size; a fixed
  batch dim B runs micro-batches of exactly B (:mod:`onnxprune.batching`: a fixed batch
  of 1 runs one sample at a time; a last partial micro-batch is padded by repeating its
  last sample and the padding dropped). The reference model is batched the same way, by
  its own input's batch dim. With several micro-batches every output must be
  batch-first (dim 0 = B); one that is not is an error naming it (its parts cannot be
  joined into the outputs of the whole batch).
- One graph input (the data's ``x``, cast to the input's float type).
- ``accuracy`` (top-1) and ``top5`` (with at least 5 classes) of the first output when
  the data has labels and that output is [N, classes].
- Against a reference (the original model), per output both models have (by name):
  ``max_abs_error`` = max |out - ref|, ``max_rel_error`` = max |out - ref| / max |ref|
  (the definitions of :class:`onnxprune.runtime.verify.OutputFidelity`), ``rel_l2_error`` =
  ||out - ref|| / ||ref||, ``cosine`` of the flattened outputs over all samples, and for
  [N, classes] outputs ``top1_agreement``: the fraction of samples whose argmax agree.
  Accumulated in float64 over batches, so memory is bounded by the batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.data import CalibrationData
from onnxprune.batching import batch_dim, require_one_input, run_in_fixed_batches
from onnxprune.errors import OnnxPruneError
from onnxprune.runtime.verify import make_session, model_source

__all__ = ["EvalResult", "OutputMetrics", "evaluate"]


@dataclass(frozen=True)
class OutputMetrics:
    """Fidelity of one output to the reference (see the module docstring for definitions)."""

    max_abs_error: float
    max_rel_error: float
    rel_l2_error: float
    cosine: float
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "rel_l2_error": self.rel_l2_error, "cosine": self.cosine, "top1_agreement": self.top1_agreement}


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        model / reference: labels of the evaluated and the reference model (paths), or None.
        samples: samples evaluated.
        accuracy / top5: top-1 / top-5 accuracy of ``model`` (None without labels or
            without an [N, classes] first output; top5 None under 5 classes).
        reference_accuracy: top-1 accuracy of the reference on the same data, or None.
        agreement: top-1 agreement of the first output with the reference, or None.
        outputs: per output name, the fidelity to the reference (empty without one).
        seconds: wall time.
        notes: why a figure is missing.
    """

    model: str | None
    reference: str | None
    samples: int
    accuracy: float | None
    top5: float | None
    reference_accuracy: float | None
    agreement: float | None
    outputs: dict[str, OutputMetrics]
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""
        from onnxprune.report import _jsonable

        return _jsonable({
            "model": self.model, "reference": self.reference, "samples": self.samples,
            "accuracy": self.accuracy, "top5": self.top5, "reference_accuracy": self.reference_accuracy,
            "agreement": self.agreement, "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "seconds": self.seconds, "notes": list(self.notes)})

    def render(self, console) -> None:
        """Print a rich summary table and, with a reference, the per-output fidelity table."""
        from rich.markup import escape
        from rich.table import Table

        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}%"

        t = Table(title=f"Evaluation on {self.samples} samples", title_justify="left")
        t.add_column("")
        t.add_column("model", justify="right")
        if self.reference is not None:
            t.add_column("reference", justify="right")
        ref = [] if self.reference is None else [escape(self.reference)]
        t.add_row("file", escape(self.model or "-"), *ref)
        t.add_row("top-1 accuracy", pct(self.accuracy), *([pct(self.reference_accuracy)] if ref else []))
        if self.top5 is not None:
            t.add_row("top-5 accuracy", pct(self.top5), *([""] if ref else []))
        if ref:
            t.add_row("top-1 agreement", pct(self.agreement), "")
        console.print(t)
        if self.outputs:
            f = Table(title="Fidelity to the reference", title_justify="left")
            f.add_column("output", overflow="fold")
            for col in ("max abs err", "max rel err", "rel L2 err", "cosine", "top-1 agree"):
                f.add_column(col, justify="right")
            for name, m in self.outputs.items():
                f.add_row(escape(name), f"{m.max_abs_error:.3g}", f"{m.max_rel_error:.3g}",
                          f"{m.rel_l2_error:.3g}", f"{m.cosine:.4f}", pct(m.top1_agreement))
            console.print(f)
        for n in self.notes:
            console.print(f"[yellow]note: {escape(n)}[/yellow]", highlight=False)


class _Runner:
    """An onnxruntime session that runs batches of any size on a model with a fixed or free batch dim."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, label: str, providers) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        with model_source(model) as src:
            self.sess = make_session(src, providers, options=opts, label=label)
        ins = self.sess.get_inputs()
        require_one_input([i.name for i in ins], f"{label}: evaluation")
        self.input = ins[0]
        self.names = [o.name for o in self.sess.get_outputs()]
        self.fixed = batch_dim(self.input.shape[0]) if self.input.shape else None  # the batching rule
        self.dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(self.input.type, np.float32)
        self.label = label

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from onnxprune.runtime.verify import _run_session  # one error path for ORT failures

        x = x.astype(self.dtype, copy=False)

        def run_one(chunk: np.ndarray) -> list[np.ndarray]:
            out = _run_session(self.sess, {self.input.name: chunk}, self.label)
            return [out[n] for n in self.names]

        return dict(zip(self.names, run_in_fixed_batches(run_one, x, self.fixed, self.names, self.label)))


class _Fidelity:
    """Streaming float64 accumulation of the fidelity figures of one output."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_ref = 0.0
        self.sq_diff = self.sq_ref = self.sq_out = self.dot = 0.0
        self.agree = 0
        self.rows = 0
        self.classifier = True

    def update(self, out: np.ndarray, ref: np.ndarray) -> None:
        o = np.asarray(out, dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        d = np.abs(o - r)
        if d.size:
            self.max_abs = max(self.max_abs, float(d.max()))
            self.max_ref = max(self.max_ref, float(np.abs(r).max()))
        self.sq_diff += float((d * d).sum())
        self.sq_ref += float((r * r).sum())
        self.sq_out += float((o * o).sum())
        self.dot += float((o * r).sum())
        if r.ndim == 2 and r.shape[1] > 1:
            self.agree += int((o.argmax(1) == r.argmax(1)).sum())
            self.rows += r.shape[0]
        else:
            self.classifier = False

    def result(self) -> OutputMetrics:
        if self.max_ref > 0:
            rel = self.max_abs / self.max_ref
        else:
            rel = 0.0 if self.max_abs == 0 else math.inf
        nr, no = math.sqrt(self.sq_ref), math.sqrt(self.sq_out)
        rel_l2 = math.sqrt(self.sq_diff) / nr if nr > 0 else (0.0 if self.sq_diff == 0 else math.inf)
        if nr == 0 and no == 0:
            cos = 1.0
        elif nr == 0 or no == 0:
            cos = 0.0
        else:
            cos = max(-1.0, min(1.0, self.dot / (nr * no)))
        top1 = self.agree / self.rows if self.classifier and self.rows else None
        return OutputMetrics(self.max_abs, rel, rel_l2, cos, top1)


def evaluate(model: onnx.ModelProto | str | os.PathLike, data: CalibrationData, *,
             reference: onnx.ModelProto | str | os.PathLike | None = None, batch_size: int = 32,
             providers=("CPUExecutionProvider",), model_label: str | None = None,
             reference_label: str | None = None) -> EvalResult:
    """Accuracy of ``model`` on ``data`` and its fidelity to ``reference``, in onnxruntime.

    Args:
        model: the model (a ModelProto or a path).
        data: inputs float32 [N, ...] in the model's layout, optional int64 labels [N].
        reference: the model to compare with (typically the unpruned original), or None.
        batch_size: samples per run for models with a free batch dim (>= 1).
        providers: onnxruntime execution providers.
        model_label / reference_label: names in messages and the result (default: the
            path, or ``"model"`` / ``"reference"``).

    Returns:
        :class:`EvalResult` (see the module docstring for every figure).

    Raises:
        OnnxPruneError: batch size < 1, several graph inputs, no output shared with the
            reference, an output whose shape differs from the reference's, an output
            that is not batch-first in a model with a fixed batch run on more samples
            than that batch; DataError:
            labels outside the class count; VerificationError: onnxruntime fails.
    """
    from onnxprune.errors import DataError

    if int(batch_size) < 1:
        raise OnnxPruneError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    mlabel = model_label or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model")
    rlabel = None
    if reference is not None:
        rlabel = reference_label or (os.fspath(reference) if isinstance(reference, (str, os.PathLike)) else "reference")
    run = _Runner(model, mlabel, providers)
    rrun = _Runner(reference, rlabel, providers) if reference is not None else None
    shared = [n for n in run.names if rrun is not None and n in rrun.names]
    if rrun is not None and not shared:
        raise OnnxPruneError(f"{mlabel} and {rlabel} have no output name in common "
                             f"({', '.join(run.names)} vs {', '.join(rrun.names)})")
    notes: list[str] = []
    fid = {n: _Fidelity() for n in shared}
    first = run.names[0]
    correct = correct5 = ref_correct = 0
    classes = None
    labelled = data.y is not None
    count = 0  # samples read (a lazy source's bad samples are skipped)
    for x, y in data.batches(int(batch_size)):
        count += len(x)
        out = run.run(x)
        logits = out[first]
        is_cls = logits.ndim == 2 and logits.shape[0] == len(x)
        if labelled and is_cls:
            classes = logits.shape[1]
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise DataError(f"{data.source}: labels range over [{int(y.min())}, {int(y.max())}] but "
                                f"{mlabel} has {classes} classes")
            correct += int((logits.argmax(1) == y).sum())
            if classes >= 5:
                top = np.argpartition(-logits, 4, axis=1)[:, :5]
                correct5 += int((top == y[:, None]).any(1).sum())
        if rrun is not None:
            ref = rrun.run(x)
            for n in shared:
                if out[n].shape != ref[n].shape:
                    raise OnnxPruneError(f"output {n!r} has shape {list(out[n].shape)} in {mlabel}, "
                                         f"{list(ref[n].shape)} in {rlabel}")
                fid[n].update(out[n], ref[n])
            r0 = ref.get(first)
            if labelled and is_cls and r0 is not None:
                ref_correct += int((r0.argmax(1) == y).sum())
    n = count
    accuracy = top5 = ref_acc = None
    if labelled:
        if classes is None:
            notes.append(f"no accuracy: the first output {first!r} is not [N, classes]")
        else:
            accuracy = correct / n
            top5 = correct5 / n if classes >= 5 else None
            ref_acc = ref_correct / n if rrun is not None and first in shared else None
    else:
        notes.append("no labels in the data: accuracy not measured")
    outputs = {k: v.result() for k, v in fid.items()}
    agreement = outputs[first].top1_agreement if first in outputs else None
    return EvalResult(mlabel, rlabel, n, accuracy, top5, ref_acc, agreement, outputs,
                      time.perf_counter() - t0, tuple(notes))
