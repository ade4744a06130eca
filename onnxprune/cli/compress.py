"""``onnxprune compress``: prune a model and write it, with a report (a thin wrapper over
:func:`onnxprune.pipeline.compress`)."""

from __future__ import annotations

import click
from rich.console import Console

from onnxprune.cli.options import (data_options, finetune_from, finetune_options, input_shape_option, input_shapes,
                                   load_data, user_errors)
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
@click.option("--criterion", default="l1", show_default=True,
              type=click.Choice(["l1", "l2", "bn", "cpmc", "random", "taylor", "infcp", "ifso"]),
              help="Channel importance criterion (taylor, infcp, ifso need --data).")
@click.option("--ratio", type=float, default=None, help="Fraction of prunable channels to remove.")
@click.option("--target-macs", type=float, default=None, help="Fraction of MACs to keep (default 0.7).")
@click.option("--target-params", type=float, default=None, help="Fraction of params to keep.")
@click.option("--target-latency", type=float, default=None,
              help="Fraction of the original's measured latency to reach (profiled, planned, measured).")
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime provider for latency: cpu, cuda, tensorrt (or a full provider name).")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Rank channels across the network or prune every group by the same fraction.")
@click.option("--round-to", default="1", show_default=True,
              help="Kept channel counts are multiples of N; 'auto' measures a channel sweep to choose N.")
@click.option("--max-layer-ratio", type=float, default=1.0, show_default=True,
              help="At most this fraction of any group's channels is removed.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="fnmatch pattern of node names never pruned.")
@input_shape_option
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the report as JSON.")
@click.option("--plan-out", type=click.Path(), default=None, help="Write the pruning plan as JSON.")
@click.option("--no-bench", is_flag=True, help="Skip the onnxruntime latency measurement.")
@click.option("--bench-repeat", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs per model.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads for the benchmark.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--cpmc-a", type=float, default=0.5, show_default=True, help="cpmc: exponent of the MACs term.")
@click.option("--cpmc-b", type=float, default=0.5, show_default=True, help="cpmc: exponent of the params term.")
@click.option("--strict-target", is_flag=True, help="Fail when the target is out of reach.")
@data_options
@click.option("--recalibrate-bn", is_flag=True,
              help="After pruning (needs --data): bias compensation of removed channels, BN statistics re-estimated.")
@finetune_options("finetune-", epochs_default=0)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration batch size.")
@click.option("--device", default="auto", show_default=True, help="Torch side: auto, cpu, cuda or cuda:N.")
@click.option("--loss", type=click.Choice(["auto", "ce", "kl", "mse"]), default="auto", show_default=True,
              help="Loss of data-driven criteria: auto = ce with labels, else kl (classifiers) or mse "
                   "(other outputs) to the original model.")
@click.option("--ensemble", type=int, default=4, show_default=True,
              help="infcp: ensemble members (copies fine-tuned on disjoint shards of the data).")
@click.option("-v", "--verbose", is_flag=True, help="Show every group in the report.")
@user_errors
def compress(model, output, criterion, ratio, target_macs, target_params, scope, round_to, max_layer_ratio,
             exclude, input_shape, report_path, plan_out, no_bench, bench_repeat, threads, seed, cpmc_a, cpmc_b,
             strict_target, data_path, image_size, mean, std, scale, channel_order, grayscale, samples,
             batch_size, device, loss, verbose, target_latency, provider, ensemble, recalibrate_bn, **finetune):
    """Prune MODEL and write a smaller ONNX model, with a report."""
    from onnxprune.io import check_side_output, default_output_path
    from onnxprune.pipeline import CompressOptions, compress as run

    out_model = output if output is not None else default_output_path(model)
    if report_path:
        check_side_output(report_path, models=[model, out_model, plan_out])
    if plan_out:
        check_side_output(plan_out, models=[model, out_model])

    from onnxprune.cli.bench import checked_provider, parse_round_to

    given = [(k, v) for k, v in ((TargetKind.RATIO, ratio), (TargetKind.MACS, target_macs),
                                  (TargetKind.PARAMS, target_params), (TargetKind.LATENCY, target_latency))
             if v is not None]
    if len(given) > 1:
        raise OnnxPruneError("give only one of --ratio, --target-macs, --target-params, --target-latency")
    target = Target(*given[0]) if given else Target(TargetKind.MACS, 0.7)
    data = load_data(data_path, image_size, mean, std, scale, channel_order, grayscale)
    ft = None
    if finetune["finetune_epochs"]:
        ft = finetune_from(finetune, "finetune-", batch_size=batch_size, loss=loss, device=device, seed=seed,
                           progress=True)
    opts = CompressOptions(
        criterion=criterion, target=target,
        plan=PlanOptions(Scope(scope), parse_round_to(round_to), max_layer_ratio, 1, tuple(exclude)),
        input_shapes=input_shapes(input_shape), seed=seed,
        criterion_args=_criterion_args(criterion, cpmc_a, cpmc_b, loss, ensemble),
        strict_target=strict_target, bench=not no_bench, bench_repeat=bench_repeat, threads=threads,
        recalibrate_bn=recalibrate_bn, finetune=ft,
        data=data, samples=samples, batch_size=batch_size, device=device, provider=checked_provider(provider))
    res = run(model, output, opts)
    res.report.render(Console(), verbose=verbose)
    if report_path:
        res.report.write_json(report_path)
    if plan_out:
        from onnxprune.io import write_text_atomic

        write_text_atomic(plan_out, res.plan.to_json())
