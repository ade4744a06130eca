"""Torch evaluation of an ONNX graph, node by node, for gradient-based criteria.

Every float initializer becomes an ``nn.Parameter`` reachable under its ONNX name
(:meth:`TorchGraph.parameter`); integer constants stay plain tensors. Each node is
evaluated by its op handler's ``evaluate`` method (the same handler that knows the op's
channel rules, see :mod:`onnxprune.ops`). A *channel gate* (a multiplicative mask along
a tensor's channel axis) can be put on any activation tensor, which is how Taylor and
IFSO differentiate the loss with respect to channels.

No torchvision or onnx2torch: the ops are written with ``torch`` functional calls.

Speed (README "Executor speed"): the nodes run as a flat program over integer slots
(:mod:`onnxprune.executor.program`, values freed after their last use), chains that one
torch kernel computes exactly run as one step (:mod:`onnxprune.executor.fusion`), conv
stacks run in ``channels_last``; half-precision models compute in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from onnxprune.analysis.analyze import model_opset
from onnxprune.errors import OnnxPruneError, UnsupportedModelError, first_line
from onnxprune.executor.allocator import tune_allocator
from onnxprune.executor.compiling import compile_default, compiled
from onnxprune.executor.context import EvalContext
from onnxprune.executor.program import Program, build_program, eval_nodes
from onnxprune.ops.registry import get_evaluator


_HALF = ("float16", "bfloat16")


class TorchGraph(nn.Module):
    """A differentiable torch copy of an ONNX model.

    Float32 and float64 initializers keep their dtype. Half-precision ones (float16,
    bfloat16) are held and computed in float32: half-precision feeds are cast up at the
    input, ``Cast`` to a half type rounds to it but keeps float32 storage, and the graph
    outputs come back in float32 (:meth:`write_back` casts every parameter back to its
    initializer's own dtype). Other feeds must have the graph inputs' dtypes, as in
    onnxruntime.

    Args:
        model: a canonical model (weights as initializers).
        requires_grad: whether float initializers are trainable parameters.
        channels_last: run 4-D activations in ``torch.channels_last`` (4-D graph inputs
            are converted once at the input; every op then keeps or ignores the layout;
            4-D outputs are returned contiguous). None (default): when the model has a
            2-D Conv (torch's CPU and CUDA convolutions are faster in that layout).
        fuse: run chains that one torch kernel computes exactly as one step (Conv+BN,
            hard-swish, SiLU: :mod:`onnxprune.executor.fusion`).
        compile: run the step loop through ``torch.compile``; None (default): off
            (measured not to pay, :mod:`onnxprune.executor.compiling`). Raises
            OnnxPruneError at the first forward where inductor's toolchain is missing.

    Raises:
        UnsupportedModelError: when an op has no torch evaluation (the message lists
            every such op with one node that uses it).
    """

    def __init__(self, model: onnx.ModelProto, *, requires_grad: bool = True, channels_last: bool | None = None,
                 fuse: bool = True, compile: bool | None = None) -> None:
        super().__init__()
        tune_allocator()  # activations reused instead of page-faulted at every pass
        graph = gs.import_onnx(model)
        graph.toposort()
        self.opset = model_opset(model)
        self._ctx = EvalContext(self.opset)
        missing: dict[str, str] = {}
        for node in graph.nodes:
            if get_evaluator(node.op, self.opset, node.domain or "") is None:
                missing.setdefault(node.op, node.name)
        if missing:
            ops = ", ".join(f"{op} (node {name})" for op, name in missing.items())
            raise UnsupportedModelError(f"no torch evaluation for op(s): {ops}")
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        self._nodes = list(graph.nodes)
        self._enodes = eval_nodes(self._nodes)
        self._params = nn.ParameterList()
        self._param_index: dict[str, int] = {}
        self._consts: dict[str, torch.Tensor] = {}
        self._const_values: dict[str, np.ndarray] = {}
        self._slot_of: dict[str, int] = {}

        def slot(name: str) -> int:
            if name not in self._slot_of:
                self._slot_of[name] = len(self._slot_of) + 1  # slot 0: an omitted input
            return self._slot_of[name]

        for name in self.input_names:
            slot(name)
        self._param_slots: list[int] = []
        self._const_slots: list[tuple[int, str]] = []
        if channels_last is None:
            channels_last = any(n.op == "Conv" and len(n.inputs) > 1 and len(n.inputs[1].shape or ()) == 4
                                for n in graph.nodes)
        self.channels_last = bool(channels_last)
        # 2-D Conv weights are held in channels_last too: oneDNN would otherwise reorder the
        # weight at every forward and autograd copy its gradient back at every backward
        cl_weights = {n.inputs[1].name for n in graph.nodes if n.op == "Conv" and len(n.inputs) > 1
                      and len(n.inputs[1].shape or ()) == 4} if self.channels_last else set()
        for name, t in graph.tensors().items():
            if not isinstance(t, gs.Constant):
                continue
            arr = np.asarray(t.values)
            self._const_values[name] = arr
            if arr.dtype.name in _HALF:  # computed in float32 (exact: every half value is a float32)
                arr = arr.astype(np.float32)
            if np.issubdtype(arr.dtype, np.floating):
                self._param_index[name] = len(self._params)
                value = torch.from_numpy(arr.copy())
                if name in cl_weights and value.dim() == 4:
                    value = value.contiguous(memory_format=torch.channels_last)
                self._params.append(nn.Parameter(value, requires_grad=requires_grad))
                self._param_slots.append(slot(name))
            else:
                self._consts[name] = torch.from_numpy(arr.copy())
                self._const_slots.append((slot(name), name))
        for node in self._nodes:
            for t in node.outputs:
                if t.name:
                    slot(t.name)
        self._gates: dict[str, tuple[int, torch.Tensor]] = {}
        # node name -> {input index: (axis, gate)}; empty unless set_input_gate was called
        self._input_gates: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}
        # node name -> evaluator used instead of the handler's (see override_node)
        self._overrides: dict[str, Callable] = {}
        self._node_info = [(n.name, n.op, n.domain or "", tuple(t.name for t in n.inputs)) for n in graph.nodes]
        self._node_inputs = {name: len(ins) for name, _, _, ins in self._node_info}
        self._fuse = bool(fuse)
        self._ctx = EvalContext(self.opset, self.channels_last)
        self._program: Program | None = None
        self._compile = compile
        self._compiled: Callable | None = None

    # ---- parameters and gates ----------------------------------------------------------
    def parameter(self, name: str) -> nn.Parameter:
        """The parameter holding initializer ``name``. Raises KeyError when there is none."""
        return self._params[self._param_index[name]]

    def named_onnx_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(ONNX initializer name, parameter) for every float initializer."""
        for name, i in self._param_index.items():
            yield name, self._params[i]

    def set_gate(self, tensor: str, axis: int, gate: torch.Tensor) -> None:
        """Multiply activation ``tensor`` by ``gate`` (1-D, one entry per position of ``axis``)."""
        self._gates[tensor] = (int(axis), gate)
        self._program = None

    def nodes(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(name, op type, domain, input tensor names; "" for an omitted input) of every
        node, in evaluation order."""
        return list(self._node_info)

    def set_input_gate(self, node_name: str, input_index: int, axis: int,
                       gate: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """Multiply the value node ``node_name`` reads at input ``input_index`` by ``gate``.

        ``gate`` is 1-D with one entry per position of ``axis`` of that input (broadcast
        like :meth:`set_gate`, cast to the input's dtype), or a zero-argument callable
        returning one, called at every forward (so a gate derived from a leaf, e.g. a
        gather ``G[index]``, follows in-place changes of the leaf and builds a fresh
        autograd graph per pass). Other consumers of the same tensor see it ungated.

        Raises:
            KeyError: no node called ``node_name``; IndexError: no such input.
        """
        n = self._node_inputs[node_name]
        if not 0 <= input_index < n:
            raise IndexError(f"node {node_name} has {n} inputs, got input index {input_index}")
        self._input_gates.setdefault(node_name, {})[int(input_index)] = (int(axis), gate)
        self._program = None

    def override_node(self, node_name: str, fn: Callable | None) -> None:
        """Evaluate node ``node_name`` with ``fn`` instead of its op handler (None restores it).

        ``fn(node, inputs, ctx) -> list[torch.Tensor]`` has the handlers' ``evaluate``
        signature: ``node`` carries ``op``, ``name``, ``attrs``, ``n_outputs``; ``inputs``
        are the node's input values (None for omitted ones), gates already applied. Used
        to observe or replace one node, e.g. BatchNormalization with batch statistics
        (:mod:`onnxprune.recover.bn`).

        Raises:
            KeyError: no node called ``node_name``.
        """
        if node_name not in self._node_inputs:
            raise KeyError(node_name)
        if fn is None:
            self._overrides.pop(node_name, None)
        else:
            self._overrides[node_name] = fn
        self._program = None

    def clear_gates(self) -> None:
        """Remove every tensor gate and every input gate."""
        self._gates.clear()
        self._input_gates.clear()
        self._program = None

    # ---- evaluation ----------------------------------------------------------------------
    def program(self) -> Program:
        """The evaluation program for the current gates and overrides (built on demand)."""
        if self._program is None:
            self._program = build_program(
                self._nodes, self._enodes, self._slot_of, len(self._slot_of) + 1, self.input_names,
                self.output_names, self.opset, consts=self._const_values, overrides=self._overrides,
                input_gates=self._input_gates, tensor_gates=self._gates, fuse=self._fuse)
            self._compiled = None
        return self._program

    def forward(self, *args: torch.Tensor, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Evaluate the graph; inputs positionally (graph input order) or by name.

        Returns:
            The graph outputs, in order (half-precision ones in float32, see the class).

        Raises:
            OnnxPruneError: a node's evaluation raised a torch RuntimeError (e.g. a
                hard-coded batch in a Reshape, see :mod:`onnxprune.batching`); the message
                names the node, its op and its input shapes. With ``compile=True``: the
                platform lacks torch.compile's toolchain.
        """
        prog = self.program()
        env: list = [None] * prog.n_slots
        for name, v in zip(self.input_names, args):
            feeds[name] = v
        for name, s in zip(self.input_names, prog.input_slots):
            if name in feeds:
                env[s] = self._feed(feeds.pop(name))
        for name, v in feeds.items():  # a named feed that is no graph input (e.g. an inner tensor)
            s = self._slot_of.get(name)
            if s is not None:
                env[s] = v
        params = list(self._params._parameters.values())  # ParameterList's own indexing is slow
        for s, p in zip(self._param_slots, params):
            env[s] = p
        if self._const_slots:
            dev = params[0].device if params else torch.device("cpu")
            for s, name in self._const_slots:
                c = self._consts[name]
                if c.device != dev:
                    c = self._consts[name] = c.to(dev)
                env[s] = c
        self._runner(env[prog.input_slots[0]] if prog.input_slots else None)(prog.steps, env, self._ctx)
        return tuple(o.contiguous() if o.dim() == 4 else o for o in (env[s] for s in prog.output_slots))

    def _feed(self, v: torch.Tensor) -> torch.Tensor:
        """A graph input as the program runs it: half floats in float32, 4-D in channels_last."""
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()
        if self.channels_last and v.dim() == 4 and v.is_floating_point():
            v = v.contiguous(memory_format=torch.channels_last)
        return v

    def _runner(self, x: torch.Tensor | None) -> Callable:
        """The step loop: eager, or compiled when asked (:mod:`onnxprune.executor.compiling`)."""
        if self._compile is None:
            self._compile = compile_default()
        if not self._compile:
            return run_steps
        if self._compiled is None:
            self._compiled = compiled(run_steps, x.device.type if x is not None else "cpu")
        return self._compiled

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Copy of ``model`` whose float initializers hold this module's parameter values."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for init in out.graph.initializer:
            if init.name in self._param_index:
                arr = self.parameter(init.name).detach().cpu().numpy()
                dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(dtype), init.name))
        return out


def run_steps(steps, env: list, ctx: EvalContext) -> None:
    """Run ``steps`` (:class:`~onnxprune.executor.program.Step`) over the slot list ``env``.

    Raises:
        OnnxPruneError: a step raised a torch RuntimeError (node, op and input shapes named).
    """
    for step in steps:
        vals = [env[i] for i in step.ins]
        try:
            if step.in_gates:
                for i, axis, gate in step.in_gates:
                    v = vals[i]
                    if callable(gate):
                        gate = gate()
                    shape = [1] * v.dim()
                    shape[axis] = -1
                    vals[i] = v * gate.to(v.dtype).view(shape)
            res = step.fn(step.node, vals, ctx)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a shape / dtype mismatch in torch: name the node
            shapes = ", ".join("-" if v is None else str(list(v.shape)) for v in vals)
            raise OnnxPruneError(f"node {step.node.name!r} ({step.op}) failed on inputs of shapes {shapes}: "
                                 f"{first_line(e)}") from e
        if step.out_gates:
            res = list(res)
            for j, axis, gate in step.out_gates:
                v = res[j]
                shape = [1] * v.dim()
                shape[axis] = -1
                res[j] = v * gate.view(shape)
        for s, v in zip(step.outs, res):
            if s:
                env[s] = v
        for s in step.frees:
            env[s] = None
    return None


def to_torch(feeds: Mapping[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """numpy feeds -> torch tensors on ``device``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v).reshape(np.shape(v))).to(device) for k, v in feeds.items()}
