"""The compress pipeline: load -> canonicalize -> analyze -> [held-out split] -> steps
(score -> plan -> apply -> recover -> measure, :mod:`onnxprune.schedule`) -> verify ->
bench -> report -> save. Each stage is a function of the public API; this module only
chains them, applies the accuracy guard, times them and collects the report.

Multi-process runs (:mod:`onnxprune.distributed`: torchrun, ``--nproc``): every rank runs
:func:`compress` with the same arguments; scoring and recovery are data-parallel, rank 0
measures (the round_to sweep, latencies, held-out figures) and broadcasts, and after the
steps rank 0 alone verifies, benchmarks and writes, after the run's last collective (a
barrier every rank reaches only when it succeeded), so a failing rank leaves no output."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.analysis import Analysis, analyze
from onnxprune.runtime.latency import measure_interleaved
from onnxprune.canonicalize import canonicalize, restore_storage_dtypes
from onnxprune.criteria import get_criterion
from onnxprune.data import CalibrationData, data_warnings
from onnxprune.distributed import DistContext, current
from onnxprune.errors import DataError, ModelLoadError, OnnxPruneError, PlanError
from onnxprune.inputs import resolve_input_shapes
from onnxprune.io import check_model_output, default_output_path, load_model, save_model
from onnxprune.planning import ROUND_TO_AUTO, PlanOptions, PruningPlan, Target, TargetKind
from onnxprune.report import CompressReport, GroupRow
from onnxprune.shapes import measure_shapes
from onnxprune.runtime.verify import VerifyResult, verify
from onnxprune.surgery import apply_plan
from onnxprune.surgery.oracle import masked_reference
from onnxprune.progressive import ProgressiveRun, held_out_split, reached, timed
from onnxprune.schedule import plan_of_original


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

    The Python defaults are the plain one-shot cut (one step, no recovery, ``round_to``
    1); the command line turns on what a user expects by default (with ``--data``:
    progressive steps, recovery, ifso; ``--round-to auto`` and the never-slower rule).

    Attributes:
        criterion: a criterion name (``l1``, ``l2``, ``bn``, ``cpmc``, ``random``; with
            ``data`` also ``taylor``, ``infcp``, ``ifso``).
        target: what to reach (default: keep 70% of the MACs); None with ``max_drop``
            alone: compress as far as the accuracy guard allows.
        plan: planner options (scope, round_to, caps, exclusions).
        input_shapes: overrides of graph input shapes (symbolic dims default to batch 1
            and 224 elsewhere).
        seed: seed of random inputs, data draws and the ``random`` criterion.
        criterion_args: extra keyword arguments of the criterion (e.g. ``{"a": 0.5}`` for cpmc).
        strict_target: fail with PlanError instead of stopping at the reachable figure.
        bench: measure onnxruntime latency of the original and of every step's cut.
        bench_warmup / bench_repeat / threads: latency measurement settings.
        provider: onnxruntime execution provider of the latency measurements, the channel
            sweep (``plan.round_to == "auto"``) and latency targets.
        data: calibration data (required by data-driven criteria and recovery).
        samples: scoring uses at most this many training samples (seeded draw; ``--score-samples``);
            None = all. For streamed data only these samples are read.
        train_samples: recovery uses at most this many training samples; None = all.
        val_split: share of ``data`` held out for validation (0 = none); made before
            anything else sees the data (:func:`onnxprune.holdout.split_holdout`).
        val_data: a held-out set of its own instead of ``val_split``.
        max_drop: accuracy guard: the returned model's held-out figure is at most this
            many points below the original's (needs data).
        steps: number of progressive steps (:mod:`onnxprune.schedule`), or ``"auto"``.
        batch_size: calibration batch size (bounds the torch side's memory).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]`` for the torch side.
        recalibrate_bn: after every cut, bias compensation of the removed channels and BN
            statistics re-estimated on the training data (:mod:`onnxprune.recover`).
        finetune: after every cut (and re-calibration), distil from the original model
            with these options (``epochs`` per step); None = no fine-tuning.
        auto_epochs: choose ``finetune.epochs`` per step from the training set size
            (:func:`onnxprune.progressive.auto_epochs`).
        never_slower: with ``plan.round_to == "auto"``, choose round_to by timing the
            target's whole cut per candidate (:func:`onnxprune.schedule.probe_round_to`),
            and re-plan a final cut that is not faster than the original with coarser
            round_to (rule 3 of :mod:`onnxprune.schedule`; needs ``bench``).
        use_cache: reuse cached ``round_to auto`` sweeps (:mod:`onnxprune.runtime.sweep_cache`).
    """

    criterion: str = "l1"
    target: Target | None = Target(TargetKind.MACS, 0.7)
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
    train_samples: int | None = None
    val_split: float = 0.1
    val_data: CalibrationData | None = None
    max_drop: float | None = None
    steps: int | str = 1
    batch_size: int = 32
    device: str = "auto"
    provider: str = "CPUExecutionProvider"
    recalibrate_bn: bool = False
    finetune: "FinetuneOptions | None" = None
    auto_epochs: bool = False
    never_slower: bool = False
    use_cache: bool = True


@dataclass(frozen=True)
class CompressResult:
    """Outcome of :func:`compress`: the pruned model (also written to ``report.output_path``).

    In a multi-process run, ranks other than 0 get the same model and plan, ``verify`` and
    ``report`` None (rank 0 alone verifies and writes).
    """

    model: onnx.ModelProto
    plan: PruningPlan
    analysis: Analysis
    verify: VerifyResult | None
    report: CompressReport | None


def prepare(path: str | os.PathLike, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Prepared:
    """Load, canonicalize and analyse a model file.

    Raises:
        ModelLoadError / UnsupportedModelError: bad file; InputShapeError: bad shapes.
    """
    times: dict[str, float] = {}
    with timed(times, "load"):
        original = load_model(path)
    with timed(times, "canonicalize"):
        canon = canonicalize(original)
    with timed(times, "analyze"):
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
    """Prune ``input_path`` toward ``options.target`` and write the result atomically.

    The run: split the data (held-out part first), resolve round_to, then the schedule of
    steps (:mod:`onnxprune.schedule`; one step = the one-shot cut), each step checked
    against the accuracy guard ``max_drop`` on the held-out data (the last step that holds
    it is returned; a failing step is retried once halfway), then verify, bench, save.

    Args:
        input_path: an ONNX file (external data beside it is loaded).
        output_path: where to write; default ``<stem>.pruned.onnx`` beside the input.
        options: see :class:`CompressOptions`.

    Raises:
        OnnxPruneError subclasses: bad file, bad shapes, bad data, unreachable target with
        ``strict_target``, an output path equal to the input, or a failed verification;
        DistributedError: another rank of a multi-process run failed.
        Nothing is written unless every stage succeeded (on every rank).
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
    _check_options(criterion, options)

    prep = prepare(input_path, options.input_shapes)
    times = dict(prep.stage_seconds)
    a = prep.analysis
    split = metric = None
    if options.data is not None:
        with timed(times, "held_out"):
            split, metric = held_out_split(prep, options)
    run = ProgressiveRun(prep, options, criterion, split, metric, times)
    plan_opts, sweep = options.plan, None
    if plan_opts.round_to == ROUND_TO_AUTO:
        from onnxprune.runtime.sweep_cache import cached_channel_sweep

        with timed(times, "sweep"):
            sweep = current().on_main(cached_channel_sweep)(  # measured (and cached) by rank 0 alone
                prep.model, a.shapes, a, provider=options.provider, threads=options.threads,
                use_cache=options.use_cache)
        plan_opts = dataclasses.replace(plan_opts, round_to=sweep.round_to)
    state, records, warnings, last_search, complete = run.schedule(plan_opts, fixed=not options.never_slower)

    final_plan = plan_of_original(a, state, options.target)
    reachable = None
    if options.target is not None and not complete:
        reachable = reached(options.target, state, a, run.original_ms)
    if reachable is not None:
        final_plan = dataclasses.replace(final_plan, reachable=reachable)
        if options.strict_target:
            raise PlanError(f"target {options.target} is out of reach: reached {options.target.kind.value}="
                            f"{reachable:.3f}")
    if not any(len(v) for v in final_plan.removed.values()):
        # nothing was cut: the input as it came (its canonical form can run slower in
        # onnxruntime, and recovery of an uncut model is the original distilled into itself)
        pruned = prep.original
        warnings.append("no channel was removed: the written model is the input model unchanged")
    else:
        pruned = restore_storage_dtypes(state.model, prep.original)
    ctx = current()
    _gather_bad_samples(ctx, options.data, options.val_data)
    if not ctx.is_main:  # rank 0 verifies, benchmarks and writes
        ctx.barrier()
        return CompressResult(pruned, final_plan, a, None, None)
    return _finish(prep, options, run, state, records, warnings, last_search, final_plan, reachable, pruned,
                   split, sweep, times, input_path, out_path, ctx)


def _gather_bad_samples(ctx: DistContext, *datas: CalibrationData | None) -> None:
    """Every rank's bad samples into each source's log (a collective: every rank calls it),
    so that rank 0's report counts them all; nothing at world 1."""
    if ctx.world == 1:
        return
    logs: list = []  # in the order given: the same on every rank
    for d in datas:
        if d is not None and all(d.bad is not b for b in logs):
            logs.append(d.bad)
    for bad in logs:
        mine = (bad.keys, list(bad.names))
        for r in range(ctx.world):
            keys, names = ctx.broadcast(mine if ctx.rank == r else None, src=r)
            if r != ctx.rank:
                bad.merge(keys, names)


def _finish(prep: Prepared, options: CompressOptions, run: ProgressiveRun, state, records, warnings, last_search,
            final_plan: PruningPlan, reachable: float | None, pruned: onnx.ModelProto, split, sweep,
            times: dict[str, float], input_path: Path, out_path: Path, ctx: DistContext) -> CompressResult:
    """Verify, bench, report and save (rank 0 alone in a multi-process run, no collective
    but the barrier before the save, where the other ranks wait)."""
    a = prep.analysis
    with timed(times, "verify"):
        result = _verify(prep, final_plan, pruned, recovered=any(r.recovery for r in records), seed=options.seed,
                         data=None if split is None else split.val)
        macs_after, params_after = state.macs, state.params
    warnings = list(prep.warnings) + warnings + data_warnings(options.data, options.val_data)
    lat_before = lat_after = None
    if last_search is not None and len(records) == 1:  # the search measured the written model already
        lat_before, lat_after = last_search.before, last_search.after
    elif options.bench or (options.target is not None and options.target.kind is TargetKind.LATENCY):
        with timed(times, "bench"):
            kw = dict(warmup=options.bench_warmup, repeat=options.bench_repeat, threads=options.threads,
                      seed=options.seed, providers=(options.provider,))
            # interleaved: both see the same load, so their ratio is the speedup
            lat_before, lat_after = measure_interleaved([prep.original, pruned], prep.input_shapes, **kw)
    if lat_after is not None and lat_after.median_ms >= lat_before.median_ms and records:
        warnings.append(f"the pruned model is not faster than the original on {lat_after.provider} "
                        f"({lat_before.median_ms:.2f} -> {lat_after.median_ms:.2f} ms median) although it has "
                        f"{macs_after / max(a.count('macs'), 1):.2f}x the MACs")
    held = run.held_out_summary(state, records)
    ctx.barrier()  # the run's last collective: every rank got here, so nothing failed
    with timed(times, "save"):
        save_model(pruned, out_path, input_path=input_path)
    recovery = next((r.recovery for r in reversed(records) if r.accepted and r.recovery), None)
    report = CompressReport(
        input_path=str(input_path), output_path=str(out_path), criterion=options.criterion,
        target=str(options.target) if options.target is not None else f"max-drop {options.max_drop:g}",
        macs_before=a.count("macs"), macs_after=macs_after,
        params_before=a.count("params"), params_after=params_after,
        latency_before=lat_before, latency_after=lat_after, groups=group_rows(a, final_plan),
        stage_seconds=times,
        reachable=None if reachable is None else f"{options.target.kind.value}={reachable:.3f}",
        warnings=tuple(warnings), fidelity={**result.to_dict(), "inputs": "random inputs" if split is None or _data_feeds(prep, split.val) is None
                                               else "held-out samples"},
        criterion_info=next((dict(r.criterion_info) for r in reversed(records) if r.criterion_info), {}),
        round_to=None if sweep is None else {**sweep.info, "sweep_choice": sweep.round_to,
                                             "chosen": sweep.round_to if run.probe is None else run.probe.chosen,
                                             "probe": None if run.probe is None else run.probe.to_json()},
        latency_target=None if last_search is None else last_search.to_dict(), recovery=recovery,
        schedule=[r.to_dict() for r in records], held_out=held)
    return CompressResult(pruned, final_plan, a, result, report)


def _verify(prep: Prepared, plan: PruningPlan, model: onnx.ModelProto, *, recovered: bool,
            seed: int, data: CalibrationData | None = None) -> VerifyResult:
    """Verify the written model against the original, with the surgery oracle on the cut, on
    the first samples of ``data`` (the held-out part) when given, else on random inputs.

    The oracle (the original with the removed channels zeroed) checks the composed plan
    applied to the original in one go; when recovery changed weights since, that pure cut
    is verified for the oracle and the written model for everything else.
    """
    removed = {g: np.asarray(v) for g, v in plan.removed.items()}
    reference = masked_reference(prep.model, prep.analysis, removed)  # one session: original and oracle
    kw = dict(seed=seed, feeds=_data_feeds(prep, data))
    if not recovered:
        return verify(model, prep.original, prep.input_shapes, reference=reference, **kw)
    cut = restore_storage_dtypes(apply_plan(prep.model, prep.analysis, removed), prep.original)
    oracle = verify(cut, prep.original, prep.input_shapes, reference=reference, **kw).oracle
    return dataclasses.replace(verify(model, prep.original, prep.input_shapes, **kw), oracle=oracle)


def _data_feeds(prep: Prepared, data: CalibrationData | None) -> dict[str, np.ndarray] | None:
    """The first samples of ``data`` as the feeds of verification (one graph input, batch as
    in ``prep.input_shapes``, the input's dtype), or None (random inputs) without data."""
    from onnxprune.inputs import graph_inputs

    inputs = graph_inputs(prep.original)
    if data is None or len(inputs) != 1 or len(data) == 0:
        return None
    name = inputs[0].name
    shape = tuple(prep.input_shapes[name])
    if tuple(data.x.shape[1:]) != shape[1:]:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
    try:  # read only these; a bad sample among them is skipped (the rest repeated below)
        x = next(iter(data.take(np.arange(min(shape[0], len(data)))).batches(shape[0])))[0]
    except DataError:
        if data.strict:
            raise
        return None  # every one of them bad: random inputs
    if len(x) < shape[0]:  # fewer samples than the batch: repeat them
        x = np.resize(x, shape)
    return {name: np.ascontiguousarray(x, dtype=dtype)}


def _check_options(criterion, options: CompressOptions) -> None:
    """Refuse option combinations that cannot run, before anything is loaded."""
    need = "give --data (a .npz with x [and y], a .npy, or a folder of images)"
    if criterion.requires_data and options.data is None:
        raise OnnxPruneError(f"criterion {options.criterion} needs calibration data: {need}")
    if (options.recalibrate_bn or options.finetune is not None) and options.data is None:
        raise OnnxPruneError(f"--recalibrate-bn and --finetune-epochs need calibration data: {need}")
    if options.max_drop is not None:
        if options.data is None:
            raise OnnxPruneError(f"--max-drop needs held-out data to measure the drop: {need}")
        if not (np.isfinite(options.max_drop) and options.max_drop >= 0):
            raise OnnxPruneError(f"--max-drop must be a number of points >= 0, got {options.max_drop}")
        if options.val_split == 0 and options.val_data is None:
            raise OnnxPruneError("--max-drop needs a held-out set: --val-split > 0 or --val-data")
    if options.target is None and options.max_drop is None:
        raise OnnxPruneError("give a target (--target-macs, --target-params, --ratio, --target-latency) "
                             "or --max-drop")
    if not (options.steps == "auto" or (isinstance(options.steps, int) and options.steps >= 1)):
        raise OnnxPruneError(f"--steps must be 'auto' or an integer >= 1, got {options.steps!r}")
    if not 0.0 <= float(options.val_split) < 1.0:
        raise OnnxPruneError(f"--val-split must lie in [0, 1), got {options.val_split}")


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

