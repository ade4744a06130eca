"""Channel analysis driver: walk the graph once, in topological order."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext
from onnxprune.analysis.groups import Analysis, build_analysis
from onnxprune.ops.registry import get_handler
from onnxprune.subgraphs import import_graph, outer_reads


def model_opset(model: onnx.ModelProto) -> int:
    """Opset of the default ONNX domain (``""`` or ``"ai.onnx"``)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def analyze(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> Analysis:
    """Find the channel groups of a canonical model.

    Rules: every node is handed to its op's handler (:mod:`onnxprune.ops`); a node
    without a handler is a barrier whose inputs' channels are blocked (the reason names
    the op and node) and whose outputs are untracked; graph inputs are untracked (their
    channels are fixed); channels that feed a graph output are blocked.

    Args:
        model: a canonical model (:func:`onnxprune.canonicalize.canonicalize`): weights as
            initializers, unique node names.
        shapes: concrete shape of every tensor (:func:`onnxprune.shapes.measure_shapes`).

    Returns:
        The :class:`Analysis`: groups, tensor channel maps and cost terms.
    """
    graph = import_graph(model)
    graph.toposort()
    opset = model_opset(model)
    ctx = AnalysisContext(graph, dict(shapes), opset)
    nested = outer_reads(model.graph)
    tensors = graph.tensors() if nested else {}
    for node in graph.nodes:
        for name in sorted(nested.get(node.name, ())):  # subgraphs are not pruned: what they read is fixed
            if name in tensors:
                ctx.block(tensors[name], f"read inside a subgraph of {node.op} node {node.name}")
        handler = get_handler(node.op, opset, node.domain or "")
        if handler is None:
            ctx.block_inputs(node, f"no handler for op {node.op} (node {node.name})")
            continue
        handler.analyze(node, ctx)
    for out in graph.outputs:
        ctx.block(out, f"feeds graph output {out.name}")
    float_consts = {  # read from the tensors' metadata: no weight is loaded here
        t.name: int(np.prod(t.shape, dtype=np.int64))
        for t in graph.tensors().values()
        if isinstance(t, gs.Constant) and _is_float(t)
    }
    return build_analysis(ctx, float_consts)



def _is_float(t: gs.Constant) -> bool:
    """Whether a constant's values are a numpy floating type (float16/32/64), read from its
    metadata; types numpy lacks (bfloat16, float8) are decided on the loaded values."""
    if isinstance(t.dtype, np.dtype):
        return bool(np.issubdtype(t.dtype, np.floating))
    return bool(np.issubdtype(np.asarray(t.values).dtype, np.floating))
