"""``torch.compile`` of the executor's step loop: when it is used and when it can be.

Measured (tools/bench_executor.py, README "Executor speed"): on the CPU, compiling the
loop does not pay. Dynamo unrolls the loop and breaks the graph inside the op
evaluators (they cache parsed attributes, read Python scalars of tensors), so each
evaluator is recompiled per node until torch's recompile limit and then runs eagerly:
compilation takes tens of seconds and the forward is slower than eager. So the default is
off everywhere; ``TorchGraph(compile=True)`` asks for it explicitly, and is refused with
a clear error where the platform lacks what inductor needs (a C++ compiler for the CPU,
triton for CUDA).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable

from onnxprune.errors import OnnxPruneError


def compile_default() -> bool:
    """Whether TorchGraph compiles its step loop when not told: never (see the module docstring)."""
    return False


def missing_toolchain(device_type: str) -> str | None:
    """What inductor lacks to compile for ``device_type`` (``cpu``, ``cuda``), or None."""
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "the triton package"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "a C++ compiler (g++, c++ or clang++ on PATH)"
    return None


def compiled(fn: Callable, device_type: str) -> Callable:
    """``torch.compile(fn)`` for tensors on ``device_type``.

    Raises:
        OnnxPruneError: the platform lacks what inductor needs (named).
    """
    import torch

    missing = missing_toolchain(device_type)
    if missing is not None:
        raise OnnxPruneError(f"TorchGraph(compile=True) on {device_type}: torch.compile needs {missing}, "
                             "which this platform lacks; use compile=False")
    return torch.compile(fn, dynamic=False)
