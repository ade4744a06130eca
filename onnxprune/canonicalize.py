"""Bring an ONNX model into the canonical form the rest of onnxprune expects.

:func:`canonicalize` works on a copy (the input model is never mutated) and applies
these rules, in this order, to the top-level graph:

a. Initializers that are also listed in ``graph.input`` (the IR < 4 convention,
   or overridable defaults in IR >= 4) are removed from ``graph.input`` so that
   every weight is a constant; an IR version below 4 is raised to 4 (the checker
   requires that once initializers are no longer inputs).
b. ``Constant`` nodes become initializers (every attribute kind: ``value``,
   ``sparse_value``, ``value_float(s)``, ``value_int(s)``, ``value_string(s)``), and
   ``ConstantOfShape`` nodes whose shape is a constant become initializers (the
   onnx "light" zoo models fill their weights that way). A node whose output is a
   graph output is kept, so graph output names never change.
c. ``Identity`` nodes are removed and their consumers rewired to the Identity's
   input. When the Identity's output is a graph output, the producer of its input
   is renamed instead, so the graph output keeps its name; an Identity that copies
   a graph input or initializer to a graph output, or one output to another, stays.
d. Constant folding of every node whose inputs are all constants, with
   onnx-graphsurgeon ``fold_constants()`` then ``cleanup()`` (dead nodes and unused
   initializers go). Shape ops are folded only where the dims they read are static,
   so a symbolic batch dim stays dynamic. Random ops and (de)quantization ops are
   never folded. The folded graph is adopted only when it has fewer nodes. No operator fusion of any kind happens: BatchNormalization on
   activations stays, Conv+BN are not merged, graph inputs and outputs keep their
   names and what the model computes does not change.
e. Every node gets a unique, non-empty name; unnamed or duplicate-named nodes are
   named ``<op>_<index>`` (index = position in the graph, suffixed when taken).
f. Nodes are sorted topologically (stable: the original order is kept where the
   data flow allows) and ONNX shape inference (``strict_mode=False``, data
   propagation on) fills ``value_info`` where possible; symbolic dims stay symbolic.
   Shape inference filling ``value_info`` is not reported as a change; if it fails
   (e.g. a model above 2 GB) the model is returned without it and the reason is in
   :attr:`CanonicalResult.warnings`.

Nested subgraphs (If/Loop/Scan bodies) and functions are left as they are, except
that references to renamed outer-scope tensors are updated; constant folding does not
enter them and is dropped (with a warning) if it would remove a tensor they read.

Folding widens weights stored as fp16/bf16 behind a ``Cast``; after surgery,
:func:`restore_storage_dtypes` stores them in their original type again, so a pruned
model is never bigger per weight than its input.
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.skeleton import LIFT_MIN_ELEMENTS, infer_value_info
from onnxprune.subgraphs import has_subgraphs, subgraphs

__all__ = ["CanonicalResult", "canonicalize", "restore_storage_dtypes", "storage_casts"]

# ConstantOfShape outputs with more elements than this are left as nodes (memory guard).
_MAX_MATERIALIZED_ELEMENTS = 1 << 28
# Initializers above this size are left out of shape inference (they are weights, not shapes).
_SKELETON_MAX_ELEMENTS = LIFT_MIN_ELEMENTS
# Nondeterministic ops: folding them would freeze one random draw into the model.
_NEVER_FOLD = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
    | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
)


@dataclass(frozen=True)
class CanonicalResult:
    """Outcome of :func:`canonicalize`.

    Attributes:
        model: the canonical model (a new object; the input is untouched).
        changes: human-readable description of each change made, in rule order.
        warnings: things that could not be done (e.g. shape inference failed); they
            do not count as changes.
    """

    model: onnx.ModelProto
    changes: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """True when at least one rule changed the model."""
        return bool(self.changes)


# --------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _local_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define itself (outer-scope reads)."""
    local = _local_names(graph)
    refs: set[str] = set()
    for node in graph.node:
        refs.update(n for n in node.input if n and n not in local)
        for sub in subgraphs(node):
            refs.update(n for n in _outer_refs(sub) if n not in local)
    refs.update(o.name for o in graph.output if o.name not in local)
    return refs


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node reads, including outer-scope reads of its subgraphs."""
    reads = {n for n in node.input if n}
    for sub in subgraphs(node):
        reads |= _outer_refs(sub)
    return reads


def _rename_node_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in subgraphs(node):
            _rename_in_subgraph(sub, old, new)


def _rename_in_subgraph(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old in _local_names(graph):  # shadowed: inner scope defines its own `old`
        return
    _rename_node_inputs(graph, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` in ``graph`` (and its subgraphs) read ``new``."""
    _rename_node_inputs(graph, old, new)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used |= _node_reads(node)
    return used


# --------------------------------------------------------------------------- rule a


def _drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    dup = [i for i, vi in enumerate(graph.input) if vi.name in inits]
    if not dup:
        return []
    for i in reversed(dup):
        del graph.input[i]
    changes = [f"removed {len(dup)} initializer(s) duplicated in graph.input"]
    if model.ir_version < 4:
        changes.append(f"raised IR version {model.ir_version} -> 4 (initializers are no longer graph inputs)")
        model.ir_version = 4
    return changes


# --------------------------------------------------------------------------- rule b


def _sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sp.values)
    dims = tuple(int(d) for d in sp.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """TensorProto held by a Constant node (named as its output), or None if unknown."""
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
        t.name = name
        return t
    if attr.name == "sparse_value":
        return numpy_helper.from_array(_sparse_to_dense(attr.sparse_tensor), name)
    if attr.name == "value_float":
        return numpy_helper.from_array(np.array(attr.f, dtype=np.float32), name)
    if attr.name == "value_floats":
        return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32), name)
    if attr.name == "value_int":
        return numpy_helper.from_array(np.array(attr.i, dtype=np.int64), name)
    if attr.name == "value_ints":
        return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64), name)
    if attr.name == "value_string":
        return helper.make_tensor(name, onnx.TensorProto.STRING, [], [attr.s])
    if attr.name == "value_strings":
        return helper.make_tensor(name, onnx.TensorProto.STRING, [len(attr.strings)], list(attr.strings))
    return None


def _constant_of_shape_tensor(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                              into: onnx.TensorProto | None = None) -> onnx.TensorProto | None:
    """The tensor a ConstantOfShape node with a constant shape fills, or None (shape unknown,
    too big, or a fill that is not one value). Numeric fills are written straight into the
    raw bytes of ``into`` (a new TensorProto when None): no intermediate copies."""
    if not node.input or node.input[0] not in inits:
        return None
    shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64).reshape(-1)
    if (shape < 0).any() or int(np.prod(shape, dtype=np.int64)) > _MAX_MATERIALIZED_ELEMENTS:
        return None
    fill = np.zeros(1, dtype=np.float32)
    for attr in node.attribute:
        if attr.name == "value":
            fill = numpy_helper.to_array(attr.t).reshape(-1)
    if fill.size != 1:
        return None
    dims = tuple(int(d) for d in shape)
    t = into if into is not None else onnx.TensorProto()
    if fill.dtype.kind in "fiub" and fill.dtype.isnative and fill.dtype.itemsize and sys.byteorder == "little":
        try:
            elem = helper.np_dtype_to_tensor_dtype(fill.dtype)
        except (KeyError, TypeError, ValueError):
            elem = None
        if elem is not None:
            n = int(np.prod(dims, dtype=np.int64))
            t.name, t.data_type = node.output[0], elem
            t.dims.extend(dims)
            zero = not fill.view(np.uint8).any()  # all bytes 0 (-0.0 is not)
            t.raw_data = bytes(n * fill.dtype.itemsize) if zero else fill.tobytes() * n  # bytes repeat: one buffer
            return t
    t.CopyFrom(numpy_helper.from_array(np.full(dims, fill[0], dtype=fill.dtype), node.output[0]))
    return t


def _constants_to_initializers(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    counts = {"Constant": 0, "ConstantOfShape": 0}
    converted: list[int] = []
    for idx, node in enumerate(graph.node):
        tensor = None
        if (
            node.domain in ("", "ai.onnx")
            and len(node.output) == 1
            and node.output[0] not in outputs
            and node.output[0] not in inits
        ):
            if node.op_type == "Constant":
                tensor = _constant_tensor(node)
                if tensor is not None:
                    graph.initializer.append(tensor)
            elif node.op_type == "ConstantOfShape":  # filled in place: a weight is copied once
                tensor = _constant_of_shape_tensor(node, inits, graph.initializer.add())
                if tensor is None:
                    del graph.initializer[-1]
        if tensor is None:
            continue
        inits[tensor.name] = graph.initializer[-1]
        counts[node.op_type] += 1
        converted.append(idx)
    for idx in reversed(converted):
        del graph.node[idx]
    return [f"turned {n} {op} node(s) into initializers" for op, n in counts.items() if n]


# --------------------------------------------------------------------------- rule c


def _remove_identities(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    removed = 0
    changed = True
    while changed:  # one Identity at a time keeps the bookkeeping simple and exact
        changed = False
        outputs = [o.name for o in graph.output]
        consts = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        for idx, node in enumerate(graph.node):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.input) != 1 or len(node.output) != 1:
                continue
            src, dst = node.input[0], node.output[0]
            if dst in outputs:
                if src in consts or src in outputs:
                    continue  # must stay: renaming would change a graph input/output
                producer = next((n for n in graph.node if src in n.output), None)
                if producer is None:
                    continue
                producer.output[list(producer.output).index(src)] = dst
                del graph.node[idx]
                _rename_uses(graph, src, dst)
            else:
                del graph.node[idx]
                _rename_uses(graph, dst, src)
            removed += 1
            changed = True
            break
    return [f"removed {removed} Identity node(s)"] if removed else []


# --------------------------------------------------------------------------- rule d


def _may_fold(graph: onnx.GraphProto) -> bool:
    """Cheap pre-check: is there any node graphsurgeon could fold?"""
    consts = {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if node.op_type in _NEVER_FOLD:
            continue
        if node.op_type in ("Shape", "Size", "Constant") or all(i in consts for i in node.input):
            return True
        if any(True for _ in subgraphs(node)):
            return True
    return False


def _restore_subgraphs(before: onnx.GraphProto, after: onnx.GraphProto) -> bool:
    """Put the original subgraphs back on ``after``'s nodes (folding does not enter them and
    graphsurgeon's export renames their tensors); True when every tensor they read from the
    outer scope is still defined in ``after``."""
    original = {n.name: n for n in before.node if n.name and any(True for _ in subgraphs(n))}
    defined = {i.name for i in after.input} | {t.name for t in after.initializer}
    defined |= {o for n in after.node for o in n.output}
    for node in after.node:
        if not any(True for _ in subgraphs(node)):
            continue
        src = original.get(node.name)
        if src is None:
            return False
        del node.attribute[:]
        node.attribute.extend(src.attribute)
        if not _node_reads(node) <= defined:
            return False
    return True


def _fold_constants(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Rule d, in place. Returns ``(changes, warnings)``."""
    import onnx_graphsurgeon as gs

    if not _may_fold(model.graph):
        return [], []
    before = len(model.graph.node)
    in_names = [i.name for i in model.graph.input]
    out_names = [o.name for o in model.graph.output]
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # folding runs ORT sessions; their graph optimisers log through it
    logger = gs.logger.G_LOGGER
    old_severity = logger.severity
    logger.severity = logger.ERROR
    nested = has_subgraphs(model.graph)
    try:
        source = onnx.ModelProto()
        source.CopyFrom(model)  # graphsurgeon's import renames subgraph tensors in place
        graph = gs.import_onnx(source)
        graph.fold_constants(
            fold_shapes=True,
            recurse_subgraphs=False,
            error_ok=True,
            recurse_functions=False,
            should_exclude_node=lambda node: node.op in _NEVER_FOLD,
        )
        graph.cleanup(remove_unused_graph_inputs=False, recurse_functions=False)
        folded = gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:  # graphsurgeon failing must not block the pipeline
        return [], [f"constant folding skipped ({_first_line(exc)})"]
    finally:
        logger.severity = old_severity
    if [i.name for i in folded.graph.input] != in_names or [o.name for o in folded.graph.output] != out_names:
        return [], ["constant folding skipped (it would rename graph inputs or outputs)"]
    after = len(folded.graph.node)
    if after >= before:
        return [], []
    # Keep inputs/outputs exactly as declared (graphsurgeon may rewrite their shapes);
    # the rest of the model (IR version, opsets, metadata, functions) is untouched.
    new_graph = folded.graph
    if nested and not _restore_subgraphs(model.graph, new_graph):
        return [], ["constant folding skipped (it would break the If/Loop/Scan subgraphs)"]
    del new_graph.input[:]
    new_graph.input.extend(model.graph.input)
    del new_graph.output[:]
    new_graph.output.extend(model.graph.output)
    model.graph.CopyFrom(new_graph)
    return [f"folded constants: {before} -> {after} nodes"], []


# --------------------------------------------------------------------------- rule e


def _name_nodes(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    seen: set[str] = set()
    renamed = 0
    pending: list[tuple[int, onnx.NodeProto]] = []
    for idx, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
        else:
            pending.append((idx, node))
    taken = seen | {n.name for n in graph.node if n.name}
    for idx, node in pending:
        base = f"{node.op_type}_{idx}"
        name, k = base, 1
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        node.name = name
        taken.add(name)
        renamed += 1
    return [f"named {renamed} unnamed or duplicate-named node(s)"] if renamed else []


# --------------------------------------------------------------------------- rule f


def _toposort(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    deps = [{producer[n] for n in _node_reads(node) if n in producer and producer[n] != i} for i, node in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    indeg = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, k in enumerate(indeg) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):  # cycle: keep the rest in the original order
        placed = set(order)
        order.extend(i for i in range(len(nodes)) if i not in placed)
    if order == list(range(len(nodes))):
        return []
    new_nodes = []
    for i in order:
        c = onnx.NodeProto()
        c.CopyFrom(nodes[i])
        new_nodes.append(c)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return ["sorted nodes topologically"]


def _prune_value_info(model: onnx.ModelProto) -> None:
    graph = model.graph
    produced = {o for n in graph.node for o in n.output if o}
    stale = [i for i, v in enumerate(graph.value_info) if v.name not in produced]
    for i in reversed(stale):
        del graph.value_info[i]


def _infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fill ``model.graph.value_info`` by ONNX shape inference (in place).

    Inference runs on a skeleton in which large initializers (more than
    ``_SKELETON_MAX_ELEMENTS`` elements: weights, never shape tensors) are graph
    inputs of the same dtype and shape (:func:`onnxprune.skeleton.infer_value_info`), so
    the full weights are not serialized.
    """
    try:
        infer_value_info(model, data_prop=True)
    except Exception as exc:  # inference is a convenience: never fatal
        return model, [f"shape inference failed: {_first_line(exc)}"]
    return model, []


def _drop_unused_initializers(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    used = _used_names(graph)
    unused = [i for i, t in enumerate(graph.initializer) if t.name not in used]
    dropped = len(unused)
    if not dropped:
        return []
    for i in reversed(unused):
        del graph.initializer[i]
    return [f"removed {dropped} unused initializer(s)"]


# --------------------------------------------------------------------------- public


def canonicalize(model: onnx.ModelProto, *, fold: bool = True) -> CanonicalResult:
    """Return a canonical copy of ``model`` and the list of changes made.

    See the module docstring for the rules (a to f) and their order. The input
    model is never mutated.

    Args:
        model: any loaded ONNX model (see :func:`onnxprune.io.load_model`).
        fold: run rule d (constant folding with onnx-graphsurgeon); on by default.

    Returns:
        :class:`CanonicalResult` with the new model, the human-readable changes
        (empty when the model was already canonical) and any warnings.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    changes: list[str] = []
    warnings: list[str] = []

    changes += _drop_initializer_inputs(work)
    changes += _constants_to_initializers(work)
    changes += _remove_identities(work)
    if fold:
        fold_changes, fold_warnings = _fold_constants(work)
        changes += fold_changes
        warnings += fold_warnings
    changes += _drop_unused_initializers(work)
    changes += _name_nodes(work)
    changes += _toposort(work)
    _prune_value_info(work)
    work, infer_warnings = _infer_shapes(work)
    warnings += infer_warnings
    return CanonicalResult(model=work, changes=tuple(changes), warnings=tuple(warnings))


# ------------------------------------------------------------------ storage dtypes


_NARROW_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def storage_casts(model: onnx.ModelProto) -> dict[str, tuple[str, int, str]]:
    """Initializers stored in a narrow float type and widened by a Cast (fp16 weights behind
    ``Cast(to=FLOAT)``), which constant folding turns into wide initializers.

    Returns:
        ``{Cast output name: (initializer name, storage data type, Cast node name)}``.
    """
    inits = {t.name: t.data_type for t in model.graph.initializer}
    out: dict[str, tuple[str, int, str]] = {}
    for node in model.graph.node:
        if node.op_type == "Cast" and len(node.input) == 1 and node.input[0] in inits:
            if inits[node.input[0]] in _NARROW_FLOATS and node.output and node.output[0]:
                out[node.output[0]] = (node.input[0], inits[node.input[0]], node.name or f"Cast_{node.output[0]}")
    return out


def restore_storage_dtypes(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Store again in its original narrow type every weight that ``original`` kept in fp16 /
    bf16 behind a Cast and canonicalisation widened (:func:`storage_casts`): the initializer
    goes back to its storage type and name, and a Cast in front of the first node restores
    the wide tensor. ``model`` is not changed; it is returned as is when there is nothing to do.

    The values of such weights came from the narrow type, so the round trip is exact unless
    they were trained since (then they are rounded to the storage type, as the input stored them).
    """
    casts = storage_casts(original)
    if not casts:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input}
    node_names = {n.name for n in graph.node}
    new_nodes = []
    for i, t in enumerate(graph.initializer):
        if t.name not in casts:
            continue
        src_name, storage, cast_name = casts[t.name]
        if src_name in taken or cast_name in node_names:
            continue
        wide = numpy_helper.to_array(t)
        if storage == onnx.TensorProto.BFLOAT16:
            import ml_dtypes

            narrow = numpy_helper.from_array(wide.astype(ml_dtypes.bfloat16), src_name)
        else:
            narrow = numpy_helper.from_array(wide.astype(np.float16), src_name)
        new_nodes.append(helper.make_node("Cast", [src_name], [t.name], name=cast_name, to=t.data_type))
        graph.initializer[i].CopyFrom(narrow)
        taken.add(src_name)
    if new_nodes:
        old = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + old)
    return out
