"""Command line (a thin click wrapper over the public API), one module per command group:
:mod:`.compress`, :mod:`.analyze`, :mod:`.bench`, :mod:`.recover` (eval, finetune), and the
options they share (:mod:`.options`).

Every error prints one line on stderr, ``error: <message>``:

- a user error (:class:`~onnxprune.errors.OnnxPruneError`) and a usage error found by
  click (an unknown option, a missing argument, a value click cannot convert) exit with
  code 2; usage errors end with where to find help (``see 'onnxprune compress --help'``)
  instead of click's three-line ``Usage: / Try / Error:`` block;
- Ctrl-C (SIGINT) and SIGTERM exit with code 130 and leave no output behind
  (:mod:`onnxprune.safety`; the signal handlers are installed by
  :func:`onnxprune.entry.main`, before any heavy import).
"""

from __future__ import annotations

import sys

import click

from onnxprune.cli.analyze import analyze
from onnxprune.cli.bench import bench
from onnxprune.cli.compress import compress
from onnxprune.cli.processes import ARGV_KEY
from onnxprune.cli.recover import eval_command, finetune_command

#: exit status of a run stopped by Ctrl-C or SIGTERM
EXIT_INTERRUPTED = 130


class OneLineGroup(click.Group):
    """A click group whose errors are one ``error: ...`` line (see the module docstring).

    The command line's arguments are kept in ``ctx.meta`` (``--nproc`` re-launches them,
    :mod:`onnxprune.cli.processes`).
    """

    def make_context(self, info_name, args, parent=None, **extra):
        """click's context, with a copy of ``args`` in ``meta`` before click consumes them."""
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta.setdefault(ARGV_KEY, argv)
        return ctx

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Run the command line; with ``standalone_mode`` (the default) exit with its status."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # click's wrapping of KeyboardInterrupt / EOF
            click.echo("error: interrupted; nothing written", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as e:
            msg = " ".join(e.format_message().split())
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                msg += f" (see '{ctx.command_path} --help')"
            click.echo(f"error: {msg}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup)
@click.version_option(package_name="onnxprune")
def main() -> None:
    """onnxprune: remove the weakest channels of a CNN stored as ONNX."""
    from onnxprune.cachedir import point_torch_caches_here

    point_torch_caches_here()  # torch's compiler cache in onnxprune's cache folder, not $TMPDIR


for _cmd in (compress, analyze, bench, eval_command, finetune_command):
    main.add_command(_cmd)

__all__ = ["EXIT_INTERRUPTED", "OneLineGroup", "main"]
