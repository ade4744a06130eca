"""Command line: ``onnxprune eval`` and ``onnxprune finetune`` (added to ``onnxprune.cli.main`` there).

Errors follow :mod:`onnxprune.cli`: one line ``error: ...`` on stderr, exit code 2, no file
written. A Ctrl-C during fine-tuning prints ``error: fine-tuning interrupted; nothing
written`` and exits with 130; the output model only ever appears complete (written
atomically after training and verification).

``finetune`` runs data-parallel under torchrun or with ``--nproc N``
(:mod:`onnxprune.cli.processes`): BN re-calibration and training are shared by the
processes, rank 0 alone verifies, prints and writes, after the run's last collective.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from onnxprune.batching import declared_input_shape
from onnxprune.cli.processes import multi_process
from onnxprune.cli.options import (data_options, finetune_from, finetune_options, input_shape_option, input_shapes,
                                   load_data, user_errors)
from onnxprune.errors import OnnxPruneError

_NEEDS_DATA = "a .npz with x [and y], a .npy, a folder of images, a list file, or .npz/.npy shards"


def _warn_bad(data) -> None:
    """The bad-sample summary of ``data`` on stderr, when samples were skipped."""
    from onnxprune.data import data_warnings
    from onnxprune.data.loader import warn

    for line in data_warnings(data):
        warn(line)


@click.command("eval")
@click.argument("model", type=click.Path(dir_okay=True))
@data_options
@click.option("--reference", type=click.Path(), default=None,
              help="Compare with this model (e.g. the original): prediction agreement and output fidelity.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the results as JSON.")
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Samples per onnxruntime run (a model with a fixed batch dim runs that batch).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the --samples draw.")
@user_errors
def eval_command(model, data_path, image_size, mean, std, scale, channel_order, grayscale, workers, strict_data,
                 samples, reference, report_path, batch_size, seed):
    """Top-1 accuracy of MODEL on --data (with labels) and its fidelity to --reference, in onnxruntime."""
    from onnxprune.distributed import launched_by_torchrun

    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        return  # onnxruntime evaluation is one process's job: under torchrun rank 0 prints and writes
    from onnxprune.evaluate import evaluate
    from onnxprune.io import check_side_output, load_model, write_text_atomic
    from onnxprune.recover.training import check_teacher

    if data_path is None:
        raise OnnxPruneError(f"eval needs --data ({_NEEDS_DATA})")
    if report_path:
        check_side_output(report_path, models=[model, reference])
    m = load_model(model)
    r = load_model(reference) if reference is not None else None
    if r is not None:
        check_teacher(m, r, student_label=str(model), teacher_label=f"--reference {reference}")
    data = load_data(data_path, image_size, mean, std, scale, channel_order, grayscale, workers,
                     strict_data).subset(samples, seed)
    data.check(declared_input_shape(m))
    res = evaluate(m, data, reference=r, batch_size=batch_size, model_label=str(model),
                   reference_label=None if reference is None else str(reference))
    res.render(Console())
    _warn_bad(data)
    if report_path:
        info = res.to_dict()
        from onnxprune.data import data_warnings

        info["data_warnings"] = data_warnings(data)
        write_text_atomic(report_path, json.dumps(info, indent=2, allow_nan=False) + "\n")


@click.command("finetune")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--teacher", type=click.Path(), default=None,
              help="The original (unpruned) model: distillation target; required when --data has no labels.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output model (default: <name>.finetuned.onnx beside the input).")
@data_options
@finetune_options()
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per step.")
@click.option("--loss", type=click.Choice(["auto", "ce", "kl", "mse"]), default="auto", show_default=True,
              help="auto = ce with labels, else kl (classifiers) or mse (other outputs) to the teacher.")
@click.option("--recalibrate-bn", is_flag=True, help="Re-estimate BatchNormalization statistics before training.")
@click.option("--device", default="auto", show_default=True, help="Torch side: auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the batch order and --samples draw.")
@input_shape_option
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the results as JSON.")
@user_errors
@multi_process
def finetune_command(model, teacher, output, data_path, image_size, mean, std, scale, channel_order, grayscale,
                     workers, strict_data, samples, batch_size, loss, recalibrate_bn, device, seed, input_shape, report_path, **ft):
    """Fine-tune the weights of MODEL (a pruned model) on --data and write them back into ONNX."""
    from onnxprune.canonicalize import canonicalize
    from onnxprune.distributed import current
    from onnxprune.executor.device import resolve_device
    from onnxprune.inputs import resolve_input_shapes
    from onnxprune.io import check_model_output, check_side_output, load_model, save_model, write_text_atomic
    from onnxprune.recover import check_teacher, finetune, recalibrate_bn as recal
    from onnxprune.runtime.verify import verify

    if data_path is None:
        raise OnnxPruneError(f"finetune needs --data ({_NEEDS_DATA})")
    out = Path(output) if output is not None else Path(model).with_name(f"{Path(model).stem}.finetuned.onnx")
    check_model_output(out, [model, teacher])
    if report_path:
        check_side_output(report_path, models=[model, teacher, out])
    options = finetune_from(ft, batch_size=batch_size, loss=loss, device=device, seed=seed, progress=True)
    original = load_model(model)
    student = canonicalize(original).model
    tmodel = None
    if teacher is not None:
        tmodel = load_model(teacher)
        check_teacher(original, tmodel, student_label=str(model), teacher_label=f"--teacher {teacher}")
        tmodel = canonicalize(tmodel).model
    data = load_data(data_path, image_size, mean, std, scale, channel_order, grayscale, workers,
                     strict_data).subset(samples, seed)
    data.check(declared_input_shape(student))
    shapes = resolve_input_shapes(student, input_shapes(input_shape))
    try:
        info = {}
        if recalibrate_bn:
            bn = recal(student, data, batch_size=batch_size, device=resolve_device(device))
            student = bn.model
            info["bn_recalibration"] = bn.to_dict()
        res = finetune(student, data, teacher=tmodel, options=options)
    except KeyboardInterrupt:
        click.echo("error: fine-tuning interrupted; nothing written", err=True)
        sys.exit(130)
    ctx = current()
    if not ctx.is_main:  # rank 0 verifies and writes after the last collective
        ctx.barrier()
        return
    check = verify(res.model, tmodel if tmodel is not None else original, shapes, seed=seed)
    ctx.barrier()  # every rank finished: nothing failed
    written = save_model(res.model, out, input_path=model)
    console = Console()
    t = Table(title=f"Fine-tuned {model} -> {written}", title_justify="left")
    for col in ("loss", "before", "after", "steps", "trained tensors", "device", "seconds"):
        t.add_column(col, justify="right" if col != "loss" else "left")
    t.add_row(res.loss, f"{res.loss_before:.4g}", f"{res.loss_after:.4g}", str(res.steps), str(len(res.trained)),
              res.device, f"{res.seconds:.1f}")
    console.print(t)
    if "bn_recalibration" in info:
        console.print(f"{info['bn_recalibration']['nodes']} BatchNormalization node(s) re-calibrated", highlight=False)
    ref_label = "teacher" if tmodel is not None else "model before fine-tuning"
    for name, f in check.fidelity.items():
        agree = "" if f.top1_agreement is None else f", top-1 agreement {f.top1_agreement:.1%}"
        console.print(f"output {name}: cosine {f.cosine:.4f} to the {ref_label} on random inputs{agree}",
                      highlight=False)
    _warn_bad(data)
    if report_path:
        from onnxprune.data import data_warnings

        info.update(finetune=res.to_dict(), output=str(written), verify=check.to_dict(),
                    data_warnings=data_warnings(data))
        from onnxprune.report import _jsonable

        write_text_atomic(report_path, json.dumps(_jsonable(info), indent=2, allow_nan=False) + "\n")
