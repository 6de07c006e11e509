"""Where the newest iterator of a loader stands, shared by the loaders, their iterators and the device stage."""

from __future__ import annotations

from typing import Any

__all__ = ["Cursor"]


class Cursor:
    """Where the newest iterator of a loader stands: its epoch, the batches it has served (a batch that
    raised counts: its turn is taken), and whether it has reached its end."""

    __slots__ = ("epoch", "served", "finished", "resume_workers", "position", "staged", "resume", "base_seed", "rng",
                 "drawn")

    def __init__(self, epoch: int, served: int) -> None:
        self.epoch = epoch
        self.served = served
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

    def consumed(self) -> tuple[int, Any]:
        """(batches the user has received, the per-worker position then, None when untracked)."""
        if self.staged:
            return self.staged[0]
        if self.position is not None:
            return self.served, self.position()
        return self.served, self.resume_workers
