"""Click options shared by several commands (compress, eval, finetune).

Kept apart from :mod:`onnxprune.cli` so that command modules (:mod:`onnxprune.cli.bench`,
:mod:`onnxprune.cli.recover`) and ``cli.py`` all import them without an import cycle.

- :func:`user_errors`: an OnnxPruneError becomes ``error: <message>`` on stderr, exit 2.
- :data:`input_shape_option` / :func:`input_shapes`: ``--input-shape NAME:D0,D1,...``.

- :func:`data_options`: ``--data``, the image preprocessing options
  (``--image-size --mean --std --scale --channel-order --grayscale``), the reading options
  (``--workers --strict-data``) and ``--samples`` (``--score-samples`` for compress);
  :func:`load_data` turns their values into :class:`~onnxprune.data.CalibrationData`.
- :func:`finetune_options`: the fine-tuning options, with a name prefix
  (``--epochs`` for ``finetune``, ``--finetune-epochs`` for ``compress``);
  :func:`finetune_from` builds :class:`~onnxprune.recover.training.FinetuneOptions`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping

import click

from onnxprune.errors import InputShapeError, OnnxPruneError
from onnxprune.inputs import parse_input_shape


def user_errors(fn: Callable) -> Callable:
    """Wrap a command body (and add ``--max-memory`` to the command).

    - an OnnxPruneError prints ``error: <message>`` and exits with 2;
    - every output the body writes is staged and moved into place only when the body
      succeeds (:func:`onnxprune.safety.staged_outputs`): a failed or interrupted run
      leaves nothing behind;
    - allocations from declared or user-given sizes are checked against ``--max-memory``;
    - numpy and library warnings are not shown (:func:`onnxprune.safety.quiet_libraries`).
    """
    @functools.wraps(fn)
    def wrapper(*args, max_memory: str | None = None, **kwargs):
        from onnxprune.safety import DEFAULT_MAX_MEMORY, memory_budget, parse_size, quiet_libraries, staged_outputs

        try:
            budget = DEFAULT_MAX_MEMORY if max_memory is None else parse_size(max_memory)
            with quiet_libraries(), memory_budget(budget), staged_outputs():
                return fn(*args, **kwargs)
        except OnnxPruneError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except MemoryError:  # an allocation the budget could not foresee (e.g. inside onnxruntime)
            click.echo("error: out of memory; give smaller input shapes, fewer samples or a smaller "
                       "--batch-size", err=True)
            sys.exit(2)

    return max_memory_option(wrapper)


max_memory_option = click.option(
    "--max-memory", "max_memory", default=None, metavar="SIZE",
    help="Memory budget for arrays allocated from the model's declared sizes or the options (e.g. 4G; "
         "default: half the RAM, at most 16G).")


def input_shapes(specs: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """``{input name: dims}`` from repeated ``--input-shape`` values (None when none given).

    Raises:
        InputShapeError: a malformed spec, or one input named twice.
    """
    out: dict[str, tuple[int, ...]] = {}
    for s in specs:
        name, dims = parse_input_shape(s)
        if name in out:
            raise InputShapeError(f"--input-shape names input {name!r} twice")
        out[name] = dims
    return out or None


input_shape_option = click.option(
    "--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...",
    help="Concrete shape of a graph input (repeatable). Symbolic dims default to 1 for the batch and 224 elsewhere.")

_DATA_OPTIONS = (
    click.option("--data", "data_path", type=click.Path(), default=None,
                 help="Calibration data: .npz (x [, y]; read into memory), .npy (memory-mapped), a folder of images "
                      "(sub-folders = classes; recursive), a list file of image paths [+ labels] (.txt/.lst/.list), "
                      "or a folder or glob of .npz/.npy shards. All but .npz are read lazily, batch by batch."),
    click.option("--image-size", default=None, metavar="H,W", help="Images: resize to H,W."),
    click.option("--mean", default="0", show_default=True, metavar="M[,M,M]", help="Images: per-channel mean."),
    click.option("--std", default="1", show_default=True, metavar="S[,S,S]", help="Images: per-channel std."),
    click.option("--scale", type=float, default=1 / 255, show_default=True, help="Images: pixel scale."),
    click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True),
    click.option("--grayscale", is_flag=True, help="Images: one channel."),
    click.option("--workers", default="auto", show_default=True, metavar="N|auto",
                 help="DataLoader worker processes that decode and preprocess --data (auto: 0 for .npz, else half "
                      "the CPUs, 1 to 4)."),
    click.option("--strict-data", is_flag=True,
                 help="A bad sample (unreadable image, NaN row) is an error naming the file (default: skipped, "
                      "counted and reported)."),
)

_SAMPLES = click.option("--samples", type=int, default=None, help="Use at most N samples (seeded draw).")
_SCORE_SAMPLES = click.option(
    "--score-samples", "--samples", "samples", type=int, default=None,
    help="Score channels on at most K samples drawn (seeded) from the training part of --data; only those are "
         "read (--samples is an alias).")


def data_options(fn: Callable | None = None, *, scoring: bool = False) -> Callable:
    """Decorator adding ``--data --image-size --mean --std --scale --channel-order --grayscale
    --workers --strict-data`` and ``--samples`` (``scoring=True``: ``--score-samples`` with
    the alias ``--samples``); parameters ``data_path, image_size, mean, std, scale,
    channel_order, grayscale, workers, strict_data, samples``. Use as ``@data_options`` or
    ``@data_options(scoring=True)``."""
    def deco(f: Callable) -> Callable:
        for opt in reversed(_DATA_OPTIONS + (_SCORE_SAMPLES if scoring else _SAMPLES,)):
            f = opt(f)
        return f

    return deco if fn is None else deco(fn)


def int_or_auto(value: str | int | None, option: str, *, minimum: int) -> int | str:
    """``auto`` (any case; None too) or an integer >= ``minimum``.

    Raises:
        OnnxPruneError: anything else, naming ``option``.
    """
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(str(value).strip())
    except ValueError:
        raise OnnxPruneError(f"{option} must be 'auto' or an integer >= {minimum}, got {value!r}") from None
    if n < minimum:
        raise OnnxPruneError(f"{option} must be 'auto' or an integer >= {minimum}, got {n}")
    return n


def workers_value(text: str | int | None) -> int | None:
    """``--workers``: None for ``auto``, else an integer >= 0 (see :func:`int_or_auto`)."""
    n = int_or_auto(text, "--workers", minimum=0)
    return None if n == "auto" else n


def floats(text: str | None, option: str, kind=float) -> tuple | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); None stays None.

    Raises:
        OnnxPruneError: a value that is not a number, naming ``option``.
    """
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise OnnxPruneError(f"{option} {text!r}: expected comma-separated numbers") from None


def load_data(data_path, image_size, mean, std, scale, channel_order, grayscale, workers="auto",
              strict_data=False, **_ignored):
    """The :class:`~onnxprune.data.CalibrationData` the :func:`data_options` values name
    (None when ``--data`` was not given).

    Raises:
        DataError: see :func:`onnxprune.data.load_calibration`; OnnxPruneError: a
        malformed ``--image-size`` / ``--mean`` / ``--std``.
    """
    if data_path is None:
        return None
    from onnxprune.data import load_calibration

    size = floats(image_size, "--image-size", int)
    if size is not None and len(size) != 2:
        raise OnnxPruneError(f"--image-size {image_size!r}: expected H,W")
    if size is not None and min(size) < 1:
        raise OnnxPruneError(f"--image-size {image_size!r}: both sizes must be positive")
    return load_calibration(data_path, image_size=size, mean=floats(mean, "--mean"), std=floats(std, "--std"),
                            scale=scale, channel_order=channel_order, grayscale=grayscale,
                            workers=workers_value(workers), strict=bool(strict_data))


_FT_FIELDS = ("epochs", "optimizer", "lr", "schedule", "weight_decay", "temperature", "warmup", "augment")


def finetune_options(prefix: str = "", *, epochs_default: int | str = 1,
                     lr_default: float = 1e-4) -> Callable[[Callable], Callable]:
    """Decorator factory adding the fine-tuning options named ``--{prefix}epochs``,
    ``--{prefix}optimizer``, ``--{prefix}lr``, ``--{prefix}schedule``,
    ``--{prefix}weight-decay``, ``--{prefix}temperature``, ``--{prefix}warmup``,
    ``--{prefix}augment`` (parameters with ``-`` as ``_``). ``epochs_default="auto"``
    makes the epochs option a string (``auto`` or an integer)."""
    p = prefix
    pu = prefix.replace("-", "_")
    opts = (
        click.option(f"--{p}epochs", f"{pu}epochs", type=str if epochs_default == "auto" else int,
                     default=epochs_default, show_default=True,
                     help="Fine-tuning epochs over the calibration data" + (
                         " per step (0: none; auto: about 4096 samples per step, with --data)." if p else ".")),
        click.option(f"--{p}optimizer", f"{pu}optimizer", type=click.Choice(["adam", "adamw", "sgd"]),
                     default="adam", show_default=True, help="Fine-tuning optimizer (sgd: momentum 0.9)."),
        click.option(f"--{p}lr", f"{pu}lr", type=float, default=lr_default, show_default=True,
                     help="Fine-tuning peak learning rate."),
        click.option(f"--{p}schedule", f"{pu}schedule", type=click.Choice(["cosine", "constant"]),
                     default="cosine", show_default=True, help="Learning-rate schedule over all steps."),
        click.option(f"--{p}weight-decay", f"{pu}weight_decay", type=float, default=0.0, show_default=True,
                     help="Fine-tuning weight decay."),
        click.option(f"--{p}temperature", f"{pu}temperature", type=float, default=1.0, show_default=True,
                     help="Softmax temperature of KL distillation (loss scaled by T^2)."),
        click.option(f"--{p}warmup", f"{pu}warmup", type=float, default=0.05, show_default=True,
                     help="Fraction of the fine-tuning steps with a linear learning-rate warm-up."),
        click.option(f"--{p}augment", f"{pu}augment", default="auto", show_default=True,
                     help="Consistent augmentation of distillation (teacher and student see the same view): "
                          "auto, none, or a list of shift,crop,flip,noise,mixup,cutmix."),
    )

    def deco(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def finetune_from(values: Mapping, prefix: str = "", **common):
    """:class:`~onnxprune.recover.training.FinetuneOptions` from the :func:`finetune_options`
    parameters in ``values`` (``prefix`` as given there) and ``common`` (batch_size, loss,
    device, seed, progress).

    Raises:
        OnnxPruneError: an option out of range (named as on the command line).
    """
    from onnxprune.recover.training import FinetuneOptions

    pu = prefix.replace("-", "_")
    kw = {f: values[f"{pu}{f}"] for f in _FT_FIELDS}
    kw["augment"] = tuple(a.strip() for a in str(kw["augment"]).split(",") if a.strip())
    try:
        return FinetuneOptions(**kw, **common)
    except OnnxPruneError as e:
        msg = str(e)
        name = msg.split(" ", 1)[0]
        if prefix and name in {f"--{f.replace('_', '-')}" for f in _FT_FIELDS}:
            msg = f"--{prefix}{name[2:]}" + msg[len(name):]
        raise OnnxPruneError(msg) from None
