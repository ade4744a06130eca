"""Pictures of a run (matplotlib, imported only when a picture is asked for).

- :func:`plot_tradeoff`: held-out figure against measured latency and against MACs, one
  point per step of the schedule, the original and the written model marked.
- :func:`plot_channels`: kept / total channels per group (``onnxprune analyze --plot``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxprune.errors import OnnxPruneError

__all__ = ["plot_channels", "plot_tradeoff"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise OnnxPruneError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically, staged with the run's other outputs
    (:func:`onnxprune.io.write_atomic`)."""
    import matplotlib.pyplot as plt

    from onnxprune.io import write_atomic

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_tradeoff(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw the run's trade-off curve from a compress report's JSON (``CompressReport.to_dict()``).

    Left: held-out figure (percent) against measured median latency (ms); right: against
    the MACs kept (fraction of the original). One point per step (rejected steps hollow),
    the original as a star, the written model circled. Without held-out data the y axis
    is MACs kept and the plot says that no accuracy was measured.

    Raises:
        OnnxPruneError: matplotlib missing; OSError: the file cannot be written.
    """
    plt = _pyplot()
    steps: Sequence[Mapping[str, Any]] = report.get("schedule") or []
    held = report.get("held_out")
    lat = report.get("latency_ms") or {}
    before = (lat.get("before") or {}).get("median")
    after = (lat.get("after") or {}).get("median")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ylabel = held["label"] if held else "no data given: accuracy not measured (MACs kept shown)"
    y0 = held["original"] if held else 1.0
    yfinal = held["final"] if held else report["macs"]["ratio"]

    def y_of(s):
        return s.get("held_out") if held else s.get("macs_fraction")

    for ax, xkey, xlabel, x0, xfinal in (
            (axes[0], "latency_ms", "median latency (ms)", before, after),
            (axes[1], "macs_fraction", "MACs kept (fraction of the original)", 1.0, report["macs"]["ratio"])):
        pts = [(s.get(xkey), y_of(s), s.get("accepted", True), s["step"]) for s in steps
               if s.get(xkey) is not None and y_of(s) is not None]
        if x0 is not None:
            ax.plot([x0], [y0], marker="*", markersize=14, color="black", linestyle="none", label="original")
        xs = [p[0] for p in pts if p[2]]
        ys = [p[1] for p in pts if p[2]]
        if xs:
            ax.plot(([x0] if x0 is not None else []) + xs, ([y0] if x0 is not None else []) + ys, "-o",
                    color="tab:blue", label="steps")
        for x, y, ok, k in pts:
            if not ok:
                ax.plot([x], [y], "o", mfc="none", color="tab:red", label="rejected step")
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if xfinal is not None:
            ax.plot([xfinal], [yfinal], "o", markersize=14, mfc="none", color="tab:green", label="written model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.suptitle(f"{Path(str(report.get('input', ''))).name}: {report.get('criterion')}, {report.get('target')}")
    return _save(fig, path)


def plot_channels(rows: Sequence[tuple[str, int, int]], path: str | os.PathLike, title: str = "") -> Path:
    """Horizontal bars of kept / total channels per group (``(name, kept, total)`` rows).

    Raises:
        OnnxPruneError: matplotlib missing; OSError: the file cannot be written.
    """
    plt = _pyplot()
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(rows) + 1)))
    names = [r[0] for r in rows]
    ax.barh(range(len(rows)), [r[2] for r in rows], color="lightgray", label="total")
    ax.barh(range(len(rows)), [r[1] for r in rows], color="tab:blue", label="kept")
    ax.set_yticks(range(len(rows)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
