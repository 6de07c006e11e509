"""What a resumed epoch needs beyond its position: the randomness its iterator drew from, and the index
batches of a sampler the user passed, counted as they are drawn and drawn again on a resume.

A map-style epoch over a user's sampler draws, in this order (torch's): ``iter(sampler)``, one int64 base
seed from the loader's ``generator`` (else torch's global RNG), then one index batch per ``next()`` of the
sampler, read ahead of the batches served. A sampler that has no state of its own repeats such an epoch only
from the same randomness: the loader notes, before those draws, the state of each generator they come from,
and a resumed iterator makes them again from there (see :func:`redrawing`).
"""

from __future__ import annotations

import base64
import binascii
import collections
import copy
import numbers
import random
import zlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from stoker._workers import is_stateful

__all__ = ["SamplerDraws", "decode_rng", "draws_from_global", "encode_rng", "note_rng", "redraw", "redrawing",
           "sampler_generator", "stateful_sampler"]

# torch's CPU generator state (ATen's CPUGeneratorImpl): a 24-byte header (initial seed, position, next), the
# 624 words of its mt19937 each held in 64 bits, and 40 bytes of normal-sampling cache.
_MT_BYTES, _MT_HEAD, _MT_WORDS = 5056, 24, 624
_MT_TAIL = _MT_HEAD + 8 * _MT_WORDS


# ----------------------------------------------------------------------------------------------------------------
# RNG states as short strings
# ----------------------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 9)).decode("ascii")


def _fresh_seed(raw: bytes) -> int | None:
    """The seed of a CPU generator state that nothing has drawn from since it was seeded, else None."""
    if len(raw) != _MT_BYTES:
        return None
    seed = int.from_bytes(raw[:8], "little")
    fresh = torch.Generator()
    fresh.manual_seed(seed)
    return seed if fresh.get_state().numpy().tobytes() == raw else None


def encode_rng(state: torch.Tensor) -> str:
    """A torch RNG state (``get_rng_state()``/``Generator.get_state()``) as a JSON-able string:
    ``"seed:N"`` (at most 25 characters) for a generator seeded with N and not drawn from since; else its
    mt19937 words packed to their 32 bits, compressed, base64 (about 3.4 KB); any other layout (another
    torch, a device generator) whole, compressed, base64."""
    raw = state.numpy().tobytes()
    seed = _fresh_seed(raw)
    if seed is not None:
        return f"seed:{seed}"
    if len(raw) == _MT_BYTES:
        words = np.frombuffer(raw, dtype=np.uint64, count=_MT_WORDS, offset=_MT_HEAD)
        if not (words >> np.uint64(32)).any():
            return "mt19937:" + _b64(raw[:_MT_HEAD] + words.astype(np.uint32).tobytes() + raw[_MT_TAIL:])
    return "raw:" + _b64(raw)


def decode_rng(text: Any, what: str) -> torch.Tensor:
    """The uint8 tensor :func:`encode_rng` made ``text`` from; ValueError naming ``what`` for anything else."""
    try:
        kind, _, body = text.partition(":")
        if kind == "seed":
            fresh = torch.Generator()
            fresh.manual_seed(int(body))
            return fresh.get_state()
        data = zlib.decompress(base64.b64decode(body.encode("ascii"), validate=True))
        if kind == "mt19937":
            words = np.frombuffer(data, dtype=np.uint32, count=_MT_WORDS, offset=_MT_HEAD)
            data = data[:_MT_HEAD] + words.astype(np.uint64).tobytes() + data[_MT_HEAD + 4 * _MT_WORDS:]
            if len(data) != _MT_BYTES:
                raise ValueError(f"{len(data)} bytes")
        elif kind != "raw":
            raise ValueError(f"unknown kind {kind!r}")
    except (AttributeError, TypeError, ValueError, OverflowError, RuntimeError, binascii.Error, zlib.error) as exc:
        raise ValueError(f"the state's {what} is not an RNG state written by stoker ({exc})") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# What a user's sampler draws from
# ----------------------------------------------------------------------------------------------------------------


def _layers(sampler):
    """The sampler and the one it wraps (a BatchSampler's ``sampler``), if any."""
    inner = getattr(sampler, "sampler", None)
    return (sampler,) if inner is None or inner is sampler else (sampler, inner)


def sampler_generator(sampler) -> torch.Generator | None:
    """The torch.Generator a user's sampler draws from: its ``generator``, or that of the sampler it wraps."""
    for layer in _layers(sampler):
        generator = getattr(layer, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


def sampler_epoch(sampler) -> int | None:
    """The epoch a user's sampler (or the one it wraps) says it serves (``set_epoch``), when it has one."""
    for layer in _layers(sampler):
        epoch = getattr(layer, "epoch", None)
        if isinstance(epoch, numbers.Integral) and not isinstance(epoch, (bool, np.bool_)):
            return int(epoch)  # (a numpy integer too)
    return None


def stateful_sampler(sampler):
    """The sampler (or the one it wraps) that keeps its own position (state_dict/load_state_dict), else None."""
    for layer in _layers(sampler):
        if is_stateful(layer):
            return layer
    return None


def _repeats_itself(sampler) -> bool:
    """Whether a sampler's order is a function of its own settings only (no RNG state of torch's)."""
    from stoker._varlen import _EpochBatchSampler  # (seed, epoch) samplers

    return isinstance(_layers(sampler)[-1], (SequentialSampler, DistributedSampler, _EpochBatchSampler))


def draws_from_global(sampler) -> bool:
    """Whether a user's sampler may draw from torch's global RNG: it has no generator of its own and is not
    one whose order is fixed by its own settings (as RandomSampler without a generator, which seeds itself
    from the global RNG, SubsetRandomSampler, WeightedRandomSampler, or a sampler stoker does not know)."""
    return sampler_generator(sampler) is None and not _repeats_itself(sampler)


# ----------------------------------------------------------------------------------------------------------------
# Redrawing a saved epoch's draws
# ----------------------------------------------------------------------------------------------------------------


def note_rng(sources: dict) -> dict:
    """The current state of each source (rng key -> torch.Generator, or None for torch's global RNG)."""
    return {key: torch.get_rng_state() if g is None else g.get_state() for key, g in sources.items()}


class redrawing:
    """Sets the generators of ``sources`` (rng key -> torch.Generator, or None for torch's global RNG) to the
    states ``rng`` holds for them (key -> uint8 tensor), for the draws a resumed iterator makes again. On exit
    the generators stay where those draws leave them (where the saved run's stood), while torch's global RNG
    goes back to the state it had on entry: the saved run made those draws before its save point, so they
    are no draws of the run that continues it."""

    def __init__(self, sources: dict, rng: dict | None) -> None:
        self.sets = [(sources[key], state) for key, state in (rng or {}).items()]
        self.caller = None

    def __enter__(self) -> redrawing:
        for generator, state in self.sets:
            if generator is None:
                self.caller = torch.get_rng_state()
                torch.set_rng_state(state)
            else:
                generator.set_state(state)
        return self

    def __exit__(self, *exc) -> None:
        if self.caller is not None:
            torch.set_rng_state(self.caller)


class _Raised:
    """A draw of the sampler that raised: its exception, raised again at that batch's turn."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class SamplerDraws:
    """The index batches of a user's sampler, counted as they are drawn, read-ahead included
    (``cursor.drawn``); for a sampler that keeps its own state, with that state after each draw, kept until
    the user has received that batch. A draw that raised counts, and the iteration goes on after it, as
    the sampler allows. Batches redrawn on a resume and not yet served (``kept``) come first."""

    def __init__(self, batches, cursor, stateful=None, first: int = 0, first_state=None, epoch_of=None,
                 first_epoch=None) -> None:
        self._batches = batches
        self._cursor = cursor
        self.stateful = stateful  # the sampler that keeps its own state, or None
        self.kept: collections.deque = collections.deque()
        cursor.drawn = first
        # (batches drawn, the sampler's state then), oldest first
        # (batches drawn, the sampler's state then, the epoch it said it served then), oldest first
        self._epoch_of = epoch_of or (lambda: None)
        self._states = collections.deque([(first, first_state, first_epoch)]) if stateful is not None else None

    def __iter__(self):
        return self

    def __next__(self):
        if self.kept:
            item = self.kept.popleft()
            if type(item) is _Raised:
                raise item.exc
            return item
        try:
            batch = next(self._batches)
        except StopIteration:
            raise
        except Exception:
            self._count()
            raise
        self._count()
        return batch

    def _count(self) -> None:
        cursor = self._cursor
        cursor.drawn += 1
        states = self._states
        if states is not None:
            states.append((cursor.drawn, copy.deepcopy(self.stateful.state_dict()), self._epoch_of()))
            while len(states) > 1 and states[1][0] <= cursor.served:  # the user is past the older ones
                states.popleft()

    def state_at(self, served: int):
        """The sampler's own state after the first ``served`` batches were drawn (before any: as it was before
        its iter())."""
        return self._kept(served)[1]

    def epoch_at(self, served: int):
        """The epoch the sampler said it served (``set_epoch``) with that state, or None."""
        return self._kept(served)[2]

    def _kept(self, served: int) -> tuple:
        return next((entry for entry in self._states if entry[0] == served), (served, None, None))


def starts_a_pass(stateful, sampler, state, keep_end: bool) -> bool:
    """Whether a sampler that keeps its own state (``stateful``, ``sampler`` or the one it wraps), loaded with
    ``state``, has a batch to give: one draw from a new iterator of ``sampler`` tells. (An IterableDataset
    with its own state is looked at alike, as its own ``stateful``: see IterableSource.begin.) A draw that gives one is
    undone: ``state`` loaded again, the random generators it may draw from (torch's, random's, numpy's, the
    sampler's) put back. False when the draw ends the pass; what the sampler did then (it may rewind itself)
    is kept, and so are its generators' draws with ``keep_end`` (a draw the saved run makes too)."""
    generator = sampler_generator(sampler)
    rngs = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
            generator.get_state() if generator is not None else None)

    def put_back() -> None:
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        if generator is not None:
            generator.set_state(rngs[3])

    try:
        next(iter(sampler))
    except StopIteration:
        if not keep_end:
            put_back()
        return False
    except Exception:  # noqa: BLE001 - its error belongs to a draw made only to look: it is made again
        pass
    put_back()
    stateful.load_state_dict(copy.deepcopy(state))
    return True


def redraw(draws: SamplerDraws, drawn: int, served: int) -> None:
    """Draws ``drawn`` index batches again (a saved iterator's draws, read-ahead included) without loading
    them; those beyond the first ``served`` are kept to be served first, a draw that raised as its error."""
    kept = []
    for number in range(drawn):
        try:
            batch = next(draws)
        except StopIteration:
            break
        except Exception as exc:  # the draw raised in the saved run too; its batch's turn is still to come
            batch = _Raised(exc)
        if number >= served:
            kept.append(batch)
    draws.kept.extend(kept)
