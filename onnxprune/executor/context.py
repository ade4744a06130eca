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
        cache: scratch space of the op's ``evaluate``: what it derives from ``attrs``
            (and from input shapes that rarely change) is parsed on the first call and
            kept here, so a node's attributes are read once, not at every forward.
    """

    op: str
    name: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    n_outputs: int = 1
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class EvalContext:
    """Model-level facts an op's evaluation may need.

    Attributes:
        opset: the default-domain opset.
        channels_last: 4-D activations run in ``torch.channels_last`` memory layout; an op
            that creates a 4-D activation from inputs whose layout is ambiguous (e.g. a
            Conv reading one channel) returns it in that layout.
    """

    opset: int
    channels_last: bool = False
