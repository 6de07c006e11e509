"""default_collate with torch's exact semantics, stacking arrays and tensors into pooled buffers.

torch's own ``collate`` walks the structure (mappings, namedtuples, sequences, scalars, strings) with a map
of per-type functions. We hand it a copy of ``default_collate_fn_map`` in which torch's two stacking
functions are replaced by ours, so every other rule, and every user extension of the map, stays torch's.
Ours stack a regular batch natively into a block of stoker's pool; anything irregular (mixed dtypes or
shapes, negative strides, tensors needing autograd, subclasses) is passed to torch's function, which gives
torch's result or torch's error.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from torch.utils.data._utils import collate as _tc
from torch.utils.data._utils import worker as _tw

from stoker._arrays import dlpack_type_of_torch
from stoker._native import POOL, core, from_dlpack

__all__ = ["default_collate"]

_Tensor = torch.Tensor


# The pool a thread collates into when an iterator asks for another one than POOL: the page-locked pool when
# batches are pinned for a GPU (see use_pool); and, in a worker process, the slot of the shared-memory ring the
# batch being collated goes to, for the thread that serves it alone (see current_arena).
_local = threading.local()


def current_arena():
    """In a stoker worker process's serving thread, the slot of the ring the batch being collated goes to:
    stacking writes straight into it, so the batch crosses to the main process without a copy (see _workers).
    None elsewhere, and in any other thread (a dataset's own threads collate into the pool as usual)."""
    return getattr(_local, "arena", None)


def set_arena(arena) -> None:
    """Makes `arena` this thread's (None: no longer)."""
    _local.arena = arena


def current_pool():
    """The pool this thread's collation stacks into: the one use_pool() set, else POOL."""
    pool = getattr(_local, "pool", None)
    return POOL if pool is None else pool


@contextlib.contextmanager
def use_pool(pool):
    """Stacks this thread's collations into `pool` for the duration (None: POOL)."""
    previous = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        yield
    finally:
        _local.pool = previous


def _stack_numpy(batch, *, collate_fn_map=None):
    if _tc.np_str_obj_array_pattern.search(batch[0].dtype.str) is None:
        arena = current_arena()
        if arena is not None:
            out = arena.empty_like_stack(batch)
            if out is not None:
                try:
                    np.stack(batch, out=out.numpy())
                    return out
                except (ValueError, TypeError):
                    pass  # shapes or dtypes differ: torch's function decides
        capsule = core.stack_arrays(batch if type(batch) is list else list(batch), current_pool())
        if capsule is not None:
            return from_dlpack(capsule)
    return _tc.collate_numpy_array_fn(batch, collate_fn_map=collate_fn_map)


def _stack_tensors(batch, *, collate_fn_map=None):
    elem = batch[0]
    if type(elem) is _Tensor and elem.layout is torch.strided and elem.device.type == "cpu":
        dtype = elem.dtype
        code_bits = dlpack_type_of_torch(dtype)
        if code_bits is not None and all(type(t) is _Tensor and t.dtype is dtype for t in batch):
            arena = current_arena()
            out = arena.empty([len(batch), *elem.shape], dtype) if arena is not None else None
            if out is None:
                out = from_dlpack(current_pool().empty([len(batch), *elem.shape], *code_bits))
            try:
                return torch.stack(batch, 0, out=out)
            except RuntimeError:
                pass  # shapes, devices or autograd: torch's function decides
    # In a stoker worker (process or thread: get_worker_info() answers in both) torch's function would stack
    # into a new shared-memory segment (and refuse tensors that need grad); our ring hands batches over, or
    # the thread shares the main process's memory, so it runs as in the main process.
    local = getattr(_tw, "_stoker_thread_info", None)  # set by stoker's worker threads (see _workers)
    thread_info = getattr(local, "info", None)
    if thread_info is not None:
        local.info = None
        try:
            return _tc.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
        finally:
            local.info = thread_info
    info = _tw._worker_info
    if info is None:
        return _tc.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    _tw._worker_info = None
    try:
        return _tc.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    finally:
        _tw._worker_info = info


_fast_map_for: tuple = (None, None)  # (items of the map it was built from, fast map)


def _fast_map() -> dict:
    global _fast_map_for
    items = tuple(_tc.default_collate_fn_map.items())
    if items != _fast_map_for[0]:
        fast = dict(_tc.default_collate_fn_map)
        if fast.get(torch.Tensor) is _tc.collate_tensor_fn:
            fast[torch.Tensor] = _stack_tensors
        if fast.get(np.ndarray) is _tc.collate_numpy_array_fn:
            fast[np.ndarray] = _stack_numpy
        _fast_map_for = (items, fast)
    return _fast_map_for[1]


def default_collate(batch):
    """torch.utils.data.default_collate, same output and errors, with arrays stacked into pooled buffers."""
    return _tc.collate(batch, collate_fn_map=_fast_map())


_PRISTINE = tuple(_tc.default_collate_fn_map.items())


def map_is_pristine() -> bool:
    """True while nobody has changed default_collate_fn_map (the native array path relies on it)."""
    return tuple(_tc.default_collate_fn_map.items()) == _PRISTINE
