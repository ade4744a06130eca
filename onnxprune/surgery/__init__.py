"""Graph surgery: cut planned channels and every weight that depends on them."""

from onnxprune.surgery.apply import apply_plan

__all__ = ["apply_plan"]
