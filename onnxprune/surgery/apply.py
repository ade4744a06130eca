"""Apply a pruning plan to a model: graph surgery on a copy.

Order (it matters): 1) each node's handler rewrites attributes and shape constants
(group counts, split sizes, slice bounds, reshape targets) while weights still have
their original shapes; 2) every weight member of every group is sliced; 3) the graph is
cleaned, sorted and its shapes re-inferred. The input model is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping

import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxprune.subgraphs import import_graph

from onnxprune.analysis.groups import Analysis
from onnxprune.errors import SurgeryError
from onnxprune.ops.registry import get_handler
from onnxprune.skeleton import FEEDABLE, LIFT_MIN_ELEMENTS, infer_value_info
from onnxprune.surgery.context import SurgeryContext


def _keep_masks(analysis: Analysis, removed: Mapping[int, np.ndarray],
                shapes: Mapping[tuple[str, str], tuple[int, ...]]):
    """{(node, tensor): {(axis, rows): bool keep mask along axis}} for sliced members."""
    masks: dict[tuple[str, str], dict[tuple[int, tuple[int, int] | None], np.ndarray]] = {}
    for gid, idx in removed.items():
        if len(idx) == 0:
            continue
        gone = np.zeros(analysis.groups[gid].size, dtype=bool)
        gone[np.asarray(idx, dtype=np.int64)] = True
        for m in analysis.groups[gid].members:
            drop = m.positions[gone[m.channels]]
            if len(drop) == 0:
                continue
            per = masks.setdefault((m.node, m.tensor), {})
            key = (m.axis, m.rows)
            if key not in per:
                per[key] = np.ones(shapes[(m.node, m.tensor)][m.axis], dtype=bool)
            per[key][drop] = False
    return masks


def _slice(value: np.ndarray, per_axis: Mapping[tuple[int, tuple[int, int] | None], np.ndarray]) -> np.ndarray:
    blocked = sorted((k, v) for k, v in per_axis.items() if k[1] is not None)
    if blocked:
        axis = blocked[0][0][0]
        by_rows = {k[1]: v for k, v in blocked}
        parts = []
        for (r0, r1) in sorted(by_rows):
            parts.append(np.compress(by_rows[(r0, r1)], value[r0:r1], axis=axis))
        value = np.concatenate(parts, axis=0)
    for (axis, rows), keep in per_axis.items():
        if rows is None:
            value = np.compress(keep, value, axis=axis)
    return value


def apply_plan(model: onnx.ModelProto, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> onnx.ModelProto:
    """Return a copy of ``model`` with the channels in ``removed`` cut out.

    Args:
        model: the canonical model that ``analysis`` was computed on.
        analysis: its channel analysis.
        removed: ``{group id: removed channel indices}``; groups not named keep all.

    Raises:
        SurgeryError: when a group is blocked, an index is out of range, a grouped
            conv's blocks would lose unequal numbers, or a group or a tensor would lose
            all its channels.
    """
    for gid, idx in removed.items():
        g = analysis.groups[gid]
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        if len(idx) and g.blocked_reason is not None:
            raise SurgeryError(f"group {g.name} is blocked: {g.blocked_reason}")
        if len(idx) and (idx[0] < 0 or idx[-1] >= g.size):
            raise SurgeryError(f"group {g.name}: removed indices must lie in [0, {g.size})")
        if len(idx) >= g.size:
            raise SurgeryError(f"group {g.name} would lose all {g.size} channels")
        if g.blocks > 1 and len(set(np.bincount(idx // (g.size // g.blocks), minlength=g.blocks).tolist())) > 1:
            raise SurgeryError(f"group {g.name} must lose the same number of channels in each of its "
                               f"{g.blocks} blocks")
    removed_elems = analysis.removed_elements(removed)
    for name, tc in analysis.channels.items():
        if len(tc.elems) and removed_elems[tc.elems].all():
            raise SurgeryError(f"the plan removes every channel of tensor {name}")
    graph = import_graph(model)
    ctx = SurgeryContext(analysis.channels, removed_elems, analysis.shapes, analysis.opset)
    for node in graph.nodes:
        handler = get_handler(node.op, analysis.opset, node.domain or "")
        if handler is not None:
            handler.apply(node, ctx)

    nodes = {n.name: n for n in graph.nodes}
    shapes: dict[tuple[str, str], tuple[int, ...]] = {}  # read without loading the values
    for g in analysis.groups:
        for m in g.members:
            node = nodes[m.node]
            t = next(t for t in node.inputs if t.name == m.tensor)
            shapes[(m.node, m.tensor)] = tuple(int(d) for d in t.shape)
    for (node_name, tensor), per_axis in _keep_masks(analysis, removed, shapes).items():
        node = nodes[node_name]
        index = next(i for i, t in enumerate(node.inputs) if t.name == tensor)
        ctx.set_const(node, index, _slice(np.asarray(node.inputs[index].values), per_axis))

    graph.cleanup().toposort()
    out = _export(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = "onnxprune", _version()
    del out.graph.value_info[:]
    out.graph.output.clear()
    out.graph.output.extend(model.graph.output)
    try:
        infer_value_info(out)  # on the skeleton: the weights are not serialised
    except Exception:  # shapes are informative only; verification runs the model
        pass
    return out


def _export(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx`` with every large weight copied once into the exported model.

    graphsurgeon builds a TensorProto per constant, copies it into the graph
    (``make_graph``) and the graph once more into the model (``make_model``). Here large
    constants are exported as data-less placeholders of the same name, type and dims and
    filled afterwards: a sliced weight (numpy) straight into ``raw_data``, an untouched one
    (still the input model's TensorProto) by one protobuf copy; each released once written."""
    pending: dict[str, np.ndarray | onnx.TensorProto] = {}
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant):
            continue
        if isinstance(t._values, LazyValues):
            src = t._values.tensor
            if not isinstance(src, onnx.TensorProto) or src.name != t.name or not _liftable_proto(src):
                continue
            pending[t.name] = src
            t._values = LazyValues(onnx.TensorProto(name=t.name, data_type=src.data_type, dims=list(src.dims)))
            continue
        arr = t.values
        if (not isinstance(arr, np.ndarray) or arr.size <= LIFT_MIN_ELEMENTS or t.export_dtype != t.dtype
                or sys.byteorder != "little" or not arr.dtype.isnative):
            continue
        try:
            elem = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        except (KeyError, TypeError, ValueError):
            continue
        if elem not in FEEDABLE:
            continue
        proto = onnx.TensorProto(name=t.name, data_type=elem, dims=list(arr.shape))
        pending[t.name] = arr
        t._values = LazyValues(proto)
    out = gs.export_onnx(graph)
    for init in out.graph.initializer:
        value = pending.pop(init.name, None)
        if isinstance(value, np.ndarray):
            init.raw_data = np.ascontiguousarray(value).tobytes()
        elif value is not None:
            init.CopyFrom(value)
        del value
    if pending:  # cannot happen: every constant the graph holds is exported
        raise SurgeryError(f"weights {sorted(pending)[:3]} were not exported")
    return out


def _liftable_proto(t: onnx.TensorProto) -> bool:
    """A large in-memory tensor (no external data): worth exporting as a placeholder."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.HasField("segment"):
        return False
    n = 1
    for d in t.dims:
        n *= int(d)
    return n > LIFT_MIN_ELEMENTS


def _version() -> str:
    from onnxprune import __version__

    return __version__
