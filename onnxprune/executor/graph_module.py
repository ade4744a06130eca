"""Torch evaluation of an ONNX graph, node by node, for gradient-based criteria.

Every float initializer becomes an ``nn.Parameter`` reachable under its ONNX name
(:meth:`TorchGraph.parameter`); integer constants stay plain tensors. Each node is
evaluated by its op handler's ``evaluate`` method (the same handler that knows the op's
channel rules, see :mod:`onnxprune.ops`). A *channel gate* (a multiplicative mask along
a tensor's channel axis) can be put on any activation tensor, which is how Taylor and
IFSO differentiate the loss with respect to channels.

No torchvision or onnx2torch: the ops are written with ``torch`` functional calls.
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
from onnxprune.executor.context import EvalContext, EvalNode
from onnxprune.ops.registry import get_evaluator


class TorchGraph(nn.Module):
    """A differentiable torch copy of an ONNX model.

    Float initializers keep their dtype (float32, float16, float64); feeds must have the
    graph inputs' dtypes, as in onnxruntime.

    Args:
        model: a canonical model (weights as initializers).
        requires_grad: whether float initializers are trainable parameters.

    Raises:
        UnsupportedModelError: when an op has no torch evaluation (the message lists
            every such op with one node that uses it).
    """

    def __init__(self, model: onnx.ModelProto, *, requires_grad: bool = True) -> None:
        super().__init__()
        graph = gs.import_onnx(model)
        graph.toposort()
        self.opset = model_opset(model)
        self._ctx = EvalContext(self.opset)
        missing: dict[str, str] = {}
        self._plan = []
        for node in graph.nodes:
            fn = get_evaluator(node.op, self.opset, node.domain or "")
            if fn is None:
                missing.setdefault(node.op, node.name)
            self._plan.append((EvalNode(node.op, node.name, dict(node.attrs), len(node.outputs)), fn,
                               [t.name for t in node.inputs], [t.name for t in node.outputs]))
        if missing:
            ops = ", ".join(f"{op} (node {name})" for op, name in missing.items())
            raise UnsupportedModelError(f"no torch evaluation for op(s): {ops}")
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        self._params = nn.ParameterList()
        self._param_index: dict[str, int] = {}
        self._consts: dict[str, torch.Tensor] = {}
        for name, t in graph.tensors().items():
            if not isinstance(t, gs.Constant):
                continue
            arr = np.asarray(t.values)
            if np.issubdtype(arr.dtype, np.floating):
                self._param_index[name] = len(self._params)
                # keep the initializer's own float type: ops must see ONNX's dtypes
                self._params.append(nn.Parameter(torch.from_numpy(arr.copy()), requires_grad=requires_grad))
            else:
                self._consts[name] = torch.from_numpy(arr.copy())
        self._gates: dict[str, tuple[int, torch.Tensor]] = {}
        # node name -> {input index: (axis, gate)}; empty unless set_input_gate was called
        self._input_gates: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}
        # node name -> evaluator used instead of the handler's (see override_node)
        self._overrides: dict[str, Callable] = {}
        self._node_info = [(n.name, n.op, n.domain or "", tuple(t.name for t in n.inputs)) for n in graph.nodes]
        self._node_inputs = {name: len(ins) for name, _, _, ins in self._node_info}

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

    def clear_gates(self) -> None:
        """Remove every tensor gate and every input gate."""
        self._gates.clear()
        self._input_gates.clear()

    # ---- evaluation ----------------------------------------------------------------------
    def forward(self, *args: torch.Tensor, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Evaluate the graph; inputs positionally (graph input order) or by name.

        Returns:
            The graph outputs, in order.

        Raises:
            OnnxPruneError: a node's evaluation raised a torch RuntimeError (e.g. a
                hard-coded batch in a Reshape, see :mod:`onnxprune.batching`); the message
                names the node, its op and its input shapes.
        """
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, args))
        env.update(feeds)
        dev = next(iter(self._params), torch.empty(0)).device
        for name, i in self._param_index.items():
            env[name] = self._params[i]
        for name, c in self._consts.items():
            env[name] = c.to(dev) if c.device != dev else c
        for node, fn, ins, outs in self._plan:
            vals = [env[n] if n else None for n in ins]
            try:
                self._eval_node(node, fn, vals, outs, env)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a shape / dtype mismatch in torch: name the node
                shapes = ", ".join("-" if v is None else str(list(v.shape)) for v in vals)
                raise OnnxPruneError(f"node {node.name!r} ({node.op}) failed on inputs of shapes {shapes}: "
                                     f"{first_line(e)}") from e
        return tuple(env[n] for n in self.output_names)

    def _eval_node(self, node: EvalNode, fn: Callable, vals: list, outs: list[str],
                   env: dict[str, torch.Tensor]) -> None:
        """Evaluate one node (its input gates, override, output gates) into ``env``."""
        vals = list(vals)
        ig = self._input_gates.get(node.name) if self._input_gates else None
        if ig is not None:
            for i, (axis, gate) in ig.items():
                v = vals[i]
                if callable(gate):
                    gate = gate()
                shape = [1] * v.dim()
                shape[axis] = -1
                vals[i] = v * gate.to(v.dtype).view(shape)
        if self._overrides and node.name in self._overrides:
            fn = self._overrides[node.name]
        res = fn(node, vals, self._ctx)
        for n, v in zip(outs, res):
            if not n:
                continue
            g = self._gates.get(n)
            if g is not None:
                axis, gate = g
                shape = [1] * v.dim()
                shape[axis] = -1
                v = v * gate.view(shape)
            env[n] = v

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


def to_torch(feeds: Mapping[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """numpy feeds -> torch tensors on ``device``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v).reshape(np.shape(v))).to(device) for k, v in feeds.items()}
