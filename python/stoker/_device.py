"""Batches delivered on a CUDA device: the device stage of a loader built with ``device=``.

Each CPU batch (collated into page-locked buffers of stoker's pool) is copied host-to-device on a stream of
stoker's own, created non-blocking in the device's primary context (the context torch uses), ``depth`` batches
ahead of the one handed to the user. The bookkeeping that makes this safe:

* destinations come from torch's caching allocator, allocated while stoker's stream is torch's current one,
  so the allocator orders their reuse on that stream;
* an event is recorded after a batch's copies (and the optional ``transform``); when the batch is handed over,
  the consumer's current stream waits on that event (no device-wide synchronisation), and every device tensor
  of the batch is marked as used by the consumer's stream (``record_stream``), so its memory is not reused
  before the consumer's work on it has run, even when the user frees it at once;
* the host buffers of a batch are kept until its event has completed: only then can the pool reuse them.

Members of a batch that are not CPU tensors (strings, numbers, custom objects) stay as they are.

Batches handed to the user pinned (``pin_memory=True``, no ``device=``) need bookkeeping too: torch tracks the
non-blocking copies it makes only from host memory its own allocator gave out, so a block of stoker's pool that
the user drops right after ``x.cuda(non_blocking=True)`` would go back to the pool, and be refilled with a later
batch, while the copy that reads it still waits behind the GPU's earlier work. So once such a loader runs, the
pool and its worker ring return memory through a fence queue (native): a block or slot released (its last
tensor, view or alias gone) is held until events recorded after the release, on torch's current stream of
each GPU the process has work on when the next batch is handed over, have completed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Callable

import torch

from stoker import _cuda
from stoker._native import core
from stoker._turns import Turns, close_in_turn, one_at_a_time

__all__ = ["CudaTarget", "DeviceIterator", "fence_queue", "poll", "stamp", "to_device"]


class CudaTarget:
    """A CUDA device as the stage uses it: stoker's driver stream for copies and events, torch's caching
    allocator (with that stream current) for destinations, torch's current stream as the consumer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = core.CudaStream(device.index)
        # torch's view of the same CUstream: allocations made under it are ordered on it.
        self._torch_stream = torch.cuda.ExternalStream(self.stream.handle, device=device)

    def side(self):
        """Context in which destinations are allocated and the transform runs: stoker's stream current."""
        return torch.cuda.stream(self._torch_stream)

    def empty(self, src: torch.Tensor) -> torch.Tensor:
        return torch.empty(src.shape, dtype=src.dtype, device=self.device)

    def consumer(self):
        """The stream the user's work runs on now (torch's current stream of the device)."""
        return torch.cuda.current_stream(self.device)

    @staticmethod
    def handle(consumer) -> int:
        return consumer.cuda_stream

    @staticmethod
    def used_by(tensor: torch.Tensor, consumer) -> None:
        tensor.record_stream(consumer)


def _leaves(batch, out: list) -> list:
    """The tensors of a batch structure (tuples, lists, mappings, namedtuples, dataclass instances, as a
    transform may return), in order."""
    if isinstance(batch, torch.Tensor):
        out.append(batch)
    elif isinstance(batch, Mapping):
        for v in batch.values():
            _leaves(v, out)
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for v in batch:
            _leaves(v, out)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            _leaves(getattr(batch, field.name, None), out)
    return out


def _rebuild(batch, convert: Callable[[torch.Tensor], torch.Tensor]):
    """The batch with each CPU tensor replaced by convert(tensor); the structure's types are kept as torch's
    pin_memory keeps them."""
    if isinstance(batch, torch.Tensor):
        return convert(batch) if batch.device.type == "cpu" else batch
    if isinstance(batch, (str, bytes)):
        return batch
    if isinstance(batch, Mapping):
        items = {k: _rebuild(v, convert) for k, v in batch.items()}
        try:
            if isinstance(batch, MutableMapping):
                clone = copy.copy(batch)  # keeps the type and attributes of a mapping subclass
                clone.update(items)
                return clone
            return type(batch)(items)
        except TypeError:
            return items  # a mapping type that cannot be built from a dict
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_rebuild(v, convert) for v in batch))
    if isinstance(batch, tuple):
        return tuple(_rebuild(v, convert) for v in batch)
    if isinstance(batch, Sequence):
        try:
            return type(batch)([_rebuild(v, convert) for v in batch])
        except TypeError:
            return [_rebuild(v, convert) for v in batch]
    return batch


def to_device(batch, target, keep: list):
    """Queues the copy of every CPU tensor of `batch` to the target device on the target's stream and returns
    the batch made of the destinations. Every host tensor read is appended to `keep`: the caller holds them
    until an event recorded after these copies has completed. Call it with target.side() entered."""
    stream = target.stream
    done: dict = {}  # id(host tensor) -> its destination: a tensor named twice in the batch is copied once

    def convert(src: torch.Tensor) -> torch.Tensor:
        found = done.get(id(src))
        if found is not None:
            return found
        original = src
        if src.requires_grad:
            src = src.detach()
        if not src.is_contiguous():
            # An async copy never reads a strided view: a contiguous host copy first (pageable: the driver
            # stages it synchronously, which is correct, only slower).
            src = src.contiguous()
        dst = target.empty(src)
        nbytes = src.numel() * src.element_size()
        if nbytes:
            stream.copy_to_device(dst.data_ptr(), src.data_ptr(), nbytes)
        # Held until the copy is done; the original also keeps its id unique while `done` is in use.
        keep.append(original)
        if src is not original:
            keep.append(src)
        done[id(original)] = dst
        return dst

    return _rebuild(batch, convert)


class DeviceIterator:
    """Wraps one of stoker's CPU batch iterators: stages ``depth`` batches on the device ahead of use (see the
    module's docstring). The position the loader reports (state_dict) is the user's, not the stage's: the
    staged batches are not counted as served."""

    def __init__(self, inner, target, depth: int, cursor=None, transform: Callable | None = None) -> None:
        self._turns = Turns()
        self._inner = inner
        self._target = target
        self._depth = max(1, int(depth))
        self._cursor = cursor
        self._transform = transform
        self._staged: collections.deque = collections.deque()  # (kind, value, event)
        self._held: collections.deque = collections.deque()    # (event, host tensors) of copies maybe in flight
        self._inner_done = False
        self._closed = False
        if cursor is not None:
            cursor.staged = collections.deque()  # the position before each staged batch, oldest first

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def _position(self):
        return None if self._cursor is None else self._cursor.now()

    def _stage_one(self) -> bool:
        """Pulls the next CPU batch from the inner iterator and queues its copy. False when it has ended."""
        position = self._position()
        try:
            batch = next(self._inner)
        except StopIteration:
            self._inner_done = True
            if self._cursor is not None and self._staged:
                self._cursor.finished = False  # the user has batches to receive still
            return False
        except Exception as exc:  # raised at this batch's turn, as the inner iterator would have
            self._staged.append(("error", exc, None))
            if self._cursor is not None:
                self._cursor.staged.append(position)
            return True
        keep: list = []
        try:
            with self._target.side():
                on_device = to_device(batch, self._target, keep)
                if self._transform is not None:
                    on_device = self._transform(on_device)
            event = self._target.stream.record()
        except Exception as exc:  # a failed copy or transform: raised at this batch's turn, as a loading error
            if keep:
                self._target.stream.record().synchronize()  # copies already queued read `keep`
            self._staged.append(("error", exc, None))
        else:
            self._held.append((event, keep))
            self._staged.append(("batch", on_device, event))
        if self._cursor is not None:
            self._cursor.staged.append(position)
        return True

    def _release_finished(self) -> None:
        # Events of one stream complete in order: the oldest first.
        while self._held and self._held[0][0].query():
            self._held.popleft()

    @one_at_a_time
    def __next__(self):
        if self._closed:
            raise StopIteration
        while not self._inner_done and len(self._staged) < self._depth + 1:
            if not self._stage_one():
                break
        if self._turns.closing:  # another thread asked for it to close (its inner iterator has): it ends now
            raise StopIteration
        self._release_finished()
        if not self._staged:
            self._close()
            if self._cursor is not None:
                self._cursor.finished = True
            raise StopIteration
        kind, value, event = self._staged.popleft()
        if self._cursor is not None:
            self._cursor.staged.popleft()
        stamp()  # the pool is shared with pinned loaders: what was released meanwhile is fenced
        if kind == "error":
            raise value
        consumer = self._target.consumer()
        event.block_stream(self._target.handle(consumer))
        for tensor in _leaves(value, []):
            if tensor.device == self._target.device:
                self._target.used_by(tensor, consumer)
        return value

    def close(self) -> None:
        """Stops the inner iterator; host buffers are kept until their copies are done, then released. From
        another thread than one in next(), once that next() has ended (see close_in_turn)."""
        if not self._closed:
            close_in_turn(self, self._inner.close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._inner.close()
        if self._held:
            with contextlib.suppress(Exception):
                self._held[-1][0].synchronize()  # the last copy done means every earlier one is
        self._held.clear()
        self._staged.clear()
        cursor = self._cursor
        if cursor is not None and cursor.staged:
            # Batches staged but never received: the user's position stays before the oldest of them.
            cursor.staged = collections.deque([cursor.staged[0]])

    def __del__(self) -> None:
        self.close()

    def __getstate__(self):
        raise NotImplementedError(f"{type(self).__name__} cannot be pickled")


_targets: dict = {}  # device index -> CudaTarget
_targets_lock = threading.Lock()


def target_for(device: torch.device) -> CudaTarget:
    """The device's target: one stream for the process, shared by every loader, never destroyed. torch's caching
    allocator files the memory allocated while that stream is current under its handle, and keeps it there
    after the loader is gone (with expandable segments it synchronises the handle when it unmaps them, in
    empty_cache or when recovering from an out-of-memory error): a destroyed stream's handle would be invalid
    there, or another stream's."""
    with _targets_lock:
        target = _targets.get(device.index)
        if target is None:
            target = _targets[device.index] = CudaTarget(device)
        return target


def stage(inner, device: torch.device, depth: int, cursor, transform) -> Any:
    """The iterator a loader built with device= returns: `inner`'s batches on `device`."""
    return DeviceIterator(inner, target_for(device), depth, cursor, transform)


# ---- pinned batches handed to the user: memory held back until the GPU has passed the point of its release ----

_fences = None  # the process's core.FenceQueue, made at the first loader handing batches over pinned
_fence_lock = threading.Lock()


def current_stream_handle(device: int) -> int:
    """The CUstream of torch's current stream on `device` (0: the legacy default stream)."""
    return torch.cuda.current_stream(device).cuda_stream


def fence_queue(device: int):
    """The process's fence queue (see the module's docstring), set on the page-locked pool that `device` pins
    with when first asked for; later calls return it (whatever their device: one pool, one queue)."""
    global _fences
    with _fence_lock:
        if _fences is None:
            queue = core.FenceQueue(device)
            pool = _cuda.pinned_pool(device)
            if pool is not None:
                pool.set_fence(queue)
            _fences = queue
    poll()  # a new iterator: what earlier ones left that has passed returns
    return _fences


def stamp() -> None:
    """Fences the memory released since the last call (an event on torch's current stream of each GPU whose
    primary context is active: the user's copy may go to any of them) and returns what has passed. Called
    where the user's current stream is the one their copies go to: at each next() of a pinned iterator (the
    last one, which ends it, included), and at each batch a device stage hands over (its blocks come from the
    same pool). Nothing when no queue exists."""
    queue = _fences
    if queue is not None:
        devices = core.cuda_active_devices() or [queue.device]
        queue.stamp([(d, current_stream_handle(d)) for d in devices])


def poll() -> None:
    """Returns the memory whose fence has passed, recording nothing (where the current stream may not be the
    user's: an iterator's start, a close from a finalizer)."""
    queue = _fences
    if queue is not None:
        queue.poll()


def _forget_cuda_objects() -> None:
    # A forked child has neither its parent's CUDA context nor its streams and events (the native queue runs
    # releases at once there).
    global _fences, _fence_lock, _targets_lock
    _fences = None
    _fence_lock = threading.Lock()
    _targets.clear()
    _targets_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_cuda_objects)
