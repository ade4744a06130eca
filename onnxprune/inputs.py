"""Concrete input shapes and random input tensors for a model's graph inputs.

Rules:

* Only "real" graph inputs count: names listed in ``graph.input`` that are not
  initializers.
* A dim is *fixed* when it has a positive ``dim_value``; anything else (a
  ``dim_param``, no value, or a non-positive value such as Paddle's ``-1``) is
  *unknown*. Unknown dims resolve to ``batch`` for dim 0 and to
  :data:`DEFAULT_SPATIAL` (224) for every other dim.
* An override replaces the whole shape of one input. It must name a real input,
  have the input's rank and agree with every fixed dim except dim 0 (the batch
  dim may always be overridden).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxprune.errors import InputShapeError, UnsupportedModelError
from onnxprune.safety import check_allocation

__all__ = ["DEFAULT_SPATIAL", "graph_inputs", "parse_input_shape", "resolve_input_shapes", "make_inputs", "tensor_bytes"]

#: Value used for unknown (symbolic) dims other than dim 0.
DEFAULT_SPATIAL = 224


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers, in declaration order."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse a CLI shape override ``name:d0,d1,...`` (e.g. ``x:1,3,224,224``).

    The name is everything before the last ``:`` (so names such as ``input:0``
    work as ``input:0:1,3,224,224``); dims are positive integers separated by
    commas. ``name:`` with no dims is a scalar input.

    Returns:
        ``(name, dims)`` with dims a tuple of positive ints.

    Raises:
        InputShapeError: no ``:``, empty name, a dim that is not an integer, or a
            dim that is zero or negative.
    """
    if ":" not in spec:
        raise InputShapeError(f"input shape {spec!r}: expected NAME:D0,D1,... (e.g. x:1,3,224,224)")
    name, _, dims_text = spec.rpartition(":")
    name = name.strip()
    if not name:
        raise InputShapeError(f"input shape {spec!r}: the input name is empty")
    dims_text = dims_text.strip()
    if not dims_text:
        return name, ()
    parts = [p.strip() for p in dims_text.split(",")]
    dims: list[int] = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise InputShapeError(f"input shape {spec!r}: dim {part!r} is not an integer") from None
        if value <= 0:
            raise InputShapeError(f"input shape {spec!r}: dim {value} must be positive")
        dims.append(value)
    return name, tuple(dims)


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dims of a tensor input (None per unknown dim), or None if the rank is unknown."""
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]


def _fmt(shape: tuple[int, ...] | list) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def resolve_input_shapes(
    model: onnx.ModelProto,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    batch: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Return the concrete shape of every real graph input.

    Args:
        model: the model whose ``graph.input`` (minus initializers) is resolved.
        overrides: input name -> full shape, replacing the declared shape.
        batch: value for an unknown dim 0 (must be positive).

    Returns:
        ``{input name: shape}`` for every real graph input, in declaration order;
        shapes are tuples of positive ints. Unknown dim 0 -> ``batch``; other
        unknown dims -> :data:`DEFAULT_SPATIAL` (224).

    Raises:
        InputShapeError: ``batch`` is not positive; an override names an unknown
            input, has the wrong rank, or contradicts a fixed dim other than dim 0;
            an input has no declared rank and no override.
    """
    overrides = dict(overrides or {})
    if int(batch) <= 0:
        raise InputShapeError(f"batch size {batch} must be positive")
    inputs = graph_inputs(model)
    known = {i.name for i in inputs}
    for name in overrides:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InputShapeError(f"input shape override names unknown input {name!r} (inputs: {listed})")
    result: dict[str, tuple[int, ...]] = {}
    for vi in inputs:
        declared = _declared_dims(vi)
        if vi.name in overrides:
            shape = tuple(int(d) for d in overrides[vi.name])
            if any(d <= 0 for d in shape):
                raise InputShapeError(f"input {vi.name!r}: override {_fmt(shape)} has a non-positive dim")
            if declared is not None:
                if len(shape) != len(declared):
                    raise InputShapeError(
                        f"input {vi.name!r}: override {_fmt(shape)} has rank {len(shape)}, "
                        f"the model declares rank {len(declared)} ({_fmt(declared)})"
                    )
                for axis, (want, got) in enumerate(zip(declared, shape)):
                    if axis > 0 and want is not None and want != got:
                        raise InputShapeError(
                            f"input {vi.name!r}: override {_fmt(shape)} sets dim {axis} to {got}, "
                            f"the model fixes it to {want} ({_fmt(declared)})"
                        )
            result[vi.name] = shape
            continue
        if declared is None:
            raise InputShapeError(f"input {vi.name!r} has no declared shape; give one with --input-shape {vi.name}:D0,D1,...")
        result[vi.name] = tuple(
            d if d is not None else (int(batch) if axis == 0 else DEFAULT_SPATIAL) for axis, d in enumerate(declared)
        )
    return result


def tensor_bytes(shape, itemsize: int = 4) -> int:
    """Bytes of a dense tensor of ``shape`` (Python ints: no overflow for absurd dims)."""
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    return n * int(itemsize)


def _itemsize(vi: onnx.ValueInfoProto) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).itemsize) or 4
    except (KeyError, TypeError, ValueError):
        return 4


def make_inputs(
    model: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random input tensors for every real graph input.

    Float inputs (float16/float32/float64) are standard normal in the declared
    dtype; integer and bool inputs are zeros. Uses ``np.random.default_rng(seed)``
    and the inputs' declaration order, so the result is reproducible.

    Args:
        model: the model whose real graph inputs are filled.
        shapes: ``{input name: shape}``, e.g. from :func:`resolve_input_shapes`.
        seed: random seed.

    Returns:
        ``{input name: np.ndarray}`` with the given shapes.

    Raises:
        InputShapeError: an input has no entry in ``shapes``.
        OnnxPruneError: the inputs would exceed the memory budget
            (:func:`onnxprune.safety.check_allocation`), checked before anything is allocated.
        UnsupportedModelError: an input is not a tensor or has a dtype numpy cannot
            hold (string, bfloat16, float8, ...).
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    total = 0
    for vi in graph_inputs(model):
        if vi.name in shapes:
            nbytes = tensor_bytes(shapes[vi.name], _itemsize(vi))
            total += nbytes
            check_allocation(nbytes, f"random input {vi.name!r} of shape {_fmt(tuple(shapes[vi.name]))}")
    check_allocation(total, "the random inputs")
    for vi in graph_inputs(model):
        if vi.name not in shapes:
            raise InputShapeError(f"no shape given for input {vi.name!r}")
        shape = tuple(int(d) for d in shapes[vi.name])
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {vi.name!r} is not a tensor; only tensor inputs are supported")
        elem = vi.type.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in "fiub" or dtype.itemsize == 0 or elem == onnx.TensorProto.BFLOAT16:
            type_name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
            raise UnsupportedModelError(f"input {vi.name!r} has dtype {type_name}, which onnxprune cannot feed")
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds
