"""Channel importance criteria (one module per criterion) and their registry by name."""

from __future__ import annotations

from onnxprune.criteria.base import Criterion
from onnxprune.criteria.cpmc import CPMC
from onnxprune.criteria.magnitude import BN, L1, L2
from onnxprune.criteria.random import Random
from onnxprune.errors import OnnxPruneError

DATA_FREE = {"l1": L1, "l2": L2, "bn": BN, "cpmc": CPMC, "random": Random}
DATA_DRIVEN = ("taylor", "ifso", "infcp")
"""Data-driven criteria available now (imported lazily: they pull in torch)."""
NOT_YET = ()


def get_criterion(name: str, **kwargs) -> Criterion:
    """The criterion called ``name`` built with ``kwargs`` (e.g. ``seed``, ``a``, ``b``).

    Raises:
        OnnxPruneError: for an unknown name, or a data-driven one not available yet.
    """
    if name in DATA_FREE:
        return DATA_FREE[name](**kwargs)
    if name == "taylor":
        from onnxprune.criteria.taylor import Taylor

        return Taylor(**kwargs)
    if name == "ifso":
        from onnxprune.criteria.ifso import IFSO

        return IFSO(**kwargs)
    if name == "infcp":
        from onnxprune.criteria.infcp import InfCP

        return InfCP(**kwargs)
    if name in NOT_YET:
        raise OnnxPruneError(f"criterion {name} needs calibration data and the torch executor, not available yet")
    raise OnnxPruneError(f"unknown criterion {name!r}; choose from {', '.join(sorted([*DATA_FREE, *DATA_DRIVEN]))}")


def __getattr__(name: str):
    # Taylor lazily, so that data-free use does not import torch
    if name == "Taylor":
        from onnxprune.criteria.taylor import Taylor

        return Taylor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BN", "CPMC", "Criterion", "L1", "L2", "Random", "Taylor", "get_criterion", "DATA_FREE", "DATA_DRIVEN"]
