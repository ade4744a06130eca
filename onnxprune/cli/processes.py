"""``--nproc N`` and torchrun for the data-driven commands (``compress``, ``finetune``).

:func:`multi_process` wraps a command body:

- ``--nproc N`` (N > 1) re-launches the same command line, without ``--nproc``, in N
  local processes through torch's launcher (:func:`onnxprune.distributed.relaunch`,
  i.e. ``python -m torch.distributed.run --standalone --nproc-per-node N -m onnxprune ...``)
  and waits; it exits non-zero when any of them failed. Under torchrun it is an error
  (torchrun already says how many processes run).
- Under torchrun (``torchrun --nproc-per-node N -m onnxprune compress ...``) the body runs
  inside :func:`onnxprune.distributed.session`: the process group exists for the whole
  command (NCCL with ``--device cuda``/``auto`` on a GPU machine, gloo on the CPU) and
  is destroyed at the end, on errors too. A user error on one rank is printed as
  ``error: rank R of N: ...``.
- Otherwise (one process) the body runs as it is: nothing is initialised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from onnxprune.errors import DistributedError, OnnxPruneError

#: key of the command line's arguments in ``click.Context.meta`` (set by the CLI group)
ARGV_KEY = "onnxprune.argv"

nproc_option = click.option(
    "--nproc", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
    help="Run N local processes (data-parallel scoring and recovery, rank 0 writes), launched through "
         "torch.distributed.run; or start the command under torchrun instead.")


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` with every ``--nproc N`` / ``--nproc=N`` removed (what each process runs)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok == "--nproc":
            skip = True
            continue
        if tok.startswith("--nproc="):
            continue
        out.append(tok)
    return out


def multi_process(fn: Callable) -> Callable:
    """Add ``--nproc`` to a command and run its body as the module docstring says.

    The body's ``device`` parameter (``--device``) chooses the backend. Apply below
    :func:`onnxprune.cli.options.user_errors` (so that its errors print as one line).

    Raises (from the wrapped command):
        OnnxPruneError: ``--nproc`` under torchrun, a failed child process, or the body's
            own errors (prefixed with the rank in a multi-process run).
    """
    @functools.wraps(fn)
    def wrapper(*args, nproc: int = 1, **kwargs):
        from onnxprune.distributed import launched_by_torchrun, relaunch, session

        if nproc > 1:
            if launched_by_torchrun():
                raise OnnxPruneError("--nproc starts its own processes; under torchrun give the process count "
                                     "to torchrun (--nproc-per-node) only")
            argv = click.get_current_context().meta.get(ARGV_KEY)
            if argv is None:
                raise OnnxPruneError("--nproc needs the command line's arguments (run through onnxprune's CLI)")
            relaunch(nproc, without_nproc(list(argv)))
            return None
        with session(kwargs.get("device", "auto")) as ctx:
            if ctx.world == 1:
                return fn(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            except DistributedError:
                raise  # names its rank already
            except OnnxPruneError as e:
                raise OnnxPruneError(f"rank {ctx.rank} of {ctx.world}: {e}") from None

    return nproc_option(wrapper)


__all__ = ["ARGV_KEY", "multi_process", "nproc_option", "without_nproc"]
