"""The iterators stoker.DataLoader returns: native gather for array datasets, threads for Python ones."""

from __future__ import annotations

import atexit
import collections
import contextlib
import copy
import dataclasses
import functools
import itertools
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as _wait_futures
from concurrent.futures import TimeoutError as _FutureTimeout

import numpy as np
import torch
from torch.utils.data._utils.pin_memory import pin_memory as _pin_memory
from torch.utils.data.dataloader import _DatasetKind

from stoker import _collate, _cuda, _device, _resume, _turns
from stoker._arrays import array_ranges
from stoker._native import POOL, core, from_dlpack
from stoker._turns import Turns, close_in_turn, one_at_a_time, serve
from stoker._workers import (Interrupted, IterablePosition, IterableSource, ProcessBatches, Stop, ThreadPool,
                             WorkerPool, Zygote, is_stateful, load_batch, set_thread_worker_info, shutdown_all,
                             start_method_of, warn_ring_not_pinned)
from stoker._workers import _add_note as _add_worker_note

__all__ = ["ArrayIterator", "IterableIterator", "PersistentIterator", "ProcessIterator", "PythonIterator"]

_profiler_enabled = torch.autograd._profiler_enabled
_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    # Threads reading user arrays must stop before the interpreter frees them; the set holds only weak
    # references, so this hook keeps no iterator alive.
    # A next() blocked in a daemon thread is woken where it can be, and waited for briefly (all at once: a
    # first pass wakes them all); one that cannot be woken is not waited for.
    live = list(_live)
    for wait in (False, True):
        _turns.exiting(wait)
        for it in live:
            it.close()
    shutdown_all()  # persistent worker pools too


def _draw_seed(generator) -> int:
    """One int64 draw from the loader's generator (or torch's global RNG), as torch draws its base_seed."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def _map_position(draws, cursor, dataset, batches):
    """The cursor's position callable for a map-style epoch, or None when the batch count says it all: the
    own state of a user's sampler after the batches served, the dataset's own state (its object here), and,
    with worker processes (``batches``), each worker's copy's state after the last batch received from it.
    It holds no reference to the iterator, which the loader's cursor must not keep alive."""
    sampler = draws is not None and draws.stateful is not None
    dataset_stateful = is_stateful(dataset)
    if not (sampler or dataset_stateful):
        return None

    def position() -> dict:
        out = {"sampler_state": draws.state_at(cursor.served) if sampler else None,
               "sampler_epoch": draws.epoch_at(cursor.served) if sampler else cursor.sampler_epoch,
               "dataset_state": copy.deepcopy(dataset.state_dict()) if dataset_stateful else None}
        if batches is not None:
            out.update(batches.position_dict(True))
        return out

    return position


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; before it, CUDA was the only one pinned for
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def _pin_requested(loader) -> bool:
    if not loader.pin_memory:
        return False
    if loader.pin_memory_device:
        warnings.warn(
            "pin_memory_device is deprecated, the current accelerator will be used as the device,"
            f"ignore pin_memory_device='{loader.pin_memory_device}'."
        )
    if not _accelerator_available():
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, "
            "then device pinned memory won't be used."
        )
        return False
    return True


class _Iterator:
    """Common protocol: iter/next/len, close(), no pickling, the epoch's seed drawn at creation.

    Subclasses call _started() at the end of __init__: until then the iterator counts as closed, so a
    constructor that fails leaves nothing for __del__ or the exit hook to trip over."""

    _closed = True
    _fence = None

    def __init__(self, loader) -> None:
        self._turns = Turns()
        self._loader = loader
        self._index_sampler = loader._index_sampler
        self._num_threads = int(loader.num_workers)
        self._pin = _pin_requested(loader)
        # Page-locked when batches are pinned or go to a GPU; None: the ordinary pool.
        self._pin_device = _cuda.pin_device(getattr(loader, "_stoker_device", None), self._pin)
        self._host_pool = None if self._pin_device is None else _cuda.pinned_pool(self._pin_device)
        # What the pool caches follows the bytes out at once since the latest iterator began (batches a user
        # once kept in a list must not keep their memory cached for good).
        (POOL if self._host_pool is None else self._host_pool).forget_peak()
        staged = getattr(loader, "_stoker_device", None) is not None
        # Pinned batches of stoker's memory handed to the user (with device=, the stage keeps them itself): their
        # memory returns through the fence queue once released.
        self._fence = _device.fence_queue(self._pin_device) if self._pin_device is not None and self._pin \
            and not staged else None
        self._native_order = loader._stoker_native_sampler
        self._rank, self._world = loader._stoker_shard()
        cursor = self._cursor = loader._stoker_begin()
        self._epoch = cursor.epoch
        self._start = cursor.served  # the batch this iterator starts from (after load_state_dict)
        # Batches after it that the saved run had served already (worker processes, in_order=False): passed over.
        self._skip = frozenset(cursor.ahead)
        self._next_number = self._start
        self._user_batches = self._begin_draws(loader, cursor)
        self._seed = loader._stoker_shuffle_seed(self._base_seed, self._world)
        self._pid = os.getpid()
        # An IterableDataset whose len() was asked before this iterator: each batch beyond it warns, as torch's.
        iterable = loader._dataset_kind != _DatasetKind.Map
        self._len_called = loader._IterableDataset_len_called if iterable else None
        self._yielded = 0

    def _started(self) -> None:
        self._closed = False
        _live.add(self)

    def _native_stream(self, batch_size: int, drop_last: bool):
        """(n, batch_size, drop_last, shuffle, seed, epoch, rank, world_size) for the native index stream."""
        loader = self._loader
        return (len(loader.dataset), batch_size, drop_last, loader._stoker_shuffle,
                self._seed & 0xFFFFFFFFFFFFFFFF, self._epoch, self._rank, self._world)

    def _sample_rng_key(self):
        """(seed, epoch) when the loader seeds every sample's RNGs (sample_seeds=True), else None."""
        if not self._loader.sample_seeds:
            return None
        return (self._seed & 0xFFFFFFFFFFFFFFFF, self._epoch)

    def _begin_draws(self, loader, cursor):
        """Makes this iterator's draws (see stoker._resume), in torch's order: ``iter()`` of a sampler the user
        passed, the base seed (one int64 from ``generator``, else torch's global RNG), then the sampler's index
        batches as they are needed. An iterator that continues a saved epoch (``cursor.resume``) makes the
        saved iterator's draws again from the RNG states they started from, keeping the index batches it had
        drawn and not served, and takes its base seed from the state; torch's global RNG is left as it found
        it. Returns the user's sampler's index batches (a SamplerDraws), or None with stoker's own sampler."""
        resume = cursor.resume
        sources = loader._stoker_rng_sources(started=True)
        if resume is None:
            cursor.rng = _resume.note_rng(sources)  # before any draw of this epoch
            draws = self._open_sampler(loader, cursor, cursor.sampler_start)
            self._base_seed = _draw_seed(loader.generator)
            if draws is not None and cursor.drawn < self._start:  # a state of stoker.DataLoader/1: no draws noted
                _resume.redraw(draws, self._start, self._start)
        else:
            cursor.rng = resume["rng"]
            with _resume.redrawing(sources, cursor.rng):
                draws = self._open_sampler(loader, cursor, resume["sampler_state"])
                if loader.generator is not None or "torch" in cursor.rng:
                    _draw_seed(loader.generator)  # as the saved iterator drew it (its value is in the state)
                drawn = resume.get("sampler_drawn")
                drawn = self._start if drawn is None else drawn
                if draws is not None and cursor.drawn < drawn:
                    _resume.redraw(draws, drawn, self._start)
            self._base_seed = resume["base_seed"]
        cursor.base_seed = self._base_seed
        loader._stoker_started(cursor)
        return draws

    def _open_sampler(self, loader, cursor, saved_state):
        """``iter()`` of the user's sampler, counted; one that keeps its own state is loaded with the state
        saved after the batches served (it then starts there), when there is one."""
        if loader._stoker_native_sampler or loader._dataset_kind != _DatasetKind.Map:
            return None
        sampler = self._index_sampler
        stateful = loader._stoker_stateful_sampler()
        if saved_state is not None:
            stateful.load_state_dict(copy.deepcopy(saved_state))
        epoch = self._check_sampler_epoch(cursor)  # (after the sampler's own state, which may set its epoch)
        # Each state of the sampler is kept with the epoch it says then; the first, with the one it said now.
        epoch_of = functools.partial(_resume.sampler_epoch, sampler)
        if saved_state is None:
            before = copy.deepcopy(stateful.state_dict()) if stateful is not None else None  # (before its iter())
            return _resume.SamplerDraws(iter(sampler), cursor, stateful, 0, before, epoch_of, epoch)
        if self._start > 0 and self._start == _length(sampler):
            # Every batch of the epoch was served. The saved run's sampler may not have met the end of its
            # pass yet (it would have at the next draw), or it may have, and moved itself on to its next pass
            # (a sampler that rewinds as its pass ends): one draw tells, and is undone in the second case.
            _resume.starts_a_pass(stateful, sampler, saved_state, keep_end=True)
            return _resume.SamplerDraws(iter(()), cursor, stateful, self._start, saved_state, epoch_of, epoch)
        if self._start == 0 and not _resume.starts_a_pass(stateful, sampler, saved_state, keep_end=False):
            # A state taken as a pass had ended, of a sampler that keeps its end position until its next iter()
            # (torchdata's, say): that look at it ended the pass, and its next iter() starts a new one.
            saved_state = copy.deepcopy(stateful.state_dict())
        return _resume.SamplerDraws(iter(sampler), cursor, stateful, self._start, saved_state, epoch_of, epoch)

    def _check_sampler_epoch(self, cursor) -> int | None:
        """Notes the epoch the user's sampler says it serves; a resumed epoch needs the one it was saved with
        (for a sampler that keeps its own state, the one it said with that state)."""
        epoch = _resume.sampler_epoch(self._index_sampler)
        saved_epoch = None if cursor.resume is None else cursor.resume["sampler_epoch"]
        if saved_epoch is not None and epoch != saved_epoch:
            raise ValueError(
                f"the loaded state was saved in an epoch its sampler served as epoch {saved_epoch} (set_epoch); this "
                f"loader's sampler says epoch {epoch}. Call set_epoch({saved_epoch}) on it before iterating, as the "
                "saved run did, so that the rest of that epoch is drawn as it was")
        cursor.sampler_epoch = epoch
        return epoch

    def _index_batches(self):
        """The epoch's index batches from this iterator's start: lists of ints (one int per sample without
        automatic batching), from the native stream or the user's sampler."""
        loader = self._loader
        if not loader._stoker_native_sampler:
            return self._user_batches
        auto = loader._auto_collation
        bs = loader.batch_size if auto else 1
        stream = core.IndexStream(*self._native_stream(bs, loader.drop_last if auto else False))
        batches = range(self._start, len(stream))
        if auto:
            return (stream.batch(b).tolist() for b in batches)
        return (int(stream.batch(b)[0]) for b in batches)

    def _draw(self, batches):
        """(number, index batch): the next of `batches`, which gives one index batch per batch of the epoch from
        this iterator's start, passing over those served ahead before the save this epoch resumed. The
        sampler's error propagates (its batch's turn is taken); StopIteration at the end."""
        while True:
            number = self._next_number
            self._next_number += 1
            try:
                indices = next(batches)
            except StopIteration:
                raise
            except Exception:
                if number in self._skip:  # raised before the save this epoch resumes, at its turn then
                    continue
                raise
            if number not in self._skip:
                return number, indices

    def _served_number(self) -> int | None:
        """The number of the batch the last next() served or raised at; None: the first not yet served."""
        return None

    def _track_in_process(self) -> None:
        """Where the user stands beyond the batch count, for a loader that loads in this process: the state of
        a sampler that keeps one, after the batches served, and the dataset's own state (torchdata's Stateful
        protocol) now (with worker threads, which share the dataset, loads read ahead included)."""
        self._cursor.position = _map_position(self._user_batches, self._cursor, self._loader.dataset, None)

    def _finish(self):
        """Ends the epoch: the cursor moves to the next one and StopIteration is raised. (Its position, which
        may hold the epoch's workers and their ring, is no longer asked for.) An iterator another thread
        asked to close meanwhile ends without ending the epoch."""
        if self._turns.closing:
            raise StopIteration
        self._cursor.finished = True
        self._cursor.position = None
        self._close()
        raise StopIteration

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self._native_order:
            return self._loader._stoker_num_batches()
        return len(self._index_sampler)

    @one_at_a_time
    def __next__(self):
        if self._pid != os.getpid():
            raise RuntimeError(
                f"this stoker iterator was created in process {self._pid}; its loading threads do not exist "
                f"in process {os.getpid()} (a fork). Create a new iterator (iter(loader)) in this process."
            )
        if self._fence is not None:
            # What the user released before asking for this batch is fenced now, and what has passed returns
            # (ring slots among it) before this batch's loading asks for more.
            _device.stamp()
        try:
            if _profiler_enabled():  # the range torch's loader records, at no cost when nobody profiles
                with torch.autograd.profiler.record_function(
                    f"enumerate(DataLoader)#{type(self).__name__}.__next__"
                ):
                    batch = self._next()
            else:
                batch = self._next()
        except StopIteration:
            raise
        except Exception:
            self._cursor.count(self._served_number())  # the batch's turn is taken; the next call serves the next
            raise
        self._cursor.count(self._served_number())
        if self._len_called is not None:
            self._yielded += 1
            if self._yielded > self._len_called:
                self._warn_length()
        if self._pin:
            batch = _pin_memory(batch)  # tensors stoker collated pinned are returned as they are
        return batch

    def _warn_length(self) -> None:
        message = (f"Length of IterableDataset {self._loader.dataset} was reported to be {self._len_called}"
                   f"(when accessing len(dataloader)), but {self._yielded} samples have been fetched. ")
        if self._num_threads > 0:
            message += ("For multiprocessing data-loading, this could be caused by not properly configuring the "
                        "IterableDataset replica at each worker. Please see "
                        "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples.")
        warnings.warn(message, stacklevel=3)

    def __getstate__(self):
        raise NotImplementedError(f"{type(self).__name__} cannot be pickled")

    def __del__(self) -> None:
        self.close()

    _wake: Callable[[], None] | None = None  # ends a wait for a batch (see close)

    def close(self) -> None:
        """Ends this iterator (its worker threads or processes stop). From another thread than one in next(),
        once that next() has ended: one waiting for a batch ends at once with StopIteration where loading can
        be interrupted (worker threads and processes), else after the batch it is loading."""
        if not self._closed:
            close_in_turn(self, self._wake)

    def _close(self) -> None:
        self._closed = True


class PersistentIterator:
    """The one iterator of a loader with persistent workers, as torch's: each ``iter(loader)`` resets it (the
    epoch it was serving ends, its prefetched batches are dropped) and hands out this same object again, now
    serving the next epoch. Whatever else is asked of it is asked of the epoch's own iterator."""

    def __init__(self) -> None:
        self._turns = Turns()
        self._inner = None  # until the first reset begins the first epoch

    @one_at_a_time
    def _reset(self, begin) -> None:
        """Ends the current epoch's iterator, then begins the next (``begin()``). If the next cannot begin, the
        error is raised and this iterator stays ended. A batch being loaded for another thread is handed over
        first: the two never share the workers."""
        if self._inner is not None:
            self._inner.close()
        self._inner = begin()

    def __iter__(self):
        return self

    @one_at_a_time
    def __next__(self):
        inner = self._inner
        if inner is None:  # the epoch could not begin
            raise StopIteration
        return next(inner)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):  # close(), and what tests and tools ask of the epoch's iterator
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __getstate__(self):
        raise NotImplementedError(f"{type(self).__name__} cannot be pickled")


def _length(sampler) -> int | None:
    try:
        return len(sampler)
    except TypeError:  # a sampler without a length
        return None


def _index_array(indices):
    """(int64 array, window, None) for a batch of indices, else (None, None, the IndexError to raise at that
    batch). The array is flat: one row per integer. `window` is None for one integer per sample; for a sequence
    of k integers per sample (a window of rows: indexing the dataset with it gives one sample of k rows) it is
    (batch, k), the shape the gathered rows are viewed as."""
    try:
        array = np.asarray(indices)
    except Exception as exc:  # ragged or exotic: what indexing with it would raise
        return None, None, IndexError(f"a batch of indices must be integers; the sampler gave {indices!r} ({exc})")
    window = None
    if array.ndim == 2 and not any(isinstance(i, tuple) for i in indices):
        window = array.shape
    elif array.ndim != 1:
        # A tuple per sample indexes dimensions (one element, not rows), and a deeper nesting indexes as torch
        # has deprecated: the native gather says so rather than guess.
        return None, None, IndexError(
            f"each sample's index into an array dataset must be an integer or a list of integers; the sampler "
            f"gave {indices!r}. To index it otherwise, wrap the dataset in a torch.utils.data.Dataset whose "
            "__getitem__ indexes it")
    if array.shape[0] == 0:
        return None, None, IndexError("list index out of range")  # default_collate's error for an empty batch
    if array.size and (array.dtype.kind not in "iu" or array.dtype == np.uint64
                       and int(array.max()) > np.iinfo(np.int64).max):
        return None, None, IndexError(
            f"only integers are valid indices into an array dataset; the sampler gave {indices!r}"
        )
    return array.astype(np.int64, copy=False).reshape(-1), window, None


class ArrayIterator(_Iterator):
    """Batches of an array dataset, gathered natively into pooled blocks (at each next() without workers, by
    native threads ahead with them) and handed over zero-copy."""

    def __init__(self, loader, plan) -> None:
        super().__init__(loader)
        self._plan = plan
        threads = max(1, self._num_threads)
        depth = (loader.prefetch_factor or 2) * threads + 2
        row_bytes = sum(spec[4] for spec in plan.specs)
        batch_rows = loader.batch_size or 1
        depth = max(2, min(depth, (32 << 20) // max(1, row_bytes * batch_rows)))
        self._depth = depth
        source = core.ArraySource(plan.specs)
        self._source_owners = plan.owners  # the arrays the native source points into
        self._batches = self._user_batches
        self._track_in_process()
        pool = POOL if self._host_pool is None else self._host_pool
        # With num_workers=0 each batch's indices are drawn, and its rows gathered, at its next() on the calling
        # thread, as torch indexes the dataset then: a sampler the training loop steers (a curriculum, say)
        # sees the loop's latest word, and a dataset the loop changes as it goes (a replay buffer) is read as
        # it is then. With workers, native threads gather prefetch_factor x num_workers batches (and two) ahead.
        self._inline = self._num_threads == 0
        if self._native_order and (self._inline or self._skip):
            order = core.IndexStream(*self._native_stream(loader.batch_size, loader.drop_last))
            self._batches = (order.batch(b) for b in range(self._start, len(order)))
        if self._inline:
            self._source, self._pool = source, pool
            self._started()
            return
        # Native threads draw stoker's own order themselves, unless batches are passed over (a resume after
        # batches served out of order): then, as a sampler's, it is submitted batch by batch.
        self._submitted = not self._native_order or bool(self._skip)
        stream = None if self._submitted else self._native_stream(loader.batch_size, loader.drop_last)
        self._pipe = core.ArrayPipeline(source, pool, stream, self._start, threads, depth)
        # Per batch read: its error, or its window shape (None for one row per sample).
        self._pending: collections.deque = collections.deque()
        self._started()
        if self._submitted:
            self._top_up()

    def _top_up(self) -> None:
        # Reads the sampler ahead. A batch it cannot serve (the sampler raised, or gave no integers) is kept
        # in line as the exception to raise at that batch's turn, so the batches before it still arrive.
        while self._batches is not None and len(self._pending) < self._depth:
            try:
                number, indices = self._draw(self._batches)
            except StopIteration:
                self._batches = None
                self._pipe.close_submissions()
                return
            except Exception as exc:
                self._pending.append(exc)
                continue
            array, window, error = _index_array(indices)
            if error is not None:
                self._pending.append(error)
            else:
                self._pipe.submit(array, number)
                self._pending.append(window)

    def _next(self):
        if self._closed:
            raise StopIteration
        if self._inline:
            return self._gather_here()
        window = None
        if self._submitted:
            self._top_up()
            if not self._pending:
                self._finish()
            window = self._pending.popleft()
            if isinstance(window, BaseException):
                raise window
        capsules = self._pipe.next()
        if capsules is None:
            self._finish()
        return self._shaped(capsules, window)

    def _shaped(self, capsules, window):
        columns = [from_dlpack(c) for c in capsules]
        if window is not None:  # (batch, k) samples of k rows each, as indexing with a list per sample gives
            columns = [t.view(*window, *t.shape[1:]) for t in columns]
        return self._plan.shape_batch(columns)

    def _gather_here(self):
        try:
            _, indices = self._draw(self._batches)
        except StopIteration:
            self._finish()
        window = None
        if not self._native_order:  # (stoker's own order is int64 arrays already)
            indices, window, error = _index_array(indices)
            if error is not None:
                raise error
        capsules = self._source.gather(self._pool, indices, self._cursor.served)  # (this batch's number)
        return self._shaped(capsules, window)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._inline and self._pid == os.getpid():  # in a forked child there are no threads to stop
                self._pipe.stop()


def _unaliased(batch, ranges: list[tuple[int, int]]):
    """The batch with each tensor or array that views memory in `ranges` (a dataset's arrays) copied, as a
    batch from a worker process would be: writing into it must not change the dataset. Containers (sequences,
    mappings, namedtuples, dataclass instances) are rebuilt only where something inside was copied."""

    def inside(ptr: int) -> bool:
        return any(start <= ptr < end for start, end in ranges)

    def walk(x):
        if isinstance(x, torch.Tensor):
            return x.clone() if x.device.type == "cpu" and inside(x.untyped_storage().data_ptr()) else x
        if isinstance(x, np.ndarray):
            return x.copy() if x.size and inside(x.__array_interface__["data"][0]) else x
        if isinstance(x, (str, bytes)):
            return x
        if isinstance(x, Mapping):
            items = {k: walk(v) for k, v in x.items()}
            if all(items[k] is v for k, v in x.items()):
                return x
            try:
                clone = copy.copy(x)  # keeps the type (and attributes) of a mapping subclass
                clone.update(items)
                return clone
            except Exception:
                return items
        if isinstance(x, (list, tuple)):
            parts = [walk(v) for v in x]
            if all(p is v for p, v in zip(parts, x)):
                return x
            if isinstance(x, tuple) and hasattr(x, "_fields"):
                return type(x)(*parts)
            try:
                return type(x)(parts)
            except Exception:
                return parts
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            changes = {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            if any(changes[k] is not getattr(x, k) for k in changes):
                return dataclasses.replace(x, **changes)
        return x

    return walk(batch)


def _load_in_thread(host_pool, dataset, getitems, auto: bool, collate, rng_key, ranges, stop, number: int, indices):
    """One batch of a map-style Python dataset, loaded where it is called (the main thread, or a worker
    thread), into `host_pool` (page-locked blocks when pinned, else the ordinary pool); a batch viewing an
    array dataset's `ranges` is copied. A worker thread's batch stops between samples once `stop` is set."""
    with _collate.use_pool(host_pool):
        batch = load_batch(dataset, getitems, auto, collate, number, indices, rng_key, stop)
    return _unaliased(batch, ranges) if ranges else batch


class PythonIterator(_Iterator):
    """Batches of any map-style dataset: `__getitems__`/`__getitem__` in Python, collated into pooled
    buffers; with num_workers > 0 the batches are loaded by that many threads, delivered in order (as they
    are ready with in_order=False)."""

    _init_error: Exception | None = None  # a worker thread's worker_init_fn raised it: raised at the next batch
    _taken: int | None = None  # the number of the batch the last next() gave or raised at (worker threads)

    def __init__(self, loader, collate) -> None:
        super().__init__(loader)
        self._dataset = loader.dataset
        self._auto = loader._auto_collation
        self._collate = collate
        getitems = getattr(self._dataset, "__getitems__", None)
        self._getitems = getitems if getitems else None
        self._indices = self._index_batches()
        self._track_in_process()
        self._rng_key = self._sample_rng_key()
        if self._rng_key is not None and self._num_threads > 0:
            raise ValueError("sample_seeds=True seeds the process-wide random, numpy and torch generators before each "
                             "sample, which threads would share: use worker_mode='process' (or num_workers=0)")
        self._pool = None
        # Threads serving an array dataset index its arrays in this process: a batch may be a view of them
        # (batch_size=None, a collate_fn that returns samples), where torch's worker processes give copies.
        self._dataset_ranges = array_ranges(self._dataset) if self._num_threads > 0 else []
        # Loads one batch. A worker thread's task holds what loading needs, not this iterator, so that one a
        # `break` left is freed and its closing cancels the batches still queued (the threads would load them
        # all first).
        self._stop = Stop() if self._num_threads > 0 else None  # set at close(): the threads' batches stop
        self._task = functools.partial(_load_in_thread, self._host_pool, self._dataset, self._getitems,
                                       self._auto, self._collate, self._rng_key, self._dataset_ranges, self._stop)
        if self._num_threads > 0:
            worker_ids = itertools.count()
            init = loader.worker_init_fn
            num_threads, base_seed, dataset = self._num_threads, self._base_seed, self._dataset
            init_errors: list = []

            me = weakref.ref(self)  # (the threads must not keep this iterator alive)

            def start_worker() -> None:
                wid = next(worker_ids)
                threading.current_thread().name = f"stoker_worker_{wid}"
                serve(me)  # asking this iterator for a batch from here is refused, not a wait for good
                # get_worker_info() answers per thread (worker_method "thread"); the threads share the process's
                # random generators, which are therefore not seeded per worker.
                set_thread_worker_info(wid, num_threads, base_seed + wid, dataset)
                if init is not None:
                    try:
                        init(wid)
                    except Exception as exc:  # raised at the first batch, as a worker's error (the pool goes on)
                        _add_worker_note(exc, f"stoker: raised by worker_init_fn in worker thread {wid}",
                                         "stoker: raised by worker_init_fn")
                        init_errors.append(exc)

            self._pool = ThreadPool(self._num_threads, "stoker_worker", start_worker)
            # Every thread's worker_init_fn has run before the first batch is asked for (however long it takes,
            # as torch waits for its workers).
            barrier = threading.Barrier(self._num_threads)
            for f in [self._pool.submit(barrier.wait) for _ in range(self._num_threads)]:
                f.result()
            self._init_error = init_errors[0] if init_errors else None
            self._depth = (loader.prefetch_factor or 2) * self._num_threads
            self._in_order = bool(loader.in_order)
            self._pending: collections.deque = collections.deque()  # (number, future) of each batch asked for
        self._started()
        if self._pool is not None and self._init_error is None:
            self._top_up()

    def _top_up(self) -> None:
        while self._indices is not None and len(self._pending) < self._depth:
            try:
                number, indices = self._draw(self._indices)
            except StopIteration:
                self._indices = None
                return
            except Exception as exc:  # the sampler's error, raised at this batch's turn
                failed: Future = Future()
                failed.set_exception(exc)
                self._pending.append((self._next_number - 1, failed))
                continue
            self._pending.append((number, self._pool.submit(self._task, number, indices)))

    def _first_ready(self, timeout: float | None):
        """The (number, future) of the batch asked for first among those ready, waiting for one up to `timeout`
        (None when none is ready by then)."""
        ready = next((p for p in self._pending if p[1].done()), None)
        if ready is None:
            _wait_futures([f for _, f in self._pending], timeout, return_when=FIRST_COMPLETED)
            ready = next((p for p in self._pending if p[1].done()), None)
        if ready is not None:
            self._pending.remove(ready)
        return ready

    def _next(self):
        if self._closed:
            raise StopIteration
        if self._pool is None:
            try:
                number, indices = self._draw(self._indices)
            except StopIteration:
                self._finish()
            try:
                return self._task(number, indices)
            except StopIteration:  # a dataset that raises StopIteration ends the epoch, as with torch
                self._finish()
        if self._init_error is not None:
            error, self._init_error = self._init_error, None
            self._close()  # as torch's loader, whose worker failing to start ends its epoch
            raise error
        self._taken = None
        try:
            return self._take()
        except Exception:
            if self._closed:  # closed by another thread meanwhile: its batch stopped, or was never begun
                self._taken = None
                raise StopIteration from None
            raise

    def _take(self):
        self._top_up()
        if not self._pending:
            self._finish()
        timeout = self._loader.timeout or None
        taken = self._pending.popleft() if self._in_order else self._first_ready(timeout)
        try:
            if taken is None:
                raise _FutureTimeout
            self._taken = taken[0]
            return taken[1].result(timeout)
        except _FutureTimeout:
            raise RuntimeError(f"DataLoader timed out after {self._loader.timeout} seconds") from None
        except StopIteration:
            self._finish()

    def _served_number(self) -> int | None:
        return self._taken

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pool is not None and self._pid == os.getpid():
                self._stop.set = True  # batches being loaded stop at their next sample
                self._pool.shutdown()

    @property
    def _wake(self):
        # (Safe beside a next(): the threads stop, and the batch waited for raises, at once. Without worker
        # threads there is nothing to wake.)
        return self._close if self._pool is not None else None


class IterableIterator(_Iterator):
    """Batches of an IterableDataset in the main process (num_workers=0): one pass of ``iter(dataset)``,
    cut into batches as torch cuts them, collated into pooled buffers."""

    def __init__(self, loader, collate) -> None:
        super().__init__(loader)
        self._collate = collate
        dataset = loader.dataset
        saved = IterablePosition(1, self._cursor.resume_workers)
        cursor, stateful = self._cursor, is_stateful(dataset)
        # iter(dataset) runs here, at iter(loader), as torch's single-process iterator calls it; not for a
        # resumed pass that had ended, whose dataset only takes the state it was left in (for its next pass).
        start = saved.start_of(0)
        if saved.ended[0] and not stateful:
            start = (start[0], None, True)
        self._source = IterableSource.begin(dataset, loader._auto_collation, loader.batch_size,
                                            bool(loader.drop_last), start)
        # Whether the pass has met the end of the dataset's iterator (the last batch served then is its last).
        self._ended = ended = [self._source.ended]

        loaded, resumed_at = start[1] if start is not None else None, cursor.served

        def position() -> dict:
            # No prefetch here: the dataset's own state is the consumer's position; until the resumed pass has
            # served a batch, the state it was loaded with (a dataset that loads lazily may not say it yet, and
            # the look at it may have moved it). (The cursor, which the loader keeps, must not keep this
            # iterator alive: no reference to self.)
            if not stateful:
                state = None
            elif loaded is not None and cursor.served == resumed_at:
                state = copy.deepcopy(loaded)
            else:
                state = dataset.state_dict()
            return {"workers": [{"batches": cursor.served, "ended": ended[0], "state": state}], "next_worker": 0}

        self._cursor.position = position
        self._started()

    def _next(self):
        if self._closed:  # (closed mid-epoch: the epoch is left, not ended)
            raise StopIteration
        try:
            data = self._source.next_data()
        except StopIteration:
            self._finish()
        finally:
            self._ended[0] = self._source.ended
        with _collate.use_pool(self._host_pool):
            return self._collate(data)


class ProcessIterator(_Iterator):
    """Batches of a Python dataset loaded by ``num_workers`` worker processes (torch's worker contract:
    worker_init_fn, get_worker_info, per-worker seeds), handed over through a shared-memory ring."""

    def __init__(self, loader, collate) -> None:
        super().__init__(loader)
        persistent = bool(loader.persistent_workers)
        pool = getattr(loader, "_stoker_pool", None)
        if pool is not None and (not persistent or pool._closed or pool.pid != os.getpid()):
            pool = None
        iterable = loader._dataset_kind != _DatasetKind.Map
        created = pool is None
        if created:
            zygote = None
            if start_method_of(loader) in ("spawn", "forkserver") and sys.platform.startswith("linux"):
                # Spawned workers are forked from one process that received the dataset once (see Zygote): no
                # new interpreter, nor unpickling, per worker and epoch, and the workers share its pages. Linux
                # only: elsewhere (macOS above all) forking a process that has started system frameworks is not
                # safe, which is why spawn is the default there.
                zygote = Zygote.for_loader(loader, collate, iterable)
            pool = WorkerPool(loader, collate, self._base_seed, iterable, zygote)
            if persistent:
                loader._stoker_pool = pool
        else:
            previous = getattr(loader, "_stoker_pool_epoch", None)
            if previous is not None:
                previous.drain()  # batches prefetched for an abandoned epoch are dropped, as torch does
        self._pool = pool
        self._own_pool = not persistent
        pool.begin()  # the first worker sets itself up while the first tasks are made (see WorkerPool.begin)
        try:
            self._dispatch(loader, pool, iterable, persistent)
        except BaseException:
            if created:  # its workers end with the iterator that could not begin
                if persistent:
                    loader._stoker_pool = None
                pool.shutdown()
            raise
        self._started()

    def _dispatch(self, loader, pool: WorkerPool, iterable: bool, persistent: bool) -> None:
        """Pins the ring if batches are pinned, then queues the epoch's first tasks."""
        if self._pin_device is not None and not pool.ring.pinned and not pool.ring.pin_error:
            # The ring the workers collate into is page-locked in place, each slot as far as its batches reach:
            # they arrive pinned.
            try:
                pool.ring.pin(self._pin_device)
                if self._fence is not None:
                    pool.ring.set_fence(self._fence)
            except RuntimeError as exc:  # the driver could not give the device's context
                warn_ring_not_pinned(str(exc))
        batches = None if iterable else self._index_batches()
        # Each worker's position (an IterableDataset's pass; a stateful map-style dataset's copy).
        dataset_stateful = is_stateful(loader.dataset)
        tracked = iterable or dataset_stateful
        position = IterablePosition(pool.num_workers, self._cursor.resume_workers) if tracked else None
        self._batches = ProcessBatches(pool, batches, self._start, bool(loader.in_order),
                                       loader.prefetch_factor or 2, loader.timeout, self._sample_rng_key(),
                                       position, self._skip, persistent)
        # Bound to the epoch's batches, not to this iterator, which the loader's cursor must not keep alive.
        if iterable:
            self._cursor.position = functools.partial(self._batches.position_dict, dataset_stateful)
        else:
            self._cursor.position = _map_position(self._user_batches, self._cursor, loader.dataset,
                                                  self._batches if dataset_stateful else None)
        if persistent:
            loader._stoker_pool_epoch = self._batches

    @property
    def _workers(self):
        return self._pool.workers

    def _served_number(self) -> int | None:
        # Map-style batches are numbered, and may arrive out of order (in_order=False); an IterableDataset's
        # are counted as they come.
        return None if self._batches.iterable else self._batches.taken

    def _next(self):
        if self._closed:
            raise StopIteration
        try:
            item = self._batches.next()
        except Interrupted:
            item = None
        except RuntimeError:
            self._close()
            raise
        if self._batches.interrupted:  # close() was asked for by another thread meanwhile (see close)
            raise StopIteration
        if item is None:
            self._finish()
        kind, value = item
        if kind == "batch":
            return value
        if kind == "stop":
            self._finish()
        raise value

    def _wake(self) -> None:
        self._batches.interrupted = True  # the wait for the workers' next message ends within _POLL_S

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._batches.ready.clear()  # prefetched batches release their slots
            if self._own_pool and self._pid == os.getpid():
                self._pool.shutdown()
            if self._fence is not None and self._pid == os.getpid():
                with contextlib.suppress(Exception):  # what has passed returns (the rest at a later batch)
                    _device.poll()
