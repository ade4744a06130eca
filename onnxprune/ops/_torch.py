"""Shared helpers of the handlers' torch ``evaluate`` methods.

torch is imported lazily (on first use of :data:`torch` / :data:`F`), so that loading the
op registry for analysis or surgery does not pay torch's import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from onnxprune.errors import UnsupportedModelError


class _LazyModule:
    """Stands for a module that is imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._mod = None

    def __getattr__(self, attr: str) -> Any:
        mod = self.__dict__.get("_mod")
        if mod is None:
            mod = importlib.import_module(self.__dict__["_name"])
            self.__dict__["_mod"] = mod
        return getattr(mod, attr)


torch: Any = _LazyModule("torch")
F: Any = _LazyModule("torch.nn.functional")


def unsupported(node, what: str) -> UnsupportedModelError:
    """The error for a feature of ``node`` the torch evaluation does not implement."""
    return UnsupportedModelError(f"{node.op} node {node.name}: {what} is not supported by the torch executor")


def attr_str(node, name: str, default: str) -> str:
    """A string attribute (bytes or str) as str."""
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def attr_ints(node, name: str, default: Sequence[int] | None = None) -> list[int] | None:
    v = node.attrs.get(name)
    if v is None:
        return None if default is None else list(default)
    return [int(a) for a in v]


def present(inputs: list, i: int):
    """Input ``i`` or None when absent (missing or an empty optional input)."""
    return inputs[i] if len(inputs) > i else None


def int_list(t) -> list[int]:
    """A 0-D or 1-D integer tensor as a list of Python ints."""
    return [int(v) for v in t.reshape(-1).tolist()]


def float_list(t) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


def scalar(t) -> Any:
    """A one-element tensor as a Python number."""
    return t.reshape(-1)[0].item()


#: ONNX TensorProto.DataType -> torch dtype name.
_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


def onnx_dtype(node, to: int):
    """torch dtype of ONNX data type ``to``."""
    name = _DTYPES.get(int(to))
    dt = getattr(torch, name, None) if name else None
    if dt is None:
        raise unsupported(node, f"data type {to}")
    return dt


def const_tensor(node, value, dtype=None):
    """A torch tensor from an attribute value (gs.Constant, numpy array or number)."""
    import numpy as np

    arr = np.asarray(getattr(value, "values", value))
    if arr.dtype.kind in "OSU":
        raise unsupported(node, "a string tensor")
    t = torch.from_numpy(np.ascontiguousarray(arr).copy())
    return t if dtype is None else t.to(dtype)


def broadcast_legacy(node, a, b, opset: int):
    """Pre-opset-7 ``broadcast``/``axis`` attributes: align ``b`` with ``a`` from ``axis``."""
    if opset >= 7 or not int(node.attrs.get("broadcast", 0)) or "axis" not in node.attrs:
        return b
    axis = int(node.attrs["axis"]) % max(a.dim(), 1)
    trailing = a.dim() - axis - b.dim()
    return b.reshape(tuple(b.shape) + (1,) * trailing) if trailing > 0 else b


# ---- spatial helpers (Conv, pooling) ---------------------------------------------------
def auto_pads(node, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` ([begin..., end...]) of a Conv/pool node, resolving ``auto_pad``."""
    n = len(in_sizes)
    mode = attr_str(node, "auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        pads = attr_ints(node, "pads", [0] * (2 * n))
        if len(pads) != 2 * n:
            raise unsupported(node, f"pads {pads} for {n} spatial axes")
        return pads
    if mode == "VALID":
        return [0] * (2 * n)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise unsupported(node, f"auto_pad {mode}")
    begin, end = [], []
    for i in range(n):
        out = -(-in_sizes[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sizes[i])
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def torch_pad_arg(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """F.pad's argument (last axis first) for per-axis ``begin``/``end`` of trailing axes."""
    out: list[int] = []
    for b, e in zip(reversed(list(begin)), reversed(list(end))):
        out += [int(b), int(e)]
    return out


def pool_out_size(size: int, k: int, s: int, d: int, pb: int, pe: int, ceil_mode: bool) -> int:
    """Pooling output length (ONNX / onnxruntime rule, incl. ceil_mode's last-window rule)."""
    span = size + pb + pe - ((k - 1) * d + 1)
    if not ceil_mode:  # C integer division (towards zero), as onnxruntime
        return int(span / s) + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + pb:  # the last window would start in the end padding
        out -= 1
    return out
