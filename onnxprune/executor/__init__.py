"""Torch evaluation of ONNX graphs: :class:`TorchGraph` (``onnxprune.executor.TorchGraph``).

The class is imported lazily (module ``__getattr__``), so that importing a submodule such as
:mod:`onnxprune.executor.device` does not build the whole executor.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TorchGraph"]


def __getattr__(name: str) -> Any:
    if name == "TorchGraph":
        from onnxprune.executor.graph_module import TorchGraph

        return TorchGraph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
