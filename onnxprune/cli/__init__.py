"""Command line (a thin click wrapper over the public API), one module per command group:
:mod:`.compress`, :mod:`.analyze`, :mod:`.bench`, :mod:`.recover` (eval, finetune), and the
options they share (:mod:`.options`).

Every user error (:class:`~onnxprune.errors.OnnxPruneError`) prints one line,
``error: <message>``, on stderr and exits with code 2, like click's own usage errors.
"""

from __future__ import annotations

import click

from onnxprune.cli.analyze import analyze
from onnxprune.cli.bench import bench
from onnxprune.cli.compress import compress
from onnxprune.cli.recover import eval_command, finetune_command


@click.group()
@click.version_option(package_name="onnxprune")
def main() -> None:
    """onnxprune: remove the weakest channels of a CNN stored as ONNX."""


for _cmd in (compress, analyze, bench, eval_command, finetune_command):
    main.add_command(_cmd)

__all__ = ["main"]
