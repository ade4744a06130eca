"""Session-wide test settings: onnxprune's caches go to a temporary folder, never the user's."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Point ``ONNXPRUNE_CACHE_DIR`` (the ``--round-to auto`` sweep cache) at a fresh folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("onnxprune-cache")))
    yield
    mp.undo()
