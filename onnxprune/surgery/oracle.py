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

from onnxprune.subgraphs import import_graph

from onnxprune.analysis.groups import Analysis
from onnxprune.ops.registry import get_handler


def tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every top-level tensor whose type is declared (inputs, outputs,
    value_info, initializers)."""
    types: dict[str, int] = {}
    g = model.graph  # canonical models carry inferred value_info (onnxprune.canonicalize)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _mask_dtype(t: gs.Tensor, dtypes: dict[str, int]):
    """numpy dtype of a mask multiplying ``t`` (float32 when ``t``'s type is unknown)."""
    elem = dtypes.get(t.name)
    if elem == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    if elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return onnx.helper.tensor_dtype_to_np_dtype(elem)
    return np.float32


def zeroed_reference(model: onnx.ModelProto, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``model`` with a Mul-by-mask before every reducing input that loses channels.

    Args:
        model: the canonical model the analysis was computed on.
        analysis: its analysis.
        removed: ``{group id: removed channel indices}``.

    Returns:
        A model with the original's inputs and outputs (0/1 masks of shape
        [1, ..., C, ..., 1] broadcast on each masked tensor's channel axis, in the masked
        tensor's own dtype: float16, bfloat16, float32 or float64).
    """
    removed_elems = analysis.removed_elements(removed)
    dtypes = tensor_dtypes(model)
    graph = import_graph(model)
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
            mask = gs.Constant(f"__oracle_mask_{count}", keep.astype(_mask_dtype(t, dtypes)).reshape(shape))
            masked = gs.Variable(f"__oracle_masked_{count}", dtype=t.dtype)
            graph.nodes.append(gs.Node("Mul", f"__oracle_mul_{count}", inputs=[t, mask], outputs=[masked]))
            node.inputs[i] = masked
            count += 1
    graph.toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out
