"""onnxprune: channel pruning of CNNs at the ONNX level.

Public API (each stage usable alone; the CLI is a thin wrapper):
load -> canonicalize -> analyze -> score -> plan -> apply -> verify -> bench -> report.
"""

__version__ = "0.1.0"
