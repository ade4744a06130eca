"""What op handlers see during surgery: keep masks of tensors and constant replacement."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.context import TensorChannels


class SurgeryContext:
    """Keep masks of activation tensors under a plan, and safe constant replacement.

    Args:
        channels: channel elements of every tracked activation tensor (from the analysis).
        removed: bool [num elements]: True for elements the plan removes.
        shapes: the analysis' concrete shapes (of the unpruned model).
        opset: default-domain opset of the model.
    """

    def __init__(self, channels: Mapping[str, TensorChannels], removed: np.ndarray,
                 shapes: Mapping[str, tuple[int, ...]], opset: int) -> None:
        self._channels = channels
        self._removed = removed
        self._shapes = shapes
        self.opset = opset

    def keep(self, t: gs.Tensor) -> np.ndarray | None:
        """bool [size of t's channel axis]: positions kept; None when nothing is removed."""
        if isinstance(t, gs.Constant) or not t.name:
            return None
        tc = self._channels.get(t.name)
        if tc is None:
            return None
        mask = ~self._removed[tc.elems]
        return None if mask.all() else mask

    def kept_count(self, t: gs.Tensor) -> int:
        """Number of positions of a tracked tensor's channel axis that the plan keeps."""
        tc = self._channels[t.name]
        return int((~self._removed[tc.elems]).sum())

    def rank(self, t: gs.Tensor) -> int:
        """Rank of a tensor in the unpruned model."""
        return len(self._shapes[t.name])

    def axis(self, t: gs.Tensor) -> int | None:
        """Channel axis of a tracked tensor, else None."""
        tc = self._channels.get(t.name) if t.name else None
        return None if tc is None else tc.axis

    @staticmethod
    def const(t: gs.Tensor) -> np.ndarray | None:
        """Value of a constant input, or None for a variable."""
        return np.asarray(t.values) if isinstance(t, gs.Constant) else None

    @staticmethod
    def set_const(node: gs.Node, index: int, value: np.ndarray) -> None:
        """Replace the constant ``node.inputs[index]`` by ``value``.

        A constant read by several nodes is copied for this node instead of changed in
        place, so other readers keep their original values.
        """
        t = node.inputs[index]
        value = np.ascontiguousarray(value)
        if len(t.outputs) > 1:
            node.inputs[index] = gs.Constant(f"{t.name}__{node.name}", value)
        else:
            t.values = value
