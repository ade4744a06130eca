"""``onnxprune analyze``: channel groups, blocked groups and why, MACs/params per layer."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from onnxprune.cli.options import input_shape_option, input_shapes, user_errors
from onnxprune.report import format_count


@click.command("analyze")
@click.argument("model", type=click.Path(dir_okay=True))
@input_shape_option
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the analysis as JSON.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Draw kept / total channels per group as PNG (kept from --plan; all kept without one).")
@click.option("--plan", "plan_path", type=click.Path(), default=None,
              help="A pruning plan of MODEL (compress --plan-out) whose kept channels --plot draws.")
@click.option("-v", "--verbose", is_flag=True, help="List every group, prunable ones included.")
@user_errors
def analyze(model, input_shape, json_path, plot_path, plan_path, verbose):
    """List MODEL's channel groups, blocked groups and why, and MACs/params per layer."""
    from onnxprune.io import check_side_output
    from onnxprune.pipeline import prepare

    for side in (json_path, plot_path):
        if side:
            check_side_output(side, models=[model] + [p for p in (json_path, plot_path) if p and p != side])
    prep = prepare(model, input_shapes(input_shape))
    a = prep.analysis
    plan = _read_plan(plan_path, a) if plan_path else None
    console = Console()
    macs, params = a.count("macs"), a.count("params")
    prunable = [g for g in a.groups if g.prunable]
    blocked = [g for g in a.groups if g.blocked_reason]
    console.print(f"[bold]{model}[/]: {format_count(macs, 'MACs')}, {format_count(params)} params, "
                  f"{len(a.groups)} channel groups: {len(prunable)} prunable "
                  f"({sum(g.size for g in prunable)} channels), {len(blocked)} blocked")
    t = Table(title="Channel groups" if verbose else "Blocked channel groups")
    for col in ("group", "op", "channels", "members", "status"):
        t.add_column(col)
    for g in a.groups:
        if verbose or g.blocked_reason:
            t.add_row(g.name, g.op, str(g.size), str(len(g.members)),
                      "prunable" if g.prunable else (g.blocked_reason or "too small"))
    console.print(t)
    by_macs, by_params = a.count_by_node("macs"), a.count_by_node("params")
    per_node = {n: (by_macs.get(n, 0.0), by_params.get(n, 0.0)) for n in {**by_macs, **by_params}}
    lt = Table(title="MACs and params per layer")
    for col in ("node", "MACs", "share", "params"):
        lt.add_column(col, justify="right" if col != "node" else "left")
    for node, (m, p) in sorted(per_node.items(), key=lambda kv: -kv[1][0])[: None if verbose else 15]:
        lt.add_row(node, format_count(m), f"{100 * m / max(macs, 1):.1f}%", format_count(p))
    console.print(lt)
    if json_path:
        from onnxprune.io import write_text_atomic

        write_text_atomic(json_path, json.dumps({
            "model": str(model), "macs": macs, "params": params,
            "input_shapes": {k: list(v) for k, v in prep.input_shapes.items()},
            "groups": [{"name": g.name, "op": g.op, "size": g.size, "prunable": g.prunable,
                        "blocked_reason": g.blocked_reason, "blocks": g.blocks,
                        "members": [{"tensor": m.tensor, "node": m.node, "axis": m.axis, "role": m.role.value}
                                    for m in g.members]} for g in a.groups],
            "layers": [{"node": n, "macs": v[0], "params": v[1]} for n, v in per_node.items()],
        }, indent=1))
    if plot_path:
        from onnxprune.plots import plot_channels

        rows = [(g.name, len(plan.kept(g.id)) if plan is not None else g.size, g.size) for g in a.groups if g.size > 1]
        plot_channels(rows, plot_path, title=f"{model}: kept / total channels per group"
                      + ("" if plan is not None else " (no --plan: nothing removed)"))


def _read_plan(path, analysis):
    """The plan in ``path``, checked against ``analysis``.

    Raises:
        PlanError: unreadable, malformed, or not a plan of this model.
    """
    from onnxprune.errors import PlanError
    from onnxprune.io import read_user_file
    from onnxprune.planning import PruningPlan

    plan = PruningPlan.from_json(read_user_file(path, PlanError, "a pruning plan (JSON)").decode("utf-8", "replace"))
    try:
        plan.validate(analysis)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None
    missing = [gid for gid in plan.group_names if gid >= len(analysis.groups)
               or analysis.groups[gid].name != plan.group_names[gid]]
    if missing:
        raise PlanError(f"{path}: not a plan of this model (group {plan.group_names[missing[0]]} differs)")
    return plan
