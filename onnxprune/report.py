"""The compression report: JSON for machines, rich tables for people.

:class:`CompressReport` holds plain figures gathered by the other stages (MACs, params,
latency, per-group kept/total, stage timings, warnings, fidelity). It computes nothing
from models itself. ``to_dict()`` gives the JSON schema::

    {"input", "output", "criterion", "target",
     "macs": {"before", "after", "ratio"}, "params": {"before", "after", "ratio"},
     "latency_ms": {"before": {median, p90, mean, min, runs, provider, threads, batch,
                               peak_memory_mb} | null,
                    "after": ... | null, "speedup": float | null, "ideal_speedup": float,
                    "realized_over_ideal": float | null},
     "groups": [{"name", "op", "kept", "total", "blocked_reason"}],
     "stage_seconds": {stage: seconds}, "reachable": str | null,
     "warnings": [str], "fidelity": {...} | null,
     "round_to": {"chosen", "sweep_choice", "probe": {"chosen", "ms", "macs_kept", "original_ms"} | null,
                  "gains", "shapes", "tables", ...} | null   (--round-to auto),
     "latency_target": {"target", "measured_fraction", "reached", "measurements",
                        "rounds", ...} | null                           (--target-latency),
     "recovery": {...} | null  (the returned step's recovery),
     "schedule": [{"step", "milestone": {"kind", "kept"}, "macs", "params", "macs_fraction",
                   "params_fraction", "latency_ms", "held_out", "held_out_before_recovery",
                   "round_to", "reachable", "accepted", "seconds", "recovery", "notes"}],
     "held_out": {"kind": "accuracy"|"agreement"|"fidelity", "label", "samples", "interval95", "source",
                  "original", "final", "drop", "max_drop",
                  "train": {"samples", "original", "final"} | null} | null}

Every accuracy / agreement / fidelity figure in ``held_out`` and ``schedule`` is measured
on the held-out data (percent); ``held_out.train`` is the secondary training-set figure.
``fidelity`` (top level) is measured on random inputs and is informational only.

Non-finite floats (an infinite ratio when a count is zero) are written as ``null`` so the
file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxprune.runtime.latency import LatencyStats, speedup

__all__ = ["CompressReport", "GroupRow", "format_count"]

_PREFIXES = ("", "K", "M", "G", "T", "P", "E")


def format_count(n: float, unit: str = "") -> str:
    """Human form of a count with three significant digits and a K/M/G/T prefix.

    ``format_count(4_089_000_000, "MACs") == "4.09 GMACs"``,
    ``format_count(25_557_032) == "25.6 M"``, ``format_count(512) == "512"``.
    """
    if isinstance(n, float) and not math.isfinite(n):
        return f"{n} {unit}".strip()
    sign = "-" if n < 0 else ""
    v = abs(float(n))
    i = 0
    while v >= 999.5 and i < len(_PREFIXES) - 1:
        v /= 1000.0
        i += 1
    if i == 0 and float(n).is_integer():
        num = str(int(v))
    elif v >= 99.95:
        num = f"{v:.0f}"
    elif v >= 9.995:
        num = f"{v:.1f}"
    else:
        num = f"{v:.2f}"
    return f"{sign}{num} {_PREFIXES[i]}{unit}".rstrip()


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: dataclasses / mappings / sequences / numpy scalars; non-finite -> None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return _jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


@dataclass(frozen=True)
class GroupRow:
    """One channel group in the report: ``kept`` of ``total`` channels survive."""

    name: str
    op: str
    kept: int
    total: int
    blocked_reason: str | None = None

    @property
    def changed(self) -> bool:
        return self.kept != self.total


@dataclass(frozen=True)
class CompressReport:
    """Everything one compression run reports; see the module docstring for the JSON schema."""

    input_path: str
    output_path: str
    criterion: str
    target: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    latency_before: LatencyStats | None
    latency_after: LatencyStats | None
    groups: tuple[GroupRow, ...]
    stage_seconds: Mapping[str, float]
    reachable: str | None = None
    warnings: tuple[str, ...] = ()
    fidelity: Mapping | None = None
    criterion_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    round_to: Mapping[str, Any] | None = None
    latency_target: Mapping[str, Any] | None = None
    recovery: Mapping[str, Any] | None = None
    schedule: tuple[Mapping[str, Any], ...] | list = ()
    held_out: Mapping[str, Any] | None = None

    # ------------------------------------------------------------------ figures
    @property
    def macs_ratio(self) -> float:
        """MACs after / before (1.0 when both are zero)."""
        return _ratio(self.macs_after, self.macs_before)

    @property
    def params_ratio(self) -> float:
        """Parameters after / before (1.0 when both are zero)."""
        return _ratio(self.params_after, self.params_before)

    @property
    def ideal_speedup(self) -> float:
        """MACs before / after: the speedup if latency were proportional to MACs."""
        return _ratio(self.macs_before, self.macs_after)

    @property
    def realized_over_ideal(self) -> float | None:
        """Measured speedup / ideal (MACs) speedup; None when latency was not measured."""
        m = self.measured_speedup
        return None if m is None else _ratio(m, self.ideal_speedup)

    @property
    def measured_speedup(self) -> float | None:
        """Median latency before / after, or None when either was not measured."""
        if self.latency_before is None or self.latency_after is None:
            return None
        return speedup(self.latency_before, self.latency_after)

    # --------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (strict JSON: non-finite floats become None)."""
        d = {
            "input": self.input_path,
            "output": self.output_path,
            "criterion": self.criterion,
            "target": self.target,
            "macs": {"before": self.macs_before, "after": self.macs_after, "ratio": self.macs_ratio},
            "params": {
                "before": self.params_before,
                "after": self.params_after,
                "ratio": self.params_ratio,
            },
            "latency_ms": {
                "before": self.latency_before.to_dict() if self.latency_before else None,
                "after": self.latency_after.to_dict() if self.latency_after else None,
                "speedup": self.measured_speedup,
                "ideal_speedup": self.ideal_speedup,
                "realized_over_ideal": self.realized_over_ideal,
            },
            "groups": [dataclasses.asdict(g) for g in self.groups],
            "stage_seconds": dict(self.stage_seconds),
            "reachable": self.reachable,
            "warnings": list(self.warnings),
            "fidelity": self.fidelity,
            "criterion_info": dict(self.criterion_info),
            "round_to": None if self.round_to is None else dict(self.round_to),
            "latency_target": None if self.latency_target is None else dict(self.latency_target),
            "recovery": None if self.recovery is None else dict(self.recovery),
            "schedule": [dict(r) for r in self.schedule],
            "held_out": None if self.held_out is None else dict(self.held_out),
        }
        return _jsonable(d)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` to ``path`` atomically (see :func:`onnxprune.io.write_text_atomic`).

        Raises:
            OutputPathError: the folder does not exist or the file cannot be written.
        """
        from onnxprune.io import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    # -------------------------------------------------------------------- rich
    def render(self, console: Console, *, verbose: bool = False) -> None:
        """Print the summary, the per-group table, stage timings and warnings.

        The group table lists only groups that lost channels, with a count of the
        unchanged and blocked ones below it; ``verbose=True`` lists every group.
        """
        console.print(
            f"[bold]onnxprune[/bold] {escape(self.input_path)} -> {escape(self.output_path)}"
            f"  (criterion {escape(self.criterion)}, target {escape(self.target)})",
            highlight=False,
        )
        console.print(self._summary_table())
        for line in _held_out_lines(self.held_out):
            console.print(line, highlight=False)
        if len(self.schedule) > 1 or (self.schedule and self.held_out):
            console.print(self._schedule_table())
        if self.round_to is not None:
            probe = self.round_to.get("probe")
            if probe:
                cuts = ", ".join(f"{n}: {ms:.3f} ms" for n, ms in probe["ms"].items())
                console.print(f"round_to {self.round_to.get('chosen')} chosen by measuring the target's cut on "
                              f"{escape(str(self.round_to.get('provider')))} ({cuts}; original "
                              f"{probe['original_ms']:.3f} ms)", highlight=False)
            else:
                console.print(f"round_to {self.round_to.get('chosen')} chosen by channel sweep on "
                              f"{escape(str(self.round_to.get('provider')))}", highlight=False)
        if self.latency_target is not None:
            lt = self.latency_target
            console.print(f"latency target {lt['target']:g}: measured {lt['measured_fraction']:.3f} of the original, "
                          f"{'reached' if lt['reached'] else '[yellow]not reached[/yellow]'} "
                          f"after {lt['measurements']} measurement(s)", highlight=False)
        if self.reachable:
            console.print(f"[yellow]target: {escape(self.reachable)}[/yellow]", highlight=False)
        for line in _recovery_lines(self.recovery):
            console.print(escape(line), highlight=False)
        for key, value in self.criterion_info.items():
            console.print(f"{escape(self.criterion)} {escape(str(key))}: {escape(_fmt_num(value) if isinstance(value, (int, float)) else str(value))}",
                          highlight=False)
        console.print(self._group_table(verbose))
        self._print_hidden_counts(console, verbose)
        if self.fidelity:
            table = self._fidelity_table()
            if table is not None:
                console.print(table)
        if self.stage_seconds:
            console.print(self._stage_table())
        for w in self.warnings:
            console.print(f"[yellow]warning: {escape(w)}[/yellow]", highlight=False)

    def _summary_table(self) -> Table:
        t = Table(title="Summary", title_justify="left")
        t.add_column("")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        t.add_column("after/before", justify="right")
        t.add_row(
            "MACs", format_count(self.macs_before, "MACs"), format_count(self.macs_after, "MACs"),
            _fmt_ratio(self.macs_ratio),
        )
        t.add_row(
            "params", format_count(self.params_before), format_count(self.params_after),
            _fmt_ratio(self.params_ratio),
        )
        lb, la = self.latency_before, self.latency_after
        if lb is not None or la is not None:
            t.add_row(
                "latency median", _fmt_ms(lb and lb.median_ms), _fmt_ms(la and la.median_ms),
                _fmt_ratio(la.median_ms / lb.median_ms) if lb and la and lb.median_ms > 0 else "-",
            )
            t.add_row("latency p90", _fmt_ms(lb and lb.p90_ms), _fmt_ms(la and la.p90_ms), "")
            ref = lb or la
            t.add_row(
                "setup", "", "",
                f"{escape(ref.provider)}, batch {ref.batch}, "
                f"threads {ref.threads if ref.threads is not None else 'default'}",
            )
        measured = self.measured_speedup
        t.add_row(
            "speedup", "", "",
            f"{_fmt_speedup(measured)} measured / {_fmt_speedup(self.ideal_speedup)} ideal (MACs)"
            + (f", realized {self.realized_over_ideal:.0%} of ideal" if self.realized_over_ideal is not None
               and math.isfinite(self.realized_over_ideal) else ""),
        )
        return t

    def _group_table(self, verbose: bool) -> Table:
        shown = self.groups if verbose else tuple(g for g in self.groups if g.changed)
        t = Table(title="Channel groups" if verbose else "Pruned channel groups",
                  title_justify="left")
        t.add_column("group", overflow="fold")
        t.add_column("op")
        t.add_column("kept/total", justify="right")
        t.add_column("kept", justify="right")
        if verbose:
            t.add_column("blocked", overflow="fold")
        for g in shown:
            row = [
                escape(g.name), escape(g.op), f"{g.kept}/{g.total}",
                f"{100.0 * g.kept / g.total:.0f}%" if g.total else "-",
            ]
            if verbose:
                row.append(f"[yellow]{escape(g.blocked_reason)}[/yellow]" if g.blocked_reason else "")
            t.add_row(*row)
        return t

    def _print_hidden_counts(self, console: Console, verbose: bool) -> None:
        blocked = sum(1 for g in self.groups if g.blocked_reason is not None)
        if verbose:
            console.print(f"{len(self.groups)} groups, {blocked} blocked", highlight=False)
            return
        unchanged = sum(1 for g in self.groups if not g.changed and g.blocked_reason is None)
        console.print(
            f"{sum(1 for g in self.groups if g.changed)} groups pruned; "
            f"{unchanged} unchanged and {blocked} blocked not shown (verbose shows all)",
            highlight=False,
        )

    def _fidelity_table(self) -> Table | None:
        data = _jsonable(self.fidelity)
        outputs = data.get("outputs", data) if isinstance(data, dict) else None
        if not isinstance(outputs, dict):
            return None
        rows = {k: v for k, v in outputs.items() if isinstance(v, dict)}
        if not rows:
            return None
        inputs = data.get("inputs", "random inputs") if isinstance(data, dict) else "random inputs"
        t = Table(title=f"Fidelity to the original on {escape(str(inputs))} (informational, not an accuracy)",
                  title_justify="left")
        t.add_column("output", overflow="fold")
        for col in ("max abs err", "max rel err", "cosine", "top-1 agree"):
            t.add_column(col, justify="right")
        for name, v in rows.items():
            t.add_row(
                escape(name), _fmt_num(v.get("max_abs_error")), _fmt_num(v.get("max_rel_error")),
                _fmt_num(v.get("cosine"), ".4f"),
                _fmt_num(v.get("top1_agreement"), ".1%"),
            )
        return t

    def _schedule_table(self) -> Table:
        t = Table(title="Steps (held-out figures; latency median)", title_justify="left")
        for col in ("step", "milestone", "MACs", "params", "latency", "held-out cut", "held-out recovered",
                    "round_to", "kept"):
            t.add_column(col, justify="right")
        for r in self.schedule:
            m = r["milestone"]
            t.add_row(str(r["step"]), f"{m['kind']} {m['kept']:.3f}", _fmt_ratio(r["macs_fraction"]),
                      _fmt_ratio(r["params_fraction"]), _fmt_ms(r.get("latency_ms")),
                      _fmt_pct(r.get("held_out_before_recovery")), _fmt_pct(r.get("held_out")), str(r["round_to"]),
                      "yes" if r.get("accepted", True) else "[yellow]no[/yellow]")
        return t

    def _stage_table(self) -> Table:
        t = Table(title="Stage timings", title_justify="left")
        t.add_column("stage")
        t.add_column("seconds", justify="right")
        for stage, sec in self.stage_seconds.items():
            t.add_row(escape(str(stage)), f"{sec:.2f}")
        t.add_row("[bold]total[/bold]", f"[bold]{sum(self.stage_seconds.values()):.2f}[/bold]")
        return t


def _recovery_lines(rec: Mapping[str, Any] | None) -> list[str]:
    """One line per recovery step of ``CompressReport.recovery`` (see onnxprune.recover)."""
    if not rec:
        return []
    lines = []
    if "bias_compensation" in rec:
        b = rec["bias_compensation"]
        lines.append(f"recovery: bias compensation in {b['nodes']} node(s), max |delta| {_fmt_num(b['max_delta'])}"
                     + (f", {len(b['skipped'])} consumer(s) skipped" if b.get("skipped") else ""))
    if "bn_recalibration" in rec:
        b = rec["bn_recalibration"]
        line = f"recovery: {b['nodes']} BatchNormalization node(s) re-calibrated on {b['samples']} samples"
        h = b.get("held_out")
        if h:
            line += (f" (held-out {h['before']:.1f} -> {h['after']:.1f}%: "
                     + ("kept)" if h["kept"] else "not kept, the plain cut recovers from here)"))
        lines.append(line)
    if "finetune" in rec:
        f = rec["finetune"]
        epochs = f.get("epoch_losses") or []
        lines.append(f"recovery: fine-tuned {f['steps']} steps on {f['device']}, mean {f['loss']} loss per epoch "
                     + " -> ".join(_fmt_num(v) for v in epochs))
    ev = rec.get("eval_calibration")
    if ev:
        for key in ("accuracy", "agreement"):
            b, a = ev["before"].get(key), ev["after"].get(key)
            if b is not None and a is not None:
                lines.append(f"recovery: {key} on {ev['samples']} calibration samples {b:.1%} -> {a:.1%}"
                             + (f" (original {ev['reference_accuracy']:.1%})"
                                if key == "accuracy" and ev.get("reference_accuracy") is not None else ""))
    return lines


def _held_out_lines(h: Mapping[str, Any] | None) -> list[str]:
    """The headline: the held-out figure of the original and the written model."""
    if not h:
        return ["[yellow]no data given: accuracy was not measured (give --data with samples of your domain)[/yellow]"]
    ci = h.get("interval95")
    line = (f"[bold]{escape(h['label'])}[/bold]: original {h['original']:.2f}%, pruned {h['final']:.2f}% "
            f"(drop {h['drop']:.2f} points" + (f", bound {h['max_drop']:g}" if h.get("max_drop") is not None else "")
            + (f"; 95% interval +-{ci:.1f} points)" if ci is not None else ")"))
    out = [line]
    tr = h.get("train")
    if tr:
        out.append(f"training set ({tr['samples']} samples, seen by scoring/recovery): original {tr['original']:.2f}%, "
                   f"pruned {tr['final']:.2f}%")
    return out


def _fmt_pct(v: Any) -> str:
    return f"{v:.2f}%" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _fmt_ratio(r: float) -> str:
    return f"{r:.3f}" if math.isfinite(r) else "-"


def _fmt_speedup(s: float | None) -> str:
    return f"{s:.2f}x" if s is not None and math.isfinite(s) else "-"


def _fmt_ms(ms: float | None) -> str:
    return f"{ms:.2f} ms" if ms is not None else "-"


def _fmt_num(v: Any, spec: str = ".3g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"
