"""Channel sweep: how onnxruntime latency of a model's conv shapes steps with channel count,
and the ``round_to`` chosen from it (``--round-to auto``).

Rules:

1. Shapes: every ``Conv`` of the canonical model with a constant weight, keyed by
   (input channels, filters, kernel, input H x W, strides, pads, dilations, group, batch);
   identical keys are one shape whose cost is the sum of its nodes' MACs. The ``top``
   most expensive shapes are swept. Grouped convs other than depthwise are skipped.
2. Sweep: for each shape, a single-node ONNX model (``onnx.helper``, opset 17, IR 8,
   random weights and bias) is timed with :func:`onnxprune.bench.measure_latency` at
   every channel count in the window ``[c0 - window + 1, c0]`` (default 96 counts) (at least 1), c0 the
   shape's own count; a count's latency is the minimum of ``repeat`` runs (noise from
   other processes only adds time, so the minimum tracks the kernel). Ordinary convs are swept twice: filters (``axis="out"``, input
   channels fixed) and input channels (``axis="in"``, filters fixed); depthwise convs
   once with both (``axis="depthwise"``). The result is one :class:`StepTable` each.
3. Decision (:func:`choose_round_to`, a pure function of the tables): for a candidate N,
   the *alignment gain* of a count c is ``m / c - t(m) / t(c)`` with ``m = N * floor(c / N)``
   (c rounded down to a multiple of N, when m >= 1 is in the table): how much more
   latency than channels rounding c down saves. A table judges N only when its counts
   round down to at least :data:`MIN_REFERENCES` (3) distinct multiples of N (so a
   window of 96 counts can judge N = 32). It is 0 when latency is proportional to
   channels, negative with a fixed overhead, positive when latency steps at multiples
   of N (or when non-multiples fall back to slower kernels). E(N) is the mean gain over
   the counts of a table (multiples of N count as 0), averaged over the tables with
   equal weight. If the largest E(N) is below ``min_gain`` (default 0.01: 1 % of the
   latency), alignment does not pay and N = 1; otherwise N is the smallest candidate
   whose E(N) is at least ``near`` (default 0.75) times the largest: multiples of a
   step size gain about as much as the step itself, so the smallest one that captures
   most of the gain is kept, leaving the planner the finest granularity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CANDIDATES", "ConvShape", "StepTable", "SweepResult", "alignment_gain", "channel_sweep",
           "choose_round_to", "conv_model", "conv_shapes", "sweep_shape"]

#: Candidate round_to values of ``--round-to auto``.
CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: A table judges a candidate N only when it holds at least this many multiples of N that
#: counts round down to: with fewer, one noisy reference point would decide.
MIN_REFERENCES = 3


@dataclass(frozen=True)
class ConvShape:
    """One conv shape: input [batch, cin, h, w], weight [cout, cin / group, kh, kw].

    ``macs`` is the summed MACs of the model's convs with this shape; ``nodes`` their names.
    """

    batch: int
    cin: int
    cout: int
    h: int
    w: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    macs: int = 0
    nodes: tuple[str, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.group > 1 and self.group == self.cin == self.cout

    def key(self) -> tuple:
        return (self.batch, self.cin, self.cout, self.h, self.w, self.kernel, self.strides, self.pads,
                self.dilations, self.group)

    def label(self) -> str:
        kind = "dw" if self.depthwise else "conv"
        return (f"{kind} {self.kernel[0]}x{self.kernel[1]} {self.cin}->{self.cout} @{self.h}x{self.w}"
                f"{'' if self.strides == (1, 1) else f' s{self.strides[0]}'}")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label(), "batch": self.batch, "cin": self.cin, "cout": self.cout, "h": self.h,
                "w": self.w, "kernel": list(self.kernel), "strides": list(self.strides), "pads": list(self.pads),
                "dilations": list(self.dilations), "group": self.group, "macs": self.macs, "nodes": list(self.nodes)}


@dataclass(frozen=True)
class StepTable:
    """Latency (ms, float64 [K]) of one conv shape at channel counts (int64 [K], increasing).

    ``axis`` says which count was swept: ``out`` (filters), ``in`` (input channels) or
    ``depthwise`` (both, with group = channels).
    """

    label: str
    axis: str
    counts: np.ndarray
    ms: np.ndarray

    def __post_init__(self) -> None:
        c = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        t = np.asarray(self.ms, dtype=np.float64).reshape(-1)
        if c.shape != t.shape:
            raise ValueError(f"step table {self.label}: {len(c)} counts but {len(t)} latencies")
        if len(c) and (c.min() < 1 or np.any(np.diff(c) <= 0)):
            raise ValueError(f"step table {self.label}: counts must be positive and increasing")
        if np.any(~np.isfinite(t)) or np.any(t <= 0):
            raise ValueError(f"step table {self.label}: latencies must be positive and finite")
        object.__setattr__(self, "counts", c)
        object.__setattr__(self, "ms", t)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "axis": self.axis, "counts": self.counts.tolist(), "ms": self.ms.tolist()}


def alignment_gain(table: StepTable, n: int) -> float | None:
    """Mean alignment gain E(N) of one table (rule 3 of the module docstring); None when no
    count of the table can be rounded down to a multiple of ``n`` inside the table."""
    where = {int(c): i for i, c in enumerate(table.counts.tolist())}
    gains, refs = [], set()
    for i, c in enumerate(table.counts.tolist()):
        m = (c // n) * n
        if m < 1 or m not in where:
            continue
        refs.add(m)
        gains.append(m / c - table.ms[where[m]] / table.ms[i])
    return float(np.mean(gains)) if len(refs) >= MIN_REFERENCES else None


def choose_round_to(tables: Sequence[StepTable], candidates: Sequence[int] = CANDIDATES, *,
                    min_gain: float = 0.01, near: float = 0.75) -> tuple[int, dict[int, float]]:
    """The round_to that the step tables call for (rule 3 of the module docstring).

    Args:
        tables: measured (or synthetic) step tables.
        candidates: round_to values to choose from (1 is always allowed).
        min_gain: smallest mean alignment gain (fraction of latency) worth aligning for.
        near: a candidate qualifies when its gain is at least ``near`` times the best.

    Returns:
        ``(N, {candidate: mean gain})``; N = 1 when no table is given or nothing gains.

    Raises:
        ValueError: a candidate below 1, or ``near`` outside (0, 1].
    """
    cands = sorted(set(int(c) for c in candidates) | {1})
    if cands[0] < 1:
        raise ValueError(f"round_to candidates must be >= 1, got {cands[0]}")
    if not 0 < near <= 1:
        raise ValueError(f"near must lie in (0, 1], got {near}")
    gains: dict[int, float] = {}
    for n in cands:
        per = [g for g in (alignment_gain(t, n) for t in tables) if g is not None]
        if per:
            gains[n] = float(np.mean(per))
    best = max(gains.values(), default=0.0)
    if best < min_gain:
        return 1, gains
    return min(n for n, g in gains.items() if g >= near * best), gains


# ------------------------------------------------------------------ measurement


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> tuple[int, ...]:
    for a in node.attribute:
        if a.name == name:
            return tuple(int(v) for v in a.ints)
    return tuple(default)


def conv_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], top: int = 3) -> list[ConvShape]:
    """The ``top`` most expensive distinct 2-D conv shapes of ``model`` (rule 1).

    ``shapes`` gives the concrete shape of every tensor (e.g. ``Analysis.shapes``).
    Convs with ``auto_pad`` other than NOTSET are taken with their inferred output size
    turned into explicit pads.
    """
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[tuple, ConvShape] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        x, wshape = shapes.get(node.input[0]), tuple(inits[node.input[1]].dims)
        y = shapes.get(node.output[0])
        if x is None or y is None or len(x) != 4 or len(wshape) != 4:
            continue
        group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
        cin, cout = int(x[1]), int(wshape[0])
        if group != 1 and not (group == cin == cout):
            continue
        k = (int(wshape[2]), int(wshape[3]))
        strides, dil = _ints(node, "strides", (1, 1)), _ints(node, "dilations", (1, 1))
        pads = _ints(node, "pads", (0, 0, 0, 0))
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in node.attribute):
            pads = _explicit_pads(x[2:], y[2:], k, strides, dil)
        macs = int(np.prod(y)) * (cin // group) * k[0] * k[1]
        s = ConvShape(int(x[0]), cin, cout, int(x[2]), int(x[3]), k, strides, pads, dil, group)
        prev = found.get(s.key())
        found[s.key()] = ConvShape(*[getattr(s, f) for f in ("batch", "cin", "cout", "h", "w", "kernel", "strides",
                                                            "pads", "dilations", "group")],
                                   macs=macs + (prev.macs if prev else 0),
                                   nodes=(prev.nodes if prev else ()) + (node.name,))
    return sorted(found.values(), key=lambda s: -s.macs)[:top]


def _explicit_pads(xs, ys, k, strides, dil) -> tuple[int, int, int, int]:
    total = [max(0, (int(o) - 1) * s + (kk - 1) * d + 1 - int(i)) for i, o, kk, s, d in zip(xs, ys, k, strides, dil)]
    return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)


def conv_model(shape: ConvShape, cin: int, cout: int, seed: int = 0) -> onnx.ModelProto:
    """Single-node model ``y = Conv(x, W, b)`` with ``x`` float32 [batch, cin, h, w] and ``cout``
    filters (depthwise shapes: group = cin = cout); opset 17, IR version 8."""
    rng = np.random.default_rng(seed)
    group = cin if shape.depthwise else 1
    w = rng.standard_normal((cout, cin // group, *shape.kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=list(shape.kernel),
                            strides=list(shape.strides), pads=list(shape.pads), dilations=list(shape.dilations),
                            group=group)
    graph = helper.make_graph([node], "sweep", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [shape.batch, cin, shape.h, shape.w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape.batch, cout, *_out_hw(shape)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _out_hw(s: ConvShape) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (size + s.pads[i] + s.pads[i + 2] - s.dilations[i] * (s.kernel[i] - 1) - 1) // s.strides[i] + 1
        for i, size in enumerate((s.h, s.w)))


def sweep_shape(shape: ConvShape, axis: str, *, window: int = 96, provider: str = "CPUExecutionProvider",
                threads: int | None = None, warmup: int = 2, repeat: int = 10,
                on_point: Callable[[], None] | None = None) -> StepTable:
    """Time ``shape`` at every count of the window along ``axis`` (``out``, ``in`` or
    ``depthwise``); the minimum latency of ``repeat`` runs per count.

    Raises:
        ValueError: an unknown axis or a window below 1.
        OnnxPruneError: the provider is not available or a run fails.
    """
    from onnxprune.bench import measure_latency

    if axis not in ("out", "in", "depthwise"):
        raise ValueError(f"unknown sweep axis {axis!r}")
    if window < 1:
        raise ValueError(f"sweep window must be >= 1, got {window}")
    c0 = shape.cout if axis != "in" else shape.cin
    counts = np.arange(max(1, c0 - window + 1), c0 + 1)
    ms = []
    for c in counts.tolist():
        cin = shape.cin if axis == "out" else c
        cout = shape.cout if axis == "in" else c
        m = conv_model(shape, cin, cout)
        st = measure_latency(m, {"x": (shape.batch, cin, shape.h, shape.w)}, providers=(provider,),
                             warmup=warmup, repeat=repeat, threads=threads)
        ms.append(st.min_ms)  # timer noise on a shared CPU only ever adds time
        if on_point:
            on_point()
    return StepTable(shape.label(), axis, counts, np.asarray(ms))


def sweep_axes(shape: ConvShape) -> tuple[str, ...]:
    """Axes swept for ``shape``: ``("depthwise",)`` or ``("out", "in")``."""
    return ("depthwise",) if shape.depthwise else ("out", "in")


@dataclass(frozen=True)
class SweepResult:
    """Step tables of a model's conv shapes, the chosen round_to and the gain per candidate."""

    shapes: tuple[ConvShape, ...]
    tables: tuple[StepTable, ...]
    round_to: int
    gains: Mapping[int, float] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"

    def to_dict(self) -> dict[str, Any]:
        return {"round_to": self.round_to, "provider": self.provider,
                "gains": {str(k): v for k, v in self.gains.items()},
                "shapes": [s.to_dict() for s in self.shapes], "tables": [t.to_dict() for t in self.tables]}


def channel_sweep(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *, top: int = 3,
                  window: int = 96, provider: str = "CPUExecutionProvider", threads: int | None = None,
                  warmup: int = 2, repeat: int = 10, candidates: Sequence[int] = CANDIDATES,
                  on_point: Callable[[], None] | None = None) -> SweepResult:
    """Sweep the ``top`` most expensive conv shapes of ``model`` and choose round_to.

    ``shapes``: concrete shape of every tensor (``Analysis.shapes``). A model without a
    2-D conv gives no tables and round_to 1. Time: about ``top * 2 * window`` session
    creations plus ``warmup + repeat`` runs each.
    """
    convs = conv_shapes(model, shapes, top)
    tables = tuple(sweep_shape(s, axis, window=window, provider=provider, threads=threads, warmup=warmup,
                               repeat=repeat, on_point=on_point)
                   for s in convs for axis in sweep_axes(s))
    n, gains = choose_round_to(tables, candidates)
    return SweepResult(tuple(convs), tables, n, gains, provider)


def sweep_points(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *, top: int = 3,
                 window: int = 96) -> int:
    """How many single-node models :func:`channel_sweep` will time (for progress bars)."""
    total = 0
    for s in conv_shapes(model, shapes, top):
        for axis in sweep_axes(s):
            c0 = s.cout if axis != "in" else s.cin
            total += c0 - max(1, c0 - window + 1) + 1
    return total

