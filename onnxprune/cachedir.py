"""Where onnxprune keeps its caches: ``ONNXPRUNE_CACHE_DIR``, else the user cache folder
(``platformdirs.user_cache_dir("onnxprune")``, e.g. ``~/.cache/onnxprune`` on Linux).

Holds the ``--round-to auto`` sweep results (:mod:`onnxprune.runtime.sweep_cache`) and
torch's compiler cache (``TORCHINDUCTOR_CACHE_DIR`` is pointed here by the command line,
so that no run leaves a ``torchinductor_<user>`` folder in the temporary folder).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "point_torch_caches_here"]


def cache_dir() -> Path:
    """The folder of onnxprune's caches (not created here)."""
    env = os.environ.get("ONNXPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("onnxprune"))


def point_torch_caches_here() -> None:
    """Set ``TORCHINDUCTOR_CACHE_DIR`` to ``<cache_dir>/torchinductor`` unless the user set it
    (torch creates its default under the temporary folder as soon as an optimizer is built)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
