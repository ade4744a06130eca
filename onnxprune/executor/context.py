"""What an op's torch ``evaluate`` receives besides its input tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalNode:
    """One ONNX node as the executor sees it.

    Attributes:
        op: op type; name: node name (for error messages).
        attrs: ONNX attributes as Python values (onnx-graphsurgeon's ``node.attrs``).
        n_outputs: number of node outputs (Split needs it when sizes are implicit).
    """

    op: str
    name: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    n_outputs: int = 1


@dataclass(frozen=True)
class EvalContext:
    """Model-level facts an op's evaluation may need: the default-domain opset."""

    opset: int
