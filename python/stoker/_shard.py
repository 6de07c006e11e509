"""Which shard of an epoch this process serves: the rank/world_size arguments, else torch.distributed."""

from __future__ import annotations

import torch

__all__ = ["SEED_MASK", "check_count", "is_seed", "resolve_shard"]

SEED_MASK = 0xFFFFFFFFFFFFFFFF


def check_count(name: str, value, minimum: int, optional: bool = True) -> None:
    """Raises ValueError unless ``value`` is an int (not bool) >= ``minimum``, or None when ``optional``."""
    if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                or value < minimum):
        raise ValueError(f"{name} should be an integer >= {minimum}, but got {name}={value!r}")


def is_seed(value) -> bool:
    """Whether ``value`` is a seed: an int (not bool) in [0, 2**64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MASK


def resolve_shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given values, the missing ones from an initialised process group, else (0, 1).

    A world size above 1 without a rank (or a rank above 0 without a world size) and no process group to
    fill it in raises ValueError, as does a rank outside [0, world_size). world_size=1 alone means the whole
    epoch on every rank (rank 0 of one), process group or not."""
    if world_size == 1 and rank is None:
        rank = 0
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size() if world_size is None else world_size
            rank = dist.get_rank() if rank is None else rank
        elif world_size is not None and world_size > 1:
            raise ValueError(f"world_size={world_size} needs rank= too (torch.distributed is not initialised)")
        elif rank is not None and rank > 0:
            raise ValueError(f"rank={rank} needs world_size= too (torch.distributed is not initialised)")
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank {rank}, rank should be in the interval [0, {world_size - 1}]")
    return rank, world_size
