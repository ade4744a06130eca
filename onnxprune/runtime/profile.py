"""Per-node onnxruntime latency from the session profiler, mapped back to the model's nodes.

onnxruntime optimises the graph before it runs it: Conv + BatchNormalization + activation
become one kernel, NCHWc kernels replace Conv, layout Reorder nodes appear, and the
kernels are renamed after one of the fused nodes *or after its output tensor* with
suffixes (``<name>_nchwc``, ``<name>_token_12``, ``<name>/QuickGeluFusion/``). Rules
:func:`profile_nodes` follows to map a profiled kernel back:

1. The kernel's name is looked up, then its prefixes cut at ``_``, ``/`` or a space, longest
   first, among the model's node names and output tensor names (a tensor stands for the
   node that produces it). The first hit is the kernel's node.
2. A matrix kernel (Conv, FusedConv, Gemm, MatMul, ...) that lands on a node without MACs
   (the BatchNormalization or activation it absorbed) is moved up the chain of first
   inputs, at most 4 nodes, to the first node that has MACs (``macs_nodes``).
3. Kernels that map to no node (Reorder*, memcpy) count as ``unmapped_ms``.
4. Only runs after ``warmup`` count; a node's time is the median over runs of its
   per-run sum; ``total_ms`` is the median ``model_run`` duration (so it includes the
   session's own overhead, which is ``total_ms - sum(node_ms) - unmapped_ms``).
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import OnnxPruneError
from onnxprune.inputs import make_inputs
from onnxprune.runtime.verify import make_session, model_source, ort_message

__all__ = ["NodeProfile", "map_kernel", "profile_nodes"]

MATRIX_KERNELS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                            "ConvTranspose", "NhwcConv"})
_CUT = re.compile(r"[_/ ]")


@dataclass(frozen=True)
class NodeProfile:
    """Profiled latency of one model, ms per run.

    Attributes:
        node_ms: model node name -> median time of the kernels mapped to it.
        unmapped_ms: median per-run time of kernels mapped to no node.
        total_ms: median duration of a whole run.
        runs: runs counted (after warm-up).
        kernels: profiled kernel name -> mapped node name (None: unmapped), for inspection.
    """

    node_ms: Mapping[str, float]
    unmapped_ms: float
    total_ms: float
    runs: int
    kernels: Mapping[str, str | None]


def map_kernel(name: str, op: str, lookup: Mapping[str, str], first_input_producer: Mapping[str, str],
               macs_nodes: frozenset[str] | set[str]) -> str | None:
    """The model node a profiled kernel belongs to (rules 1-2 of the module docstring).

    Args:
        name: the kernel's name in the profile (``..._kernel_time`` already removed).
        op: the kernel's op type (``args.op_name``).
        lookup: node names and output tensor names -> node name.
        first_input_producer: node name -> the node producing its first input.
        macs_nodes: names of nodes that have MACs.
    """
    hit = None
    cand = name.strip()
    while cand:
        if cand in lookup:
            hit = lookup[cand]
            break
        cuts = [m.start() for m in _CUT.finditer(cand)]
        cand = cand[: cuts[-1]] if cuts else ""
    if hit is None:
        return None
    if op in MATRIX_KERNELS and hit not in macs_nodes:
        node = hit
        for _ in range(4):
            node = first_input_producer.get(node)
            if node is None:
                break
            if node in macs_nodes:
                return node
    return hit


def profile_nodes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], *,
                  macs_nodes: frozenset[str] | set[str] = frozenset(), provider: str = "CPUExecutionProvider",
                  threads: int | None = None, warmup: int = 3, runs: int = 20, seed: int = 0) -> NodeProfile:
    """Run ``model`` under onnxruntime's profiler (full graph optimisation, as deployed) and
    map kernel times back to its nodes.

    Args:
        model: the model whose node names the result uses (a canonical model).
        input_shapes: concrete shape of every graph input.
        macs_nodes: nodes that have MACs (rule 2).
        provider / threads: the session's provider and intra-op threads.
        warmup / runs: untimed and counted runs.

    Raises:
        OnnxPruneError: the provider is unavailable, or the session fails to load or run.
    """
    if runs < 1 or warmup < 0:
        raise OnnxPruneError(f"profiling needs runs >= 1 and warmup >= 0, got {runs} and {warmup}")
    feeds = make_inputs(model, dict(input_shapes), seed=seed)
    with tempfile.TemporaryDirectory(prefix="onnxprune-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        if threads is not None:
            opts.intra_op_num_threads = threads
        with model_source(model) as source:
            sess = make_session(source, (provider,), options=opts, label="model")
            wanted = {i.name for i in sess.get_inputs()}
            try:
                for _ in range(warmup + runs):
                    sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
            except Exception as exc:
                raise OnnxPruneError(f"onnxruntime failed to run the model: {ort_message(exc)}") from exc
            path = sess.end_profiling()
        with open(path, encoding="utf-8") as fh:
            events = json.load(fh)
    return _parse(events, model, macs_nodes, warmup)


def _parse(events: list, model: onnx.ModelProto, macs_nodes, warmup: int) -> NodeProfile:
    lookup: dict[str, str] = {}
    producer: dict[str, str] = {}
    for n in model.graph.node:
        for o in n.output:
            lookup.setdefault(o, n.name)
            producer[o] = n.name
    for n in model.graph.node:
        lookup[n.name] = n.name
    first_input = {n.name: producer[n.input[0]] for n in model.graph.node if n.input and n.input[0] in producer}

    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    starts = [e["ts"] for e in run_events]
    n_runs = len(run_events)
    per_node: dict[str, np.ndarray] = {}
    unmapped = np.zeros(n_runs)
    kernels: dict[str, str | None] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        r = bisect.bisect_right(starts, e["ts"]) - 1
        if r < 0:
            continue
        kname = e["name"][: -len("_kernel_time")]
        if kname not in kernels:
            kernels[kname] = map_kernel(kname, str(e.get("args", {}).get("op_name", "")), lookup, first_input,
                                        macs_nodes)
        node = kernels[kname]
        if node is None:
            unmapped[r] += e["dur"]
        else:
            per_node.setdefault(node, np.zeros(n_runs))[r] += e["dur"]
    keep = slice(min(warmup, max(n_runs - 1, 0)), None)
    totals = np.asarray([e["dur"] for e in run_events], dtype=np.float64)
    return NodeProfile(
        node_ms={k: float(np.median(v[keep])) / 1e3 for k, v in per_node.items()},
        unmapped_ms=float(np.median(unmapped[keep])) / 1e3 if n_runs else 0.0,
        total_ms=float(np.median(totals[keep])) / 1e3 if n_runs else 0.0,
        runs=len(totals[keep]), kernels=kernels)
