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

__all__ = ["POOL", "core", "from_dlpack", "new_pool"]

core = _core

# What a plain pool caches: 64 MiB, raised to the most bytes its blocks have been out at once (since the latest
# iterator began: see BufferPool.forget_peak) up to 1 GiB.
# Batches of tens of MiB, a few in flight, would otherwise be allocated and page-faulted afresh each time
# (96 MiB batches loaded at half torch's speed that way, at 6.8x with the bound raised to their peak).
POOL_CACHE_BYTES = 64 << 20
POOL_GROW_TO = 1 << 30


def new_pool():
    """A plain pool with the process's bounds (see POOL_CACHE_BYTES)."""
    return _core.BufferPool(POOL_CACHE_BYTES, grow_to=POOL_GROW_TO)


# One pool for every loader of the process: blocks are kept per exact size, so loaders of different shapes
# do not share blocks, and the cache bound keeps idle memory small.
POOL = new_pool()

_from_dlpack = getattr(torch._C, "_from_dlpack", None) or torch.from_dlpack


def from_dlpack(capsule):
    """A CPU tensor viewing a pooled block, zero-copy; the block returns to the pool when it is freed."""
    return _from_dlpack(capsule)
