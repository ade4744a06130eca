"""Torch evaluation of ONNX graphs (issue: data-driven criteria)."""
