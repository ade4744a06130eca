"""Channel importance criteria (one module per criterion) and their registry by name."""

from __future__ import annotations

from importlib import import_module

from onnxprune.criteria.base import Criterion, Scores
from onnxprune.criteria.cpmc import CPMC
from onnxprune.criteria.magnitude import BN, L1, L2
from onnxprune.criteria.random import Random
from onnxprune.errors import OnnxPruneError

DATA_FREE = {"l1": L1, "l2": L2, "bn": BN, "cpmc": CPMC, "random": Random}
DATA_DRIVEN = {"taylor": ("onnxprune.criteria.taylor", "Taylor"),
               "infcp": ("onnxprune.criteria.infcp", "InfCP"),
               "ifso": ("onnxprune.criteria.ifso", "IFSO")}
"""Data-driven criteria: name -> (module, class), imported lazily (they pull in torch)."""


def _data_driven_class(name: str) -> type:
    module, cls = DATA_DRIVEN[name]
    return getattr(import_module(module), cls)


def get_criterion(name: str, **kwargs) -> Criterion:
    """The criterion called ``name`` built with ``kwargs`` (e.g. ``seed``, ``a``, ``b``, ``loss``).

    Raises:
        OnnxPruneError: for an unknown name.
    """
    if name in DATA_FREE:
        return DATA_FREE[name](**kwargs)
    if name in DATA_DRIVEN:
        return _data_driven_class(name)(**kwargs)
    raise OnnxPruneError(f"unknown criterion {name!r}; choose from {', '.join(sorted([*DATA_FREE, *DATA_DRIVEN]))}")


def __getattr__(name: str):
    # the data-driven classes lazily, so that data-free use does not import torch
    for key, (_, cls) in DATA_DRIVEN.items():
        if cls == name:
            return _data_driven_class(key)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BN", "CPMC", "Criterion", "IFSO", "InfCP", "L1", "L2", "Random", "Scores", "Taylor", "get_criterion",
           "DATA_FREE", "DATA_DRIVEN"]
