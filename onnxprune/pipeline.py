"""The compress pipeline: load -> canonicalize -> analyze -> score -> plan -> apply ->
verify -> bench -> report -> save. Each stage is a function of the public API; this
module only chains them, times them and collects the report."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.analysis import Analysis, analyze
from onnxprune.runtime.latency import measure_latency
from onnxprune.canonicalize import canonicalize, restore_storage_dtypes
from onnxprune.criteria import get_criterion
from onnxprune.data import CalibrationData
from onnxprune.errors import ModelLoadError, OnnxPruneError, PlanError
from onnxprune.inputs import resolve_input_shapes
from onnxprune.io import check_model_output, default_output_path, load_model, save_model
from onnxprune.runtime.latency_search import search_latency
from onnxprune.runtime.sweep import channel_sweep
from onnxprune.planning import ROUND_TO_AUTO, PlanOptions, PruningPlan, Target, TargetKind, make_plan
from onnxprune.report import CompressReport, GroupRow
from onnxprune.shapes import measure_shapes
from onnxprune.surgery import apply_plan
from onnxprune.surgery.oracle import zeroed_reference
from onnxprune.runtime.verify import VerifyResult, verify

if TYPE_CHECKING:  # recover.training imports torch; an l1 run must not
    from onnxprune.recover.training import FinetuneOptions


@dataclass(frozen=True)
class Prepared:
    """A loaded, canonical, analysed model.

    Attributes:
        original: the model as loaded.
        model: its canonical form (what is scored and cut).
        input_shapes: concrete shape of every graph input used for shapes and checks.
        analysis: channel groups and costs of ``model``.
        stage_seconds: wall time of load, canonicalize and analyze.
        warnings: notes from canonicalisation.
    """

    original: onnx.ModelProto
    model: onnx.ModelProto
    input_shapes: Mapping[str, tuple[int, ...]]
    analysis: Analysis
    stage_seconds: Mapping[str, float]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompressOptions:
    """Options of :func:`compress`.

    Attributes:
        criterion: a data-free criterion name (``l1``, ``l2``, ``bn``, ``cpmc``, ``random``).
        target: what to reach (default: keep 70% of the MACs).
        plan: planner options (scope, round_to, caps, exclusions).
        input_shapes: overrides of graph input shapes (symbolic dims default to batch 1
            and 224 elsewhere).
        seed: seed of random inputs and of the ``random`` criterion.
        criterion_args: extra keyword arguments of the criterion (e.g. ``{"a": 0.5}`` for cpmc).
        strict_target: fail with PlanError instead of stopping at the reachable figure.
        bench: measure onnxruntime CPU latency before and after.
        bench_warmup / bench_repeat / threads: latency measurement settings.
        provider: onnxruntime execution provider of the latency measurements, the channel
            sweep (``plan.round_to == "auto"``) and latency targets.
        data: calibration data, required by data-driven criteria (``taylor``, ...).
        samples: use at most this many calibration samples (seeded draw); None = all.
        batch_size: calibration batch size (bounds the torch side's memory).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]`` for the torch side.
        recalibrate_bn: after surgery, bias compensation of the removed channels and BN
            statistics re-estimated on ``data`` (:mod:`onnxprune.recover`).
        finetune: after surgery (and re-calibration), fine-tune on ``data`` with these
            options, the original model as teacher; None = no fine-tuning.
    """

    criterion: str = "l1"
    target: Target = Target(TargetKind.MACS, 0.7)
    plan: PlanOptions = PlanOptions()
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int = 0
    criterion_args: Mapping[str, float] = field(default_factory=dict)
    strict_target: bool = False
    bench: bool = True
    bench_warmup: int = 5
    bench_repeat: int = 30
    threads: int | None = None
    data: CalibrationData | None = None
    samples: int | None = None
    batch_size: int = 32
    device: str = "auto"
    provider: str = "CPUExecutionProvider"
    recalibrate_bn: bool = False
    finetune: FinetuneOptions | None = None


@dataclass(frozen=True)
class CompressResult:
    """Outcome of :func:`compress`: the pruned model (also written to ``report.output_path``)."""

    model: onnx.ModelProto
    plan: PruningPlan
    analysis: Analysis
    verify: VerifyResult
    report: CompressReport


@contextmanager
def _timed(times: dict[str, float], stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0


def prepare(path: str | os.PathLike, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Prepared:
    """Load, canonicalize and analyse a model file.

    Raises:
        ModelLoadError / UnsupportedModelError: bad file; InputShapeError: bad shapes.
    """
    times: dict[str, float] = {}
    with _timed(times, "load"):
        original = load_model(path)
    with _timed(times, "canonicalize"):
        canon = canonicalize(original)
    with _timed(times, "analyze"):
        shapes_in = resolve_input_shapes(canon.model, input_shapes)
        shapes = measure_shapes(canon.model, shapes_in)
        analysis = analyze(canon.model, shapes)
    return Prepared(original, canon.model, shapes_in, analysis, times, tuple(canon.warnings))


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer name -> numpy array (float and integer constants alike)."""
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


def count_model(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """(MACs, params) of any model at the given input shapes (conv/linear MACs; float params)."""
    a = analyze(model, measure_shapes(model, input_shapes))
    return a.count("macs"), a.count("params")


def compress(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None,
             options: CompressOptions = CompressOptions()) -> CompressResult:
    """Prune ``input_path`` to ``options.target`` and write the result atomically.

    Args:
        input_path: an ONNX file (external data beside it is loaded).
        output_path: where to write; default ``<stem>.pruned.onnx`` beside the input.
        options: see :class:`CompressOptions`.

    Raises:
        OnnxPruneError subclasses: bad file, bad shapes, unreachable target with
        ``strict_target``, an output path equal to the input, or a failed verification.
        Nothing is written unless every stage succeeded.
    """
    if not str(input_path):
        raise ModelLoadError("the model path is empty")
    input_path = Path(input_path)
    out_path = Path(output_path) if output_path is not None else default_output_path(input_path)
    check_model_output(output_path if output_path is not None else out_path, [input_path],
                       clash="output path is the input model; choose another -o")
    crit_args = dict(options.criterion_args)
    if options.criterion == "random":
        crit_args.setdefault("seed", options.seed)
    criterion = get_criterion(options.criterion, **crit_args)
    if criterion.requires_data and options.data is None:
        raise OnnxPruneError(f"criterion {options.criterion} needs calibration data: give --data "
                             "(a .npz with x [and y], a .npy, or a folder of images)")
    if (options.recalibrate_bn or options.finetune is not None) and options.data is None:
        raise OnnxPruneError("--recalibrate-bn and --finetune-epochs need calibration data: give --data "
                             "(a .npz with x [and y], a .npy, or a folder of images)")

    prep = prepare(input_path, options.input_shapes)
    times = dict(prep.stage_seconds)
    a = prep.analysis
    with _timed(times, "score"):
        if criterion.requires_data:
            from onnxprune.executor.device import resolve_device

            data = options.data.subset(options.samples, options.seed)
            data.check(_declared_input_shape(prep.model))
            scores = criterion.score_with_data(a, prep.model, data, batch_size=options.batch_size,
                                               device=resolve_device(options.device), seed=options.seed)
        else:
            scores = criterion.score(a, weights_of(prep.model))
    plan_opts, sweep, search = options.plan, None, None
    if plan_opts.round_to == ROUND_TO_AUTO:
        with _timed(times, "sweep"):
            sweep = channel_sweep(prep.model, a.shapes, provider=options.provider, threads=options.threads,
                                  analysis=a)
        plan_opts = dataclasses.replace(plan_opts, round_to=sweep.round_to)
    with _timed(times, "plan"):
        if options.target.kind is TargetKind.LATENCY:  # plan, apply and measure until the target is met
            search = search_latency(prep.original, prep.model, a, prep.input_shapes, scores, options.target,
                                    plan_opts, normalize=criterion.normalize, provider=options.provider,
                                    threads=options.threads, warmup=options.bench_warmup,
                                    repeat=options.bench_repeat, seed=options.seed)
            plan = search.plan
        else:
            plan = make_plan(a, scores, options.target, plan_opts, normalize=criterion.normalize)
        plan.validate(a)
    if plan.reachable is not None and options.strict_target:
        raise PlanError(plan.warnings[0])
    with _timed(times, "apply"):
        removed = {g: np.asarray(v) for g, v in plan.removed.items()}
        pruned = restore_storage_dtypes(apply_plan(prep.model, a, removed), prep.original)
    with _timed(times, "verify"):
        result = verify(pruned, prep.original, prep.input_shapes, seed=options.seed,
                        reference=zeroed_reference(prep.model, a, removed))
        macs_after, params_after = count_model(pruned, prep.input_shapes)
    recovery = None
    if options.recalibrate_bn or options.finetune is not None:
        oracle = result.oracle  # the surgery oracle checks the cut, before recovery changes weights
        pruned, result, recovery = _recover(prep, plan, pruned, options, times)
        result = dataclasses.replace(result, oracle=oracle)
    warnings = list(prep.warnings) + list(plan.warnings)
    if result.oracle is not None and result.oracle["status"] != "passed":
        warnings.append(result.oracle["message"])
    if abs(macs_after - plan.macs_after) > 0.005 * max(plan.macs_after, 1):
        warnings.append(f"measured MACs after pruning ({macs_after}) differ from the plan's ({plan.macs_after})")
    lat_before = lat_after = None
    if search is not None:  # the search measured the chosen model already (a miss is in plan.warnings)
        lat_before, lat_after = search.before, search.after
    elif options.bench:
        with _timed(times, "bench"):
            kw = dict(warmup=options.bench_warmup, repeat=options.bench_repeat, threads=options.threads,
                      seed=options.seed, providers=(options.provider,))
            lat_before = measure_latency(prep.original, prep.input_shapes, **kw)
            lat_after = measure_latency(pruned, prep.input_shapes, **kw)
    if lat_after is not None and lat_after.median_ms >= lat_before.median_ms:
        warnings.append(f"the pruned model is not faster than the original on {lat_after.provider} "
                        f"({lat_before.median_ms:.2f} -> {lat_after.median_ms:.2f} ms median) although it has "
                        f"{macs_after / max(a.count('macs'), 1):.2f}x the MACs")
    with _timed(times, "save"):
        save_model(pruned, out_path, input_path=input_path)
    report = CompressReport(
        input_path=str(input_path), output_path=str(out_path), criterion=options.criterion,
        target=str(options.target), macs_before=a.count("macs"), macs_after=macs_after,
        params_before=a.count("params"), params_after=params_after,
        latency_before=lat_before, latency_after=lat_after, groups=group_rows(a, plan),
        stage_seconds=times,
        reachable=None if plan.reachable is None else f"{plan.target.kind.value}={plan.reachable:.3f}",
        warnings=tuple(warnings), fidelity=result.to_dict(), criterion_info=getattr(scores, "info", {}),
        round_to=None if sweep is None else {"chosen": sweep.round_to, **sweep.to_dict()},
        latency_target=None if search is None else search.to_dict(), recovery=recovery)
    return CompressResult(pruned, plan, a, result, report)


#: at most this many calibration samples are evaluated before / after recovery for the report
RECOVERY_EVAL_SAMPLES = 256


def _recover(prep: Prepared, plan: PruningPlan, pruned: onnx.ModelProto, options: CompressOptions,
             times: dict[str, float]) -> tuple[onnx.ModelProto, VerifyResult, dict]:
    """The recovery stage: :func:`onnxprune.recover.recover`, verify again, and accuracy /
    agreement on (at most :data:`RECOVERY_EVAL_SAMPLES` of) the calibration data before and
    after recovery (training data: an optimistic figure, reported as such)."""
    from onnxprune.evaluate import evaluate
    from onnxprune.recover import recover

    data = options.data.subset(options.samples, options.seed)
    data.check(_declared_input_shape(prep.model))
    removed = {g: np.asarray(v) for g, v in plan.removed.items()}
    with _timed(times, "recover"):
        rec = recover(prep.model, pruned, prep.analysis, removed, data, recalibrate=options.recalibrate_bn,
                      finetune_options=options.finetune, batch_size=options.batch_size, device=options.device)
    rec_model = restore_storage_dtypes(rec.model, prep.original)
    with _timed(times, "verify"):
        result = verify(rec_model, prep.original, prep.input_shapes, seed=options.seed)
    info = dict(rec.info)
    with _timed(times, "recover_eval"):
        sub = data.subset(RECOVERY_EVAL_SAMPLES, options.seed)
        before = evaluate(pruned, sub, reference=prep.original, batch_size=options.batch_size)
        after = evaluate(rec.model, sub, reference=prep.original, batch_size=options.batch_size)
    info["eval_calibration"] = {
        "samples": len(sub), "reference_accuracy": after.reference_accuracy,
        "before": {"accuracy": before.accuracy, "agreement": before.agreement},
        "after": {"accuracy": after.accuracy, "agreement": after.agreement}}
    return rec_model, result, info


def _declared_input_shape(model: onnx.ModelProto) -> list[int | None] | None:
    """The first graph input's declared shape (:func:`onnxprune.batching.declared_input_shape`)."""
    from onnxprune.batching import declared_input_shape

    return declared_input_shape(model)


def group_rows(analysis: Analysis, plan: PruningPlan | None = None) -> tuple[GroupRow, ...]:
    """One report row per group: kept/total channels and why it is blocked."""
    rows = []
    for g in analysis.groups:
        kept = g.size - (len(plan.removed.get(g.id, ())) if plan else 0)
        rows.append(GroupRow(g.name, g.op, kept, g.size, g.blocked_reason))
    return tuple(rows)


__all__ = ["CompressOptions", "CompressResult", "Prepared", "compress", "count_model", "group_rows",
           "prepare", "weights_of"]

