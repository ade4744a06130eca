"""``onnxprune compress``: prune a model and write it, with a report (a thin wrapper over
:func:`onnxprune.pipeline.compress`).

Under torchrun or with ``--nproc N`` (:mod:`onnxprune.cli.processes`) every process runs
the pipeline, rank 0 alone prints the report and writes the model, report, plan and plot.
"""

from __future__ import annotations

import click
from rich.console import Console

from onnxprune.cli.processes import multi_process
from onnxprune.cli.options import (data_options, finetune_from, finetune_options, input_shape_option, input_shapes,
                                   int_or_auto, load_data, user_errors)
from onnxprune.errors import OnnxPruneError
from onnxprune.planning import PlanOptions, Scope, Target, TargetKind


def _criterion_args(criterion: str, cpmc_a: float, cpmc_b: float, loss: str, ensemble: int = 4) -> dict:
    """Keyword arguments of the criterion from the options that concern it."""
    if criterion == "cpmc":
        return {"a": cpmc_a, "b": cpmc_b}
    if criterion == "infcp":
        return {"loss": loss, "members": ensemble}
    if criterion in ("taylor", "infcp", "ifso"):
        return {"loss": loss}
    return {}


@click.command("compress")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output model (default: <name>.pruned.onnx beside the input).")
@click.option("--criterion", default=None,
              type=click.Choice(["l1", "l2", "bn", "cpmc", "random", "taylor", "infcp", "ifso"]),
              help="Channel importance criterion (taylor, infcp, ifso need --data). Default: taylor with --data (measured best with recovery), "
                   "l1 without.")
@click.option("--ratio", type=float, default=None, help="Fraction of prunable channels to remove.")
@click.option("--target-macs", type=float, default=None, help="Fraction of MACs to keep (default 0.7).")
@click.option("--target-params", type=float, default=None, help="Fraction of params to keep.")
@click.option("--target-latency", type=float, default=None,
              help="Fraction of the original's measured latency to reach (profiled, planned, measured).")
@click.option("--max-drop", type=float, default=None, metavar="PTS",
              help="Accuracy guard (needs --data): the held-out figure drops at most PTS points; alone, compress "
                   "as far as that allows.")
@click.option("--steps", default="auto", show_default=True,
              help="Progressive steps toward the target (1 = one-shot); auto: 1 without --data, else one per "
                   "15% removed.")
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime provider for latency: cpu, cuda, tensorrt (or a full provider name).")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Rank channels across the network or prune every group by the same fraction.")
@click.option("--round-to", default=None,
              help="Kept channel counts are multiples of N. Default: auto (a channel sweep, cached per model, "
                   "provider and CPU) and never slower: a cut that is not faster is re-planned coarser (1 with "
                   "--no-bench). An explicit N is used as given.")
@click.option("--max-layer-ratio", type=float, default=1.0, show_default=True,
              help="At most this fraction of any group's channels is removed.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="fnmatch pattern of node names never pruned.")
@input_shape_option
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the report as JSON.")
@click.option("--plan-out", type=click.Path(), default=None, help="Write the pruning plan as JSON.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Draw the trade-off curve (held-out figure vs latency and MACs, one point per step) as PNG.")
@click.option("--no-bench", is_flag=True, help="Skip the onnxruntime latency measurement.")
@click.option("--bench-repeat", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs per model.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads for the benchmark.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--cpmc-a", type=float, default=0.5, show_default=True, help="cpmc: exponent of the MACs term.")
@click.option("--cpmc-b", type=float, default=0.5, show_default=True, help="cpmc: exponent of the params term.")
@click.option("--strict-target", is_flag=True, help="Fail when the target is out of reach.")
@data_options(scoring=True)
@click.option("--train-samples", type=int, default=None,
              help="Recovery uses at most N training samples (default: all; --score-samples bounds scoring).")
@click.option("--val-split", type=float, default=0.1, show_default=True,
              help="Share of --data held out for validation, split before anything else (0: none).")
@click.option("--val-data", "val_path", type=click.Path(), default=None,
              help="A held-out set of its own (same format and preprocessing as --data).")
@click.option("--recover/--no-recover", "recover_flag", default=None,
              help="Recovery after every cut (default with --data): bias compensation, BN re-calibration and "
                   "distillation from the original.")
@click.option("--recalibrate-bn/--no-recalibrate-bn", default=None,
              help="Bias compensation of removed channels and BN statistics re-estimated (default: with recovery).")
@finetune_options("finetune-", epochs_default="auto", lr_default=1e-3)
@click.option("--finetune-loss", type=click.Choice(["distill", "auto", "ce", "kl", "mse"]), default="distill",
              show_default=True, help="Recovery loss: distill = KL (classifiers) or MSE to the original's outputs.")
@click.option("--patience", type=int, default=2, show_default=True,
              help="Recovery stops after N epochs without a better held-out figure.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration batch size.")
@click.option("--device", default="auto", show_default=True, help="Torch side: auto, cpu, cuda or cuda:N.")
@click.option("--loss", type=click.Choice(["auto", "ce", "kl", "mse"]), default="auto", show_default=True,
              help="Loss of data-driven criteria: auto = ce with labels on a classifier, else kl (classifiers) or mse "
                   "(other outputs) to the original model.")
@click.option("--ensemble", type=int, default=4, show_default=True,
              help="infcp: ensemble members (copies fine-tuned on disjoint shards of the data).")
@click.option("-v", "--verbose", is_flag=True, help="Show every group in the report.")
@user_errors
@multi_process
def compress(model, output, criterion, ratio, target_macs, target_params, scope, round_to, max_layer_ratio,
             exclude, input_shape, report_path, plan_out, plot_path, no_bench, bench_repeat, threads, seed, cpmc_a,
             cpmc_b, strict_target, data_path, image_size, mean, std, scale, channel_order, grayscale, workers,
             strict_data, samples,
             train_samples, val_split, val_path, recover_flag, batch_size, device, loss, verbose, target_latency,
             provider, ensemble, recalibrate_bn, max_drop, steps, finetune_loss, patience, **finetune):
    """Prune MODEL and write a smaller ONNX model, with a report.

    With --data (samples of your domain, labels optional): held-out split, taylor scores,
    progressive steps with recovery, accuracy guard (--max-drop). Without: l1, one step,
    and the report says that no accuracy was measured.
    """
    from onnxprune.io import check_side_output, default_output_path
    from onnxprune.pipeline import CompressOptions, compress as run

    out_model = output if output is not None else default_output_path(model)
    for side in (report_path, plan_out, plot_path):
        if side:
            check_side_output(side, models=[model, out_model] + [p for p in (report_path, plan_out, plot_path)
                                                                 if p and p != side])

    from onnxprune.cli.bench import checked_provider, parse_round_to

    given = [(k, v) for k, v in ((TargetKind.RATIO, ratio), (TargetKind.MACS, target_macs),
                                  (TargetKind.PARAMS, target_params), (TargetKind.LATENCY, target_latency))
             if v is not None]
    if len(given) > 1:
        raise OnnxPruneError("give only one of --ratio, --target-macs, --target-params, --target-latency")
    if given:
        target = Target(*given[0])
    else:
        target = None if max_drop is not None else Target(TargetKind.MACS, 0.7)
    read = dict(workers=workers, strict_data=strict_data)
    data = load_data(data_path, image_size, mean, std, scale, channel_order, grayscale, **read)
    val_data = load_data(val_path, image_size, mean, std, scale, channel_order, grayscale, **read)
    if val_data is not None and data is None:
        raise OnnxPruneError("--val-data needs --data (the training and scoring samples)")
    if criterion is None:
        criterion = "taylor" if data is not None else "l1"  # measured: README "Progressive compression"
    recovering = recover_flag if recover_flag is not None else data is not None
    if recovering and data is None:
        raise OnnxPruneError("--recover needs calibration data: give --data")
    epochs = int_or_auto(finetune["finetune_epochs"], "--finetune-epochs", minimum=0)
    ft = None
    if recovering and epochs != 0:
        values = dict(finetune, finetune_epochs=1 if epochs == "auto" else epochs)
        ft = finetune_from(values, "finetune-", batch_size=batch_size, loss=finetune_loss, device=device, seed=seed,
                           progress=True, patience=patience)
    recal = recalibrate_bn if recalibrate_bn is not None else recovering
    fixed_round_to = round_to is not None
    if round_to is None:  # measured by default; without any measurement, the plain count
        round_to = "1" if no_bench else "auto"
    opts = CompressOptions(
        criterion=criterion, target=target,
        plan=PlanOptions(Scope(scope), parse_round_to(round_to), max_layer_ratio, 1, tuple(exclude)),
        input_shapes=input_shapes(input_shape), seed=seed,
        criterion_args=_criterion_args(criterion, cpmc_a, cpmc_b, loss, ensemble),
        strict_target=strict_target, bench=not no_bench, bench_repeat=bench_repeat, threads=threads,
        recalibrate_bn=bool(recal), finetune=ft, auto_epochs=epochs == "auto",
        data=data, samples=samples, train_samples=train_samples, val_split=val_split, val_data=val_data,
        max_drop=max_drop, steps=int_or_auto(steps, "--steps", minimum=1),
        never_slower=not fixed_round_to and not no_bench,
        batch_size=batch_size, device=device, provider=checked_provider(provider))
    res = run(model, output, opts)
    if res.report is None:  # a rank other than 0 of a multi-process run: rank 0 reports and writes
        return
    res.report.render(Console(), verbose=verbose)
    if report_path:
        res.report.write_json(report_path)
    if plan_out:
        from onnxprune.io import write_text_atomic

        write_text_atomic(plan_out, res.plan.to_json())
    if plot_path:
        from onnxprune.plots import plot_tradeoff

        plot_tradeoff(res.report.to_dict(), plot_path)
