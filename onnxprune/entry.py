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


def main() -> None:
    """Run the command line (``onnxprune ...`` and ``python -m onnxprune ...``)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        from onnxprune.cli import main as cli

        cli(prog_name="onnxprune")
    except KeyboardInterrupt:
        _interrupted()
