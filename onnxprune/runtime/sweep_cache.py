"""``--round-to auto`` without paying the channel sweep twice: results cached per setup.

Rules:

- The sweep (:func:`onnxprune.runtime.sweep.channel_sweep`) depends only on the shapes
  of the swept conv chains (or single convs), the execution provider, the thread count,
  the processor and the onnxruntime version. The cache key is the SHA-256 of exactly
  those (the chains' shapes and activations as JSON, the sweep window and the
  candidate list, ``provider``, ``threads``, the CPU model name and core count, the
  onnxruntime version and this module's format version), so a model with the same conv
  chains on the same machine and settings reuses the choice, and any change of those
  sweeps again.
- The cache is one JSON file, ``round_to.json``, in the user cache folder
  (``platformdirs.user_cache_dir("onnxprune")``; ``ONNXPRUNE_CACHE_DIR`` overrides it),
  written atomically. A cache that cannot be read or written is ignored (the sweep runs,
  a note says why): caching never makes a compress fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxprune.cachedir import cache_dir

__all__ = ["CachedSweep", "cache_dir", "cached_channel_sweep", "cpu_name"]

_FORMAT = 1


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class CachedSweep:
    """A round_to choice and where it came from.

    Attributes:
        round_to: the chosen N.
        info: the sweep's JSON (:meth:`SweepResult.to_dict`) plus ``cached`` (bool) and
            ``cache_note`` (why the cache was not used, or None).
    """

    round_to: int
    info: Mapping[str, Any]


def _key(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], analysis: Any, *, top: int, window: int,
         provider: str, threads: int | None) -> str:
    import onnxruntime as ort

    from onnxprune.runtime.sweep import CANDIDATES, conv_chains, conv_shapes

    chains = conv_chains(model, shapes, analysis, top)
    what = [c.to_dict() for c in chains] if chains else [s.to_dict() for s in conv_shapes(model, shapes, top)]
    for w in what:
        w.pop("groups", None)
        w.pop("macs", None)
    blob = json.dumps({"format": _FORMAT, "what": what, "window": window, "candidates": list(CANDIDATES),
                       "provider": provider, "threads": threads, "cpu": cpu_name(), "cores": os.cpu_count(),
                       "ort": ort.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def cached_channel_sweep(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], analysis: Any, *,
                         provider: str = "CPUExecutionProvider", threads: int | None = None, top: int = 3,
                         window: int = 48, use_cache: bool = True) -> CachedSweep:
    """round_to for ``model`` from the cache, or from a channel sweep that is then cached.

    Args:
        model / shapes / analysis: the canonical model, every tensor's shape, its analysis.
        provider / threads / top / window: the sweep's settings (part of the key).
        use_cache: False sweeps and neither reads nor writes the cache.

    Returns:
        :class:`CachedSweep`.

    Raises:
        OnnxPruneError: from the sweep itself (onnxruntime failures).
    """
    from onnxprune.runtime.sweep import channel_sweep

    note = None
    path = cache_dir() / "round_to.json"
    key = _key(model, shapes, analysis, top=top, window=window, provider=provider, threads=threads)
    entries: dict = {}
    if use_cache:
        try:
            entries = _read(path) if path.exists() else {}
        except (OSError, ValueError) as e:
            note = f"round_to cache {path} unreadable ({type(e).__name__}); swept again"
        hit = entries.get(key)
        if isinstance(hit, dict) and isinstance(hit.get("round_to"), int):
            return CachedSweep(int(hit["round_to"]), {**hit.get("sweep", {}), "cached": True, "cache_note": None,
                                                      "cache_file": str(path)})
    res = channel_sweep(model, shapes, provider=provider, threads=threads, analysis=analysis, top=top, window=window)
    sweep = res.to_dict()
    if use_cache:
        entries[key] = {"round_to": res.round_to, "sweep": sweep}
        try:
            from onnxprune.io import write_text_atomic

            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(entries, indent=1, sort_keys=True))
        except Exception as e:  # noqa: BLE001 - a cache is an optimisation, never a failure
            note = f"round_to cache {path} not written ({type(e).__name__})"
    return CachedSweep(res.round_to, {**sweep, "cached": False, "cache_note": note, "cache_file": str(path)})
