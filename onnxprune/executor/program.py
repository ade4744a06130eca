"""The executor's evaluation program: ONNX nodes as a flat list of steps over integer slots.

Every tensor of the graph gets an integer *slot* in a list (slot 0 always holds None:
an omitted optional input). A :class:`Step` reads its input slots, calls its evaluation
function and writes its output slots; the slots whose value no later step reads are
cleared right after the step that reads them last (``frees``), so activations are
released as soon as possible instead of living until the end of the pass.

:func:`build_program` is called once per change of gates or overrides (not per forward):
it resolves each node's evaluator, its overrides and gates, and the fused chains
(:mod:`onnxprune.executor.fusion`), so the forward loop does no name lookups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.executor.context import EvalNode
from onnxprune.executor.fusion import find_fusions
from onnxprune.ops.registry import get_evaluator

#: (input or output index, axis, gate: a 1-D tensor or a zero-argument callable returning one)
Gate = tuple[int, int, object]


@dataclass(frozen=True)
class Step:
    """One evaluation: ``outs = fn(node, [slots[i] for i in ins], ctx)``.

    Attributes:
        node: what the op's ``evaluate`` receives (the first node of a fused chain).
        op: op type, or the chain's label (error messages).
        fn: the evaluator (handler's, override, or fused chain's).
        ins / outs: slot per input / output (0: omitted input, dropped output).
        frees: slots to clear after the step (values no later step reads).
        in_gates / out_gates: gates applied to inputs before / outputs after ``fn``.
    """

    node: EvalNode
    op: str
    fn: Callable
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    frees: tuple[int, ...]
    in_gates: tuple[Gate, ...]
    out_gates: tuple[Gate, ...]


@dataclass(frozen=True)
class Program:
    """The steps, the slot count and the slots of graph inputs and outputs."""

    steps: tuple[Step, ...]
    n_slots: int
    input_slots: tuple[int, ...]
    output_slots: tuple[int, ...]


def eval_nodes(nodes: Sequence[gs.Node]) -> list[EvalNode]:
    """One :class:`EvalNode` per node (made once per graph: evaluators cache into them)."""
    return [EvalNode(n.op, n.name, dict(n.attrs), len(n.outputs)) for n in nodes]


def build_program(nodes: Sequence[gs.Node], enodes: Sequence[EvalNode], slot_of: Mapping[str, int], n_slots: int,
                  input_names: Sequence[str], output_names: Sequence[str], opset: int, *,
                  consts: Mapping[str, np.ndarray], overrides: Mapping[str, Callable],
                  input_gates: Mapping[str, Mapping[int, tuple[int, object]]],
                  tensor_gates: Mapping[str, tuple[int, object]], fuse: bool) -> Program:
    """The program of a toposorted node list.

    Args:
        nodes: graph nodes in evaluation order; ``enodes`` their EvalNodes.
        slot_of: slot of every named tensor (graph inputs, initializers, node outputs).
        n_slots: total slots (slot 0 included).
        input_names / output_names: the graph's.
        opset: default-domain opset.
        consts: initializer values (numpy), for the constants of fused patterns.
        overrides: node name -> evaluator used instead of the handler's.
        input_gates: node name -> {input index: (axis, gate)}.
        tensor_gates: tensor name -> (axis, gate).
        fuse: whether to run fusable chains as one step.
    """
    fusions = find_fusions(list(nodes), output_names, consts, opset, pinned_nodes=overrides,
                           gated_nodes=input_gates, gated_tensors=tensor_gates) if fuse else {}
    absorbed = {id(m) for f in fusions.values() for m in f.nodes[1:]}
    raw: list[tuple[EvalNode, str, Callable, tuple[str, ...], tuple[str, ...]]] = []
    for n, en in zip(nodes, enodes):
        if id(n) in absorbed:
            continue
        f = fusions.get(id(n))
        if f is not None:
            raw.append((en, f.op, f.fn, f.inputs, f.outputs))
            continue
        fn = overrides.get(n.name) or get_evaluator(n.op, opset, n.domain or "")
        raw.append((en, n.op, fn, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)))
    keep = set(output_names)
    last: dict[int, int] = {}
    for k, (_, _, _, ins, _) in enumerate(raw):
        for t in ins:
            if t:
                last[slot_of[t]] = k
    frees: list[list[int]] = [[] for _ in raw]
    for s, k in last.items():
        frees[k].append(s)
    steps = []
    for k, (en, op, fn, ins, outs) in enumerate(raw):
        out_slots = tuple(slot_of[t] if t else 0 for t in outs)
        dead = [s for s, t in zip(out_slots, outs) if t and t not in keep and s not in last]  # never read
        ig = tuple((i, a, g) for i, (a, g) in sorted(input_gates.get(en.name, {}).items()))
        og = tuple((j, *tensor_gates[t]) for j, t in enumerate(outs) if t in tensor_gates)
        steps.append(Step(en, op, fn, tuple(slot_of[t] if t else 0 for t in ins), out_slots,
                          tuple(s for s in frees[k] + dead if s not in {slot_of[o] for o in keep}), ig, og))
    return Program(tuple(steps), n_slots, tuple(slot_of[t] for t in input_names),
                   tuple(slot_of[t] for t in output_names))
