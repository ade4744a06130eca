"""Channel analysis: which channels must be cut together, and what they cost."""

from onnxprune.analysis.analyze import analyze, model_opset
from onnxprune.analysis.groups import Analysis, ChannelGroup, Member

__all__ = ["Analysis", "ChannelGroup", "Member", "analyze", "model_opset"]
