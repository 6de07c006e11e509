"""One caller at a time: the iterators' ``__next__`` (and a persistent iterator's reset) run whole, one thread after
another. A loader's iterator read from two threads at once would interleave two readers of one worker pipe (a
message torn between them, and the other reader waiting for good) or two consumers of one native pipeline.

A loader's own worker threads (they run its dataset and collate_fn) are known as such: one that asks an
iterator of that loader for a batch is refused, as the thread iterating it would be, where it would otherwise
wait for the batches it is loading itself."""

from __future__ import annotations

import functools
import os
import threading
import weakref

__all__ = ["Turns", "one_at_a_time", "serve"]


_forks = 0  # forks this process is a child of (each fork's child counts one more)


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)

_serving = threading.local()  # .loader: a weak reference to the loader whose worker thread this is


def serve(loader) -> None:
    """Marks the calling thread as a worker thread of `loader` (for as long as the thread lives)."""
    _serving.loader = weakref.ref(loader)


class Turns:
    """The lock an object's one-at-a-time methods share, which thread holds it, and the loader the object
    serves batches of (None: no loader's worker threads are refused)."""

    __slots__ = ("lock", "owner", "forks", "loader")

    def __init__(self, loader=None) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.forks = _forks
        self.loader = loader


def one_at_a_time(method):
    """Wraps a method of an object that has ``self._turns`` (a Turns): a call from another thread while one runs
    waits for it to return; a call from the same thread while one runs (a dataset, sampler or collate_fn that asks
    the iterator loading it for a batch) raises RuntimeError, where it would otherwise wait on itself for good."""

    @functools.wraps(method)
    def in_turn(self, *args, **kwargs):
        turns = self._turns
        if turns.forks != _forks:
            # A forked child's copy of a lock a thread of the parent may have held: nobody here would release it.
            turns = self._turns = Turns(turns.loader)
        me = threading.get_ident()
        if turns.owner == me:  # only this thread writes its own id there
            raise RuntimeError(
                f"{type(self).__name__}.{method.__name__}() was called while it was running, from the same "
                f"thread: a dataset, sampler or collate_fn asked the iterator that is loading it for a batch")
        serving = getattr(_serving, "loader", None)
        if serving is not None and turns.loader is not None and serving() is turns.loader:
            raise RuntimeError(
                f"{type(self).__name__}.{method.__name__}() was called from one of its loader's worker threads "
                f"({threading.current_thread().name}): a dataset or collate_fn asked an iterator of the loader "
                f"that is loading it for a batch, which would wait for the batches this thread loads")
        with turns.lock:  # (taken and released by `with`: a KeyboardInterrupt between the two cannot keep it)
            try:
                turns.owner = me
                return method(self, *args, **kwargs)
            finally:
                turns.owner = None

    return in_turn
