"""stoker.DataLoader: torch's DataLoader, same arguments and batches, with stoker's engine underneath."""

from __future__ import annotations

import copy
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import DistributedSampler
from torch.utils.data._utils import collate as _tc
from torch.utils.data.dataloader import _DatasetKind

from stoker import _collate, _cuda, _device, _resume
from stoker._arrays import array_plan, is_array_dataset
from stoker._cursor import Cursor as _Cursor
from stoker._iterators import ArrayIterator, IterableIterator, PersistentIterator, ProcessIterator, PythonIterator
from stoker._native import core
from stoker._shard import SEED_MASK, check_count, is_seed, resolve_shard
from stoker._workers import is_stateful

__all__ = ["DataLoader"]

STATE_FORMAT = "stoker.DataLoader/2"
_FORMAT_1 = "stoker.DataLoader/1"  # before states held the epoch's draws and own states: still loaded

# What state_dict() holds of the stream's position, besides the settings it checks (see state_dict).
_PROGRESS = ("epoch", "batches_served", "served_ahead", "base_seed", "rng", "sampler_epoch", "sampler_drawn",
             "sampler_state", "dataset_state", "workers", "next_worker")
_PROGRESS_ADDED = {"served_ahead": None, "sampler_epoch": None}  # keys states of this format lacked at first
_ITERABLE_PROGRESS = ("epoch", "batches_served", "base_seed", "rng", "workers", "next_worker")
_PROGRESS_DEFAULTS = {**_PROGRESS_ADDED, "base_seed": None, "rng": None, "sampler_drawn": None,
                      "sampler_state": None, "dataset_state": None, "workers": None, "next_worker": 0}
_RNG_NAMES = {"loader_generator": "the loader's generator=", "sampler_generator": "the sampler's generator",
              "torch": "torch's global RNG"}


def _rng_names(keys) -> str:
    return ", ".join(_RNG_NAMES.get(k, repr(k)) for k in sorted(keys)) or "no generator"


def _encode_rng(states: dict | None) -> dict | None:
    """RNG states (key -> uint8 tensor) as the state's strings, or None when there are none."""
    if not states:
        return None
    return {key: _resume.encode_rng(state) for key, state in states.items()}


# A loader with persistent workers -> its one iterator (both weakly held: in the loader's own attributes the
# reference would not pickle, nor let the loader end its workers once dropped).
_persistent_iterators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_persistent_lock = threading.Lock()


def _new_persistent_lock() -> None:  # a forked child's copy may be held by a thread that is not there
    global _persistent_lock
    _persistent_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_persistent_lock)


class DataLoader(_TorchDataLoader):
    """A drop-in for :class:`torch.utils.data.DataLoader`: the same signature, checks, attributes, ``len``
    and batches, and a subclass of it, so code that checks ``isinstance`` or rebuilds loaders from their
    attributes (Lightning, Accelerate) accepts it.

    What changes is underneath:

    * Array datasets (``TensorDataset``, a numpy array or CPU tensor, ``np.memmap``,
      :class:`stoker.ArrayDataset`) are gathered by native threads, without the GIL, into reusable buffers
      that torch receives zero-copy. A buffer is reused only after every tensor viewing it is freed, so a
      batch you keep is never overwritten.
    * Other map-style datasets are read with ``__getitems__``/``__getitem__`` and ``default_collate`` stacks
      into pooled buffers; with ``num_workers > 0`` worker processes load batches ahead and hand them over
      through one shared-memory ring, without a copy (``worker_mode="thread"`` uses threads instead).
    * Shuffling is native and counter-based: the order of an epoch is a pure function of (seed, epoch), the
      same for any ``num_workers``. It is not the order torch's ``RandomSampler`` draws. Without ``seed``,
      each iterator draws its seed from ``generator`` (or torch's global RNG), so ``torch.manual_seed``
      makes runs reproducible. A ``sampler`` or ``batch_sampler`` you pass is followed exactly.
    * An ``IterableDataset`` is iterated in the main process (``num_workers=0``) or by each worker process,
      each over its own copy, with batches formed in the worker and interleaved round-robin, as with torch.

    * :meth:`state_dict` / :meth:`load_state_dict` resume mid-epoch exactly, at no cost in the position.
    * Under ``torch.distributed`` (or with ``rank=``/``world_size=``) each rank serves its own shard, as with
      torch's ``DistributedSampler``.

    Extra keyword-only arguments:
        seed: fixes the shuffle seed; epoch ``e`` is then always the same permutation, and each new iterator
            moves to the next epoch (or the one :meth:`set_epoch` names). Without it the seed is drawn once,
            at the first iterator, from ``generator`` or torch's global RNG; when sharded it is 0, as
            ``DistributedSampler``'s, so that every rank shuffles alike.
        worker_mode: ``"auto"`` (the default) loads a Python dataset with ``num_workers > 0`` in worker
            processes, as torch does (``worker_init_fn`` and ``get_worker_info()`` run in them), and array
            datasets on native threads; ``"thread"`` uses ``num_workers`` threads for everything;
            ``"process"`` uses processes for every dataset that is not served by the native array path.
        device: ``"cuda"`` / ``"cuda:N"`` / a ``torch.device``: batches arrive on that GPU. They are collated
            into page-locked buffers and copied on a stream of stoker's own, ``device_prefetch`` batches ahead
            of use; your current stream waits for a batch's copy when you receive it (no synchronisation of
            the device), and its memory is kept from reuse until your work on it has run. Members that are not
            tensors stay on the CPU. ``state_dict()`` counts only the batches you have received. Raises
            ``RuntimeError`` saying why where CUDA is not usable; ``None`` or ``"cpu"``: CPU batches.
        device_prefetch: how many batches are copied ahead of the one you hold (default 2).
        device_transform: a callable applied to each batch on the device, on stoker's stream, after its copy
            (for example :class:`stoker.Normalize`, which turns uint8 images into normalised floats there,
            so they cross PCIe as bytes). Needs ``device``.
        sample_seeds: seeds ``random``, numpy and torch before each sample of a Python dataset from (shuffle
            seed, epoch, index), so random augmentations give the same batches whatever ``num_workers`` and
            after a resume (beyond torch). Python datasets only, in processes or with ``num_workers=0``.
        rank, world_size: the shard this process serves. By default they come from ``torch.distributed``
            when a process group is initialised; ``world_size=1`` turns sharding off. Rank ``r`` of ``W``
            serves the positions ``r, r+W, r+2W...`` of the epoch's order, padded by repeating its start
            to a multiple of ``W`` (cut to one below ``len(dataset)`` with ``drop_last``), exactly the
            samples ``DistributedSampler`` assigns. A ``sampler`` or ``batch_sampler`` you pass is not
            sharded further: it decides what this process sees.
    """

    def __init__(
        self,
        dataset,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler=None,
        batch_sampler=None,
        num_workers: int = 0,
        collate_fn=None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn=None,
        multiprocessing_context=None,
        generator=None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        worker_mode: str = "auto",
        sample_seeds: bool = False,
        device=None,
        device_prefetch: int = 2,
        device_transform=None,
    ) -> None:
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory,
            drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device, in_order=in_order,
        )
        if seed is not None and not is_seed(seed):
            raise ValueError(f"seed should be an integer in [0, 2**64), but got seed={seed!r}")
        if worker_mode not in ("auto", "thread", "process"):
            raise ValueError(f"worker_mode should be 'auto', 'thread' or 'process', but got worker_mode={worker_mode!r}")
        self.worker_mode = worker_mode
        self.sample_seeds = bool(sample_seeds)
        check_count("world_size", world_size, 1)
        check_count("rank", rank, 0)
        if rank is not None and world_size is not None and rank >= world_size:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval [0, {world_size - 1}]")
        check_count("device_prefetch", device_prefetch, 1)
        if device_transform is not None and not callable(device_transform):
            raise TypeError(f"device_transform should be a callable, but got {type(device_transform).__name__}")
        if device_transform is not None and device is None:
            raise ValueError("device_transform runs on the device batches are copied to: give device= as well")
        self._stoker_device = _cuda.resolve_device(device)  # None: batches stay on the CPU
        self.device = device
        self.device_prefetch = device_prefetch
        self.device_transform = device_transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        map_style = self._dataset_kind == _DatasetKind.Map
        self._stoker_native_sampler = map_style and sampler is None and batch_sampler is None
        self._stoker_shuffle = map_style and bool(shuffle)
        self._stoker_epoch = 0
        self._stoker_seed: int | None = None  # the shuffle seed once drawn (or loaded)
        self._stoker_cursor: _Cursor | None = None
        self._stoker_resume: dict | None = None  # a loaded state the next iterator continues (its position)
        # The sampler or batch_sampler you passed (None: stoker's own, or an iterable dataset).
        self._stoker_sampler_given = None
        if map_style and not self._stoker_native_sampler:
            self._stoker_sampler_given = batch_sampler if batch_sampler is not None else sampler
        if (rank is not None or world_size is not None) and not self._stoker_native_sampler:
            given = sampler if sampler is not None else getattr(batch_sampler, "sampler", None)
            if not isinstance(given, DistributedSampler):
                warnings.warn(
                    "rank= and world_size= shard only stoker's own sampler; with the sampler, batch_sampler or "
                    "iterable dataset given, that decides which samples this process sees", stacklevel=2)

    # ----------------------------------------------------------------------------------------------------------
    # Sharding
    # ----------------------------------------------------------------------------------------------------------

    def _stoker_shard(self) -> tuple[int, int]:
        """(rank, world_size) this loader's own sampler serves: the arguments, else torch.distributed."""
        if not self._stoker_native_sampler:
            return 0, 1
        return resolve_shard(self.rank, self.world_size)

    def _stoker_num_batches(self) -> int:
        """Batches per epoch of this loader's own sampler on this rank."""
        _, world = self._stoker_shard()
        samples = core.IndexStream.shard_size_for(len(self.dataset), world, bool(self.drop_last))
        if not self._auto_collation:
            return samples
        bs = self.batch_size
        return samples // bs if self.drop_last else -(-samples // bs)

    def __len__(self) -> int:
        if self._stoker_native_sampler:
            return self._stoker_num_batches()
        return super().__len__()

    # ----------------------------------------------------------------------------------------------------------
    # Epochs, seeds and the resumable position
    # ----------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iterator serve epoch ``epoch`` (its shuffle order is a function of seed and epoch).

        After :meth:`load_state_dict`, naming the loaded epoch keeps its position; naming another starts it
        from its first batch."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch should be a non-negative integer, but got epoch={epoch}")
        self._stoker_epoch = epoch
        self._stoker_cursor = None

    def _stoker_begin(self) -> _Cursor:
        """The cursor of a new iterator: the epoch it serves, the batch it starts from, and what a loaded
        state holds for it when it continues that state's epoch. The loader moves on to it only once the
        iterator has made its draws (:meth:`_stoker_started`): an iterator that fails to leaves it as it was."""
        epoch = self._stoker_epoch
        resume = self._stoker_resume
        if resume is not None and resume["epoch"] != epoch:
            resume = None
        cursor = _Cursor(epoch, 0) if resume is None else _Cursor(epoch, resume["batches_served"],
                                                                  resume["served_ahead"] or ())
        if resume is not None:
            if resume["workers"] is not None:
                cursor.resume_workers = {"workers": resume["workers"], "next_worker": resume["next_worker"]}
            if resume["base_seed"] is not None:  # the saved epoch's iterator had made its draws
                cursor.resume = {**resume, "rng": resume["rng_states"]}
            else:  # saved between epochs: a sampler you passed that keeps its own state starts from it
                cursor.sampler_start = resume["sampler_state"]
        return cursor

    def _stoker_started(self, cursor: _Cursor) -> None:
        """The newest iterator is under way at ``cursor``: the next one serves the following epoch."""
        self._stoker_epoch = cursor.epoch + 1
        self._stoker_resume = None
        self._stoker_cursor = cursor

    def _stoker_shuffle_seed(self, drawn: int, world_size: int) -> int:
        """The shuffle seed: ``seed=``, else one drawn once per loader (0 when sharded, on every rank)."""
        if self.seed is not None:
            return self.seed
        if self._stoker_seed is None:
            self._stoker_seed = 0 if world_size > 1 else drawn & SEED_MASK
        return self._stoker_seed

    # ----------------------------------------------------------------------------------------------------------
    # What an epoch draws from, and the states of a sampler and dataset that keep their own
    # ----------------------------------------------------------------------------------------------------------

    def _stoker_stateful_sampler(self):
        """The sampler you passed (or the one your batch_sampler wraps) when it has state_dict/load_state_dict."""
        given = self._stoker_sampler_given
        return None if given is None else _resume.stateful_sampler(given)

    def _stoker_replays_sampler(self) -> bool:
        """Whether a resume draws a sampler you passed again (it keeps no state of its own)."""
        return self._stoker_sampler_given is not None and self._stoker_stateful_sampler() is None

    def _stoker_rng_sources(self, started: bool) -> dict:
        """What this loader's epochs draw from and a state records, by key: ``generator=``
        ("loader_generator"), the generator of a sampler you passed when it is another ("sampler_generator"),
        and, for an epoch under way (``started``), torch's global RNG ("torch", value None) when that sampler
        has no generator and may draw from it. A sampler that keeps its own state records its randomness
        itself; torch's global RNG between epochs is yours (see :meth:`state_dict`)."""
        sources: dict[str, Any] = {}
        if isinstance(self.generator, torch.Generator):
            sources["loader_generator"] = self.generator
        if self._stoker_replays_sampler():
            given = self._stoker_sampler_given
            generator = _resume.sampler_generator(given)
            if generator is None:
                if started and _resume.draws_from_global(given):
                    sources["torch"] = None
            elif generator is not self.generator:
                sources["sampler_generator"] = generator
        return sources

    def _stoker_sampler_state(self):
        """The own state of a sampler you passed that keeps one, as it stands (between epochs), else None."""
        stateful = self._stoker_stateful_sampler()
        return copy.deepcopy(stateful.state_dict()) if stateful is not None else None

    def _stoker_dataset_state(self):
        """The dataset's own state (torchdata's Stateful protocol), or None when it keeps none."""
        return copy.deepcopy(self.dataset.state_dict()) if is_stateful(self.dataset) else None

    def _stoker_progress(self) -> dict[str, Any]:
        """Where the stream stands as the user consumed it, and what its epoch holds beyond the count: the
        newest iterator's while it is under way, else those of a loaded state not yet continued, else the
        start of the next epoch (nothing drawn yet; the generators as they stand)."""
        cursor = self._stoker_cursor
        if cursor is not None and not cursor.finished:
            served, position, ahead = cursor.consumed()
            position = position or {}
            return {"epoch": cursor.epoch, "batches_served": served, "served_ahead": ahead or None,
                    "base_seed": cursor.base_seed,
                    "rng": _encode_rng(cursor.rng),
                    "sampler_epoch": position.get("sampler_epoch", cursor.sampler_epoch),
                    "sampler_drawn": cursor.drawn if self._stoker_replays_sampler() else None,
                    "sampler_state": position.get("sampler_state"),
                    "dataset_state": position.get("dataset_state"),
                    "workers": position.get("workers"), "next_worker": position.get("next_worker", 0)}
        resume = self._stoker_resume
        if resume is not None and resume["epoch"] == self._stoker_epoch:
            return {key: resume[key] for key in _PROGRESS}
        return {"epoch": self._stoker_epoch, "batches_served": 0, "served_ahead": None, "base_seed": None,
                "rng": _encode_rng(_resume.note_rng(self._stoker_rng_sources(started=False))),
                "sampler_epoch": None, "sampler_drawn": None, "sampler_state": self._stoker_sampler_state(),
                "dataset_state": self._stoker_dataset_state(), "workers": self._stoker_kept_workers(),
                "next_worker": 0}

    def _stoker_kept_workers(self) -> list | None:
        """Between epochs, the states the next epoch's dataset copies go on from, for a stateful dataset:
        persistent worker processes' copies as the last epoch left them; an IterableDataset iterated in the main
        process, its state as it stands. (Other worker processes start from the dataset.)"""
        if not is_stateful(self.dataset):
            return None
        if self._dataset_kind != _DatasetKind.Map and self.num_workers == 0:
            return [{"batches": 0, "ended": False, "state": copy.deepcopy(self.dataset.state_dict())}]
        pool, epoch = getattr(self, "_stoker_pool", None), getattr(self, "_stoker_pool_epoch", None)
        if pool is None or epoch is None or pool._closed or not epoch.tracked:
            return None
        position = epoch.position_dict(True)
        return [{"batches": 0, "ended": False, "state": w["state"]} for w in position["workers"]]

    # ----------------------------------------------------------------------------------------------------------
    # state_dict / load_state_dict
    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands, as a small dict of plain values (``torch.save`` and ``json`` store it).

        It describes the newest iterator: the epoch it serves and the batches it has yielded (one that
        raised counts). A finished iterator, or none yet, stands at the start of the next epoch. Load it
        into a loader built the same way (:meth:`load_state_dict`) and its next iterator continues exactly
        there, and every later epoch is the one this loader would have served; ``num_workers`` may differ.

        ``batches_served`` is the number of batches of the epoch before the first not yet received; with workers
        and ``in_order=False`` batches after it may have been received too: ``served_ahead`` lists them
        (sorted; None when there are none) and a resumed epoch passes over them.

        Beyond the position it holds what the epoch's iterator drew (``base_seed``, the seed torch draws per
        iterator for the workers' seeds) and the states of whatever keeps its own:

        * ``rng``: for the generators this loader's epochs draw from (``generator=`` as "loader_generator";
          the ``generator`` of a sampler you passed, or of the sampler your ``BatchSampler`` wraps, as
          "sampler_generator"; and, mid-epoch, torch's global RNG as "torch" when that sampler has no
          generator of its own and may draw from it, as ``RandomSampler`` without one does), their states
          when the epoch's draws began (between epochs, as they stand). Each is a string: ``"seed:N"`` for a
          generator not drawn from since it was seeded, else about 3.4 KB. None when nothing is drawn from.
        * ``sampler_epoch``: mid-epoch, the epoch a sampler you passed said it served (its ``epoch``, set by
          ``set_epoch``: ``DistributedSampler``, stoker's bucketing samplers) when the epoch's draws began (one
          that keeps its own state: with that state); the resumed iterator raises ``ValueError`` unless the
          loader's sampler says the same, its own state loaded (call its ``set_epoch`` first, as the saved run
          did).
        * ``sampler_drawn``: the index batches drawn from a sampler you passed by then (read-ahead included).
        * ``sampler_state``: a sampler that has ``state_dict()``/``load_state_dict()`` (torchdata's
          ``StatefulDistributedSampler`` style): its state after the batches served (the batches it gave
          beyond, read ahead, are not in it); before the first, and between epochs, as it stood before the
          epoch's ``iter()``. A resume tells apart a sampler that rewinds itself as a pass ends from one that
          keeps its end position until its next ``iter()`` by one draw, undone.
        * ``dataset_state``: a map-style dataset with ``state_dict()``/``load_state_dict()`` (torchdata's
          Stateful protocol): its state now (in the main process; with ``num_workers=0`` after the batches
          you received, with worker threads, which share it, loads read ahead included). With worker
          processes, ``workers`` holds each worker's copy's state after the last batch you received from it
          (before its first, the state it started the epoch with).

        For an ``IterableDataset`` it holds each worker's position: the batches the user received from it
        and, when the dataset has ``state_dict()``/``load_state_dict()``, its copy's state after the last of
        them (a worker with no batch received yet reports the state its pass started from; this call waits
        for that report). Such a state resumes with the same ``num_workers`` (any at an epoch's start). Between
        epochs it holds what the next epoch's copies go on from: the dataset's state with ``num_workers=0``, each
        copy's as its pass ended with persistent workers (other workers start each epoch from the dataset).
        """
        progress = self._stoker_progress()
        if self._dataset_kind != _DatasetKind.Map:
            return {"format": STATE_FORMAT, "dataset": "iterable", "batch_size": self.batch_size,
                    "drop_last": bool(self.drop_last), "num_workers": int(self.num_workers),
                    **{key: progress[key] for key in _ITERABLE_PROGRESS}}
        seed = self.seed if self.seed is not None else self._stoker_seed
        return {"format": STATE_FORMAT, **self._stoker_settings(), "seed": seed, **progress}

    def _stoker_settings(self) -> dict[str, Any]:
        """What a map-style state is checked against when loaded: the loader's setup."""
        rank, world = self._stoker_shard()
        return {
            "dataset_len": len(self.dataset),
            "batch_size": self.batch_size,
            "drop_last": bool(self.drop_last),
            "shuffle": self._stoker_shuffle if self._stoker_native_sampler else None,
            "sampler": "native" if self._stoker_native_sampler else "user",
            "rank": rank,
            "world_size": world,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state`` (see :meth:`state_dict`): the next iterator serves the rest of its epoch.

        With stoker's own sampler this costs nothing whatever the position: any batch of any epoch is
        computed directly. A sampler you passed that has ``state_dict()``/``load_state_dict()`` is loaded with
        its saved state at the next ``iter()`` and goes on from there. Any other sampler you passed is drawn
        again at the next ``iter()`` (the batches it gave before the save point are dropped, their samples
        not loaded), from the RNG states its epoch started from, so that its order is the saved run's.

        The rule for randomness: a resumed epoch makes none of the draws the saved run had made before its
        save point. Its iterator redraws them from the recorded states and then leaves each generator it
        drew from (``generator=``, the sampler's ``generator``) where the saved run's stood at the save point,
        so its later draws and later epochs are the uninterrupted run's; torch's global RNG is put back as
        it was at ``iter()``: the saved run had drawn from it already, and it is also the RNG of your own
        training code. Restore it yourself from a checkpoint taken with the loader's state (save
        ``torch.get_rng_state()`` beside ``loader.state_dict()``, ``torch.set_rng_state`` on resume) and it
        stands exactly where the uninterrupted run's stood, so a sampler that seeds each epoch from it
        (``RandomSampler`` without a generator) gives the later epochs of the uninterrupted run too. Without
        that, the rest of the saved epoch is still exact once its order was drawn by the save point (after
        its first batch always; with ``num_workers=0`` the sampler is first drawn at the first batch), and
        later epochs of such a sampler follow whatever the global RNG holds. A generator the loader or sampler draws from is taken to be theirs alone.
        A state saved between epochs sets the generators to their saved states here, at loading (your own
        reseeding before the next epoch still wins).

        A dataset's own state (``dataset_state``) is loaded into it here. Per-worker states (``workers``)
        are loaded into the worker processes' copies and need the same number of worker processes.

        States of format ``stoker.DataLoader/1`` still load (they resume as they did: a sampler you passed
        is drawn again from where its RNG stands). Raises ``ValueError`` when the state comes from a
        different dataset length, batching, shuffle, shard, seed, generators or worker setup."""
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        if not isinstance(state, Mapping) or found not in (STATE_FORMAT, _FORMAT_1):
            raise ValueError(f"load_state_dict expects a state from stoker.DataLoader.state_dict() "
                             f"(format {STATE_FORMAT!r}); got {found!r}")
        iterable = self._dataset_kind != _DatasetKind.Map
        if (state.get("dataset") == "iterable") != iterable:
            raise ValueError(f"the state was saved by a loader over {'an iterable' if not iterable else 'a map-style'} "
                             f"dataset; this loader's dataset is {'iterable' if iterable else 'map-style'}")
        current = found == STATE_FORMAT
        if not current:  # saved before states held the epoch's draws and own states: it resumes as it did then
            state = {**_PROGRESS_DEFAULTS, **state}
        elif not iterable:
            state = {**_PROGRESS_ADDED, **state}  # (saved before states held them)
        if iterable:
            self._stoker_load_iterable_state(state, current)
            return
        missing = {"dataset_len", "batch_size", "drop_last", "shuffle", "sampler", "rank", "world_size", "seed",
                   *_PROGRESS} - set(state)
        if missing:
            raise ValueError(f"the state lacks {sorted(missing)}")
        mine = self._stoker_settings()
        for key, what in (("dataset_len", "a dataset of {} samples"), ("sampler", "the {} sampler"),
                          ("batch_size", "batch_size={}"), ("drop_last", "drop_last={}"),
                          ("shuffle", "shuffle={}"), ("world_size", "world_size={}"), ("rank", "rank={}")):
            if state[key] != mine[key]:
                raise ValueError(
                    f"the state was saved by a loader with {what.format(state[key])}; this one has "
                    f"{what.format(mine[key])} ({key} differs), so its batches would not continue that run")
        seed = state["seed"]
        if seed is not None and not is_seed(seed):
            raise ValueError(f"the state's seed must be an integer in [0, 2**64) or None, got {seed!r}")
        if self.seed is not None and seed is not None and seed != self.seed:
            raise ValueError(f"the state was saved with seed={seed}; this loader was built with seed={self.seed}")
        epoch, served = state["epoch"], state["batches_served"]
        check_count("the state's epoch", epoch, 0, optional=False)
        check_count("the state's batches_served", served, 0, optional=False)
        if self._stoker_native_sampler:
            batches: int | None = self._stoker_num_batches()
        else:
            try:
                batches = len(self._index_sampler)
            except TypeError:  # a sampler without a length: nothing to check against
                batches = None
        if batches is not None and served > batches:
            raise ValueError(f"the state has served {served} batches of an epoch of {batches}")
        ahead = state["served_ahead"]
        if ahead is not None:
            if not (isinstance(ahead, list) and ahead and all(type(b) is int for b in ahead)
                    and ahead == sorted(set(ahead)) and ahead[0] > served
                    and (batches is None or ahead[-1] < batches)):
                raise ValueError(f"the state's served_ahead must be None or a sorted list of distinct batch numbers "
                                 f"after batches_served={served} and before the epoch's end ({batches}); got "
                                 f"{ahead!r}")
        rng_states = self._stoker_check_draws(state, current)
        drawn = state["sampler_drawn"]
        if drawn is not None:
            check_count("the state's sampler_drawn", drawn, 0)
            if drawn < served or batches is not None and drawn > batches:
                raise ValueError(f"the state's sampler_drawn={drawn} should lie between the batches served "
                                 f"({served}) and the epoch's {batches}")
        sampler_epoch = state["sampler_epoch"]
        if sampler_epoch is not None and (isinstance(sampler_epoch, bool) or not isinstance(sampler_epoch, int)):
            raise ValueError(f"the state's sampler_epoch must be None or an integer, got {sampler_epoch!r}")
        if state["sampler_state"] is not None and self._stoker_stateful_sampler() is None:
            raise ValueError("the state holds the own state of the sampler it was saved with (sampler_state); this "
                             "loader's sampler has no state_dict()/load_state_dict() to load it into")
        if state["dataset_state"] is not None and not is_stateful(self.dataset):
            raise ValueError("the state holds the dataset's own state (dataset_state); this loader's dataset has no "
                             "state_dict()/load_state_dict() to load it into")
        workers = self._stoker_check_workers(state)
        if state["dataset_state"] is not None:
            self.dataset.load_state_dict(copy.deepcopy(state["dataset_state"]))
        if self.seed is None:
            self._stoker_seed = seed  # None: the saved loader had not drawn one yet, nor will this one have
        self._stoker_accept(state, rng_states, workers)

    def _stoker_check_draws(self, state: Mapping[str, Any], current: bool) -> dict:
        """Checks the state's base_seed and rng against this loader; returns the RNG states (key -> uint8
        tensor) decoded. A current state must record exactly the generators this loader draws from."""
        base_seed, rng = state["base_seed"], state["rng"]
        if base_seed is not None and not is_seed(base_seed):
            raise ValueError(f"the state's base_seed must be an integer in [0, 2**64) or None, got {base_seed!r}")
        if rng is not None and not (isinstance(rng, Mapping) and rng and all(
                isinstance(k, str) and isinstance(v, str) for k, v in rng.items())):
            raise ValueError(f"the state's rng must be None or a non-empty dict of strings, got {rng!r}")
        sources = self._stoker_rng_sources(started=base_seed is not None)
        saved = dict(rng or {})
        if not set(saved) <= set(sources) or current and set(saved) != set(sources):
            raise ValueError(
                f"the state holds the RNG states of {_rng_names(saved)}; this loader's epochs draw from "
                f"{_rng_names(sources)} (its generator= or its sampler's generator differs), so its batches "
                "would not continue that run")
        states = {}
        for key, text in saved.items():
            decoded = _resume.decode_rng(text, f"rng[{key!r}]")
            target = sources[key]
            size = (torch.get_rng_state() if target is None else target.get_state()).numel()
            if decoded.numel() != size:
                raise ValueError(f"the state's rng[{key!r}] holds an RNG state of {decoded.numel()} bytes; "
                                 f"{_RNG_NAMES[key]} of this loader has one of {size}")
            states[key] = decoded
        return states

    def _stoker_check_workers(self, state: Mapping[str, Any]) -> list | None:
        """Checks the state's per-worker positions (worker processes, each with its own dataset copy) against
        this loader's workers; returns them as a list of plain dicts, or None."""
        workers = state["workers"]
        if workers is None:
            return None
        nw = int(self.num_workers)
        processes = self._stoker_iterator_kind()[0] == "process"
        if not isinstance(workers, list) or not workers:
            raise ValueError("the state's workers must be None or a list with one {batches, ended, state} entry "
                             "per worker")
        if not processes or len(workers) != nw:
            setup = (f"num_workers={nw}" if processes else
                     "loads in the main process" if nw == 0 else f"loads with {nw} worker threads")
            raise ValueError(
                f"the state was saved by a loader with {len(workers)} worker process(es), each over its own copy of "
                f"the dataset; this loader {setup}. An epoch resumes per-worker positions only with the same "
                "number of worker processes (or at the start of an epoch)")
        if not all(isinstance(w, Mapping) and {"batches", "ended", "state"} <= set(w) for w in workers):
            raise ValueError("the state's workers must be a list with one {batches, ended, state} entry per worker")
        for w in workers:
            check_count("a worker's batches", w["batches"], 0)
        check_count("the state's next_worker", state["next_worker"], 0)
        if state["next_worker"] >= len(workers):
            raise ValueError(f"the state's next_worker={state['next_worker']} names no worker of {len(workers)}")
        return [dict(w) for w in workers]

    def _stoker_accept(self, state: Mapping[str, Any], rng_states: dict, workers: list | None) -> None:
        """Makes a checked state the one the next iterator continues (when it serves the state's epoch). A
        state saved between epochs sets the generators now."""
        resume = {key: state.get(key, _PROGRESS_DEFAULTS.get(key)) for key in _PROGRESS}
        resume["workers"] = workers
        resume["rng_states"] = rng_states
        if state["base_seed"] is None:
            sources = self._stoker_rng_sources(started=False)
            for key, rng in rng_states.items():
                sources[key].set_state(rng)
        self._stoker_epoch = state["epoch"]
        self._stoker_resume = resume
        self._stoker_cursor = None

    def _stoker_load_iterable_state(self, state: Mapping[str, Any], current: bool) -> None:
        missing = {"batch_size", "drop_last", "num_workers", *_ITERABLE_PROGRESS} - set(state)
        if missing:
            raise ValueError(f"the state lacks {sorted(missing)}")
        for key in ("batch_size", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the state was saved by a loader with {key}={state[key]}; this one has "
                                 f"{key}={getattr(self, key)}, so its batches would not continue that run")
        epoch, served = state["epoch"], state["batches_served"]
        check_count("the state's epoch", epoch, 0, optional=False)
        check_count("the state's batches_served", served, 0, optional=False)
        rng_states = self._stoker_check_draws(state, current)
        workers = state["workers"]
        if workers is not None and state["num_workers"] != self.num_workers and served == 0 and isinstance(
                workers, list) and all(isinstance(w, Mapping) and w.get("batches") == 0 and not w.get("ended")
                                       for w in workers):
            # At an epoch's start the number of workers may differ; the saved copies' own states then have no
            # copy here to go on in: this loader's start from the dataset as it is.
            if any(w.get("state") is not None for w in workers):
                warnings.warn(
                    f"the state was saved at the start of an epoch by a loader with "
                    f"num_workers={state['num_workers']}, with the own states of its dataset copies; this loader has "
                    f"num_workers={self.num_workers}, so its copies start from the dataset as it is, not from those "
                    "states", stacklevel=3)
            workers = None
        if workers is not None:
            if state["num_workers"] != self.num_workers:
                raise ValueError(
                    f"the state was saved by a loader with num_workers={state['num_workers']}; this one has "
                    f"num_workers={self.num_workers}. Each worker of an IterableDataset iterates its own copy, "
                    "so an epoch resumes only with the same number of workers (or at the start of an epoch)")
            if not isinstance(workers, list) or len(workers) != max(1, self.num_workers) or not all(
                    isinstance(w, Mapping) and {"batches", "ended", "state"} <= set(w) for w in workers):
                raise ValueError("the state's workers must be a list with one {batches, ended, state} entry per "
                                 "worker")
            for w in workers:
                check_count("a worker's batches", w["batches"], 0)
            check_count("the state's next_worker", state["next_worker"], 0)
            workers = [dict(w) for w in workers]
        self._stoker_accept(state, rng_states, workers)

    def _stoker_iterable_iter(self, collate):
        if self.sample_seeds:
            raise ValueError("sample_seeds=True seeds each sample from its index; an IterableDataset has no "
                             "indices (seed inside the dataset, from get_worker_info().seed, instead)")
        if self.num_workers == 0:
            return IterableIterator(self, collate)
        if self.worker_mode == "thread":
            raise ValueError(
                "worker_mode='thread' cannot serve an IterableDataset with num_workers > 0: each worker iterates "
                "its own copy of the dataset, which threads would share. Use worker_mode='auto' or 'process'")
        return ProcessIterator(self, collate)

    def __iter__(self):
        if self.persistent_workers and self.num_workers > 0:
            # As torch's loader: one iterator, which each iter() resets (ending the epoch it served) and hands
            # out again. The loader holds it weakly: one nobody holds cannot be told from a new one, and the
            # loader dropped must end its workers at once (an iterator holds its loader).
            with _persistent_lock:  # two threads' first iter() make one iterator
                held = _persistent_iterators.get(self)
                it = held() if held is not None else None
                if it is None:
                    it = PersistentIterator()
                    _persistent_iterators[self] = weakref.ref(it)
            it._reset(self._stoker_iter)  # after the batch another thread is being served, if one is
            return it
        return self._stoker_iter()

    def _stoker_iter(self):
        self._stoker_device = _cuda.current_target(self._stoker_device, self.device)
        inner = self._stoker_cpu_iter()
        if self._stoker_device is None:
            return inner
        return _device.stage(inner, self._stoker_device, self.device_prefetch, self._stoker_cursor,
                             self.device_transform)

    def _stoker_cpu_iter(self):
        operator.index(self.num_workers)  # torch fails here, at iter(), for a float
        if self.num_workers == 0 and self.timeout != 0:
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        # torch's checks at iter(), in its workers' iterator, in its order (None, from num_workers set after
        # construction, means 2 here, where torch's iterator would fail on it)
        if self.num_workers > 0 and self.prefetch_factor is not None:
            if self.prefetch_factor <= 0:
                raise AssertionError("prefetch_factor must be greater than 0 for MultiProcessingDataLoaderIter")
            operator.index(self.prefetch_factor * self.num_workers)  # a float: torch's TypeError from range()
        default = self.collate_fn is _tc.default_collate
        collate: Any = _collate.default_collate if default else self.collate_fn
        if self._dataset_kind != _DatasetKind.Map:
            return self._stoker_iterable_iter(collate)
        kind, plan = self._stoker_iterator_kind()
        if kind == "array":
            return ArrayIterator(self, plan)
        if kind == "process":
            return ProcessIterator(self, collate)
        return PythonIterator(self, collate)

    def _stoker_iterator_kind(self) -> tuple[str, Any]:
        """How a map-style dataset is loaded: "array" (native gather), "process" (worker processes) or "python"
        (the main process, or worker threads); with the dataset's array plan (None if it has none)."""
        plan = array_plan(self.dataset)
        default = self.collate_fn is _tc.default_collate
        # A worker_init_fn asks for worker processes (it may open files per worker, or seed the generators
        # that worker's samples draw from): they are started as torch starts them, whatever the dataset.
        wants_workers = self.num_workers > 0 and self.worker_mode == "auto" and self.worker_init_fn is not None
        if plan is not None and default and self._auto_collation and _collate.map_is_pristine() \
                and not wants_workers:
            return "array", plan
        if self.num_workers > 0 and (self.worker_mode == "process" or wants_workers or self.worker_mode == "auto"
                                     and plan is None and not is_array_dataset(self.dataset)):
            return "process", plan
        return "python", plan
