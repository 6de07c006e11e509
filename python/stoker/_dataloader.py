"""stoker.DataLoader: torch's DataLoader, same arguments and batches, with stoker's engine underneath."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data._utils import collate as _tc
from torch.utils.data.dataloader import _DatasetKind

from stoker import _collate
from stoker._arrays import array_plan
from stoker._iterators import ArrayIterator, PythonIterator

__all__ = ["DataLoader"]


class DataLoader(_TorchDataLoader):
    """A drop-in for :class:`torch.utils.data.DataLoader`: the same signature, checks, attributes, ``len``
    and batches, and a subclass of it, so code that checks ``isinstance`` or rebuilds loaders from their
    attributes (Lightning, Accelerate) accepts it.

    What changes is underneath:

    * Array datasets (``TensorDataset``, a numpy array or CPU tensor, ``np.memmap``,
      :class:`stoker.ArrayDataset`) are gathered by native threads, without the GIL, into reusable buffers
      that torch receives zero-copy. A buffer is reused only after every tensor viewing it is freed, so a
      batch you keep is never overwritten.
    * Other map-style datasets are read with ``__getitems__``/``__getitem__``; ``num_workers`` threads load
      batches ahead (worker processes are not used), and ``default_collate`` stacks into pooled buffers.
    * Shuffling is native and counter-based: the order of an epoch is a pure function of (seed, epoch), the
      same for any ``num_workers``. It is not the order torch's ``RandomSampler`` draws. Without ``seed``,
      each iterator draws its seed from ``generator`` (or torch's global RNG), so ``torch.manual_seed``
      makes runs reproducible. A ``sampler`` or ``batch_sampler`` you pass is followed exactly.
    * Iterable datasets are served by torch's own machinery for now.

    Extra keyword-only arguments:
        seed: fixes the shuffle seed; epoch ``e`` is then always the same permutation, and each new iterator
            moves to the next epoch (or the one :meth:`set_epoch` names).
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
    ) -> None:
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory,
            drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device, in_order=in_order,
        )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed should be a non-negative integer, but got seed={seed!r}")
        self.seed = seed
        map_style = self._dataset_kind == _DatasetKind.Map
        self._stoker_native_sampler = map_style and sampler is None and batch_sampler is None
        self._stoker_shuffle = map_style and bool(shuffle)
        self._stoker_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iterator serve epoch ``epoch`` (its shuffle order is a function of seed and epoch)."""
        self._stoker_epoch = operator.index(epoch)

    def _stoker_next_epoch(self) -> int:
        epoch = self._stoker_epoch
        self._stoker_epoch += 1
        return epoch

    def __iter__(self):
        if self._dataset_kind != _DatasetKind.Map:
            return super().__iter__()
        operator.index(self.num_workers)  # torch fails here, at iter(), for a float
        if self.num_workers == 0 and self.timeout != 0:
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        default = self.collate_fn is _tc.default_collate
        if default and self._auto_collation and _collate.map_is_pristine():
            plan = array_plan(self.dataset)
            if plan is not None:
                return ArrayIterator(self, plan)
        if default:
            collate: Any = _collate.default_collate
        else:
            collate = self.collate_fn
        return PythonIterator(self, collate)
