"""``onnxprune bench``: onnxruntime latency and peak memory of models, per provider and batch
size, or a channel sweep (``--channel-sweep``) choosing ``--round-to auto``'s N.

Errors follow :mod:`onnxprune.cli`: one ``error: ...`` line on stderr, exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from onnxprune.cli.options import max_memory_option
from onnxprune.errors import OnnxPruneError
from onnxprune.planning import ROUND_TO_AUTO

__all__ = ["bench", "checked_provider", "parse_batches", "parse_round_to"]


def parse_round_to(text: str | int) -> int | str:
    """``--round-to`` value: a positive integer or ``auto``.

    Raises:
        OnnxPruneError: anything else (the message names the option).
    """
    from onnxprune.cli.options import int_or_auto

    n = int_or_auto(text, "--round-to", minimum=1)
    return ROUND_TO_AUTO if n == "auto" else n


def parse_batches(values: tuple[str, ...]) -> tuple[int, ...]:
    """``--batch`` values (repeated and/or comma-separated) -> distinct sizes in the given order.

    Raises:
        OnnxPruneError: a value that is not a positive integer (the message names it).
    """
    out: list[int] = []
    for v in values or ("1",):
        for part in str(v).split(","):
            try:
                n = int(part.strip())
            except ValueError:
                raise OnnxPruneError(f"--batch {v!r}: {part.strip()!r} is not an integer") from None
            if n < 1:
                raise OnnxPruneError(f"--batch {v!r}: batch size {n} must be at least 1")
            if n not in out:
                out.append(n)
    return tuple(out)


def checked_provider(name: str) -> str:
    """onnxruntime name of ``--provider NAME``, checked to be available (fail before any work).

    Raises:
        OnnxPruneError: unknown or unavailable provider (the message lists the available ones).
    """
    from onnxprune.runtime.latency import resolve_provider
    from onnxprune.runtime.verify import check_providers

    full = resolve_provider(name)
    check_providers((full,))
    return full


def _providers(names: tuple[str, ...], err: Console) -> tuple[list[str], list[str]]:
    from onnxprune.runtime.latency import available_providers, resolve_provider
    from onnxprune.runtime.verify import check_providers

    if names:
        full = list(dict.fromkeys(resolve_provider(n) for n in names))
        check_providers(full)  # asked for explicitly: a missing one is an error
        return full, []
    usable, skipped = available_providers()
    for msg in skipped:
        err.print(f"[dim]{escape(msg)}[/dim]", highlight=False)
    return usable, skipped


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="cpu, cuda, tensorrt or a full provider name (repeatable). Default: CPU and every GPU "
                   "provider this onnxruntime offers.")
@click.option("--batch", "batches", multiple=True, metavar="N[,N...]",
              help="Batch size(s), repeatable or comma-separated (default 1). Symbolic batch dims take it.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs before timing.")
@click.option("--repeat", type=int, default=30, show_default=True, help="Timed runs per measurement.")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...",
              help="Concrete shape of a graph input (dim 0 is replaced by --batch).")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the results as JSON.")
@click.option("--channel-sweep", is_flag=True,
              help="Instead: time the model's most expensive conv shapes over a window of channel counts and "
                   "print the step tables and the round_to that --round-to auto would choose.")
@click.option("--sweep-top", type=int, default=3, show_default=True, help="Conv shapes swept.")
@click.option("--sweep-window", type=int, default=48, show_default=True, help="Channel counts per sweep.")
@click.option("-v", "--verbose", is_flag=True, help="Channel sweep: print every count of every step table.")
@max_memory_option
def bench(models, providers, batches, threads, warmup, repeat, input_shape, report_path, channel_sweep, sweep_top,
          sweep_window, verbose, max_memory):
    """Measure onnxruntime latency (median, p90) and peak memory of MODELS; the speedup of each
    model is against the first."""
    from onnxprune.cli.options import input_shapes, user_errors
    from onnxprune.io import check_side_output

    @user_errors
    def run():
        if report_path:
            check_side_output(report_path, models=list(models))
        if threads is not None and threads < 1:
            raise OnnxPruneError(f"--threads {threads}: must be at least 1")
        if warmup < 0 or repeat < 1:
            raise OnnxPruneError(f"--warmup must be >= 0 and --repeat >= 1, got {warmup} and {repeat}")
        sizes = parse_batches(batches)
        shapes = input_shapes(input_shape)
        out, err = Console(), Console(stderr=True)
        provs, skipped = _providers(providers, out)  # skipped providers are results: stdout
        if channel_sweep:
            data = _sweep(models, provs, shapes, threads, sweep_top, sweep_window, verbose, out, err)
        else:
            data = _bench(models, provs, sizes, threads, warmup, repeat, shapes, skipped, out, err)
        if report_path:
            from onnxprune.io import write_text_atomic

            write_text_atomic(report_path, json.dumps(data, indent=1, allow_nan=False) + "\n")

    run(max_memory=max_memory)


def _bench(models, provs, sizes, threads, warmup, repeat, shapes, skipped, out: Console, err: Console) -> dict:
    from onnxprune.runtime.bench import bench_models

    total = len(models) * len(provs) * len(sizes) * (max(warmup, 1) + repeat)
    with _progress(err) as progress:
        task = progress.add_task("onnxruntime runs", total=total)
        res = bench_models(list(models), provs, sizes, warmup=warmup, repeat=repeat, threads=threads,
                           input_shapes=shapes, skipped=skipped, on_run=lambda: progress.advance(task))
    t = Table(title=f"onnxruntime latency (median of {repeat} runs after {warmup} warm-up, "
                    f"threads {threads if threads is not None else 'default'})", title_justify="left")
    for col in ("model", "provider", "batch", "median ms", "p90 ms", "peak memory", "speedup vs first"):
        t.add_column(col, justify="left" if col in ("model", "provider") else "right", overflow="fold")
    names = {c.model: Path(c.model).name for c in res.cells}
    if len(set(names.values())) < len(names):  # same file name in two folders: show paths
        names = {m: m for m in names}
    for c in res.cells:
        s = c.stats
        t.add_row(escape(names[c.model]), c.provider.replace("ExecutionProvider", ""), str(c.batch),
                  f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}",
                  "-" if s.peak_memory_mb is None else f"{s.peak_memory_mb:.1f} MiB",
                  "-" if c.speedup_vs_first is None else f"{c.speedup_vs_first:.2f}x")
    out.print(t)
    return res.to_dict()


def _sweep(models, provs, shapes, threads, top, window, verbose, out: Console, err: Console) -> dict:
    from onnxprune.runtime.sweep import channel_sweep, sweep_points
    from onnxprune.pipeline import prepare

    if top < 1 or window < 1:
        raise OnnxPruneError(f"--sweep-top and --sweep-window must be at least 1, got {top} and {window}")
    results = []
    for m in models:
        prep = prepare(m, shapes)
        for p in provs:
            n = sweep_points(prep.model, prep.analysis.shapes, top=top, window=window)
            with _progress(err) as progress:
                task = progress.add_task(f"sweep {p.replace('ExecutionProvider', '')}", total=n)
                res = channel_sweep(prep.model, prep.analysis.shapes, top=top, window=window, provider=p,
                                    threads=threads, on_point=lambda: progress.advance(task))
            _print_sweep(str(m), res, verbose, out)
            results.append({"model": str(m), **res.to_dict()})
    return {"channel_sweep": results}


def _print_sweep(model: str, res, verbose: bool, out: Console) -> None:
    if not res.tables:
        out.print(f"{escape(model)}: no 2-D conv to sweep; round_to 1", highlight=False)
        return
    t = Table(title=f"{escape(model)}: latency (ms, min of runs) by channel count, {res.provider}",
              title_justify="left")
    t.add_column("shape")
    t.add_column("axis")
    t.add_column("counts", justify="right")
    t.add_column("ms (last 16 counts)" if not verbose else "ms per count", overflow="fold")
    for tab in res.tables:
        idx = range(len(tab.counts)) if verbose else range(max(0, len(tab.counts) - 16), len(tab.counts))
        cells = " ".join(f"{tab.counts[i]}:{tab.ms[i]:.3f}" for i in idx)
        t.add_row(escape(tab.label), tab.axis, f"{tab.counts[0]}-{tab.counts[-1]}", cells)
    out.print(t)
    g = Table(title="alignment gain E(N)", title_justify="left")
    g.add_column("N", justify="right")
    g.add_column("E(N)", justify="right")
    for n, v in res.gains.items():
        g.add_row(str(n), f"{v:+.4f}")
    out.print(g)
    out.print(f"[bold]round_to {res.round_to}[/bold] (what --round-to auto chooses)", highlight=False)
