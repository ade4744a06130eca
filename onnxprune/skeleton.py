"""Models without their weights: skeletons for shape inference, the checker and onnxruntime.

Serialising a model copies every weight (a VGG-19 is 575 MB); onnx shape inference, the
ONNX checker and an onnxruntime session each serialise the model they are given, and a
session keeps its own copy of every initializer. None of them needs the weights' values:
a *skeleton* is the model with every large initializer turned into a graph input of the
same name, element type and shape, built field by field so the weights are never copied.

Rules:

* An initializer is *lifted* (becomes an input) when it holds more than ``min_elements``
  elements (default :data:`LIFT_MIN_ELEMENTS`) and its type is one onnxruntime accepts as
  a numpy feed (:data:`FEEDABLE`); smaller ones (shape tensors, axes, scalars) and other
  types stay initializers, so constant inputs that ops need to read stay constant.
* An initializer already listed in ``graph.input`` (IR < 4) keeps its declaration.
* Everything else (nodes, value_info, outputs, opsets, functions, metadata) is copied as is;
  the input model is never changed.

:func:`lift_weights` also returns the lifted values as numpy arrays, to be fed next to the
real inputs: running the skeleton on them computes exactly what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["FEEDABLE", "LIFT_MIN_ELEMENTS", "Lifted", "lift_weights", "skeleton"]

#: initializers with more elements than this are lifted to graph inputs
LIFT_MIN_ELEMENTS = 4096
#: element types lifted (onnxruntime takes numpy feeds of these types)
FEEDABLE = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
                      TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                      TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL})


def _liftable(t: TensorProto, min_elements: int) -> bool:
    if t.data_type not in FEEDABLE or t.data_location == TensorProto.EXTERNAL or t.HasField("segment"):
        return False
    n = 1
    for d in t.dims:
        n *= int(d)
    return n > min_elements


def copy_fields(dst, src, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except field ``skip``.

    Field ``skip`` is never read: ``ListFields`` would hand out its value, a copy of its
    bytes for a TensorProto's ``raw_data``."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name == skip:
            continue
        if fd.is_repeated:
            value = getattr(src, fd.name)
            if len(value):
                getattr(dst, fd.name).extend(value)
        elif src.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


def skeleton(model: onnx.ModelProto, min_elements: int = LIFT_MIN_ELEMENTS) -> tuple[onnx.ModelProto, list[str]]:
    """The model with its large initializers turned into graph inputs (see the module rules).

    Args:
        model: any model (not modified; its weights are not copied).
        min_elements: initializers with more elements than this are lifted.

    Returns:
        ``(skeleton, lifted)``: a new ModelProto and the names of the lifted initializers,
        in initializer order (each is a graph input of the skeleton, declared with the
        initializer's element type and dims, appended after the model's own inputs).
    """
    out = onnx.ModelProto()
    copy_fields(out, model, skip="graph")
    g, sg = model.graph, out.graph
    copy_fields(sg, g, skip="initializer")
    declared = {i.name for i in g.input}
    lifted: list[str] = []
    for t in g.initializer:
        if _liftable(t, min_elements):
            lifted.append(t.name)
            if t.name not in declared:
                sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            sg.initializer.add().CopyFrom(t)
    return out, lifted


@dataclass(frozen=True, eq=False)
class Lifted:
    """A skeleton and the values of its lifted initializers.

    Attributes:
        model: the skeleton (:func:`skeleton`).
        weights: lifted initializer name -> numpy array (its dtype and dims; read-only
            arrays over one copy of the initializer's bytes).
    """

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]


def lift_weights(model: onnx.ModelProto, min_elements: int = LIFT_MIN_ELEMENTS) -> Lifted:
    """:func:`skeleton` of ``model`` with the lifted values, ready to feed to onnxruntime.

    Raises:
        ValueError: an initializer's data does not match its dims or type (a corrupt tensor).
    """
    skel, names = skeleton(model, min_elements)
    wanted = set(names)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    return Lifted(skel, weights)


def infer_value_info(model: onnx.ModelProto, *, data_prop: bool = False) -> None:
    """Fill ``model.graph.value_info`` by ONNX shape inference (``strict_mode=False``), in
    place, run on the :func:`skeleton` so the weights are not serialised (small initializers,
    which shape tensors are, stay constants the inference can read).

    Raises:
        whatever :func:`onnx.shape_inference.infer_shapes` raises (InferenceError, ...);
        ``model`` is unchanged then.
    """
    skel, _ = skeleton(model)
    inferred = onnx.shape_inference.infer_shapes(skel, check_type=False, strict_mode=False, data_prop=data_prop)
    lifted = {i.name for i in inferred.graph.input}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in lifted)
