"""Channel gates on a :class:`~onnxprune.executor.graph_module.TorchGraph`.

One flat gate vector ``G`` covers every channel of every group (group ``g``'s channels
at ``offsets[g] .. offsets[g] + size``). Its entries multiply the *inputs of the
channel-reducing nodes* (Conv, ConvTranspose, Gemm, MatMul: ``handler.reduces_channels``)
wherever such an input is a tracked activation, which is exactly where the surgery
oracle (:func:`onnxprune.surgery.oracle.zeroed_reference`) zeroes removed channels. So
setting ``G[offsets[g] + c] = 0`` computes what removing channel ``c`` of group ``g``
computes, and ``dL/dG`` is the first-order effect of removing each channel.

Positions of a tensor that repeat a channel (after Flatten one channel spans H*W
features) gather the same entry of ``G``, so their gradients add up into one.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from onnxprune.analysis.groups import Analysis
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.ops.registry import get_handler


def group_offsets(analysis: Analysis) -> np.ndarray:
    """int64 [num groups + 1]: start of each group's channels in the flat gate vector."""
    return np.cumsum([0] + [g.size for g in analysis.groups]).astype(np.int64)


def gate_sites(nodes, analysis: Analysis) -> list[tuple[str, int, str]]:
    """(node name, input index, tensor name) of every tracked input of a reducing node.

    Args:
        nodes: the canonical model (``onnx.ModelProto``) or ``TorchGraph.nodes()``.
        analysis: its analysis.
    """
    if isinstance(nodes, onnx.ModelProto):
        nodes = [(n.name, n.op, n.domain or "", tuple(t.name for t in n.inputs))
                 for n in gs.import_onnx(nodes).nodes]
    sites = []
    for name, op, domain, inputs in nodes:
        handler = get_handler(op, analysis.opset, domain)
        if handler is None or not handler.reduces_channels:
            continue
        for i, t in enumerate(inputs):
            # initializers are never in analysis.channels (it tracks activations only)
            if t and t in analysis.channels:
                sites.append((name, i, t))
    return sites


def channel_gates(analysis: Analysis, graph: TorchGraph, device: str | torch.device = "cpu", *,
                  model: onnx.ModelProto | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, np.ndarray]:
    """Install one gate vector on every reducing node input that carries group channels.

    Args:
        analysis: the analysis of ``model``.
        graph: a TorchGraph of ``model`` (its existing gates are cleared first).
        device: where ``G`` lives (the graph's device).
        model: the canonical model the analysis was computed on; node names and inputs
            are read from it, or from ``graph.nodes()`` (the same model's nodes) when None.
        dtype: dtype of ``G`` (each input gate is cast to the dtype of what it multiplies).

    Returns:
        ``(G, offsets)``: ``G`` float [sum of group sizes], all ones, ``requires_grad``;
        ``offsets`` int64 [num groups + 1] from :func:`group_offsets`.
    """
    offsets = group_offsets(analysis)
    G = torch.ones(int(offsets[-1]), dtype=dtype, device=device, requires_grad=True)
    graph.clear_gates()
    for node_name, i, tensor in gate_sites(model if model is not None else graph.nodes(), analysis):
        tc = analysis.channels[tensor]
        idx = offsets[analysis.elem_group[tc.elems]] + analysis.elem_channel[tc.elems]
        index = torch.as_tensor(idx, dtype=torch.long, device=device)
        graph.set_input_gate(node_name, i, tc.axis, _Gather(G, index))
    return G, offsets


class _Gather:
    """``G[index]`` evaluated at each forward, so in-place edits of ``G`` (zeroing a
    channel) take effect and every pass builds its own autograd graph."""

    __slots__ = ("G", "index")

    def __init__(self, G: torch.Tensor, index: torch.Tensor) -> None:
        self.G, self.index = G, index

    def __call__(self) -> torch.Tensor:
        return self.G[self.index]

