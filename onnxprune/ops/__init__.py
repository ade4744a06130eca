"""Per-op handlers (one module per op family) and their registry."""

from onnxprune.ops.registry import OpHandler, get_handler, register, supported_ops

__all__ = ["OpHandler", "get_handler", "register", "supported_ops"]
