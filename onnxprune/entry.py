"""The ``onnxprune`` program's first lines: signal handling before any heavy import.

:func:`main` installs a SIGTERM handler that raises KeyboardInterrupt (so SIGTERM and
Ctrl-C take the same path: outputs staged so far are removed, see
:func:`onnxprune.safety.staged_outputs`), then imports and runs the click command line.
An interruption at any point, start-up imports included, prints one line
``error: interrupted; nothing written`` and exits with code 130. This module imports the
standard library only.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupted() -> None:
    # a second signal while exiting must not print a traceback either
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        sys.stderr.write("error: interrupted; nothing written\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_INTERRUPTED)


#: spins of an idle OpenMP thread (GNU libgomp, torch's CPU runtime) before it sleeps
GOMP_SPINCOUNT = "10000"


def tune_openmp(env: dict | None = None) -> bool:
    """Bound how long torch's idle OpenMP threads spin (``GOMP_SPINCOUNT``), unless the user
    set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``; whether it was set. Must run before torch
    is imported (libgomp reads its environment once).

    Why: libgomp's threads spin at every barrier (a few hundred thousand spins by default);
    on a machine whose cores are busy with other work they burn the time slices the other
    thread needs. Measured on the 2-core CI machine, quickstart (`compress
    models/mnist_cnn.onnx --data ...`), time of the steps: idle 2.3-3.7 s by default and
    2.3-4.6 s with 10000 spins; with two CPU-bound processes beside it 39-61 s by default
    and 6-16 s with 10000 spins (``OMP_WAIT_POLICY=PASSIVE``: 3.4-5.6 s idle, 8-11 s
    loaded). GNU libgomp documents the variable; other OpenMP runtimes ignore it.
    """
    env = os.environ if env is None else env
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return False
    env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    return True


def main() -> None:
    """Run the command line (``onnxprune ...`` and ``python -m onnxprune ...``)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    if "torch" not in sys.modules:
        tune_openmp()
    try:
        from onnxprune.cli import main as cli

        cli(prog_name="onnxprune")
    except KeyboardInterrupt:
        _interrupted()
