"""Channel sweep: how onnxruntime latency of a model's conv chains steps with the channel
count of a pruned group, and the ``round_to`` chosen from it (``--round-to auto``).

Why chains: on CPU the cost of a misaligned count is mostly *between* layers. ORT's NCHWc
layout (ORT_ENABLE_ALL) pads a conv's output channels to its block size (8 with AVX2, 16
with AVX-512) when they are a multiple of 4 and otherwise falls back to the plain NCHW
kernel with Reorder nodes around it; a single conv timed alone shows little of that.

Rules:

1. Chains (:func:`conv_chains`): one per prunable channel group of the analysis: its first
   producing Conv (``cin -> c``), the activation the model applies to it, the depthwise
   Conv of the group if any (group = c, the MobileNet pattern), and the group's first
   consuming Conv (``c -> cout``), all with the model's kernels, strides, pads and spatial
   sizes. Identical chains are one whose cost is the summed MACs of its convs; the ``top``
   (default 3) most expensive are swept. A model without any chain falls back to the
   single-node sweeps of rule 2b.
2. Sweep: (a) each chain is rebuilt (:func:`chain_model`: ``onnx.helper``, opset
   :data:`OPSET`, IR 8, random weights and biases) at every group size ``c`` of the window
   ``[c0 - window + 1, c0]`` (default 48 counts, at least 1), ``c0`` the group's size, and
   timed in onnxruntime with ``ORT_ENABLE_ALL``: ``warmup`` (2) runs, then ``repeat`` (10)
   interleaved passes over the counts; a count's latency is its minimum (noise from other
   processes only adds time, and interleaving spreads a burst of it over all counts).
   (b) Fallback: single-node convs (:func:`conv_model`) of the ``top`` most expensive conv
   shapes (:func:`conv_shapes`), filters (``axis="out"``) and input channels (``"in"``)
   swept apart, depthwise convs once (``"depthwise"``). One :class:`StepTable` per sweep.
   Cost: ``top * window`` session creations (about 10-25 s per model on a 2-core CPU).
3. Decision (:func:`choose_round_to`, a pure function of the tables): for a candidate N,
   the *alignment gain* of a count c is ``m / c - t(m) / t(c)`` with ``m = N * floor(c / N)``
   (c rounded down to a multiple of N, when m >= 1 is in the table): how much more
   latency than channels rounding c down saves. A table judges N only when its counts
   round down to at least :data:`MIN_REFERENCES` (3) distinct multiples of N (so a
   window of 48 counts judges N <= 16, 96 counts N = 32). It is 0 when latency is
   proportional to channels, negative with a fixed overhead, positive when latency steps
   at multiples of N (or when non-multiples fall back to slower kernels). E(N) is the
   mean gain over the counts of a table (multiples of N count as 0), averaged over the
   tables with equal weight. If the largest E(N) is below ``min_gain`` (default 0.01: 1 %
   of the latency), alignment does not pay and N = 1; otherwise N is the smallest
   candidate whose E(N) is within ``tol`` (default ``min_gain``) of the largest: a larger
   N is taken only when it saves at least 1 % more latency, else the planner keeps the
   finer granularity. (An earlier rule took the smallest N within 75 % of the best; it
   stopped at N = 4 where non-multiples of 4 are twice as slow although rounding to the
   NCHWc block of 16 saves a further 3-8 % of the latency.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CANDIDATES", "OPSET", "Activation", "ConvChain", "ConvShape", "StepTable", "SweepResult", "alignment_gain",
           "chain_model", "channel_sweep", "choose_round_to", "conv_chains", "conv_model", "conv_shapes", "sweep_chain",
           "sweep_points", "sweep_shape"]

#: Candidate round_to values of ``--round-to auto``.
CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: Opset of the sweep models (HardSwish needs 14; every onnxruntime >= 1.12 runs 17).
OPSET = 17
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
    """Latency (ms, float64 [K]) of one conv chain or shape at channel counts (int64 [K], increasing).

    ``axis`` says which count was swept: ``chain`` (a group's size in a producer ->
    consumer chain), ``depthwise`` (the same with a depthwise conv between), or, for the
    single-node fallback, ``out`` (filters), ``in`` (input channels) or ``depthwise``.
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
                    min_gain: float = 0.01, tol: float | None = None) -> tuple[int, dict[int, float]]:
    """The round_to that the step tables call for (rule 3 of the module docstring).

    Args:
        tables: measured (or synthetic) step tables.
        candidates: round_to values to choose from (1 is always allowed).
        min_gain: smallest mean alignment gain (fraction of latency) worth aligning for.
        tol: a candidate qualifies when its gain is at most ``tol`` (fraction of latency)
            below the best; default ``min_gain``.

    Returns:
        ``(N, {candidate: mean gain})``; N = 1 when no table is given or nothing gains.

    Raises:
        ValueError: a candidate below 1, or a negative ``tol``.
    """
    cands = sorted(set(int(c) for c in candidates) | {1})
    if cands[0] < 1:
        raise ValueError(f"round_to candidates must be >= 1, got {cands[0]}")
    tol = min_gain if tol is None else float(tol)
    if tol < 0:
        raise ValueError(f"tol must not be negative, got {tol}")
    gains: dict[int, float] = {}
    for n in cands:
        per = [g for g in (alignment_gain(t, n) for t in tables) if g is not None]
        if per:
            gains[n] = float(np.mean(per))
    best = max(gains.values(), default=0.0)
    if best < min_gain:
        return 1, gains
    return min(n for n, g in gains.items() if g >= best - tol), gains


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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


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
    from onnxprune.runtime.latency import measure_latency

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


# ------------------------------------------------------------------ chains (what the whole model pays)


#: Unary activations copied from the model into a chain (attributes kept).
_UNARY = ("Relu", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Mish",
          "Gelu")
#: Ops between a conv and its activation that ORT folds into the conv; skipped when looking for the activation.
_FOLDED = ("BatchNormalization",)


@dataclass(frozen=True)
class Activation:
    """The activation after a conv, as rebuilt in a chain model.

    ``op`` is an ONNX op type (see ``_UNARY``), ``"Clip"`` (``clip`` holds its constant
    min and max, None where absent), ``"Swish"`` (``x * Sigmoid(x)``, two nodes) or
    ``"None"`` (the conv feeds the next conv directly or through a BatchNormalization only).
    ``attrs``: the node's float/int attributes as ``(name, value)`` pairs.
    """

    op: str = "Relu"
    attrs: tuple[tuple[str, float], ...] = ()
    clip: tuple[float | None, float | None] = (None, None)

    def label(self) -> str:
        return self.op.lower() if self.op != "None" else "-"


@dataclass(frozen=True)
class ConvChain:
    """Producer conv -> activation [-> depthwise conv -> activation] -> consumer conv around
    one channel group of ``c0`` channels (the swept count).

    ``producer``: the group's producing conv, ``cin -> c0`` (group 1). ``depthwise``: the
    depthwise conv (group = channels = ``c0``) that reads the producer's channels, or None.
    ``consumer``: the conv that reads the group's channels, shaped as the chain feeds it
    (``c0 -> cout``, input spatial size = the producer's or depthwise conv's output).
    ``macs``: summed MACs of the model's chains with this key (each chain counts its
    producer, depthwise and consumer convs at full size); ``groups``: their group names.
    """

    producer: ConvShape
    act: Activation
    consumer: ConvShape
    depthwise: ConvShape | None = None
    dw_act: Activation = Activation("None")
    macs: int = 0
    groups: tuple[str, ...] = ()

    @property
    def c0(self) -> int:
        return self.producer.cout

    @property
    def axis(self) -> str:
        return "depthwise" if self.depthwise is not None else "chain"

    def key(self) -> tuple:
        return (self.producer.key(), self.act, None if self.depthwise is None else self.depthwise.key(), self.dw_act,
                self.consumer.key())

    def label(self) -> str:
        p, c = self.producer, self.consumer
        s = lambda x: "" if x.strides == (1, 1) else f"s{x.strides[0]}"  # noqa: E731
        mid = "" if self.depthwise is None else (f" dw{self.depthwise.kernel[0]}x{self.depthwise.kernel[1]}"
                                                  f"{s(self.depthwise)} {self.dw_act.label()}")
        return (f"{p.kernel[0]}x{p.kernel[1]}{s(p)} {p.cin}->[{self.c0}] {self.act.label()}{mid} -> "
                f"{c.kernel[0]}x{c.kernel[1]}{s(c)} ->{c.cout} @{p.h}x{p.w}")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label(), "channels": self.c0, "producer": self.producer.to_dict(),
                "activation": self.act.op,
                "depthwise": None if self.depthwise is None else self.depthwise.to_dict(),
                "consumer": self.consumer.to_dict(), "macs": self.macs, "groups": list(self.groups)}


def _conv_shape(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                shapes: Mapping[str, tuple[int, ...]]) -> ConvShape | None:
    """The :class:`ConvShape` of one 2-D Conv node with a constant weight, or None."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    x, y, wshape = shapes.get(node.input[0]), shapes.get(node.output[0]), tuple(inits[node.input[1]].dims)
    if x is None or y is None or len(x) != 4 or len(y) != 4 or len(wshape) != 4:
        return None
    group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
    k = (int(wshape[2]), int(wshape[3]))
    strides, dil = _ints(node, "strides", (1, 1)), _ints(node, "dilations", (1, 1))
    pads = _ints(node, "pads", (0, 0, 0, 0))
    if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in node.attribute):
        pads = _explicit_pads(x[2:], y[2:], k, strides, dil)
    macs = int(np.prod(y)) * (int(x[1]) // group) * k[0] * k[1]
    return ConvShape(int(x[0]), int(x[1]), int(wshape[0]), int(x[2]), int(x[3]), k, strides, pads, dil, group,
                     macs, (node.name,))


def _activation_after(model: onnx.ModelProto, tensor: str, readers: Mapping[str, list[onnx.NodeProto]],
                      inits: Mapping[str, onnx.TensorProto]) -> Activation:
    """The activation applied to a conv output ``tensor`` (rules in :func:`conv_chains`)."""
    for _ in range(4):  # skip folded ops (BatchNormalization) with a single reader
        rs = readers.get(tensor, [])
        if len(rs) == 1 and rs[0].op_type in _FOLDED:
            tensor = rs[0].output[0]
            continue
        break
    rs = readers.get(tensor, [])
    if not rs or all(r.op_type == "Conv" for r in rs):
        return Activation("None")
    if len(rs) == 1 and rs[0].op_type in _UNARY:
        kinds = (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT)
        attrs = tuple(sorted((a.name, float(a.f) if a.type == onnx.AttributeProto.FLOAT else int(a.i))
                             for a in rs[0].attribute if a.type in kinds))
        return Activation(rs[0].op_type, attrs)
    if len(rs) == 1 and rs[0].op_type == "Clip":
        def const(i: int) -> float | None:
            n = rs[0].input[i] if len(rs[0].input) > i else ""
            return float(numpy_helper.to_array(inits[n]).reshape(-1)[0]) if n in inits else None
        return Activation("Clip", clip=(const(1), const(2)))
    sig = [r for r in rs if r.op_type == "Sigmoid"]
    if len(rs) == 2 and len(sig) == 1:
        mul = next(r for r in rs if r is not sig[0])
        if mul.op_type == "Mul" and set(mul.input) == {tensor, sig[0].output[0]}:
            return Activation("Swish")
    return Activation("Relu")


def conv_chains(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], analysis: Any = None,
                top: int = 3) -> list[ConvChain]:
    """The ``top`` most expensive distinct producer -> consumer conv chains of ``model``.

    One chain per prunable channel group (``analysis.groups``; computed with
    :func:`onnxprune.analysis.analyze` when None — ``model`` must then be canonical):

    * producer: the group's first ``Conv`` member with role PRODUCER and group 1; it is
      rebuilt as ``cin -> c`` even when the group holds only part of its filters.
    * depthwise: the group's first PRODUCER ``Conv`` member with group = its input channels
      = its filters (the MobileNet pattern producer -> depthwise -> pointwise), or none.
    * consumer: the group's first ``Conv`` member with role CONSUMER and group 1 whose
      input spatial size equals the producer's (depthwise conv's, if any) output size;
      rebuilt as ``c -> cout`` even when it also reads other channels (Concat).
    * activation: what follows the producer's (depthwise conv's) output, skipping one
      BatchNormalization (ORT folds it): a unary activation (``_UNARY``, attributes kept),
      Clip with constant bounds, Swish (``Sigmoid`` and ``Mul(x, Sigmoid(x))``), nothing
      when the output goes straight to a Conv, Relu for anything else (Add, Concat, ...).

    Groups without such a producer and consumer, or with grouped convs other than depthwise
    (``blocks > 1``), give no chain. Chains with equal :meth:`ConvChain.key` are one,
    with summed MACs; sorted by MACs, most expensive first.
    """
    if analysis is None:
        from onnxprune.analysis import analyze

        analysis = analyze(model, shapes)
    from onnxprune.analysis.context import Role

    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in dict.fromkeys(n.input):
            readers.setdefault(i, []).append(n)
    found: dict[tuple, ConvChain] = {}
    for g in analysis.groups:
        if not g.prunable or g.blocks != 1:
            continue
        convs = [(m, nodes[m.node]) for m in g.members if m.op == "Conv" and m.node in nodes]
        cs = {m.node: _conv_shape(n, inits, shapes) for m, n in convs}
        prod = next((cs[m.node] for m, _ in convs if m.role is Role.PRODUCER and cs[m.node] is not None
                     and cs[m.node].group == 1), None)
        if prod is None:
            continue
        dw = next((cs[m.node] for m, _ in convs if m.role is Role.PRODUCER and cs[m.node] is not None
                   and cs[m.node].depthwise and cs[m.node].cin == prod.cout), None)
        if dw is not None and (dw.h, dw.w) != _out_hw(prod):
            dw = None
        last = dw if dw is not None else prod
        cons = next((cs[m.node] for m, _ in convs if m.role is Role.CONSUMER and cs[m.node] is not None
                     and cs[m.node].group == 1 and (cs[m.node].h, cs[m.node].w) == _out_hw(last)), None)
        if cons is None:
            continue
        act = _activation_after(model, nodes[prod.nodes[0]].output[0], readers, inits)
        dw_act = Activation("None") if dw is None else _activation_after(model, nodes[dw.nodes[0]].output[0],
                                                                         readers, inits)
        macs = prod.macs + (dw.macs if dw else 0) + cons.macs
        cons = dataclasses.replace(cons, cin=prod.cout, macs=0, nodes=())
        ch = ConvChain(dataclasses.replace(prod, macs=0, nodes=()), act, cons,
                       None if dw is None else dataclasses.replace(dw, macs=0, nodes=()), dw_act)
        prev = found.get(ch.key())
        full_macs = macs + (0 if prev is None else prev.macs)
        found[ch.key()] = dataclasses.replace(ch, macs=full_macs, groups=(prev.groups if prev else ()) + (g.name,))
    return sorted(found.values(), key=lambda s: -s.macs)[:top]


def _act_nodes(act: Activation, x: str, y: str, tag: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    if act.op == "None":
        return [helper.make_node("Identity", [x], [y], name=f"{tag}_id")]
    if act.op == "Swish":
        return [helper.make_node("Sigmoid", [x], [f"{tag}_sig"], name=f"{tag}_sigmoid"),
                helper.make_node("Mul", [x, f"{tag}_sig"], [y], name=f"{tag}_mul")]
    if act.op == "Clip":
        ins = [x]
        for i, v in enumerate(act.clip):
            name = "" if v is None else f"{tag}_clip{i}"
            if v is not None:
                inits.append(numpy_helper.from_array(np.array(v, dtype=np.float32), name))
            ins.append(name)
        return [helper.make_node("Clip", ins, [y], name=f"{tag}_clip")]
    return [helper.make_node(act.op, [x], [y], name=f"{tag}_{act.op.lower()}", **dict(act.attrs))]


def _conv_node(s: ConvShape, cin: int, cout: int, group: int, x: str, y: str, tag: str,
               rng: np.random.Generator, inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    w = (rng.standard_normal((cout, cin // group, *s.kernel)) * (2.0 / (cin // group * s.kernel[0] * s.kernel[1]))
         ** 0.5).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{tag}_w"),
              numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{tag}_b")]
    return helper.make_node("Conv", [x, f"{tag}_w", f"{tag}_b"], [y], name=tag, kernel_shape=list(s.kernel),
                            strides=list(s.strides), pads=list(s.pads), dilations=list(s.dilations), group=group)


def chain_model(chain: ConvChain, c: int, seed: int = 0) -> onnx.ModelProto:
    """The chain with ``c`` channels in its group: ``x`` float32 [batch, cin, h, w] ->
    Conv(cin -> c) -> activation [-> depthwise Conv(c, group c) -> activation] ->
    Conv(c -> cout) -> ``y`` float32 [batch, cout, oh, ow] (every conv with a bias, the
    kernels, strides, pads and dilations of the model's convs; random He-scaled weights).
    Opset :data:`OPSET`, IR version 8.

    Raises:
        ValueError: ``c`` below 1.
    """
    if c < 1:
        raise ValueError(f"chain channel count must be >= 1, got {c}")
    rng, inits = np.random.default_rng(seed), []
    p, d, q = chain.producer, chain.depthwise, chain.consumer
    nodes = [_conv_node(p, p.cin, c, 1, "x", "p", "producer", rng, inits)]
    nodes += _act_nodes(chain.act, "p", "pa", "act", inits)
    last = "pa"
    if d is not None:
        nodes.append(_conv_node(d, c, c, c, "pa", "d", "depthwise", rng, inits))
        nodes += _act_nodes(chain.dw_act, "d", "da", "dw_act", inits)
        last = "da"
    nodes.append(_conv_node(q, c, q.cout, 1, last, "y", "consumer", rng, inits))
    graph = helper.make_graph(nodes, "chain_sweep", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [p.batch, p.cin, p.h, p.w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [q.batch, q.cout, *_out_hw(q)])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def _time_interleaved(build: Callable[[int], onnx.ModelProto], n: int, x_shape: tuple[int, ...], *, provider: str,
                      threads: int | None, warmup: int, repeat: int, chunk: int = 8,
                      on_point: Callable[[], None] | None = None) -> np.ndarray:
    """Minimum latency (ms, float64 [n]) of the models ``build(0) .. build(n - 1)``, measured
    interleaved.

    The models are built and timed ``chunk`` at a time (bounds memory: one live session
    per model of the chunk). Every model gets its own onnxruntime session (``ORT_ENABLE_ALL``, ``threads``
    intra-op threads or ORT's default, thread-pool spinning off so that idle sessions do
    not steal the cores) and ``warmup`` untimed runs on one seeded float32 input ``x`` of
    ``x_shape``; then ``repeat`` passes each time one run of every model of the chunk (in
    alternating order), and a model's latency is its minimum over the passes. A burst of
    load from other processes then hits neighbouring counts alike instead of a run of
    them, and the minimum drops it.

    Raises:
        OnnxPruneError: the provider is missing or falls back to another, or a run fails.
    """
    import onnxruntime as ort

    from onnxprune.errors import OnnxPruneError
    from onnxprune.runtime.verify import ort_message

    if repeat < 1 or warmup < 0:
        raise OnnxPruneError(f"sweep repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    # idle thread pools of the other live sessions must not spin while one is timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    feeds = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    best = np.full(n, np.inf)
    try:
        for lo in range(0, n, chunk):
            _time_chunk([build(i) for i in range(lo, min(n, lo + chunk))], best[lo:lo + chunk], feeds, options,
                        provider, warmup, repeat, on_point)
    except OnnxPruneError:
        raise
    except Exception as exc:  # onnxruntime raises its own Exception subclasses
        raise OnnxPruneError(f"onnxruntime failed to run a sweep model: {ort_message(exc)}") from exc
    return best


def _time_chunk(models: Sequence[onnx.ModelProto], best: np.ndarray, feeds: Mapping[str, np.ndarray],
                options: Any, provider: str, warmup: int, repeat: int,
                on_point: Callable[[], None] | None) -> None:
    """One chunk of :func:`_time_interleaved`: writes the minimum ms of each model into ``best``."""
    import time

    from onnxprune.errors import OnnxPruneError
    from onnxprune.runtime.verify import make_session

    sessions = []
    for m in models:
        sess = make_session(m.SerializeToString(), (provider,), options=options, label="sweep model")
        if sess.get_providers()[0] != provider:
            raise OnnxPruneError(f"onnxruntime could not use {provider} for the sweep model "
                                 f"(it fell back to {sess.get_providers()[0]}); is the device present?")
        for _ in range(warmup):
            sess.run(None, feeds)
        sessions.append(sess)
        if on_point:
            on_point()
    for r in range(repeat):
        order = range(len(sessions)) if r % 2 == 0 else range(len(sessions) - 1, -1, -1)
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)


def sweep_chain(chain: ConvChain, *, window: int = 48, provider: str = "CPUExecutionProvider",
                threads: int | None = None, warmup: int = 2, repeat: int = 10,
                on_point: Callable[[], None] | None = None) -> StepTable:
    """Time :func:`chain_model` at every group size ``c`` in ``[c0 - window + 1, c0]`` (at
    least 1): ms per count = minimum of ``repeat`` interleaved passes after ``warmup`` runs
    (:func:`_time_interleaved`). ``on_point`` is called once per count (session ready).

    Raises:
        ValueError: a window below 1.
        OnnxPruneError: the provider is not available or a run fails.
    """
    if window < 1:
        raise ValueError(f"sweep window must be >= 1, got {window}")
    p = chain.producer
    counts = np.arange(max(1, chain.c0 - window + 1), chain.c0 + 1)
    ms = _time_interleaved(lambda i: chain_model(chain, int(counts[i])), len(counts), (p.batch, p.cin, p.h, p.w),
                           provider=provider, threads=threads, warmup=warmup, repeat=repeat, on_point=on_point)
    return StepTable(chain.label(), chain.axis, counts, ms)


# ------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class SweepResult:
    """Step tables of a model, the chosen round_to and the gain per candidate.

    ``method`` is ``"chain"`` (``chains`` were swept, rule 2) or ``"single-node"`` (the
    fallback: ``shapes`` were swept as single convs); ``"none"`` when nothing was swept.
    """

    shapes: tuple[ConvShape, ...]
    tables: tuple[StepTable, ...]
    round_to: int
    gains: Mapping[int, float] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"
    chains: tuple[ConvChain, ...] = ()
    method: str = "chain"

    def to_dict(self) -> dict[str, Any]:
        return {"round_to": self.round_to, "provider": self.provider, "method": self.method,
                "gains": {str(k): v for k, v in self.gains.items()},
                "chains": [c.to_dict() for c in self.chains],
                "shapes": [s.to_dict() for s in self.shapes], "tables": [t.to_dict() for t in self.tables]}


def channel_sweep(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *, top: int = 3,
                  window: int = 48, provider: str = "CPUExecutionProvider", threads: int | None = None,
                  warmup: int = 2, repeat: int = 10, candidates: Sequence[int] = CANDIDATES,
                  on_point: Callable[[], None] | None = None, analysis: Any = None) -> SweepResult:
    """Sweep the ``top`` most expensive conv chains of ``model`` (rule 2) and choose round_to.

    ``model``: canonical model; ``shapes``: concrete shape of every tensor
    (``Analysis.shapes``); ``analysis``: its :class:`~onnxprune.analysis.Analysis`
    (computed when None). A model without a chain falls back to single-node sweeps of its
    ``top`` most expensive conv shapes; one without a 2-D conv gives no tables and
    round_to 1. Time: about ``top * window`` session creations plus ``warmup + repeat``
    runs each (twice that for the fallback's ordinary convs).
    """
    chains = conv_chains(model, shapes, analysis, top)
    if chains:
        tables = tuple(sweep_chain(ch, window=window, provider=provider, threads=threads, warmup=warmup,
                                   repeat=repeat, on_point=on_point) for ch in chains)
        n, gains = choose_round_to(tables, candidates)
        return SweepResult((), tables, n, gains, provider, tuple(chains), "chain")
    convs = conv_shapes(model, shapes, top)
    tables = tuple(sweep_shape(s, axis, window=window, provider=provider, threads=threads, warmup=warmup,
                               repeat=repeat, on_point=on_point)
                   for s in convs for axis in sweep_axes(s))
    n, gains = choose_round_to(tables, candidates)
    return SweepResult(tuple(convs), tables, n, gains, provider, (), "single-node" if tables else "none")


def sweep_points(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *, top: int = 3,
                 window: int = 48, analysis: Any = None) -> int:
    """How many models :func:`channel_sweep` will time with the same arguments (progress bars)."""
    chains = conv_chains(model, shapes, analysis, top)
    if chains:
        return sum(ch.c0 - max(1, ch.c0 - window + 1) + 1 for ch in chains)
    total = 0
    for s in conv_shapes(model, shapes, top):
        for axis in sweep_axes(s):
            c0 = s.cout if axis != "in" else s.cin
            total += c0 - max(1, c0 - window + 1) + 1
    return total
