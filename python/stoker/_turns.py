"""One caller at a time: the iterators' ``__next__`` (and a persistent iterator's reset) run whole, one thread after
another. A loader's iterator read from two threads at once would interleave two readers of one worker pipe (a
message torn between them, and the other reader waiting for good) or two consumers of one native pipeline."""

from __future__ import annotations

import functools
import os
import threading

__all__ = ["Turns", "one_at_a_time"]


class Turns:
    """The lock an object's one-at-a-time methods share, and which thread holds it."""

    __slots__ = ("lock", "owner", "pid")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.pid = os.getpid()


def one_at_a_time(method):
    """Wraps a method of an object that has ``self._turns`` (a Turns): a call from another thread while one runs
    waits for it to return; a call from the same thread while one runs (a dataset, sampler or collate_fn that asks
    the iterator loading it for a batch) raises RuntimeError, where it would otherwise wait on itself for good."""

    @functools.wraps(method)
    def in_turn(self, *args, **kwargs):
        turns = self._turns
        lock = turns.lock
        if not lock.acquire(False):
            me = threading.get_ident()
            if turns.pid != os.getpid():
                # A forked child's copy of a lock a thread of the parent held: nobody here will release it.
                turns = self._turns = Turns()
                lock = turns.lock
                lock.acquire()
            elif turns.owner == me:
                raise RuntimeError(
                    f"{type(self).__name__}.{method.__name__}() was called while it was running, from the same "
                    f"thread: a dataset, sampler or collate_fn asked the iterator that is loading it for a batch")
            else:
                lock.acquire()
        turns.owner = threading.get_ident()
        try:
            return method(self, *args, **kwargs)
        finally:
            turns.owner = None
            lock.release()

    return in_turn
