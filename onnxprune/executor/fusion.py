"""Chains of ONNX nodes that one fused torch kernel computes exactly.

Exporters often spell an activation as a chain of elementwise nodes (hard-swish as
``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``, SiLU as ``Mul(x, Sigmoid(x))``) and keep
BatchNormalization after a Conv. Evaluated node by node each link is one pass over the
activation; :func:`find_fusions` finds the chains that the executor may run as one torch
call instead:

- ``Conv -> [BatchNormalization] -> [Mul(., c)] -> [Add(., c)]`` (inference BN with
  constant 1-D parameters; ``c`` constants with one value per channel or one value, the
  "learnable affine blocks" of PP-OCRv4): the per-channel scale and shift are folded
  into the Conv's weight and bias at every forward (weight-sized work, differentiable in
  every parameter), as onnxruntime does;
- ``Mul(x, c1) -> Add(., c2)`` with constant ``c1``, ``c2``: ``torch.addcmul`` (one pass);
- ``Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6)`` and
  ``HardSigmoid(x; alpha=1/6, beta=0.5) -> Mul(x, .)``: ``F.hardswish(x)``;
- ``Sigmoid(x) -> Mul(x, .)``: ``F.silu(x)``;
- ``Relu -> MaxPool``: pooled first, then ``relu`` on the smaller tensor (equal values);
- ``MatMul(A, B) -> Add(., bias)`` with constant 2-D B and 1-D bias: ``F.linear`` (one
  GEMM with the bias, on oneDNN where it can: :mod:`onnxprune.ops._onednn`).

A chain is fused only when nothing can observe its inner tensors: every inner tensor
has exactly one consumer (the next link), is no graph output and carries no gate, and
no link but the first has an input gate or an override (the first link's input gates
still apply, its inputs keep their indices). Scalar constants of a pattern (3, 6, 0,
alpha, beta) are read once, from the initializers, when the chain is found, and are
constants of the fused step: no gradient reaches them (nothing trains or scores them:
they are no weights, see :func:`onnxprune.recover.training.trainable_initializers`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.executor.context import EvalContext, EvalNode
from onnxprune.ops._onednn import linear
from onnxprune.ops._torch import F, torch
from onnxprune.ops.norm import batch_norm_affine, batch_norm_is_inference
from onnxprune.ops.registry import get_evaluator


@dataclass(frozen=True)
class Fusion:
    """One chain of nodes run as one step.

    Attributes:
        nodes: the chain's nodes, first to last.
        op: a label for error messages (``"Conv+BatchNormalization"``).
        inputs: tensor names the fused step reads ("" = an omitted input); the first
            link's inputs come first, at their own indices.
        outputs: tensor names it writes (the last link's outputs).
        fn: ``fn(node, inputs, ctx) -> list[torch.Tensor]``, the handlers' signature;
            ``node`` is the first link's :class:`EvalNode`.
    """

    nodes: tuple[gs.Node, ...]
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: Callable


def _scalar(t: gs.Tensor, consts: Mapping[str, np.ndarray]) -> float | None:
    """The value of a one-element float initializer, else None."""
    arr = consts.get(t.name) if t.name else None
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    return float(arr.reshape(-1)[0])


class _Graph:
    """Consumers of each tensor and the rules of what may be fused."""

    def __init__(self, nodes: list[gs.Node], outputs: Collection[str], consts: Mapping[str, np.ndarray],
                 pinned_nodes: Collection[str], gated_nodes: Collection[str], gated_tensors: Collection[str],
                 opset: int) -> None:
        self.consumers: dict[str, list[gs.Node]] = {}
        for n in nodes:
            for t in n.inputs:
                if t.name:
                    self.consumers.setdefault(t.name, []).append(n)
        self.outputs, self.consts, self.opset = set(outputs), consts, opset
        self.pinned, self.gated_nodes, self.gated_tensors = set(pinned_nodes), set(gated_nodes), set(gated_tensors)

    def only_consumer(self, t: gs.Tensor) -> gs.Node | None:
        """The single consumer of inner tensor ``t`` when nothing else can see ``t``."""
        if t.name in self.outputs or t.name in self.gated_tensors:
            return None
        users = self.consumers.get(t.name, [])
        return users[0] if len(users) == 1 else None

    def free_link(self, n: gs.Node, first: bool = False) -> bool:
        """Whether ``n`` may be absorbed (no override; no input gate unless it is the first)."""
        return n.name not in self.pinned and (first or n.name not in self.gated_nodes)

    def unused(self, tensors) -> bool:
        return all(not t.name or (t.name not in self.outputs and not self.consumers.get(t.name)) for t in tensors)


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of binary ``node`` that is not ``t`` (None if ``t`` is not an input)."""
    ins = [i for i in node.inputs]
    if len(ins) != 2:
        return None
    if ins[0] is t:
        return ins[1]
    if ins[1] is t:
        return ins[0]
    return None


def _channel_const(t: gs.Tensor | None, g: _Graph, c_out: int, rank: int) -> bool:
    """Whether ``t`` is a float initializer that broadcasts against a Conv output [N, C, ...]
    of ``rank`` dims as one value per channel (or one value): () / (1,) / (1, C, 1, ...) /
    (C, 1, ...)."""
    arr = g.consts.get(t.name) if t is not None and t.name else None
    if arr is None or arr.dtype.kind != "f" or arr.ndim > rank:
        return False
    if arr.size == 1:
        return True
    ones = (1,) * (rank - 2)
    return arr.shape in ((1, c_out) + ones, (c_out,) + ones)


def _conv_affine(conv: gs.Node, g: _Graph) -> Fusion | None:
    """Conv -> [BatchNormalization] -> [Mul(., c)] -> [Add(., c)], at least one of the three."""
    if conv.op != "Conv" or not g.free_link(conv, first=True) or len(conv.inputs) < 2:
        return None
    w = conv.inputs[1]
    b = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if w.name not in g.consts or (b is not None and b.name not in g.consts):
        return None
    c_out, rank = g.consts[w.name].shape[0], g.consts[w.name].ndim
    links, steps = [conv], []
    ins = [t.name for t in conv.inputs] + [""] * (3 - len(conv.inputs))
    t = conv.outputs[0]
    nxt = g.only_consumer(t)
    if nxt is not None and nxt.op == "BatchNormalization" and g.free_link(nxt) and nxt.inputs[0] is t \
            and batch_norm_is_inference(nxt.attrs, g.opset) and g.unused(nxt.outputs[1:]) \
            and len(nxt.inputs) == 5 \
            and all(p.name in g.consts and g.consts[p.name].shape == (c_out,) for p in nxt.inputs[1:5]):
        steps.append(("bn", len(ins), EvalNode(nxt.op, nxt.name, dict(nxt.attrs), len(nxt.outputs))))
        ins += [p.name for p in nxt.inputs[1:5]]
        links.append(nxt)
        t = nxt.outputs[0]
        nxt = g.only_consumer(t)
    for op in ("Mul", "Add"):
        if nxt is None or nxt.op != op or not g.free_link(nxt):
            continue
        c = _other(nxt, t)
        if not _channel_const(c, g, c_out, rank):
            continue
        steps.append((op, len(ins), None))
        ins.append(c.name)
        links.append(nxt)
        t = nxt.outputs[0]
        nxt = g.only_consumer(t)
    if len(links) == 1:
        return None
    conv_fn = get_evaluator("Conv", g.opset)
    memo: dict = {}  # the folded (weight, bias) of frozen parameters, by their identity and version

    def fn(node: EvalNode, vals: list, ctx: EvalContext) -> list:
        x, w_ = vals[0], vals[1]
        params = vals[1:]
        if any(t is not None and t.requires_grad for t in params):
            # folding costs passes over the weight (and its gradient): when the weight is
            # bigger than the output (e.g. batch 1), scale the output instead
            if w_.numel() > x.shape[0] * w_.shape[0] * (x.numel() // max(1, x.shape[0] * x.shape[1])):
                y = conv_fn(node, [x, w_, vals[2]], ctx)[0]
                mul, shift = _affine(vals)
                shape = (1, -1) + (1,) * (y.dim() - 2)
                if mul is not None:
                    y = y * mul.reshape(shape) if shift is None else torch.addcmul(shift.reshape(shape), y,
                                                                                    mul.reshape(shape))
                elif shift is not None:
                    y = y + shift.reshape(shape)
                return [y]
            return conv_fn(node, [x, *_fold(vals)], ctx)
        key = tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in params)
        if memo.get("key") != key:
            memo["key"], memo["wb"] = key, _fold(vals)
        return conv_fn(node, [x, *memo["wb"]], ctx)

    def _affine(vals: list) -> tuple:
        """(mul, shift): the chain after the Conv is ``y * mul + shift`` (each [C], [1] or None)."""
        mul = shift = None
        for kind, pos, bn_node in steps:
            if kind == "bn":
                m, sft = batch_norm_affine(bn_node, *vals[pos:pos + 4])
            elif kind == "Mul":
                m, sft = vals[pos].reshape(-1), None
            else:
                m, sft = None, vals[pos].reshape(-1)
            if m is not None:
                mul = m if mul is None else mul * m
                shift = None if shift is None else shift * m
            if sft is not None:
                shift = sft if shift is None else shift + sft
        return mul, shift

    def _fold(vals: list) -> tuple:
        """(weight, bias) of the Conv with the chain's per-channel scale and shift folded in."""
        w_, b_ = vals[1], vals[2]
        mul, shift = _affine(vals)
        if mul is not None:
            w_ = w_ * mul.reshape((-1,) + (1,) * (w_.dim() - 1))
            b_ = None if b_ is None else b_ * mul
        if shift is not None:
            b_ = shift if b_ is None else b_ + shift
            if b_.numel() == 1:
                b_ = b_.expand(w_.shape[0])
        return w_, b_

    return Fusion(tuple(links), "+".join(n.op for n in links), tuple(ins), (t.name,), fn)


def _affine_fn(node, vals, ctx):
    x, scale, shift = vals
    return [torch.addcmul(shift, x, scale)]


def _mul_add(mul: gs.Node, g: _Graph) -> Fusion | None:
    """Mul(x, c1) -> Add(., c2), c1 and c2 float initializers: ``addcmul(c2, x, c1)``."""
    if mul.op != "Mul" or len(mul.inputs) != 2 or not g.free_link(mul) or mul.name in g.gated_nodes:
        return None
    x, c1 = mul.inputs
    if c1.name not in g.consts:
        x, c1 = c1, x
    if c1.name not in g.consts or x.name in g.consts or g.consts[c1.name].dtype.kind != "f":
        return None
    add = g.only_consumer(mul.outputs[0])
    if add is None or add.op != "Add" or not g.free_link(add):
        return None
    c2 = _other(add, mul.outputs[0])
    if c2 is None or c2.name not in g.consts or g.consts[c2.name].dtype != g.consts[c1.name].dtype:
        return None
    return Fusion((mul, add), "Affine(Mul,Add)", (x.name, c1.name, c2.name), (add.outputs[0].name,), _affine_fn)


def _hardswish_fn(node, vals, ctx):
    return [F.hardswish(vals[0])]


def _silu_fn(node, vals, ctx):
    return [F.silu(vals[0])]


def _times_x(first: gs.Node, x: gs.Tensor, t: gs.Tensor, g: _Graph) -> gs.Node | None:
    """The ``Mul(x, t)`` (either order) that alone consumes ``t``, else None."""
    mul = g.only_consumer(t)
    if mul is None or mul.op != "Mul" or not g.free_link(mul) or _other(mul, t) is not x:
        return None
    return mul


def _hardswish_chain(add: gs.Node, g: _Graph) -> Fusion | None:
    """Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6)."""
    if add.op != "Add" or len(add.inputs) != 2 or not g.free_link(add) or add.name in g.gated_nodes:
        return None
    x, three = add.inputs
    if _scalar(three, g.consts) != 3.0:
        x, three = three, x
        if _scalar(three, g.consts) != 3.0:
            return None
    if x.name in g.consts:
        return None
    clip = g.only_consumer(add.outputs[0])
    if clip is None or clip.op != "Clip" or not g.free_link(clip) or clip.inputs[0] is not add.outputs[0]:
        return None
    if g.opset < 11:
        lo, hi = clip.attrs.get("min"), clip.attrs.get("max")
    else:
        lo = _scalar(clip.inputs[1], g.consts) if len(clip.inputs) > 1 else None
        hi = _scalar(clip.inputs[2], g.consts) if len(clip.inputs) > 2 else None
    if lo is None or hi is None or float(lo) != 0.0 or float(hi) != 6.0:
        return None
    mul = _times_x(add, x, clip.outputs[0], g)
    if mul is None:
        return None
    div = g.only_consumer(mul.outputs[0])
    if div is None or div.op != "Div" or not g.free_link(div) or div.inputs[0] is not mul.outputs[0] \
            or _scalar(div.inputs[1], g.consts) != 6.0:
        return None
    return Fusion((add, clip, mul, div), "HardSwish(Add,Clip,Mul,Div)", (x.name,), (div.outputs[0].name,),
                  _hardswish_fn)


def _gate_chain(first: gs.Node, g: _Graph) -> Fusion | None:
    """HardSigmoid(x; 1/6, 0.5) -> Mul(x, .) (hard-swish) and Sigmoid(x) -> Mul(x, .) (SiLU)."""
    if first.op not in ("HardSigmoid", "Sigmoid") or not g.free_link(first) or first.name in g.gated_nodes:
        return None
    x = first.inputs[0]
    if first.op == "HardSigmoid":
        alpha, beta = float(first.attrs.get("alpha", 0.2)), float(first.attrs.get("beta", 0.5))
        if alpha != float(np.float32(1 / 6)) or beta != 0.5:
            return None
    mul = _times_x(first, x, first.outputs[0], g)
    if mul is None:
        return None
    if first.op == "HardSigmoid":
        return Fusion((first, mul), "HardSwish(HardSigmoid,Mul)", (x.name,), (mul.outputs[0].name,), _hardswish_fn)
    return Fusion((first, mul), "SiLU(Sigmoid,Mul)", (x.name,), (mul.outputs[0].name,), _silu_fn)


def _linear_fn(node, vals, ctx):
    a, b, bias = vals
    if a.dim() == 2:
        return [linear(a, b.t(), bias)]
    if a.dim() > 2 and a.is_contiguous():  # [..., K]: the rows as one matrix
        return [linear(a.reshape(-1, a.shape[-1]), b.t(), bias).reshape(*a.shape[:-1], b.shape[1])]
    return [F.linear(a, b.t(), bias)]


def _matmul_add(mm: gs.Node, g: _Graph) -> Fusion | None:
    """MatMul(A, B) -> Add(., bias), B a 2-D float initializer, bias a 1-D one of B's width."""
    if mm.op != "MatMul" or len(mm.inputs) != 2 or not g.free_link(mm, first=True):
        return None
    b = g.consts.get(mm.inputs[1].name)
    if b is None or b.ndim != 2 or b.dtype.kind != "f":
        return None
    add = g.only_consumer(mm.outputs[0])
    if add is None or add.op != "Add" or not g.free_link(add):
        return None
    bias = _other(add, mm.outputs[0])
    arr = g.consts.get(bias.name) if bias is not None else None
    if arr is None or arr.shape != (b.shape[1],) or arr.dtype != b.dtype:
        return None
    return Fusion((mm, add), "Linear(MatMul,Add)", (mm.inputs[0].name, mm.inputs[1].name, bias.name),
                  (add.outputs[0].name,), _linear_fn)


def _relu_maxpool(relu: gs.Node, g: _Graph) -> Fusion | None:
    """Relu -> MaxPool (no indices output): ``relu(maxpool(x))``, the same values (a window's
    max commutes with a non-decreasing function) on a tensor the pooling made smaller."""
    if relu.op != "Relu" or not g.free_link(relu, first=True):
        return None
    pool = g.only_consumer(relu.outputs[0])
    if pool is None or pool.op != "MaxPool" or not g.free_link(pool) or len(pool.outputs) != 1 \
            or pool.inputs[0] is not relu.outputs[0]:
        return None
    pool_fn = get_evaluator("MaxPool", g.opset)
    pool_node = EvalNode(pool.op, pool.name, dict(pool.attrs), 1)

    def fn(node: EvalNode, vals: list, ctx: EvalContext) -> list:
        return [torch.relu(pool_fn(pool_node, vals, ctx)[0])]

    return Fusion((relu, pool), "MaxPool+Relu", (relu.inputs[0].name,), (pool.outputs[0].name,), fn)


_MATCHERS = (_relu_maxpool, _conv_affine, _hardswish_chain, _gate_chain, _matmul_add, _mul_add)


def find_fusions(nodes: list[gs.Node], outputs: Collection[str], consts: Mapping[str, np.ndarray], opset: int, *,
                 pinned_nodes: Collection[str] = (), gated_nodes: Collection[str] = (),
                 gated_tensors: Collection[str] = ()) -> dict[str, Fusion]:
    """The fusable chains of a toposorted node list.

    Args:
        nodes: the graph's nodes in evaluation order.
        outputs: graph output names (never inner tensors of a chain).
        consts: initializer values by name (numpy); a pattern's constants must be here.
        opset: the default-domain opset.
        pinned_nodes: nodes with an override (never part of a chain).
        gated_nodes: nodes with input gates (only the first link of a chain may have them).
        gated_tensors: tensors with a tensor gate (never inner tensors of a chain).

    Returns:
        ``{id() of the chain's first node: Fusion}``; chains do not overlap.
    """
    g = _Graph(nodes, outputs, consts, pinned_nodes, gated_nodes, gated_tensors, opset)
    taken: set[int] = set()
    found: dict[int, Fusion] = {}
    for n in nodes:
        if id(n) in taken:
            continue
        for match in _MATCHERS:
            f = match(n, g)
            if f is not None and not any(id(m) in taken for m in f.nodes):
                found[id(n)] = f
                taken.update(id(m) for m in f.nodes)
                break
    return found
