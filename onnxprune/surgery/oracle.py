"""The surgery oracle: the original model with removed channels forced to zero.

For any plan, the pruned model must compute what the original computes when every
removed channel is replaced by zeros where a channel-reducing op (Conv, Gemm, MatMul,
ConvTranspose) reads it. This module builds that reference model, for tests (:func:`zeroed_reference`, masks as
initializers) and for ``verify``'s numeric check (:func:`masked_reference`, masks and
weights as inputs of a skeleton: one onnxruntime session gives the original's outputs with
all-ones masks and the oracle's with the plan's masks). Both edit the ONNX graph directly:
a ``Mul`` by the mask is put right before each reducing node that reads a removed channel.
"""

from __future__ import annotations

from collections.abc import Mapping

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis.groups import Analysis
from onnxprune.ops.registry import get_handler
from onnxprune.skeleton import skeleton


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


def _mask_dtype(name: str, dtypes: dict[str, int]):
    """numpy dtype of a mask multiplying tensor ``name`` (float32 when its type is unknown)."""
    elem = dtypes.get(name)
    if elem == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    if elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return onnx.helper.tensor_dtype_to_np_dtype(elem)
    return np.float32


@dataclass(frozen=True, eq=False)
class _Mask:
    """One masked read: input ``slot`` of node ``node`` (index in the graph) reads ``tensor``."""

    node: int
    slot: int
    tensor: str
    keep: np.ndarray  # 0/1 of the tensor's dtype, shape [1, ..., C, ..., 1]


def _masks(model: onnx.ModelProto, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> list[_Mask]:
    """Every reducing node input that reads a channel the plan removes, with its mask."""
    removed_elems = analysis.removed_elements(removed)
    dtypes = tensor_dtypes(model)
    consts = {t.name for t in model.graph.initializer}
    out: list[_Mask] = []
    for k, node in enumerate(model.graph.node):
        handler = get_handler(node.op_type, analysis.opset, node.domain or "")
        if handler is None or not handler.reduces_channels:
            continue
        for i, name in enumerate(node.input):
            tc = analysis.channels.get(name) if name and name not in consts else None
            if tc is None:
                continue
            keep = ~removed_elems[tc.elems]
            if keep.all():
                continue
            shape = [1] * len(analysis.shapes[name])
            shape[tc.axis] = len(keep)
            out.append(_Mask(k, i, name, keep.astype(_mask_dtype(name, dtypes)).reshape(shape)))
    return out


def _insert_muls(graph: onnx.GraphProto, masks: list[_Mask], mask_names: list[str],
                 extra: dict[int, list[onnx.NodeProto]] | None = None) -> None:
    """Rewire each masked read through ``Mul(tensor, mask)``, the Mul placed right before its
    reader (the node order stays topological); ``extra`` nodes go before the Mul of mask k."""
    before: dict[int, list[onnx.NodeProto]] = {}
    for k, (m, mask_name) in enumerate(zip(masks, mask_names)):
        masked = f"__oracle_masked_{k}"
        nodes = list((extra or {}).get(k, ()))
        nodes.append(onnx.helper.make_node("Mul", [m.tensor, mask_name], [masked], name=f"__oracle_mul_{k}"))
        before.setdefault(m.node, []).extend(nodes)
        graph.node[m.node].input[m.slot] = masked
    if not before:
        return
    order: list[onnx.NodeProto] = []
    for k, node in enumerate(graph.node):
        order.extend(before.get(k, ()))
        order.append(node)
    del graph.node[:]
    graph.node.extend(order)


def zeroed_reference(model: onnx.ModelProto, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``model`` with a Mul-by-mask before every reducing input that loses channels.

    Args:
        model: the canonical model the analysis was computed on.
        analysis: its analysis.
        removed: ``{group id: removed channel indices}``.

    Returns:
        A model with the original's inputs and outputs (0/1 masks of shape
        [1, ..., C, ..., 1] broadcast on each masked tensor's channel axis, in the masked
        tensor's own dtype: float16, bfloat16, float32 or float64, stored as initializers
        ``__oracle_mask_<k>``).
    """
    masks = _masks(model, analysis, removed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = [f"__oracle_mask_{k}" for k in range(len(masks))]
    for m, name in zip(masks, names):
        out.graph.initializer.append(onnx.numpy_helper.from_array(m.keep, name))
    _insert_muls(out.graph, masks, names)
    return out


@dataclass(frozen=True, eq=False)
class MaskedReference:
    """The surgery oracle as one model for two runs: the original (all-ones masks) and the
    original with the plan's channels zeroed.

    Attributes:
        model: skeleton of the canonical model (large weights are inputs,
            :func:`onnxprune.skeleton.skeleton`) with a Mul by the float32 input
            ``__oracle_mask_<k>`` (cast to the tensor's type where it is not float32)
            before each reducing read of a removed channel.
        source: the canonical model whose weights :meth:`weights` reads (not copied here:
            the arrays exist only while a caller holds them).
        lifted: names of the weights that are inputs of ``model``.
        masks: mask input name -> float32 0/1 array of the plan.
    """

    model: onnx.ModelProto
    source: onnx.ModelProto
    lifted: tuple[str, ...]
    masks: dict[str, np.ndarray]

    def weights(self) -> dict[str, np.ndarray]:
        """The lifted weights of ``source`` as arrays (one copy of their bytes).

        Raises:
            ValueError: an initializer's data does not match its dims (a corrupt tensor).
        """
        wanted = set(self.lifted)
        return {t.name: onnx.numpy_helper.to_array(t) for t in self.source.graph.initializer if t.name in wanted}

    def feeds(self, zeroed: bool, weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The weights (``weights`` when given, else :meth:`weights`) and the masks: the
        plan's when ``zeroed``, else all ones."""
        masks = self.masks if zeroed else {k: np.ones_like(v) for k, v in self.masks.items()}
        return {**(self.weights() if weights is None else weights), **masks}


def masked_reference(model: onnx.ModelProto, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> MaskedReference:
    """:class:`MaskedReference` of a plan (same arguments as :func:`zeroed_reference`; the
    zeroed run computes exactly what :func:`zeroed_reference`'s model computes). No weight
    is copied: ``model`` is kept as the reference's ``source``."""
    masks = _masks(model, analysis, removed)
    skel, lifted = skeleton(model)
    graph = skel.graph
    names, feeds, extra = [], {}, {}
    for k, m in enumerate(masks):
        name = f"__oracle_mask_{k}"
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(m.keep.shape)))
        feeds[name] = m.keep.astype(np.float32)
        elem = onnx.helper.np_dtype_to_tensor_dtype(m.keep.dtype)
        if elem != onnx.TensorProto.FLOAT:
            cast = f"__oracle_mask_cast_{k}"
            extra[k] = [onnx.helper.make_node("Cast", [name], [cast], name=f"__oracle_cast_{k}", to=elem)]
            name = cast
        names.append(name)
    _insert_muls(graph, masks, names, extra)
    return MaskedReference(skel, model, tuple(lifted), feeds)
