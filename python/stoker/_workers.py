"""Worker processes for Python datasets: torch's worker contract, with batches handed over through one
shared-memory ring instead of a shared-memory segment per tensor.

The main process owns a file mapping (in /dev/shm) cut into equal slots. With each task it lends a worker a
free slot; the worker loads and collates the batch, copies its tensors into the slot and sends back only the
batch's structure, with each tensor replaced by its place in the slot. The main process wraps those places as
tensors without copying (DLPack, owning a lease on the slot), and the slot is lent again only once every
tensor viewing it has been freed. A tensor collate stacks that is too large for the rest of its slot gets a
shared-memory segment of its own, and so does every one of a batch whose task was sent while every slot was
held by the user; they travel by handle, as torch's loader sends them. A batch that does not fit its slot
otherwise (a collate_fn's own tensors) travels pickled.

Tasks reach a worker through a queue of its own; its answers come back through a pipe of its own, written by the
worker's thread itself (no feeder thread, no lock shared between workers), and the main process reads whichever
worker has an answer waiting. At most prefetch_factor x num_workers batches are asked for and not yet handed to
the user, those that arrived ahead of their turn included, so the ring's slots cover them.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import copy
import functools
import gc
import itertools
import mmap
import multiprocessing
import os
import pickle
import queue
import random
import select
import signal
import struct
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions for the pickled path
from multiprocessing import connection as _mp_connection
from multiprocessing import reduction as _reduction
from multiprocessing.reduction import ForkingPickler
from torch.utils.data._utils import worker as _torch_worker

from stoker import _native
from stoker._arrays import dlpack_type_of_torch
from stoker._collate import set_arena

__all__ = ["Interrupted", "IterablePosition", "IterableSource", "ProcessBatches", "ThreadPool", "WorkerPool",
           "Zygote", "close_zygotes", "is_stateful", "load_batch", "seed_sample", "set_thread_worker_info",
           "shutdown_all", "start_method_of", "warn_ring_not_pinned"]

_POLL_S = 0.25  # how often a waiting main process checks that its workers live
_PARENT_CHECK_S = 1.0  # how often an idle worker checks that its parent lives
_EXIT_GRACE_S = 0.5  # how long shutdown waits for workers to exit before terminating them
_REST_AFTER_S = 0.1  # forked workers after the first start once it replied, or this long after its fork
_ALIGN = 64
_DEFAULT_SLOT_BYTES = 32 << 20

_TORCH_DTYPES = {}
for _dt in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
            torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
            torch.complex64, torch.complex128):
    _cb = dlpack_type_of_torch(_dt)
    if _cb is not None:
        _TORCH_DTYPES[_dt] = _cb


_NUMPY_TO_TORCH = {}
for _dt in _TORCH_DTYPES:
    try:
        _NUMPY_TO_TORCH[np.dtype(torch.empty(0, dtype=_dt).numpy().dtype)] = _dt
    except TypeError:  # bfloat16 and the like have no numpy dtype
        pass


_LOADING_NOTE = "stoker: raised while loading"  # the note of the batch (and index) an error was raised at


def _add_note(exc: BaseException, note: str, kind: str = _LOADING_NOTE) -> None:
    """Adds stoker's note saying where ``exc`` was raised (``note`` starts with ``kind``), in place of any of
    that kind it had: an exception object raised again (a dataset keeping one) names its latest batch only."""
    if hasattr(exc, "add_note"):
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [n for n in notes if not (isinstance(n, str) and n.startswith(kind))]
        exc.add_note(note)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _seed_torch(seed: int) -> None:
    """torch.manual_seed(seed) (as torch's workers seed themselves, and as sample_seeds seeds each sample),
    without the part of its work that cannot matter.

    Besides the CPU generator, torch.manual_seed queues a seed for each accelerator backend (CUDA, XPU,
    MTIA, ...) not started yet, and each queued seed formats the whole call stack, reading its source files:
    about 0.2 ms a call, and some milliseconds in a new worker, before its first sample. When torch has no
    accelerator (none built in, no custom backend registered), no such backend can ever start, and seeding
    the CPU generator alone is the same."""
    accelerator = getattr(getattr(torch, "accelerator", None), "current_accelerator", None)
    custom = getattr(torch._C, "_get_privateuse1_backend_name", None)
    if accelerator is None or custom is None or accelerator() is not None or hasattr(torch, custom()):
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def seed_sample(rng_key, index) -> None:
    """Seeds random, numpy and torch from (seed, epoch, index): a sample's random choices then depend on
    nothing else (not the worker, nor the worker count, nor what was loaded before it)."""
    seed, epoch = rng_key
    s = _mix64(_mix64(seed ^ 0x9E3779B97F4A7C15) ^ _mix64(epoch + 0xD1B54A32D192ED03) ^ _mix64(int(index) + 1))
    random.seed(s)
    np.random.seed([s & 0xFFFFFFFF, s >> 32])
    _seed_torch(s)


class Stop:
    """Set when the iterator a worker thread loads for has closed: the thread's batch stops at its next sample
    (raising Stopped, which nobody receives), where it would otherwise load the rest of the batch first."""

    __slots__ = ("set",)

    def __init__(self) -> None:
        self.set = False


class ThreadPool:
    """Worker threads for a loader's batches: `num_threads` threads that run `initializer()` then the calls
    submitted, in order, each answered through a Future (what ``concurrent.futures.ThreadPoolExecutor`` does
    here, its threads started at once). They are daemon threads: a sample that never returns does not keep the
    interpreter from exiting, where the executor's threads are joined at exit, as torch's worker processes are
    ended at exit, not waited for."""

    def __init__(self, num_threads: int, name: str, initializer: Callable[[], None]) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()  # (future, fn, args), or None: a thread ends
        self._lock = threading.Lock()
        self._shut = False
        self._threads = [threading.Thread(target=_serve_tasks, args=(self._tasks, initializer),
                                          name=f"{name}_{i}", daemon=True) for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args) -> Future:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._tasks.put((future, fn, args))
            return future

    def shutdown(self) -> None:
        """Cancels the calls queued; the threads end after those begun (nobody waits for them)."""
        with self._lock:
            if not self._shut:
                self._shut = True
                while True:
                    try:
                        task = self._tasks.get_nowait()
                    except queue.Empty:
                        break
                    task[0].cancel()  # (no None is queued before this)
                for _ in self._threads:
                    self._tasks.put(None)


def _serve_tasks(tasks: queue.SimpleQueue, initializer: Callable[[], None]) -> None:
    # (A function of its own, not a method: the thread must not keep the pool alive.)
    initializer()
    while True:
        task = tasks.get()
        if task is None:
            return
        future, fn, args = task
        del task
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - the future's caller receives it
                future.set_exception(exc)
                del exc
            else:
                future.set_result(result)
                del result
        del future, fn, args  # (nothing of a finished batch is kept while the thread waits for the next)


class Interrupted(Exception):
    """Raised to the thread waiting for the workers' next message when another thread asked for the epoch to
    close: that waiting thread closes it (the pipes it reads are not closed under it)."""


class Stopped(Exception):
    """A batch left between two samples: its iterator has closed (see Stop)."""


def load_batch(dataset, getitems, auto: bool, collate, number: int, indices, rng_key=None, stop: Stop | None = None):
    """Fetches and collates one batch as torch's fetcher does; an error gets a note naming the index. With
    `rng_key` = (seed, epoch), the RNGs are seeded before each sample (before each batch, with
    __getitems__, from its first index). With `stop`, a batch whose iterator has closed stops before its next
    sample."""
    if not auto:
        if rng_key is not None:
            seed_sample(rng_key, indices)
        try:
            return collate(dataset[indices])
        except StopIteration:
            raise
        except Exception as exc:
            _add_note(exc, f"stoker: raised while loading dataset index {indices!r} (batch {number})")
            raise
    if getitems is not None:
        if rng_key is not None and len(indices):
            seed_sample(rng_key, indices[0])
        try:
            data = getitems(indices)
        except StopIteration:
            raise
        except Exception as exc:
            _add_note(exc, f"{_LOADING_NOTE} dataset indices {list(indices)!r} with __getitems__ (batch {number})")
            raise
    else:
        data = []
        for i in indices:
            if stop is not None and stop.set:
                raise Stopped
            if rng_key is not None:
                seed_sample(rng_key, i)
            try:
                data.append(dataset[i])
            except StopIteration:
                raise
            except Exception as exc:
                _add_note(exc, f"stoker: raised while loading dataset index {i!r} (batch {number})")
                raise
    return collate(data)


# ----------------------------------------------------------------------------------------------------------------
# get_worker_info() in worker threads
# ----------------------------------------------------------------------------------------------------------------

_thread_info = threading.local()
_thread_info_lock = threading.Lock()
_thread_info_installed = False


def _per_thread_get_worker_info():
    # This code runs as torch's get_worker_info (its code object is moved there), so the names below are looked
    # up in torch's worker module: the thread's own WorkerInfo if stoker set one, else torch's process-wide one.
    info = getattr(_stoker_thread_info, "info", None)  # noqa: F821 - a global of torch's worker module
    return _worker_info if info is None else info  # noqa: F821


def set_thread_worker_info(worker_id: int, num_workers: int, seed: int, dataset) -> None:
    """Makes torch.utils.data.get_worker_info() answer, in the calling thread, for worker `worker_id`.

    torch's get_worker_info reads one module global, which threads would share. The first call moves a
    two-line body into that function (its __code__; the function object, its name and its docstring stay
    torch's, so references taken with `from torch.utils.data import get_worker_info` see it too): the calling
    thread's WorkerInfo when one is set, else what torch's global holds (None in the main process, the worker's
    in a worker process)."""
    global _thread_info_installed
    with _thread_info_lock:
        if not _thread_info_installed:
            _torch_worker._stoker_thread_info = _thread_info
            _torch_worker.get_worker_info.__code__ = _per_thread_get_worker_info.__code__
            _thread_info_installed = True
    try:
        info = _torch_worker.WorkerInfo(id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset,
                                        worker_method="thread")
    except TypeError:  # a torch whose WorkerInfo has no worker_method
        info = _torch_worker.WorkerInfo(id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset)
    _thread_info.info = info


def _moved(dataset, state) -> bool:
    """Whether a stateful dataset's state is no longer ``state``. Where that cannot be told (a state_dict()
    that raises), it has not: the look at a kept end leaves the state as loaded."""
    try:
        return not _same(dataset.state_dict(), state)
    except Exception:  # noqa: BLE001
        return False


def _same(a, b) -> bool:
    """Equality of two states as values, whichever way one travelled (json makes tuples lists, torch.load
    gives tensors back) and for values that are not equal to themselves under ``==`` (NaN, objects without
    ``__eq__``): a value and its deep copy are the same."""
    if a is b:
        return True
    if isinstance(a, collections.abc.Mapping) and isinstance(b, collections.abc.Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        try:
            return a.shape == b.shape and a.dtype == b.dtype and bool(
                torch.equal(a, b) or ((a == b) | (a.isnan() & b.isnan())).all())
        except Exception:  # noqa: BLE001 - sparse or other layouts: their bytes decide
            return _same_bytes(a, b)
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
        except Exception:  # noqa: BLE001 - not numeric arrays (objects, strings): their bytes decide
            return _same_bytes(a, b)
    try:
        if a == b:
            return True
    except Exception:  # noqa: BLE001 - an object whose == raises, or gives an array
        pass
    if isinstance(a, float) and isinstance(b, float):
        return a != a and b != b  # NaN and NaN
    return _same_bytes(a, b)


def _same_bytes(a, b) -> bool:
    """Whether two values pickle alike (objects compared by identity under ``==``, say)."""
    try:
        return type(a) is type(b) and pickle.dumps(a) == pickle.dumps(b)
    except Exception:  # noqa: BLE001 - unpicklable: no way to tell them apart
        return True


class IterableSource:
    """One pass over an IterableDataset, cut into batches as torch's iterable fetcher cuts them: up to
    `batch_size` items per batch (one item, uncollated, without automatic batching); an empty batch, or a
    short one with `drop_last`, ends the pass, and nothing is drawn from the iterator after it ended."""

    def __init__(self, dataset, auto: bool, batch_size, drop_last: bool) -> None:
        self.iterator = iter(dataset)
        self.auto = auto
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.ended = False

    @classmethod
    def begin(cls, dataset, auto: bool, batch_size, drop_last: bool, start=None) -> IterableSource:
        """A pass from the beginning, or from `start` = (batches served, the dataset's own state then[, True
        when the pass had ended]) on a resume: a stateful dataset loads its state before iter(); any other has
        its pass replayed to there. A pass that had ended only loads its state (for the next): no iter().

        A state taken before the pass's first batch, or after its last, may be the end of a pass: a dataset
        that keeps its end position until its next iter() (torchdata's way; its generator has not run yet
        when iter() returns) reports the pass before's end there, and loaded as it is would give an empty
        pass. One item drawn from a new iterator tells (see _resume.starts_a_pass), its draws from the global
        generators given back: an item drawn is given back too (the state loaded again). A pass that gives
        none without moving the state was such an end, which the saved run had taken; one that moves it (a
        dataset that rewinds itself, whose pass is empty) is the pass to come: the state is loaded again."""
        ended = start is not None and len(start) > 2 and start[2]
        if start is not None and start[1] is not None:
            dataset.load_state_dict(copy.deepcopy(start[1]))
            if ended or start[0] == 0:
                from stoker._resume import starts_a_pass  # (which imports this module)

                if not starts_a_pass(dataset, dataset, start[1], keep_end=False) and _moved(dataset, start[1]):
                    dataset.load_state_dict(copy.deepcopy(start[1]))
        if ended:
            source = cls.__new__(cls)
            source.iterator, source.ended = None, True
            return source
        source = cls(dataset, auto, batch_size, drop_last)
        if start is not None and start[1] is None:
            source.skip(start[0])
        return source

    def skip(self, batches: int) -> None:
        """Draws (and drops, uncollated) the items of `batches` batches, cut as they were served, a batch that
        raised included: the pass then stands where the pass that served them stood."""
        for _ in range(batches):
            try:
                self.next_data()
            except StopIteration:
                return
            except Exception:  # the served batch raised here too; its turn was taken all the same
                continue

    def next_data(self):
        """The next batch's items (a list), or the next item without automatic batching; StopIteration
        once the pass is over."""
        if self.ended:
            raise StopIteration
        if not self.auto:
            try:
                return next(self.iterator)
            except StopIteration:
                self.ended = True
                raise
        data = []
        for _ in range(self.batch_size):
            try:
                data.append(next(self.iterator))
            except StopIteration:
                self.ended = True
                break
        if not data or self.drop_last and len(data) < self.batch_size:
            self.ended = True
            raise StopIteration
        return data


# ----------------------------------------------------------------------------------------------------------------
# Batches in a slot: the structure travels, the tensors stay in shared memory
# ----------------------------------------------------------------------------------------------------------------


class _InSlot:
    """Where a tensor of a batch lies in its slot."""

    __slots__ = ("offset", "shape", "code", "bits")

    def __init__(self, offset: int, shape: tuple, code: int, bits: int) -> None:
        self.offset, self.shape, self.code, self.bits = offset, shape, code, bits

    def __reduce__(self):
        return _InSlot, (self.offset, self.shape, self.code, self.bits)


class _NoFit(Exception):
    pass


class _StackTarget:
    """Where collate stacks numpy arrays: a tensor to stack them into, from the subclass's empty()."""

    align = _ALIGN  # a tensor of the batch starts at a multiple of this many bytes (empty() gives such starts)

    def room(self) -> int:
        """Bytes empty() can still give from the slot; beyond them each tensor is a shared-memory segment."""
        return 0

    def empty_like_stack(self, arrays):
        first = arrays[0]
        dtype = _NUMPY_TO_TORCH.get(first.dtype)  # native byte order only: others are not in the map
        if dtype is None:
            return None
        return self.empty((len(arrays), *first.shape), dtype)


class _RingPages:
    """A worker's reservations in the ring's file. The file is sparse: a page exists once written, and writing
    one where its file system (/dev/shm) is full kills the writer with SIGBUS. So the part of a slot a batch
    will take is reserved first (fallocate, which fails cleanly instead), in steps of _RESERVE_STEP, and a
    batch that finds no room travels as shared-memory segments of its own, whose allocation raises torch's
    clear error where there is no room for them either."""

    def __init__(self, fd: int, slot_bytes: int, slots: int) -> None:
        self.fd = fd
        self.slot_bytes = slot_bytes
        self.reserved = [0] * slots  # bytes from each slot's start known to be backed (by this worker's calls)

    def reserve(self, slot: int, end: int) -> bool:
        """Whether bytes [0, end) of `slot` are backed by memory, reserving what is not yet known to be."""
        have = self.reserved[slot]
        if end <= have:
            return True
        want = min(self.slot_bytes, -(-end // _RESERVE_STEP) * _RESERVE_STEP)
        try:
            os.posix_fallocate(self.fd, slot * self.slot_bytes + have, want - have)
        except OSError:
            return False
        self.reserved[slot] = want
        return True


_RESERVE_STEP = 1 << 20


class _Arena(_StackTarget):
    """The slot a worker is filling: collate takes its output tensors from here, front to back. A tensor
    the rest of the slot cannot hold (or that finds no memory for its pages, see _RingPages) gets a
    shared-memory segment of its own (as with no slot at all), and travels by handle beside the slot's
    places."""

    def __init__(self, view: torch.Tensor, reserve: Callable[[int], bool]) -> None:
        self.view = view
        self.base = view.data_ptr()
        self.used = 0
        self.reserve = reserve  # reserve(end): whether the slot's bytes [0, end) may be written
        self.own_segments: list[int] = []  # storage addresses of the tensors given their own segment

    def empty(self, shape, dtype: torch.dtype):
        if dtype not in _TORCH_DTYPES:
            return None
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * dtype.itemsize
        end = self.used + nbytes
        if end > self.view.numel() or not self.reserve(end):
            out = _SharedArena.empty(shape, dtype)
            self.own_segments.append(out.untyped_storage().data_ptr())
            return out
        out = self.view[self.used:end].view(dtype).view(tuple(shape))
        self.used = (end + _ALIGN - 1) // _ALIGN * _ALIGN
        return out

    def room(self) -> int:
        return max(0, self.view.numel() - self.used)


    def offset_of(self, t: torch.Tensor) -> int | None:
        """The offset of a tensor collate wrote into this slot, or None."""
        ptr = t.data_ptr()
        if self.base <= ptr < self.base + self.used and t.is_contiguous():
            return ptr - self.base
        return None

    def in_own_segment(self, t: torch.Tensor) -> bool:
        """Whether collate wrote `t` into a segment of its own (too large for the rest of the slot)."""
        return t.untyped_storage().data_ptr() in self.own_segments


class _SharedArena(_StackTarget):
    """Where collate takes its output tensors for a batch that has no slot: each in a new shared-memory
    segment, as torch's own collate does in a worker, so the batch is pickled without another copy and the
    worker keeps no buffer of its own once the batch is sent."""

    @staticmethod
    def empty(shape, dtype: torch.dtype):
        if dtype not in _TORCH_DTYPES:
            return None
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)



def _fits_slot(t) -> bool:
    return (type(t) is torch.Tensor and t.layout is torch.strided and not t.is_nested and t.device.type == "cpu"
            and not t.requires_grad and t.dtype in _TORCH_DTYPES)


def _map_leaves(obj, leaf):
    """obj rebuilt with leaf(x) for every x below its lists, tuples, namedtuples and plain dicts (the
    containers default_collate builds); anything else is a leaf, kept whole."""
    kind = type(obj)
    if kind is list:
        return [_map_leaves(x, leaf) for x in obj]
    if kind is tuple:
        return tuple(_map_leaves(x, leaf) for x in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return kind(*(_map_leaves(x, leaf) for x in obj))
    if kind is dict:
        return {k: _map_leaves(v, leaf) for k, v in obj.items()}
    return leaf(obj)


def _into_slot(obj, slot: torch.Tensor, at: list, arena: _Arena | None = None):
    """obj with its plain CPU tensors copied into `slot` (uint8) and replaced by _InSlot places; a tensor
    that collate already wrote into the slot (`arena`) stays where it is, and so does one it wrote into a
    shared-memory segment of its own. Other leaves travel pickled (tensors inside them by torch's
    shared-memory reduction)."""

    def place(t):
        if not _fits_slot(t):
            return t
        if arena is not None:
            offset = arena.offset_of(t)
            if offset is not None:
                return _InSlot(offset, tuple(t.shape), *_TORCH_DTYPES[t.dtype])
            if arena.in_own_segment(t):
                return t
        nbytes = t.numel() * t.element_size()
        offset = at[0]
        end = offset + nbytes
        if end > slot.numel() or arena is not None and not arena.reserve(end):
            raise _NoFit
        at[0] = (end + _ALIGN - 1) // _ALIGN * _ALIGN
        if nbytes:
            slot[offset:end].view(t.dtype).view(t.shape).copy_(t)
        return _InSlot(offset, tuple(t.shape), *_TORCH_DTYPES[t.dtype])

    return _map_leaves(obj, place)


def _detach_from(obj, arena: _Arena):
    """obj with the tensors that live in the arena's slot copied out of it."""
    end = arena.base + arena.view.numel()

    def detach(t):
        inside = isinstance(t, torch.Tensor) and t.layout is torch.strided and not t.is_nested \
            and arena.base <= t.data_ptr() < end
        return t.clone() if inside else t

    return _map_leaves(obj, detach)


def _from_slot(obj, lease):
    """A received structure with its _InSlot places wrapped as tensors over the slot (zero-copy)."""

    def wrap(x):
        if type(x) is _InSlot:
            return _native.from_dlpack(lease.tensor(x.offset, list(x.shape), x.code, x.bits))
        return x

    return _map_leaves(obj, wrap)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


class _WorkerError:
    """An exception raised in a worker, with what it takes to raise it again in the main process."""

    def __init__(self, exc: BaseException, worker_id: int, where: str) -> None:
        self.type_name = type(exc).__qualname__
        self.message = str(exc)
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.worker_id = worker_id
        self.where = where
        self.pickled = self.parts = self.kind = None
        try:
            self.pickled = pickle.dumps(exc)
            pickle.loads(self.pickled)
        except Exception:
            self.pickled = None
            # An exception whose constructor takes other arguments than its args (a classic of
            # pytorch#30147) is rebuilt from its class, args and attributes instead.
            try:
                self.parts = pickle.dumps((type(exc), exc.args, dict(getattr(exc, "__dict__", {}))))
                pickle.loads(self.parts)
            except Exception:
                self.parts = None
                try:  # its class alone (attributes that do not pickle): rebuilt from the message, as torch does
                    self.kind = pickle.dumps(type(exc))
                    pickle.loads(self.kind)
                except Exception:
                    self.kind = None  # reported by name and message

    def exception(self, pid) -> BaseException:
        note = (f"stoker: raised in DataLoader worker process {self.worker_id} (pid {pid}) {self.where}.\n"
                f"Original traceback in the worker:\n{self.traceback}")
        exc = None
        if self.pickled is not None:
            exc = pickle.loads(self.pickled)
        elif self.parts is not None:
            cls, args, state = pickle.loads(self.parts)
            try:
                exc = cls.__new__(cls)
                exc.args = args
                exc.__dict__.update(state)
            except Exception:
                exc = None
        if exc is not None:
            _add_note(exc, note, "stoker: raised in DataLoader worker process")
            return exc
        if self.kind is not None:
            # torch's own recipe (ExceptionWrapper.reraise): the class called with the message and traceback.
            text = (f"Caught {self.type_name} in DataLoader worker process {self.worker_id} {self.where}.\n"
                    f"Original {self.traceback}")
            try:
                return pickle.loads(self.kind)(text)
            except Exception:
                pass
        return RuntimeError(f"Caught {self.type_name} in DataLoader worker process {self.worker_id}: "
                            f"{self.message}\n{note}")


# ----------------------------------------------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------------------------------------------


_HEADER = struct.Struct("<Q")  # a message's length, before its bytes


class _Parent:
    """How a worker tells that the main process is gone. A forked or spawned worker is the main process's
    child: its parent changes when the main process ends. A forkserver worker is the fork server's child, and
    the fork server lives as long as any process it started (each holds its liveness pipe), so its workers
    watch a pipe of their own instead, whose only write end the main process holds: it reads end-of-file
    once the main process is gone (or has shut the pool down)."""

    def __init__(self, pid: int, alive=None) -> None:
        self.pid = pid
        self.alive = alive  # the read end of the main process's liveness pipe (forkserver), or None

    def gone(self) -> bool:
        if self.alive is not None:
            return bool(select.select([self.alive], [], [], 0)[0])  # nothing is ever written: end-of-file
        return os.getppid() != self.pid


class _Disconnected(BaseException):
    """The main process is gone or stopped listening: the worker ends (not an Exception, so that no handler
    of a dataset's error takes it)."""


class _ResultWriter:
    """A worker's end of its own result pipe: each message is its length and its bytes, written by this
    thread. The pipe is the worker's alone, so no lock is shared with other workers (a worker killed while
    writing cannot stall the others) and no feeder thread hands the bytes over (one thread switch and GIL
    hand-off fewer per batch than a multiprocessing queue). Writes never block for long: while the pipe is
    full the worker checks every _PARENT_CHECK_S that its parent lives, and ends if it does not."""

    def __init__(self, conn, parent: _Parent) -> None:
        self._conn = conn  # owns the descriptor
        self._fd = conn.fileno()
        self._parent = parent
        os.set_blocking(self._fd, False)

    def put(self, data) -> None:
        for part in (_HEADER.pack(len(data)), data):
            view = memoryview(part).cast("B")
            while len(view):
                try:
                    view = view[os.write(self._fd, view):]
                except BlockingIOError:
                    _, writable, _ = select.select([], [self._fd], [], _PARENT_CHECK_S)
                    if not writable and self._parent.gone():
                        raise _Disconnected from None
                except (BrokenPipeError, OSError):
                    raise _Disconnected from None


def _read_message(fd: int) -> bytearray:
    """One message of a worker's result pipe (see _ResultWriter); EOFError once the worker has closed it."""
    header = _read_exact(fd, _HEADER.size)
    return _read_exact(fd, _HEADER.unpack(header)[0])


def _read_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return buf


def _send(writer: _ResultWriter, msg, worker_id: int) -> None:
    """Pickles a result and writes it; a batch that cannot be pickled becomes an error (never a lost result
    that would leave the main process waiting)."""
    try:
        data = ForkingPickler.dumps(msg)
    except Exception as exc:
        generation, number, _, _, _, slot, position = msg
        err = _WorkerError(exc, worker_id, f"while sending batch {number} to the main process")
        try:
            data = ForkingPickler.dumps((generation, number, worker_id, "error", err, slot, position))
        except Exception:  # the dataset's state itself does not pickle
            data = ForkingPickler.dumps((generation, number, worker_id, "error", err, slot, None))
    writer.put(data)


def is_stateful(dataset) -> bool:
    """Whether a dataset keeps its own position (torchdata's Stateful protocol: state_dict/load_state_dict)."""
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


class _Channel:
    """What a worker gets of its result pipe when it starts: the write end (set only for the start); in a
    forked worker, the descriptors of the main process's read ends it inherited; for a forkserver worker, the
    read end of the main process's liveness pipe (see _Parent)."""

    def __init__(self) -> None:
        self.conn = None
        self.inherited: list[int] = []
        self.alive = None


def _worker_loop(dataset, auto, collate, index_queue, channel, ring_path, slot_bytes, slots, worker_id,
                 num_workers, base_seed, init_fn, parent_pid, iterable):
    # iterable: (batch_size, drop_last) for an IterableDataset, which this worker iterates itself (a new pass
    # at each epoch, i.e. each new task generation); None for a map-style dataset, loaded by the indices sent.
    # parent_pid: the main process's pid.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if channel.inherited:
        # Each is replaced by /dev/null rather than closed: the number stays taken, so the copy of the main
        # process's objects here can never close a descriptor this worker opens later under the same number.
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in channel.inherited:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
        os.close(null)
    parent = _Parent(parent_pid, channel.alive)
    results = _ResultWriter(channel.conn, parent)
    try:
        _serve(dataset, auto, collate, index_queue, results, ring_path, slot_bytes, slots, worker_id,
               num_workers, base_seed, init_fn, parent, iterable)
    except _Disconnected:
        if parent.gone():  # orphaned, maybe before the main process could remove the ring's file
            _remove(ring_path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _serve(dataset, auto, collate, index_queue, results, ring_path, slot_bytes, slots, worker_id,
           num_workers, base_seed, init_fn, parent, iterable):
    torch.set_num_threads(1)
    # A pool of our own: a fork may have copied the parent's pool while another thread held its lock.
    fresh = _native.new_pool()
    import stoker._collate as _collate_module

    _collate_module.POOL = fresh
    seed = base_seed + worker_id
    random.seed(seed)
    _seed_torch(seed)
    np.random.seed(_torch_worker._generate_state(base_seed, worker_id))
    _torch_worker._worker_info = _torch_worker.WorkerInfo(
        id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset)
    init_error = None
    try:
        if init_fn is not None:
            init_fn(worker_id)
    except Exception as exc:
        init_error = _WorkerError(exc, worker_id, "in worker_init_fn")
    ring = pages = None
    try:
        with open(ring_path, "r+b") as f:
            ring = mmap.mmap(f.fileno(), slot_bytes * slots)
            pages = _RingPages(os.dup(f.fileno()), slot_bytes, slots)
    except OSError:
        ring = None  # every batch then travels pickled
    getitems = getattr(dataset, "__getitems__", None) or None
    source: IterableSource | None = None
    source_generation = None
    stateful = is_stateful(dataset)
    results.put(ForkingPickler.dumps(("ready", worker_id)))
    while True:
        try:
            task = index_queue.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if parent.gone():
                # Orphaned: the main process is gone, maybe before it could remove the ring's file.
                _remove(ring_path)
                return
            continue
        except (EOFError, OSError):
            # The task pipe is closed: the main process shut the pool down, or is gone, maybe before it could
            # remove the ring's file (its name is this pool's alone: removing it twice is harmless).
            _remove(ring_path)
            return
        except KeyboardInterrupt:
            return
        if task is None:
            return
        generation, number, indices, slot, rng_key, start = task
        position = None  # an IterableDataset's own state after this batch (stateful datasets)

        def reply(kind, payload):
            _send(results, (generation, number, worker_id, kind, payload, slot, position), worker_id)

        if init_error is not None:
            # Every batch of a map-style dataset fails alike; an IterableDataset's copy reports it once per
            # epoch and then counts as exhausted (its pass never started).
            if iterable is not None and generation == source_generation:
                reply("stop", None)
            else:
                source_generation = generation
                reply("error", init_error)
            continue
        if iterable is None and stateful and generation != source_generation:
            # A stateful map-style copy: loaded with its saved state (on a resume), and where it starts reported.
            source_generation = generation
            try:
                if start is not None and start[1] is not None:
                    dataset.load_state_dict(start[1])
                _send(results, (generation, -1, worker_id, "started", None, -1, dataset.state_dict()), worker_id)
            except Exception as exc:
                reply("error", _WorkerError(exc, worker_id, "while loading its copy of the dataset's state"))
                continue
        if iterable is not None:
            if generation != source_generation:
                source_generation = generation
                try:
                    source = IterableSource.begin(dataset, auto, *iterable, start)
                    if stateful:
                        # Where this pass starts, for a state taken before the user has any batch of it.
                        _send(results, (generation, -1, worker_id, "started", None, -1, dataset.state_dict()),
                              worker_id)
                except Exception as exc:
                    source = None
                    reply("error", _WorkerError(exc, worker_id, "while starting its pass over the dataset"))
                    continue
            if source is None or source.ended:  # this copy is exhausted: every further task of the epoch ends
                reply("stop", None)
                continue
        view = arena = None
        if slot >= 0 and ring is not None:
            view = torch.frombuffer(ring, dtype=torch.uint8, count=slot_bytes, offset=slot * slot_bytes)
            arena = _Arena(view, functools.partial(pages.reserve, slot))
        # (no slot: every one is held, or no ring; the batch travels pickled, collated into shared memory)
        into = functools.partial(_collate_into, collate, arena if arena is not None else _SharedArena())
        try:
            if source is not None:
                batch = into(source.next_data())
                if stateful:
                    position = dataset.state_dict()
            else:
                batch = load_batch(dataset, getitems, auto, into, number, indices, rng_key)
                if stateful:
                    position = dataset.state_dict()
        except StopIteration:
            if source is not None and stateful:  # the state its pass ended in (a dataset may rewind itself then)
                try:
                    position = dataset.state_dict()
                except Exception:  # noqa: BLE001 - the position after its last batch stands
                    position = None
            reply("stop", None)
            continue
        except Exception as exc:
            if source is not None:
                where = f"while loading batch {number} from its copy of the IterableDataset"
                if stateful:  # the batch's turn is taken: the position after it is still reported
                    try:
                        position = dataset.state_dict()
                    except Exception:
                        position = None
            else:
                where = f"while loading dataset indices {list(indices) if auto else indices!r} (batch {number})"
                if stateful:
                    try:
                        position = dataset.state_dict()
                    except Exception:
                        position = None
            if source is not None and source.ended:
                position = LastOfPass(position)
            reply("error", _WorkerError(exc, worker_id, where))
            continue
        finally:
            del into
        if source is not None and source.ended:
            position = LastOfPass(position)
        if view is not None:
            used = [arena.used]
            try:
                structure = _into_slot(batch, view, used, arena)
            except Exception:  # noqa: BLE001 - _NoFit, or a tensor the ring cannot describe: sent pickled
                # Too large for its slot (or of a kind the slot cannot hold): what collate already wrote there
                # must not travel as a view of it.
                batch = _detach_from(batch, arena)
            else:
                del view, arena, batch
                reply("ring", (structure, used[0]))  # with the bytes of the slot it fills
                del structure  # its own segments, if any, are the main process's now
                continue
            del view, arena
        reply("pickled", batch)
        del batch  # its shared-memory segments are the main process's now: not kept here until the next batch


def _collate_into(collate, arena, data):
    """`collate(data)` with `arena` as this thread's for the call: the batch's tensors are stacked into the slot
    it goes to. Only for that call: what the dataset builds while its samples load (with its own collation, in
    its own threads or this one) may outlive the batch, and is made in the pool as anywhere else."""
    set_arena(arena)
    try:
        return collate(data)
    finally:
        set_arena(None)


# ----------------------------------------------------------------------------------------------------------------
# The main process's side
# ----------------------------------------------------------------------------------------------------------------


_ring_pin_warned = False  # a worker ring that could not be page-locked is said once per process


def warn_ring_not_pinned(reason: str) -> None:
    """Says, once per process, that batches from worker processes are not pinned, and why."""
    global _ring_pin_warned
    if not _ring_pin_warned:
        _ring_pin_warned = True
        warnings.warn(f"stoker could not page-lock its worker ring ({reason}); batches from worker processes are "
                      "loaded as usual and pinned (or copied to the GPU) from ordinary memory (said once per process)",
                      RuntimeWarning, stacklevel=3)


def _ring_dir() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


class _frozen_for_fork:
    """Around forking workers: the parent's objects move to the collector's permanent generation (gc.freeze),
    so that a forked worker's collections never visit them. A full collection writes to the header of every
    container it visits, which copies each page of the parent's Python heap into the worker (on the bench's
    crop + flip workload, some 30 MiB per worker, twice what the worker itself allocates). In the worker they
    stay frozen: a reference cycle made in the parent is not collected there (Python's documented recipe for
    fork, gc.freeze). The parent's objects go back to its oldest generation on exit (gc.unfreeze), so the
    parent's own collections are only held off for the time the forks take. A user's own freeze (objects
    already frozen) is left alone, and so is any start method but fork (a spawned worker shares nothing)."""

    def __init__(self, start_method: str) -> None:
        self.active = start_method == "fork" and gc.get_freeze_count() == 0

    def __enter__(self) -> None:
        if self.active:
            gc.freeze()

    def __exit__(self, *exc) -> None:
        if self.active:
            gc.unfreeze()


_pools: weakref.WeakSet = weakref.WeakSet()
_counter = itertools.count()


def _context_of(loader):
    """The multiprocessing context of the loader's worker processes (its multiprocessing_context, a start
    method's name or a context, or the default)."""
    ctx = loader.multiprocessing_context
    return multiprocessing.get_context(ctx) if ctx is None or isinstance(ctx, str) else ctx


def start_method_of(loader) -> str:
    return _context_of(loader).get_start_method()


class WorkerPool:
    """`num_workers` processes serving batches of one dataset, and the ring they write into."""

    def __getstate__(self):
        # As torch's loader, whose persistent workers' iterator refuses so: processes do not travel.
        raise NotImplementedError(f"{type(self).__name__} cannot be pickled: it holds the worker processes of a "
                                  "loader with persistent_workers=True")

    def __init__(self, loader, collate, base_seed: int, iterable: bool = False, zygote: Zygote | None = None) -> None:
        self.num_workers = int(loader.num_workers)
        ctx = _context_of(loader)
        self.start_method = ctx.get_start_method()
        # An IterableDataset is iterated by each worker, cut into (batch_size, drop_last) batches there.
        self.iterable = (loader.batch_size, bool(loader.drop_last)) if iterable else None
        self.slots = (loader.prefetch_factor or 2) * self.num_workers + 2
        if getattr(loader, "_stoker_device", None) is not None:
            # The device stage holds device_prefetch + 1 batches whose copies may be in flight.
            self.slots += int(getattr(loader, "device_prefetch", 2)) + 1
        elif loader.pin_memory:
            self.slots += 3  # pinned batches the user released stay lent until the GPU has passed (a fence)
        self.slot_bytes = _DEFAULT_SLOT_BYTES
        self.pid = os.getpid()
        # The name is this pool's alone: a process killed before it could remove its ring leaves the file behind,
        # and a later process may get its pid.
        self.ring_path = os.path.join(_ring_dir(), f"stoker-ring-{self.pid}-{next(_counter)}-{os.urandom(6).hex()}")
        fd = os.open(self.ring_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.slots * self.slot_bytes)  # sparse: pages exist once a batch touches them
        finally:
            os.close(fd)
        self.ring = _native.core.SlotRing(self.ring_path, self.slot_bytes, self.slots)
        # Per started worker, the descriptor of its result pipe's read end (None once closed). Plain descriptors,
        # closed only by shutdown: a Connection object's own finaliser could close one a second time when the
        # pool is collected in a cycle with it.
        self.results: list[int | None] = []
        self._next_result = 0  # where the next look for a message starts (turns between the workers)
        self.index_queues = []
        self.workers = []
        self.generation = 0
        self.pending_states: dict = {}  # worker -> (batches, saved state) its copy loads with its next task
        self._ready = 0
        self._closed = False
        self._launched = 0  # workers started so far (they start in order)
        self._rest_due = 0.0  # when the workers not started yet start at the latest (see begin)
        self._replied = False  # the first worker is set up (or has replied): the others may be forked
        _pools.add(self)
        self._channels = [_Channel() for _ in range(self.num_workers)]
        # forkserver workers watch this pipe for the main process's end (see _Parent): (read, write) ends.
        self._alive = os.pipe() if self.start_method == "forkserver" and zygote is None else None
        self._zygote = zygote
        self._base_seed = base_seed
        if zygote is not None:  # its workers get their task pipes when they start
            self.index_queues = [None] * self.num_workers
            self.workers = [_ZygoteWorker(zygote) for _ in range(self.num_workers)]
            return
        try:
            for wid in range(self.num_workers):
                iq = ctx.Queue()
                iq.cancel_join_thread()
                self.index_queues.append(iq)
                self.workers.append(ctx.Process(
                    target=_worker_loop,
                    args=(loader.dataset, loader._auto_collation, collate, iq, self._channels[wid], self.ring_path,
                          self.slot_bytes, self.slots, wid, self.num_workers, base_seed, loader.worker_init_fn,
                          self.pid, self.iterable),
                    daemon=True,
                ))
        except BaseException:
            self.shutdown()
            raise

    def begin(self) -> None:
        """Starts the workers of a new pool (a no-op once started).

        Spawned workers (spawn, forkserver) all start at once: starting one costs the main process little.
        Forked workers start one by one. The first starts at once, and sets itself up while the main process
        makes and queues the first tasks. The others are forked (by get) once the first worker says it is set
        up ("ready": seeded, worker_init_fn run, ring mapped), or _REST_AFTER_S after its fork if it has not
        by then (a long worker_init_fn). A fork costs the main process milliseconds per worker on a large
        parent, and forks beside the first worker's set-up slowed it on the 2-core VM this was measured on.
        Forking the others only after the first batch was handed over made that batch a further ~10 ms
        sooner, but the second batch of a fresh pool then waited for a fork, a set-up and a batch (35-40 ms
        of stall in a training loop, more in all over the first batches than torch's loader): not chosen."""
        if self._launched:
            return
        if self.start_method != "fork":
            self.start()
            return
        self.start(1)
        self._rest_due = time.monotonic() + _REST_AFTER_S

    def start(self, upto: int | None = None) -> None:
        """Starts the workers not started yet, in order, up to the first `upto` (all by default)."""
        end = self.num_workers if upto is None else min(int(upto), self.num_workers)
        if self._launched >= end or self._closed:
            return
        try:
            with _frozen_for_fork(self.start_method):
                while self._launched < end:
                    self._start_worker(self._launched)
                    self._launched += 1
        except BaseException:
            self.shutdown()
            raise

    def _start_worker(self, wid: int) -> None:
        """Starts worker `wid` with a result pipe of its own, made just before it starts so that no worker
        started earlier holds its write end: the main process then reads end-of-file when it dies."""
        if self._zygote is not None:
            self._fork_from_zygote(wid)
            return
        reader, write_end = os.pipe()
        writer = _mp_connection.Connection(write_end, readable=False)  # a Connection travels to a spawned worker
        channel = self._channels[wid]
        channel.conn = writer
        # A forked worker inherits the read ends of the result pipes (its own included) and lets them go, so
        # that closing them here ends a worker waiting to write (see shutdown).
        if self.start_method == "fork":
            channel.inherited = [r for r in (*self.results, reader) if r is not None]
        if self._alive is not None:
            channel.alive = _mp_connection.Connection(os.dup(self._alive[0]), writable=False)
        try:
            self.workers[wid].start()
        except BaseException:
            os.close(reader)
            raise
        finally:
            writer.close()  # the worker's own now
            channel.conn = None
            if channel.alive is not None:
                channel.alive.close()
                channel.alive = None
        self.results.append(reader)

    def _fork_from_zygote(self, wid: int) -> None:
        """Has the zygote fork worker `wid`, with a task pipe and a result pipe of its own."""
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            self.workers[wid].pid = self._zygote.fork(
                (self.ring_path, self.slot_bytes, self.slots, wid, self.num_workers, self._base_seed), task_r, result_w)
        except BaseException:
            os.close(task_w)
            os.close(result_r)
            raise
        finally:
            os.close(task_r)  # the worker's own now
            os.close(result_w)
        self.index_queues[wid] = _TaskWriter(task_w)
        self.results.append(result_r)

    def _pending(self) -> bool:
        """Whether a worker's message is waiting to be read."""
        live = [r for r in self.results if r is not None]
        return bool(live) and bool(_mp_connection.wait(live, 0))

    def _read(self, timeout: float):
        """The next message of any worker (taking turns among those with one waiting), or None after
        `timeout` seconds; RuntimeError if a worker closed its pipe (it died, or exited)."""
        live = [r for r in self.results if r is not None]
        if not live:
            time.sleep(timeout)
            return None
        ready = _mp_connection.wait(live, timeout)
        if not ready:
            return None
        n = len(self.results)
        for k in range(n):
            wid = (self._next_result + k) % n
            reader = self.results[wid]
            if reader is not None and reader in ready:
                self._next_result = wid + 1
                try:
                    return _read_message(reader)
                except (EOFError, OSError):
                    self.results[wid] = None
                    os.close(reader)
                    proc = self.workers[wid]
                    proc.join(timeout=_EXIT_GRACE_S)  # its exit status, for the error's message
                    self._check_workers()
                    self.shutdown()
                    raise RuntimeError(f"DataLoader worker (pid(s) {proc.pid}) exited unexpectedly") from None
        return None

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def send(self, worker: int, task) -> None:
        self.index_queues[worker].put(task)

    def _check_workers(self) -> None:
        for w in self.workers:
            code = w.exitcode
            if code is not None:
                self.shutdown()
                if code < 0:
                    try:
                        name = signal.Signals(-code).name
                        desc = signal.strsignal(-code) or name
                    except ValueError:
                        desc = f"signal {-code}"
                    raise RuntimeError(f"DataLoader worker (pid {w.pid}) is killed by signal: {desc}")
                raise RuntimeError(f"DataLoader worker (pid(s) {w.pid}) exited unexpectedly (exit code {code})")

    def get(self, timeout: float | None, interrupted: Callable[[], bool] | None = None):
        """The next message of a worker; RuntimeError if a worker died or `timeout` seconds passed; Interrupted
        as soon as `interrupted()` says so (looked at every _POLL_S while waiting). Workers due to start (see
        begin) are forked here, one at a time while no message is waiting."""
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            if interrupted is not None and interrupted():
                raise Interrupted
            if self._launched < self.num_workers and not self._closed:
                if (self._replied or time.monotonic() >= self._rest_due) and not self._pending():
                    self.start(self._launched + 1)
                    continue
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            if self._launched < self.num_workers and not self._replied:
                wait = min(wait, max(0.0, self._rest_due - time.monotonic()))
            data = self._read(wait)
            if data is None:
                self._check_workers()
                if deadline is not None and time.monotonic() >= deadline:
                    raise RuntimeError(f"DataLoader timed out after {timeout} seconds") from None
                continue
            msg = pickle.loads(data)
            if msg[0] == "ready":
                self._replied = True  # the first worker is set up: the others may be forked now
                self._ready += 1
                if self._ready == self.num_workers:
                    self._unlink()
                continue
            self._replied = True
            return msg

    def _unlink(self) -> None:
        _remove(self.ring_path)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pid != os.getpid():
            return
        for iq in self.index_queues:
            try:
                if iq is not None:
                    iq.put(None)
            except Exception:
                pass
        # A worker waiting for room in its result pipe ends as soon as its read end is closed.
        results, self.results = self.results, [None] * len(self.results)
        alive, self._alive = self._alive or (), None  # forkserver workers end as soon as it closes
        for fd in (*results, *alive):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        # Idle workers exit at once; one still busy with a sample (say after a timeout) is not waited for.
        started = [w for w in self.workers if w.pid is not None]
        deadline = time.monotonic() + _EXIT_GRACE_S
        for w in started:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in started:
            if w.exitcode is None:
                w.terminate()
                w.join(timeout=1.0)
        for q in self.index_queues:
            try:
                if q is not None:
                    q.cancel_join_thread()
                    q.close()
            except Exception:
                pass
        # A batch the user keeps holds the ring: what its other slots hold is given back now, the rest as the
        # batches kept return.
        with contextlib.suppress(Exception):
            self.ring.retire()
        self._unlink()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def shutdown_all() -> None:
    for pool in list(_pools):
        pool.shutdown()
    close_zygotes()



# ----------------------------------------------------------------------------------------------------------------
# Zygotes: the dataset sent once to workers that are spawned anew each epoch
# ----------------------------------------------------------------------------------------------------------------
#
# With spawn or forkserver and persistent_workers=False, torch starts fresh interpreters at every epoch and sends
# each of them the dataset (pickled per worker, unpickled in each). A zygote is one process, started the same
# way, that receives the dataset once and forks each epoch's workers from its copy: every worker still starts
# as a fresh process with a pristine copy of the dataset as it was pickled (worker_init_fn and seeding run in
# it as in torch's), but no interpreter starts, nothing is unpickled again, and the workers share the zygote's
# pages. The dataset is pickled again at each epoch only to be compared: a loader whose dataset (or
# collate_fn, worker_init_fn) pickles differently gets a new zygote, so a change made between epochs reaches
# the workers as it does in torch.


class _TaskWriter:
    """The main process's end of a zygote worker's task pipe, with the part of a queue the pool uses. Tasks are
    pickled by the caller and written by a thread of this writer's own, so the main thread never waits for a
    busy worker to read (and a worker waiting to write its answer never waits on the main thread in turn)."""

    _STOP = object()

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._feed, name="stoker-tasks", daemon=True).start()

    def put(self, task) -> None:
        self._queue.put(bytes(ForkingPickler.dumps(task)))

    def cancel_join_thread(self) -> None:
        pass

    def close(self) -> None:
        self._queue.put(self._STOP)

    def _feed(self) -> None:
        try:
            while True:
                data = self._queue.get()
                if data is self._STOP:
                    return
                for part in (_HEADER.pack(len(data)), data):
                    view = memoryview(part)
                    while len(view):
                        view = view[os.write(self._fd, view):]
        except OSError:
            pass  # the worker is gone
        finally:
            os.close(self._fd)


class _TaskReader:
    """A zygote worker's end of its task pipe, read as a worker reads its queue: get(timeout) raises
    queue.Empty when no task came in time, EOFError once the main process has closed the pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def get(self, timeout: float):
        if not select.select([self._fd], [], [], timeout)[0]:
            raise queue.Empty
        return pickle.loads(_read_message(self._fd))


def _zygote_main(source, control, alive) -> None:
    """The zygote's loop: reads what its workers get (the dataset, ...) from `source`, then forks a worker for
    each request of the main process, reaps them and reports their exits; ends when the main process asks,
    closes the control pipe, or is gone (its liveness pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    fd = os.dup(source.fileno())
    source.close()
    with os.fdopen(fd, "rb", buffering=1 << 20) as f:
        dataset, auto, collate, init_fn, iterable = pickle.load(f)
    me = os.getpid()
    children: set[int] = set()
    # A dataset whose unpickling started CUDA cannot be forked from (CUDA does not survive a fork), nor one
    # whose unpickling started Python threads (a module's background thread, say, imported with it): a fork
    # made while such a thread holds a lock leaves that lock held in the worker for good. The main process then
    # spawns workers per epoch instead, each importing those modules afresh, as torch's do.
    cuda = getattr(torch, "cuda", None)
    threads = any(t is not threading.main_thread() and t.is_alive() for t in threading.enumerate())
    try:
        control.send(("ready", bool(cuda is not None and cuda.is_initialized()) or threads))
    except OSError:
        return
    while True:
        ready = select.select([control, alive], [], [], _POLL_S)[0]
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            with contextlib.suppress(OSError):
                control.send(("exited", pid, os.waitstatus_to_exitcode(status)))
        if alive in ready:
            return
        if control not in ready:
            continue
        try:
            msg = control.recv()
            if msg[0] == "kill":
                if msg[1] in children:
                    os.kill(msg[1], signal.SIGTERM)
                continue
            if msg[0] != "fork":
                return
            task_fd = _reduction.recv_handle(control)
            result_fd = _reduction.recv_handle(control)
        except (EOFError, OSError):
            return
        ring_path, slot_bytes, slots, wid, num_workers, base_seed = msg[1]
        with _frozen_for_fork("fork"):
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                alive.close()
                channel = _Channel()
                channel.conn = _mp_connection.Connection(result_fd, readable=False)
                _worker_loop(dataset, auto, collate, _TaskReader(task_fd), channel, ring_path, slot_bytes, slots, wid,
                             num_workers, base_seed, init_fn, me, iterable)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(task_fd)
        os.close(result_fd)
        children.add(pid)
        try:
            control.send(("forked", pid))
        except OSError:
            return


def _zygote_key(loader, collate, iterable) -> bytes | None:
    """A digest of what the zygote's workers get once (dataset, collate_fn, worker_init_fn and the batching
    of an IterableDataset), or None when it does not pickle (the pool then spawns its workers as torch does).
    The pickle streams into the hash: no copy of a large dataset is made to compare it."""
    import hashlib
    import types

    digest = hashlib.sha256()  # the fastest of hashlib's on the machines measured (SHA extensions)
    try:
        pickle.Pickler(types.SimpleNamespace(write=digest.update), protocol=pickle.HIGHEST_PROTOCOL).dump(
            (loader.dataset, loader._auto_collation, collate, loader.worker_init_fn, iterable))
    except Exception:
        return None
    return digest.digest()


_zygotes: weakref.WeakSet = weakref.WeakSet()


class Zygote:
    """The main process's side of a zygote (see above): start, fork a worker, learn how workers ended, close."""

    def __init__(self, ctx, key: bytes, loader, collate, iterable) -> None:
        self.key = key
        self.pid = os.getpid()  # the process that owns it
        self.exits: dict[int, int] = {}  # worker pid -> exit code, as the zygote reported them
        self._closed = False
        self._control, child = ctx.Pipe(duplex=True)
        alive_r, self._alive = os.pipe()  # the zygote ends when the write end, kept here, closes
        alive = _mp_connection.Connection(alive_r, writable=False)
        # What the workers get goes through a pipe of its own, pickled straight into it: a process start would
        # pickle it into one buffer first (a second copy of the dataset in this process, for a moment).
        source_r, source_w = os.pipe()
        source = _mp_connection.Connection(source_r, writable=False)
        self.process = ctx.Process(target=_zygote_main, args=(source, child, alive), daemon=True)
        try:
            self.process.start()
        except BaseException:
            os.close(source_w)
            self.close()
            raise
        finally:
            child.close()
            alive.close()
            source.close()
        _zygotes.add(self)
        try:
            with os.fdopen(source_w, "wb", buffering=1 << 20) as f:
                ForkingPickler(f, pickle.HIGHEST_PROTOCOL).dump(
                    (loader.dataset, loader._auto_collation, collate, loader.worker_init_fn, iterable))
        except Exception:
            pass  # the zygote is gone, or this does not pickle this way: ready() says so

    def __reduce__(self):
        return _no_zygote, ()  # a copied or pickled loader starts a zygote of its own when it needs one

    def ready(self) -> bool:
        """Waits for the zygote's first word: False if it cannot fork workers (it then ends)."""
        while True:
            msg = self._receive(_POLL_S)
            if msg is not None:
                if msg[0] == "ready" and not msg[1]:
                    return True
                break
            if self.process.exitcode is not None:
                break
        self.close()
        return False

    @classmethod
    def for_loader(cls, loader, collate, iterable) -> Zygote | None:
        """The loader's zygote for this epoch: the one it has if what it holds pickles the same, else a new one;
        None when the dataset does not pickle for the comparison."""
        ctx = _context_of(loader)
        iterable = (loader.batch_size, bool(loader.drop_last)) if iterable else None  # as WorkerPool has it
        key = _zygote_key(loader, collate, iterable)
        old = getattr(loader, "_stoker_zygote", None)
        if old is not None and (old.key != key or not old.alive()):
            old.close()
            old = None
        if key is None or getattr(loader, "_stoker_zygote_refused", None) == key:
            return None
        if old is None:
            old = cls(ctx, key, loader, collate, iterable)
            if not old.ready():  # CUDA or threads started in it, or it could not start: spawned per epoch, as torch
                loader._stoker_zygote_refused = key
                loader._stoker_zygote = None
                return None
            loader._stoker_zygote = old
            weakref.finalize(loader, old.close)
        return old

    def alive(self) -> bool:
        return not self._closed and self.pid == os.getpid() and self.process.exitcode is None

    def _receive(self, timeout: float):
        """The next message that is not an exit report (exit reports are recorded), or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self._control.poll(max(0.0, deadline - time.monotonic())):
                    return None
                msg = self._control.recv()
            except (EOFError, OSError):
                return None
            if msg[0] != "exited":
                return msg
            self.exits[msg[1]] = msg[2]

    def fork(self, args: tuple, task_fd: int, result_fd: int) -> int:
        """Has the zygote fork a worker over these pipe ends (duplicated into it); its pid."""
        try:
            self._control.send(("fork", args))
            _reduction.send_handle(self._control, task_fd, self.process.pid)
            _reduction.send_handle(self._control, result_fd, self.process.pid)
        except OSError as exc:
            raise RuntimeError(f"the DataLoader's zygote process (pid {self.process.pid}) is gone: {exc}") from None
        while True:
            msg = self._receive(_POLL_S)
            if msg is not None:
                return msg[1]
            if self.process.exitcode is not None:
                raise RuntimeError(f"the DataLoader's zygote process (pid {self.process.pid}) exited "
                                   f"unexpectedly (exit code {self.process.exitcode})")

    def exitcode(self, pid: int, wait: float = 0.0):
        """How worker `pid` ended (as Process.exitcode), or None while it runs; waits up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while pid not in self.exits:
            if self.process.exitcode is not None:
                return self.exits.get(pid, -signal.SIGKILL)  # the zygote died: its workers cannot outlive it
            left = deadline - time.monotonic()
            if self._receive(max(0.0, left)) is None and left <= 0:
                return None
        return self.exits[pid]

    def kill(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self._control.send(("kill", pid))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pid != os.getpid():
            return
        with contextlib.suppress(OSError):
            self._control.send(("stop",))
        with contextlib.suppress(OSError):
            os.close(self._alive)
        proc = getattr(self, "process", None)
        if proc is not None and proc.pid is not None:
            proc.join(timeout=_EXIT_GRACE_S)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(timeout=1.0)
        self._control.close()


def _no_zygote() -> None:
    return None


class _ZygoteWorker:
    """A worker forked by a zygote, with the part of multiprocessing.Process the pool uses."""

    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self.pid: int | None = None

    @property
    def exitcode(self):
        return None if self.pid is None else self.zygote.exitcode(self.pid)

    def is_alive(self) -> bool:
        return self.pid is not None and self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        if self.pid is not None:
            self.zygote.exitcode(self.pid, wait=3600.0 if timeout is None else timeout)

    def terminate(self) -> None:
        if self.pid is not None:
            self.zygote.kill(self.pid)


def close_zygotes() -> None:
    for zygote in list(_zygotes):
        zygote.close()


class LastOfPass:
    """The position a worker reports with the last batch of its pass over an IterableDataset (the batch that
    met the end of its iterator): the pass is then known to be over, whatever the dataset's own state says
    (a dataset may rewind itself as its pass ends)."""

    __slots__ = ("state",)

    def __init__(self, state) -> None:
        self.state = state

    def __reduce__(self):
        return LastOfPass, (self.state,)


class IterablePosition:
    """Where an epoch over an IterableDataset stands as the user consumed it: per worker (the main process
    counts as the one worker when num_workers=0) the batches it served, whether its pass is known to be over,
    and its dataset copy's state after its last served batch (stateful datasets); and the worker whose batch
    comes next in the round-robin. Worker processes over a stateful map-style dataset are followed alike
    (their passes never end)."""

    def __init__(self, workers: int, saved: dict | None = None) -> None:
        if saved is None:
            self.batches = [0] * workers
            self.ended = [False] * workers
            self.states: list = [None] * workers
            self.next_worker = 0
        else:
            self.batches = [int(w["batches"]) for w in saved["workers"]]
            self.ended = [bool(w["ended"]) for w in saved["workers"]]
            self.states = [w["state"] for w in saved["workers"]]
            self.next_worker = int(saved["next_worker"])
        self.resumed = saved is not None

    def served(self, worker: int, state) -> None:
        self.batches[worker] += 1
        if type(state) is LastOfPass:
            state = state.state
            self.ended[worker] = True  # a resume gives this worker no batch more
        self.states[worker] = state
        self.next_worker = (worker + 1) % len(self.batches)

    def started(self, worker: int, state) -> None:
        if self.batches[worker] == 0 and self.states[worker] is None:
            self.states[worker] = state

    def start_of(self, worker: int):
        """What a worker's pass starts from: None (the beginning), else (batches to skip, state to load), and
        True third for a pass that had ended (it serves nothing more: see IterableSource.begin)."""
        if not self.resumed:
            return None
        if self.ended[worker]:
            return (self.batches[worker], self.states[worker], True)
        if not (self.batches[worker] or self.states[worker] is not None):
            return None
        return (self.batches[worker], self.states[worker])

    def to_dict(self) -> dict:
        return {"workers": [{"batches": b, "ended": e, "state": st}
                            for b, e, st in zip(self.batches, self.ended, self.states)],
                "next_worker": self.next_worker}


class ProcessBatches:
    """The main process's loop over one epoch: dispatch, receive, reorder, wrap.

    Tasks go round-robin to the active workers, as torch sends them. For a map-style dataset every worker
    stays active and each task names the indices of its batch. For an IterableDataset a task asks a worker
    for the next batch of its own pass; a worker whose pass is over answers "stop" (to that task and any
    other it was sent), leaves the cycle, and its stops are skipped, so the epoch interleaves the workers'
    batches round-robin until the last worker ends, as torch's loader does. `position` (an IterableDataset, or
    a map-style dataset with its own state) follows what the user has consumed from each worker, and a saved
    one makes each worker start where it stood: a map-style copy loads its saved state with its first task
    (with persistent workers, of a later epoch when this one has none left for it)."""

    def __init__(self, pool: WorkerPool, batches, first_number: int, in_order: bool, prefetch: int,
                 timeout: float, rng_key=None, position: IterablePosition | None = None,
                 skip: frozenset = frozenset(), persistent: bool = False) -> None:
        pool.generation += 1
        self.pool = pool
        self.generation = pool.generation
        self._ring_pinned = pool.ring.pinned  # until a slot cannot be page-locked (said once)
        self.batches = batches  # iterator of index batches (or sampler errors as exceptions); unused if iterable
        self.iterable = pool.iterable is not None
        self.tracked = self.iterable or position is not None  # each worker's position is followed
        self.position = position if position is not None else IterablePosition(pool.num_workers)
        self.numbers = itertools.count(first_number)
        self.skip = skip  # map-style: batch numbers the resumed epoch had served (out of order) before its save
        self.taken: int | None = None  # the number of the batch (or error) next() last gave
        self.in_order = in_order
        self.limit = prefetch * pool.num_workers
        self.timeout = timeout
        self.rng_key = rng_key
        self.outstanding: set[int] = set()  # batch numbers sent and not yet answered
        self.ready: dict[int, tuple] = {}  # number -> (kind, value, worker, dataset state)
        self.order: collections.deque = collections.deque()  # batch numbers in dispatch order
        self.local_errors: dict[int, BaseException] = {}
        self.active = [not ended for ended in self.position.ended]
        self.first_task = [True] * pool.num_workers
        self.heard = [False] * pool.num_workers  # a message of this epoch came from the worker
        # Held while the workers' pipe is read (next, position_dict, drain): one reader at a time, whichever
        # thread asks, and a reader waiting for its answer is never left waiting for one another took.
        self.reading = threading.RLock()
        if self.tracked and not self.iterable and self.position.resumed:
            # A stateful map-style copy loads its saved state with its first task, of this epoch or (persistent
            # workers, when this one leaves it none) of a later one.
            pool.pending_states = {w: self.position.start_of(w) for w in range(pool.num_workers)}
        self.cycle = itertools.cycle(range(pool.num_workers))
        for _ in range(self.position.next_worker):
            next(self.cycle)
        self.exhausted = False
        self.interrupted = False  # another thread asked for this epoch to close while next() waits (see close)
        if self.iterable and self.position.resumed and persistent:
            self._hand_over_ended_states()
        self._top_up()

    def _hand_over_ended_states(self) -> None:
        """A resumed worker whose pass had ended serves nothing this epoch; its copy, which persists, still
        takes its saved state to go on from next epoch: one task that only loads it, answered "stop"."""
        for worker in range(self.pool.num_workers):
            if self.position.ended[worker] and self.position.states[worker] is not None:
                self.first_task[worker] = False
                self._send(worker, next(self.numbers), None, -1, self.position.start_of(worker))

    def _send(self, worker: int, number: int, indices, slot: int, start) -> None:
        """Sends task `number` to `worker` (its reply awaited in dispatch order)."""
        self.outstanding.add(number)
        self.order.append(number)
        self.pool.send(worker, (self.generation, number, indices, slot, self.rng_key, start))

    def _next_worker(self) -> int | None:
        for _ in range(self.pool.num_workers):
            worker = next(self.cycle)
            if self.active[worker]:
                return worker
        return None

    def _top_up(self) -> None:
        pool = self.pool
        while not self.exhausted and len(self.outstanding) + len(self.ready) < self.limit:
            indices = None
            number = next(self.numbers)
            if not self.iterable:
                try:
                    indices = next(self.batches)
                except StopIteration:
                    self.exhausted = True
                    return
                except Exception as exc:  # the sampler's error, raised at this batch's turn
                    if number not in self.skip:  # (else raised before the save this epoch resumes)
                        self.local_errors[number] = exc
                        self.order.append(number)
                    continue
                if number in self.skip:
                    continue
            worker = self._next_worker()
            if worker is None:  # every worker's pass is over
                self.exhausted = True
                return
            start = None
            if self.tracked and self.first_task[worker]:
                self.first_task[worker] = False
                start = self.position.start_of(worker) if self.iterable else pool.pending_states.pop(worker, None)
            self._send(worker, number, indices, pool.ring.acquire(), start)

    def _receive(self, interruptible: bool = False) -> None:
        pool = self.pool
        interrupted = (lambda: self.interrupted) if interruptible else None
        generation, number, worker, kind, payload, slot, state = pool.get(self.timeout, interrupted)
        if generation != self.generation:  # left over from an earlier epoch of persistent workers
            if slot >= 0:
                pool.ring.release(slot, fenced=False)
            return
        self.heard[worker] = True
        if kind == "started":  # a stateful copy's state at the start of its pass: its position until it serves
            self.position.started(worker, state)
            return
        self.outstanding.discard(number)
        if kind == "ring":
            structure, used = payload
            batch = _from_slot(structure, pool.ring.lease(slot, used))  # a pinned ring page-locks what it fills
            if self._ring_pinned and not pool.ring.pinned:
                self._ring_pinned = False
                warn_ring_not_pinned(pool.ring.pin_error)
            self.ready[number] = ("batch", batch, worker, state)
            return
        if slot >= 0:
            pool.ring.release(slot, fenced=False)
        if kind == "pickled":
            self.ready[number] = ("batch", payload, worker, state)
        elif kind == "stop" and self.iterable:
            self.active[worker] = False
            self.ready[number] = ("skip", None, worker, state)  # (the state its pass ended in, if it says)
        elif kind == "stop":
            self.ready[number] = ("stop", None, worker, None)
        else:
            self.ready[number] = ("error", payload.exception(pool.workers[worker].pid), worker, state)

    def position_dict(self, stateful: bool) -> dict:
        """The consumer's position (IterableDataset). For a stateful dataset it first waits until every
        worker asked for a batch has reported the state its pass started from, so that a worker the user
        has no batch of yet resumes that same pass, not a new one."""
        with self.reading:  # (a checkpoint taken in another thread than the one iterating)
            if stateful and not self.pool._closed:
                while any(not self.first_task[w] and not self.heard[w] for w in range(self.pool.num_workers)):
                    self._receive()
            return self.position.to_dict()

    def _take(self):
        """The next answer in the order asked for: in dispatch order, or the first that has arrived."""
        if self.in_order:
            number = self.order[0]
            if number not in self.local_errors:
                while number not in self.ready:
                    self._receive(True)
        else:
            number = None
            while number is None:
                number = next((n for n in self.order if n in self.local_errors or n in self.ready), None)
                if number is None:
                    self._receive(True)
        self.order.remove(number)
        self.taken = number
        if number in self.local_errors:
            return ("error", self.local_errors.pop(number), None, None)
        return self.ready.pop(number)

    def next(self):
        """("batch", b) | ("error", exc) | ("stop", None) | None when the epoch is over."""
        with self.reading:
            return self._next()

    def _next(self):
        self.taken = None
        while True:
            self._top_up()
            if not self.order:
                return None
            kind, value, worker, state = self._take()
            if not self.iterable:
                if self.tracked and worker is not None and kind in ("batch", "error"):
                    self.position.served(worker, state)
                return kind, value
            if kind == "skip":
                self.position.ended[worker] = True
                if state is not None:
                    self.position.states[worker] = state
                continue
            if kind in ("batch", "error"):
                self.position.served(worker, state)
            return kind, value

    def drain(self) -> None:
        """Waits for this epoch's outstanding tasks (persistent workers), returning their slots."""
        with self.reading:
            try:
                while self.outstanding:
                    self._receive()
            except RuntimeError:
                pass
            self.ready.clear()
            self.order.clear()
            self.exhausted = True

