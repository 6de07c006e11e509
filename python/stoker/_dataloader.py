"""stoker.DataLoader: torch's DataLoader, same arguments and batches, with stoker's engine underneath."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import DistributedSampler
from torch.utils.data._utils import collate as _tc
from torch.utils.data.dataloader import _DatasetKind

from stoker import _collate, _cuda, _device
from stoker._arrays import array_plan, is_array_dataset
from stoker._cursor import Cursor as _Cursor
from stoker._iterators import ArrayIterator, IterableIterator, ProcessIterator, PythonIterator
from stoker._native import core
from stoker._shard import check_count, resolve_shard

__all__ = ["DataLoader"]

STATE_FORMAT = "stoker.DataLoader/1"
_SEED_MASK = 0xFFFFFFFFFFFFFFFF


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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_MASK):
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
        self._stoker_resume: tuple[int, int] | None = None  # (epoch, batch) a loaded state starts from
        self._stoker_resume_workers: dict | None = None  # IterableDataset: where each worker stood
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
        """The cursor of a new iterator: the epoch it serves and the batch it starts from."""
        epoch = self._stoker_epoch
        self._stoker_epoch += 1
        start = 0
        workers = None
        if self._stoker_resume is not None:
            if self._stoker_resume[0] == epoch:
                start = self._stoker_resume[1]
                workers = self._stoker_resume_workers
            self._stoker_resume = None
            self._stoker_resume_workers = None
        cursor = _Cursor(epoch, start)
        cursor.resume_workers = workers
        self._stoker_cursor = cursor
        return cursor

    def _stoker_shuffle_seed(self, drawn: int, world_size: int) -> int:
        """The shuffle seed: ``seed=``, else one drawn once per loader (0 when sharded, on every rank)."""
        if self.seed is not None:
            return self.seed
        if self._stoker_seed is None:
            self._stoker_seed = 0 if world_size > 1 else drawn & _SEED_MASK
        return self._stoker_seed

    def _stoker_position(self) -> tuple[int, int]:
        """(epoch, batches served) of the stream as the user has consumed it."""
        cursor = self._stoker_cursor
        if cursor is not None and not cursor.finished:
            return cursor.epoch, cursor.consumed()[0]
        resume = self._stoker_resume
        if resume is not None and resume[0] == self._stoker_epoch:
            return resume
        return self._stoker_epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands, as a small dict of plain values (``torch.save`` and ``json`` store it).

        It describes the newest iterator: the epoch it serves and the batches it has yielded (one that
        raised counts). A finished iterator, or none yet, stands at the start of the next epoch. Load it
        into a loader built the same way (:meth:`load_state_dict`) and its next iterator continues exactly
        there, and every later epoch is the one this loader would have served; ``num_workers`` may differ.

        For an ``IterableDataset`` it also holds each worker's position: the batches the user received from
        it and, when the dataset has ``state_dict()``/``load_state_dict()``, its copy's state after the last
        of them (a worker with no batch received yet reports the state its pass started from; this call
        waits for that report). Such a state resumes with the same ``num_workers`` (any at an epoch's start).
        """
        if self._dataset_kind != _DatasetKind.Map:
            return self._stoker_iterable_state()
        epoch, served = self._stoker_position()
        rank, world = self._stoker_shard()
        seed = self.seed if self.seed is not None else self._stoker_seed
        return {
            "format": STATE_FORMAT,
            "dataset_len": len(self.dataset),
            "batch_size": self.batch_size,
            "drop_last": bool(self.drop_last),
            "shuffle": self._stoker_shuffle if self._stoker_native_sampler else None,
            "sampler": "native" if self._stoker_native_sampler else "user",
            "rank": rank,
            "world_size": world,
            "seed": seed,
            "epoch": epoch,
            "batches_served": served,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state`` (see :meth:`state_dict`): the next iterator serves the rest of its epoch.

        With stoker's own sampler this costs nothing whatever the position: any batch of any epoch is
        computed directly. With a ``sampler``/``batch_sampler`` you passed, the batches already served are
        drawn from it again and skipped (their samples are not loaded), so the resumed order is exact when
        that sampler repeats itself (``SequentialSampler``, ``DistributedSampler`` after the same
        ``set_epoch``, or a sampler whose generator you restore).

        Raises ``ValueError`` when the state comes from a different dataset length, batching, shuffle, shard
        or seed."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"load_state_dict expects a state from stoker.DataLoader.state_dict() "
                             f"(format {STATE_FORMAT!r}); got {found!r}")
        iterable = self._dataset_kind != _DatasetKind.Map
        if (state.get("dataset") == "iterable") != iterable:
            raise ValueError(f"the state was saved by a loader over {'an iterable' if not iterable else 'a map-style'} "
                             f"dataset; this loader's dataset is {'iterable' if iterable else 'map-style'}")
        if iterable:
            self._stoker_load_iterable_state(state)
            return
        missing = {"dataset_len", "batch_size", "drop_last", "shuffle", "sampler", "rank", "world_size", "seed",
                   "epoch", "batches_served"} - set(state)
        if missing:
            raise ValueError(f"the state lacks {sorted(missing)}")
        mine = self.state_dict()
        for key, what in (("dataset_len", "a dataset of {} samples"), ("sampler", "the {} sampler"),
                          ("batch_size", "batch_size={}"), ("drop_last", "drop_last={}"),
                          ("shuffle", "shuffle={}"), ("world_size", "world_size={}"), ("rank", "rank={}")):
            if state[key] != mine[key]:
                raise ValueError(
                    f"the state was saved by a loader with {what.format(state[key])}; this one has "
                    f"{what.format(mine[key])} ({key} differs), so its batches would not continue that run")
        seed = state["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_MASK):
            raise ValueError(f"the state's seed must be an integer in [0, 2**64) or None, got {seed!r}")
        if self.seed is not None and seed is not None and seed != self.seed:
            raise ValueError(f"the state was saved with seed={seed}; this loader was built with seed={self.seed}")
        epoch, served = state["epoch"], state["batches_served"]
        check_count("the state's epoch", epoch, 0)
        check_count("the state's batches_served", served, 0)
        if self._stoker_native_sampler:
            batches: int | None = self._stoker_num_batches()
        else:
            try:
                batches = len(self._index_sampler)
            except TypeError:  # a sampler without a length: nothing to check against
                batches = None
        if batches is not None and served > batches:
            raise ValueError(f"the state has served {served} batches of an epoch of {batches}")
        if self.seed is None:
            self._stoker_seed = seed  # None: the saved loader had not drawn one yet, nor will this one have
        self._stoker_epoch = epoch
        self._stoker_resume = (epoch, served)
        self._stoker_cursor = None

    def _stoker_iterable_state(self) -> dict[str, Any]:
        """state_dict() of a loader over an IterableDataset: the epoch, the batches served, and where each
        worker's pass stood (its batches served, and its dataset copy's own state when the dataset has
        state_dict()/load_state_dict(), as torchdata's Stateful datasets do)."""
        cursor = self._stoker_cursor
        workers = None
        if cursor is not None and not cursor.finished:
            epoch = cursor.epoch
            served, workers = cursor.consumed()
        else:
            epoch, served = self._stoker_position()
            if self._stoker_resume is not None and self._stoker_resume[0] == epoch:
                workers = self._stoker_resume_workers
        return {
            "format": STATE_FORMAT,
            "dataset": "iterable",
            "batch_size": self.batch_size,
            "drop_last": bool(self.drop_last),
            "num_workers": int(self.num_workers),
            "epoch": epoch,
            "batches_served": served,
            "workers": None if workers is None else workers["workers"],
            "next_worker": 0 if workers is None else workers["next_worker"],
        }

    def _stoker_load_iterable_state(self, state: Mapping[str, Any]) -> None:
        missing = {"batch_size", "drop_last", "num_workers", "epoch", "batches_served", "workers",
                   "next_worker"} - set(state)
        if missing:
            raise ValueError(f"the state lacks {sorted(missing)}")
        for key in ("batch_size", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the state was saved by a loader with {key}={state[key]}; this one has "
                                 f"{key}={getattr(self, key)}, so its batches would not continue that run")
        epoch, served = state["epoch"], state["batches_served"]
        check_count("the state's epoch", epoch, 0)
        check_count("the state's batches_served", served, 0)
        workers = state["workers"]
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
            workers = {"workers": [dict(w) for w in workers], "next_worker": state["next_worker"]}
        self._stoker_epoch = epoch
        self._stoker_resume = (epoch, served)
        self._stoker_resume_workers = workers
        self._stoker_cursor = None

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
        inner = self._stoker_cpu_iter()
        if self._stoker_device is None:
            return inner
        return _device.stage(inner, self._stoker_device, self.device_prefetch, self._stoker_cursor,
                             self.device_transform, self)

    def _stoker_cpu_iter(self):
        operator.index(self.num_workers)  # torch fails here, at iter(), for a float
        if self.num_workers == 0 and self.timeout != 0:
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        default = self.collate_fn is _tc.default_collate
        if self._dataset_kind != _DatasetKind.Map:
            return self._stoker_iterable_iter(_collate.default_collate if default else self.collate_fn)
        plan = array_plan(self.dataset)
        if plan is not None and default and self._auto_collation and _collate.map_is_pristine():
            return ArrayIterator(self, plan)
        if default:
            collate: Any = _collate.default_collate
        else:
            collate = self.collate_fn
        if self.num_workers > 0 and (self.worker_mode == "process" or self.worker_mode == "auto" and plan is None
                                     and not is_array_dataset(self.dataset)):
            return ProcessIterator(self, collate)
        return PythonIterator(self, collate)
