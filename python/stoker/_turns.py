"""One caller at a time: the iterators' ``__next__`` (and a persistent iterator's reset) run whole, one thread after
another. A loader's iterator read from two threads at once would interleave two readers of one worker pipe (a
message torn between them, and the other reader waiting for good) or two consumers of one native pipeline.

An iterator's own worker threads (they run its dataset and collate_fn) are known as such: one that asks that
iterator (or a wrapper of it) for a batch is refused, as the thread iterating it would be, where it would
otherwise wait for the batches it is loading itself.

close() from another thread than the one in its turn runs in turn too (close_in_turn): it wakes that thread
where the iterator can (its wait for a batch ends), and the iterator is closed once that turn has ended, never
under it."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from typing import Callable

__all__ = ["Turns", "close_in_turn", "exiting", "one_at_a_time", "serve"]

_CLOSE_WAIT_S = 2.0  # how long close() from another thread waits for the turn running to end
_EXIT_WAIT_S = 1.0  # the same at exit, for a turn that close() can wake (see close_in_turn)
_exiting = False  # the interpreter exits: a turn blocked in a daemon thread may never end
_exit_wait_s = _EXIT_WAIT_S


_forks = 0  # forks this process is a child of (each fork's child counts one more)


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)

class _Serving(threading.local):
    iterator = None  # a weak reference to the iterator whose worker thread this is (a class default: no
    # AttributeError raised and caught at each look, which cost more than the rest of a turn)


_serving = _Serving()


def serve(iterator: weakref.ref) -> None:
    """Marks the calling thread as a worker thread of the iterator `iterator` refers to (while the thread
    lives)."""
    _serving.iterator = iterator


def _wraps(outer, inner) -> bool:
    """Whether `outer` is `inner` or wraps it (a persistent or device-staging iterator's `_inner`)."""
    while outer is not None:
        if outer is inner:
            return True
        outer = getattr(outer, "__dict__", {}).get("_inner")
    return False


class Turns:
    """The lock an object's one-at-a-time methods share, which thread holds it, and whether another thread
    asked for the object to close meanwhile."""

    __slots__ = ("lock", "owner", "forks", "closing")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.forks = _forks
        self.closing = False


def one_at_a_time(method):
    """Wraps a method of an object that has ``self._turns`` (a Turns): a call from another thread while one runs
    waits for it to return; a call from the same thread while one runs (a dataset, sampler or collate_fn that asks
    the iterator loading it for a batch) raises RuntimeError, where it would otherwise wait on itself for good."""

    @functools.wraps(method)
    def in_turn(self, *args, **kwargs):
        turns = self._turns
        if turns.forks != _forks:
            # A forked child's copy of a lock a thread of the parent may have held: nobody here would release it.
            turns = self._turns = Turns()
        me = threading.get_ident()
        if turns.owner == me:  # only this thread writes its own id there
            raise RuntimeError(
                f"{type(self).__name__}.{method.__name__}() was called while it was running, from the same "
                f"thread: a dataset, sampler or collate_fn asked the iterator that is loading it for a batch")
        serving = _serving.iterator
        if serving is not None and _wraps(self, serving()):
            raise RuntimeError(
                f"{type(self).__name__}.{method.__name__}() was called from one of its own worker threads "
                f"({threading.current_thread().name}): a dataset or collate_fn asked the iterator that is "
                f"loading it for a batch, which would wait for the batches this thread loads")
        with turns.lock:  # (taken and released by `with`: a KeyboardInterrupt between the two cannot keep it)
            try:
                turns.owner = me
                return method(self, *args, **kwargs)
            finally:
                try:
                    if turns.closing:  # close() was asked for during this turn: it is closed now it has ended
                        with contextlib.suppress(Exception):  # (what this turn raised, if it did, is raised)
                            self._close()
                finally:
                    turns.owner = None

    return in_turn


def exiting(wait: bool = True) -> None:
    """Called by the exit hooks before they close what is live (see close_in_turn); `wait=False` for a first
    pass that only wakes every turn (so that the waits of the second pass overlap)."""
    global _exiting, _exit_wait_s
    _exiting = True
    _exit_wait_s = _EXIT_WAIT_S if wait else 0.0


def close_in_turn(obj, wake: Callable[[], None] | None = None) -> None:
    """Closes `obj` (which has ``_turns`` and ``_close``) with ``obj._close()``, never while a thread is in its
    turn: at once with none in it; while one is, after `wake()` (which ends that thread's wait for a batch, if
    given) and once the turn has ended. A thread other than the one in turn
    waits for that up to _CLOSE_WAIT_S seconds (at exit, _EXIT_WAIT_S for a turn it woke, else not at all);
    the thread in turn (a sampler or collate_fn closing the iterator that calls it) and the iterator's own
    worker threads (whose batch the turn may be waiting for) do not wait. If the turn has not ended by then,
    the thread in turn closes `obj` as its turn ends."""
    turns = obj._turns
    if turns.forks != _forks:  # a forked child's copy: no thread of this process is in its turn
        obj._close()
        return
    turns.closing = True  # (before the lock is tried: a turn ending meanwhile sees it and closes)
    if wake is not None:
        wake()
    serving = _serving.iterator
    if turns.owner == threading.get_ident() or (serving is not None and _wraps(obj, serving())):
        wait = 0.0
    elif _exiting:
        # A woken turn ends soon (its thread is out of stoker's calls before the interpreter stops it);
        # another may never end.
        wait = _exit_wait_s if wake is not None else 0.0
    else:
        wait = _CLOSE_WAIT_S
    if not (turns.lock.acquire(timeout=wait) if wait else turns.lock.acquire(blocking=False)):
        return
    try:
        obj._close()
        turns.closing = False
    finally:
        turns.lock.release()
