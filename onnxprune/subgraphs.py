"""Nested graphs (If / Loop / Scan bodies) seen from the top-level graph.

onnxprune prunes the top-level graph only. A subgraph may read tensors of the outer
scope by name (no edge in ``node.input`` says so); :func:`outer_reads` lists them per node
so that analysis treats every such tensor as read by an op it does not know (a barrier).
onnx-graphsurgeon's importer renames subgraph tensors in place: :func:`import_graph`
imports a copy when the model has subgraphs, so the caller's model is never changed.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

__all__ = ["has_subgraphs", "import_graph", "outer_reads", "subgraphs"]


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graph-valued attributes of ``node`` (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """True when a node of ``graph`` (top level) carries a subgraph."""
    return any(True for node in graph.node for _ in subgraphs(node))


def _local(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def _refs(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` reads (at any depth) that it does not define itself."""
    local = _local(graph)
    refs = {n for node in graph.node for n in node.input if n and n not in local}
    for node in graph.node:
        for sub in subgraphs(node):
            refs |= {n for n in _refs(sub) if n not in local}
    refs |= {o.name for o in graph.output if o.name not in local}
    return refs


def outer_reads(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """``{node name: outer-scope tensor names its subgraphs read}`` for every top-level node
    of ``graph`` with subgraphs that read any (names as in the top-level graph)."""
    out: dict[str, set[str]] = {}
    for node in graph.node:
        refs: set[str] = set()
        for sub in subgraphs(node):
            refs |= _refs(sub)
        if refs:
            out[node.name] = refs
    return out


def import_graph(model: onnx.ModelProto):
    """``onnx_graphsurgeon.import_onnx`` of ``model`` without changing it (a copy is imported
    when the model has subgraphs, which the importer renames in place)."""
    import onnx_graphsurgeon as gs

    if has_subgraphs(model.graph):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    return gs.import_onnx(model)
