"""Where the newest iterator of a loader stands, shared by the loaders, their iterators and the device stage."""

from __future__ import annotations

from typing import Any

__all__ = ["Cursor"]


class Cursor:
    """Where the newest iterator of a loader stands: its epoch, the batches it has served (a batch that
    raised counts: its turn is taken), and whether it has reached its end.

    `served` is the number of the first batch not yet served: every one before it was. Workers with
    ``in_order=False`` serve batches as they are ready, so some beyond it may have been served too:
    their numbers are `ahead`, and an iterator resuming the epoch passes over them."""

    __slots__ = ("epoch", "served", "ahead", "finished", "resume_workers", "position", "staged", "resume",
                 "base_seed", "rng", "drawn", "sampler_start", "sampler_epoch")

    def __init__(self, epoch: int, served: int, ahead=()) -> None:
        self.epoch = epoch
        self.served = served
        self.ahead = set(ahead)
        self.finished = False
        # IterableDataset: the saved per-worker position this epoch resumes from, and a callable the iterator
        # sets that tells the position as the user has consumed it.
        self.resume_workers = None
        self.position = None
        # device=: the position (served, per-worker position) before each batch staged on the device but not
        # yet received, oldest first. The user's position is the oldest of them (see _device).
        self.staged = None
        # stoker.DataLoader: the loaded state this iterator continues when its epoch had started there (else
        # None); the base seed the epoch's iterator drew; the RNG states (key -> uint8 tensor) its draws
        # started from; the index batches drawn from a sampler the user passed (read-ahead included).
        self.resume = None
        self.base_seed = None
        self.rng = None
        self.drawn = None
        # The own state of a sampler you passed that an epoch starts from: one saved between epochs, else None.
        self.sampler_start = None
        # The epoch a sampler you passed said it served (set_epoch) when the epoch's draws began, else None.
        self.sampler_epoch = None

    def count(self, number: int | None = None) -> None:
        """Marks batch `number` served; None means the first not yet served (an iterator serving in order)."""
        if number is None or number == self.served:
            self.served += 1
            while self.ahead and self.served in self.ahead:
                self.ahead.discard(self.served)
                self.served += 1
        elif number > self.served:
            self.ahead.add(number)

    def now(self) -> tuple[int, Any, list]:
        """(served, the per-worker position now, None when untracked, the batches served ahead, sorted)."""
        position = self.position() if self.position is not None else self.resume_workers
        return self.served, position, sorted(self.ahead)

    def consumed(self) -> tuple[int, Any, list]:
        """:meth:`now` as the user stands: before the oldest batch staged on the device and not yet received."""
        if self.staged:
            return self.staged[0]
        return self.now()
