"""The one place the extension is imported, with a clear error when it is missing or stale."""

from __future__ import annotations

try:
    from stoker import _core
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "stoker's native extension (stoker._core) could not be imported: "
        f"{exc}. Reinstall stoker (pip install --force-reinstall stoker, or pip install . from a checkout)."
    ) from exc

import torch

__all__ = ["POOL", "core", "from_dlpack"]

core = _core

# One pool for every loader of the process: blocks are kept per exact size, so loaders of different shapes
# do not share blocks, and the cache bound keeps idle memory small.
POOL = _core.BufferPool(64 << 20)

_from_dlpack = getattr(torch._C, "_from_dlpack", None) or torch.from_dlpack


def from_dlpack(capsule):
    """A CPU tensor viewing a pooled block, zero-copy; the block returns to the pool when it is freed."""
    return _from_dlpack(capsule)
