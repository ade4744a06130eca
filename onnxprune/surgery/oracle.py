"""The surgery oracle: the original model with removed channels forced to zero.

For any plan, the pruned model must compute what the original computes when every
removed channel is replaced by zeros where a channel-reducing op (Conv, Gemm, MatMul,
ConvTranspose) reads it. This module builds that reference model, for tests and for
``verify``'s numeric check.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.analysis.groups import Analysis
from onnxprune.ops.registry import get_handler


def zeroed_reference(model: onnx.ModelProto, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``model`` with a Mul-by-mask before every reducing input that loses channels.

    Args:
        model: the canonical model the analysis was computed on.
        analysis: its analysis.
        removed: ``{group id: removed channel indices}``.

    Returns:
        A model with the original's inputs and outputs (float32 masks of shape
        [1, ..., C, ..., 1] broadcast on each masked tensor's channel axis).
    """
    removed_elems = analysis.removed_elements(removed)
    graph = gs.import_onnx(model)
    count = 0
    for node in list(graph.nodes):
        handler = get_handler(node.op, analysis.opset, node.domain or "")
        if handler is None or not handler.reduces_channels:
            continue
        for i, t in enumerate(node.inputs):
            tc = analysis.channels.get(t.name) if isinstance(t, gs.Variable) else None
            if tc is None:
                continue
            keep = ~removed_elems[tc.elems]
            if keep.all():
                continue
            rank = len(analysis.shapes[t.name])
            shape = [1] * rank
            shape[tc.axis] = len(keep)
            mask = gs.Constant(f"__oracle_mask_{count}", keep.astype(np.float32).reshape(shape))
            masked = gs.Variable(f"__oracle_masked_{count}", dtype=t.dtype)
            graph.nodes.append(gs.Node("Mul", f"__oracle_mul_{count}", inputs=[t, mask], outputs=[masked]))
            node.inputs[i] = masked
            count += 1
    graph.toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out
