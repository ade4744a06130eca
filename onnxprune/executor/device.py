"""Where the torch side runs: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.

In a multi-process run (:mod:`onnxprune.distributed`), ``auto`` and ``cuda`` mean the GPU
of the process's ``LOCAL_RANK`` (``cuda:<local rank>``), one GPU per process.
"""

from __future__ import annotations

from onnxprune.errors import OnnxPruneError


def resolve_device(name: str = "auto") -> str:
    """The torch device string for ``name`` (``cuda:<local rank>`` for ``auto`` / ``cuda``
    with CUDA in a multi-process run).

    Raises:
        OnnxPruneError: ``cuda`` was asked for but torch sees no CUDA device, or the
            name is not one of auto, cpu, cuda, cuda:N.
    """
    import torch

    from onnxprune.distributed import current

    ctx = current()
    if ctx.world > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise OnnxPruneError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__})")
        return name
    raise OnnxPruneError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
