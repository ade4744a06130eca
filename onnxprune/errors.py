"""Errors raised by onnxprune.

Every error a user can cause (bad file, bad option, unreachable target) is an
:class:`OnnxPruneError` subclass whose message is one line naming the problem
(file, node, op, opset). The CLI prints that line and exits with code 2.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class of all user-facing onnxprune errors (CLI exit code 2)."""


class ModelLoadError(OnnxPruneError):
    """The file is missing, unreadable, not ONNX, or corrupt."""


class UnsupportedModelError(OnnxPruneError):
    """The model is valid ONNX but outside what onnxprune supports (opset, IR, dtype)."""


class InputShapeError(OnnxPruneError):
    """An ``--input-shape`` override is malformed or contradicts the model."""


class PlanError(OnnxPruneError):
    """A pruning target or plan cannot be met or is inconsistent with the analysis."""


class SurgeryError(OnnxPruneError):
    """Graph surgery produced (or would produce) an invalid model."""


class VerificationError(OnnxPruneError):
    """The pruned model fails the checker, does not run, or its outputs differ in name/dtype/shape."""


class OutputPathError(OnnxPruneError):
    """The output path is unusable (equal to the input, unwritable directory)."""


class DataError(OnnxPruneError):
    """Calibration data is missing, malformed or does not fit the model."""


class DistributedError(OnnxPruneError):
    """A multi-process run failed: a collective could not complete (another process stopped
    or timed out) or the process group could not be formed."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of a library exception's message (its type name if none),
    for the one-line messages of the errors above."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
