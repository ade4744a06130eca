"""The concrete shape of every tensor of a model at given input shapes.

ONNX shape inference (on the weightless :func:`~onnxprune.skeleton.skeleton`, with data
propagation) is tried first: when it gives every node output of the top-level graph a
tensor type with every dim known and positive, those are the shapes, and nothing runs
(tests/test_shapes.py checks them against onnxruntime on every real and test model).
An onnxruntime session of the skeleton is still made (not run), so a model onnxruntime
cannot load (an op or element type without a kernel) fails here as before. Inference
leaves gaps (Resize with computed scales, Reshape of computed shapes, ops it does not
know, sequences) and cannot tell that a model fails at an input size; the pruning stages
need exact numbers. So otherwise :func:`measure_shapes` runs the model
once in onnxruntime (CPUExecutionProvider, graph optimizations off) on random inputs of
the given shapes, with every node output of the top-level graph exposed as a graph
output, and reads the shapes off the results. Tensors inside If/Loop/Scan bodies are not
measured.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from onnxprune.errors import InputShapeError, UnsupportedModelError, first_line
from onnxprune.inputs import graph_inputs, make_inputs, tensor_bytes
from onnxprune.safety import check_allocation
from onnxprune.skeleton import lift_weights, skeleton

__all__ = ["measure_shapes"]

_PROTO_LIMIT = 1_800_000_000


def _fmt_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n}={'x'.join(str(d) for d in s) or 'scalar'}" for n, s in shapes.items())


def _probe_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Skeleton of ``model`` (large weights as inputs, :func:`onnxprune.skeleton.lift_weights`)
    whose graph outputs are every node output of the top-level graph, and the weights to feed."""
    lifted = lift_weights(model)
    probe = lifted.model
    graph = probe.graph
    existing = {o.name for o in graph.output}
    # Declared value_info can be wrong (exporters) and clash with what ORT infers; drop it.
    del graph.value_info[:]
    for node in graph.node:
        for out in node.output:
            if out and out not in existing:
                existing.add(out)
                vi = onnx.ValueInfoProto()
                vi.name = out  # no type: onnxruntime takes it from its own inference
                graph.output.append(vi)
    return probe, lifted.weights


def _session(probe: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # failures are reported by our own exception
    if probe.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="onnxprune-shapes-") as tmp:
        path = os.path.join(tmp, "probe.onnx")
        onnx.save_model(probe, path, save_as_external_data=True, all_tensors_to_one_file=True, location="probe.data")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _inferred(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto | None:
    """ONNX shape inference of the :func:`skeleton` with these input shapes (None: it failed)."""
    skel = skeleton(model)[0]
    graph = skel.graph
    del graph.value_info[:]
    for vi in graph.output:  # a declared output shape can be wrong (a fixed batch): infer it
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    for vi in graph.input:
        if vi.name in input_shapes and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[vi.name]:
                try:
                    shape.dim.add().dim_value = int(d)
                except ValueError:  # beyond int64: nothing to infer
                    return None
    try:
        return onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=True)
    except Exception:  # an estimate only
        return None


def _known_dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The dims of a tensor value_info when every one is known, else None."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


#: ops whose ONNX shape inference can disagree with onnxruntime (ceil-mode pooling with pads,
#: Resize / Upsample from float scales): their models are measured
_STATIC_UNSAFE_OPS = frozenset({"Resize", "Upsample"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})


def _static_is_safe(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether static inference can stand in for the onnxruntime probe: the given input
    shapes are the model's own fully declared ones (a shape the user overrides is checked
    by running it: ONNX inference does not check a Conv's channels), and no op whose
    inference is known to differ from onnxruntime's (``ceil_mode`` pooling, Resize /
    Upsample) is in the graph."""
    for vi in graph_inputs(model):
        dims = _known_dims(vi)
        if dims is None or tuple(dims) != tuple(input_shapes.get(vi.name, ())):
            return False
    for node in model.graph.node:
        if node.op_type in _STATIC_UNSAFE_OPS:
            return False
        if node.op_type in _POOLS and any(a.name == "ceil_mode" and a.i for a in node.attribute):
            return False
    return True


def static_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
                  inferred: onnx.ModelProto | None = None) -> dict[str, tuple[int, ...]] | None:
    """``{node output: shape}`` of every node output of the top-level graph by ONNX shape
    inference, or None unless every one is a tensor whose dims are all known and positive
    (an output that no node reads and the graph does not return may lack a shape; it is
    left out then, as it would be were it no tensor), or when static inference is not to be
    trusted for this model at these shapes (:func:`_static_is_safe`). None is no failure:
    the caller measures the shapes with onnxruntime."""
    if not _static_is_safe(model, input_shapes):
        return None
    if inferred is None:
        inferred = _inferred(model, input_shapes)
    if inferred is None:
        return None
    g = inferred.graph
    known = {vi.name: _known_dims(vi) for vi in list(g.value_info) + list(g.output)}
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                 for n in model.graph.node for a in n.attribute)
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    out: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        for name in node.output:
            if not name:
                continue
            dims = known.get(name)
            if dims is None or any(d <= 0 for d in dims):
                if not nested and name not in read:  # an output nothing reads (a Dropout mask)
                    continue
                return None
            out[name] = dims
    return out


def activation_bytes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
                     inferred: onnx.ModelProto | None = None) -> int:
    """Bytes of every node output of the top-level graph whose shape ONNX shape inference
    finds with these input shapes (an estimate from below: unknown shapes count 0).

    Large initializers are replaced by inputs of the same type for the inference, so it
    costs little even for big models. Never raises: a failed inference gives 0.
    """
    if inferred is None:
        inferred = _inferred(model, input_shapes)
    if inferred is None:
        return 0
    total = 0
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if all(d is not None for d in dims):
            try:
                size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
            except (KeyError, TypeError, ValueError):
                size = 4
            total += tensor_bytes(dims, size)
    return total


def measure_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int = 0,
    static: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every tensor in the top-level graph: by static inference where it
    is complete, else measured with onnxruntime (module doc).

    Args:
        model: the model to measure (not modified; a copy is run).
        input_shapes: ``{graph input name: shape}`` for every real graph input, e.g.
            from :func:`onnxprune.inputs.resolve_input_shapes`.
        seed: seed of the random inputs (:func:`onnxprune.inputs.make_inputs`).
        static: try ONNX shape inference first (False: always run onnxruntime).

    Returns:
        ``{tensor name: shape}`` (tuples of ints, ``()`` for scalars) for every graph
        input, every initializer and every non-empty node output of the top-level
        graph. Non-tensor outputs (sequences, maps) are left out.

    Raises:
        InputShapeError: ``input_shapes`` misses or adds an input, or the model does
            not run on these shapes (e.g. the spatial size is too small); the message
            names the inputs and shapes.
        UnsupportedModelError: onnxruntime cannot build a session for the model, or
            an input dtype cannot be fed.
        OnnxPruneError: the inputs or the activations would exceed the memory budget
            (:func:`onnxprune.safety.check_allocation`).
    """
    real = [vi.name for vi in graph_inputs(model)]
    unknown = sorted(set(input_shapes) - set(real))
    if unknown:
        raise InputShapeError(f"input shapes name unknown input(s) {', '.join(unknown)} (inputs: {', '.join(real)})")
    missing = [n for n in real if n not in input_shapes]
    if missing:
        raise InputShapeError(f"no shape given for input(s) {', '.join(missing)}")

    shapes: dict[str, tuple[int, ...]] = {}
    for name in real:
        shapes[name] = tuple(int(d) for d in input_shapes[name])
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)

    real_shapes = {n: shapes[n] for n in real}
    feeds = make_inputs(model, shapes, seed=seed)  # refuses inputs over the memory budget
    inferred = _inferred(model, real_shapes)
    check_allocation(activation_bytes(model, real_shapes, inferred),
                     f"running the model at input shapes {_fmt_shapes({n: shapes[n] for n in real})} "
                     f"(every activation, by static shape inference)")
    if static:
        found = static_shapes(model, real_shapes, inferred)
        if found is not None:
            try:  # what the probe's session would refuse (an op or a type it has no kernel for)
                _session(skeleton(model)[0])
            except Exception as exc:
                raise UnsupportedModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc
            for name, dims in found.items():
                shapes.setdefault(name, dims)
            return shapes
    try:
        probe, weights = _probe_model(model)
        sess = _session(probe)
    except Exception as exc:
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc
    del probe
    out_names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(out_names, {**feeds, **weights})
    except Exception as exc:
        raise InputShapeError(
            f"the model does not run with input shapes {_fmt_shapes({n: shapes[n] for n in real})} "
            f"(give the right ones with --input-shape NAME:D0,D1,...): {first_line(exc)}"
        ) from exc
    for name, value in zip(out_names, values):
        if isinstance(value, np.ndarray):
            shapes.setdefault(name, tuple(int(d) for d in value.shape))
    return shapes
