"""Variable-length batches without packing: a padding collate_fn and two batch samplers that group samples
of similar length, so that padding wastes little.

* :class:`PadCollate` pads 1-D token sequences (or dicts of them) to the longest in the batch.
* :class:`LengthBucketSampler` yields batches of ``batch_size`` indices of similar length.
* :class:`TokenBudgetSampler` yields batches of as many indices as fit a token budget.

They work with ``stoker.DataLoader`` and ``torch.utils.data.DataLoader`` alike::

    lengths = [len(s["input_ids"]) for s in dataset]          # once, or stored beside the data
    sampler = TokenBudgetSampler(lengths, max_tokens=16384, seed=0)
    loader = stoker.DataLoader(dataset, batch_sampler=sampler, collate_fn=PadCollate(pad_id=0))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                              # the loader does not do it for a batch_sampler
        for batch in loader:                                  # {"input_ids": [B, T], ..., "attention_mask": [B, T]}
            ...

A sampler's batches are a pure function of (lengths, arguments, seed, epoch), so a loader resumed with
``load_state_dict`` after the same ``set_epoch`` continues exactly.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler
from torch.utils.data import default_collate as _default_collate
from torch.utils.data._utils import worker as _torch_worker

from stoker import _collate
from stoker._native import core, from_dlpack

__all__ = ["LengthBucketSampler", "PadCollate", "TokenBudgetSampler"]

_INT64 = np.iinfo(np.int64)
_SEQUENCE_TYPES = (list, tuple, range)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _int_arg(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (anything with ``__index__`` but bool), at least ``minimum``; else ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} should be an integer, but got {name}={value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} should be an integer, but got {name}={value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} should be an integer >= {minimum}, but got {name}={value!r}")
    return number


def _as_lengths(lengths: Any) -> np.ndarray:
    """``lengths`` (a list, numpy array or tensor of non-negative ints) as a private 1-D int64 array."""
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype is torch.bool:
            raise ValueError(f"lengths should hold integers, got a tensor of dtype {lengths.dtype}")
        array = lengths.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(lengths)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"lengths should be a 1-D sequence of non-negative integers ({exc})") from None
    if array.ndim != 1:
        raise ValueError(f"lengths should be 1-D (one length per sample), got shape {tuple(array.shape)}")
    if array.size == 0:
        return np.zeros(0, np.int64)
    if array.dtype.kind not in "iu":
        raise ValueError(f"lengths should hold integers, got dtype {array.dtype} (first value {array[0]!r})")
    if array.dtype.kind == "i":
        negative = np.flatnonzero(array < 0)
        if negative.size:
            i = int(negative[0])
            raise ValueError(f"lengths should be non-negative, but lengths[{i}] = {int(array[i])}")
    elif array.dtype == np.uint64 and int(array.max()) > _INT64.max:
        i = int(np.argmax(array))
        raise ValueError(f"lengths[{i}] = {int(array[i])} is too large")
    return array.astype(np.int64, copy=True)  # a copy: later changes to the caller's array do not reach us


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch))


# ----------------------------------------------------------------------------------------------------------------
# PadCollate
# ----------------------------------------------------------------------------------------------------------------


def _sequence(value: Any, index: int, key: str, hint: str) -> np.ndarray:
    """One sample's sequence under ``key`` as a 1-D numpy array of integers (a view where it can be)."""
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, torch.Tensor):
        try:
            array = value.numpy()  # a view of a CPU tensor
        except (TypeError, RuntimeError):  # autograd, another device, or a dtype numpy lacks (bfloat16)
            if value.is_floating_point() or value.is_complex():
                raise TypeError(f"sample {index}: {key!r} should hold integers, got a tensor of dtype "
                                f"{value.dtype}{hint}") from None
            array = value.detach().cpu().numpy()
    elif isinstance(value, _SEQUENCE_TYPES):
        if len(value) == 0:
            return np.zeros(0, np.int64)
        try:
            array = np.asarray(value)
        except ValueError:  # ragged nesting
            raise ValueError(f"sample {index}: {key!r} should be a 1-D sequence, got a nested ragged "
                             f"{type(value).__name__}") from None
    else:
        raise TypeError(f"sample {index}: {key!r} should be a 1-D sequence of integers (list, tuple, numpy "
                        f"array or tensor), got {type(value).__name__}{hint}")
    if array.ndim != 1:
        raise ValueError(f"sample {index}: {key!r} should be 1-D, got shape {tuple(array.shape)}{hint}")
    if array.dtype.kind not in "iub" and array.size:
        raise TypeError(f"sample {index}: {key!r} should hold integers, got dtype {array.dtype}{hint}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > _INT64.max:  # (a list of ints past 2**63 too)
        raise ValueError(f"sample {index}: {key!r} holds {int(array.max())}, which does not fit in int64{hint}")
    return array


def _is_sequence(value: Any) -> bool:
    if isinstance(value, _SEQUENCE_TYPES):
        return True
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1


class PadCollate:
    """A ``collate_fn`` for samples of different lengths: pads them to the longest in the batch.

    A sample is a 1-D sequence of token ids (list, tuple, numpy array or tensor of integers), or a dict whose
    values include such sequences (``{"input_ids": ..., "labels": ...}``) and possibly other fields. The
    batch is a dict of int64 tensors ``[B, T]``, ``T`` the longest sequence of the batch rounded up to a
    multiple of ``pad_to_multiple_of``:

    * bare sequences give ``{"input_ids": ..., "attention_mask": ...}`` (``keys`` is not consulted);
    * dict samples give their keys in the first sample's order, then ``"attention_mask"``. The keys padded
      are ``keys``, or by default every key whose value in the first sample is a list, tuple, or 1-D array
      or tensor. Other fields (scalars, strings, fixed-shape arrays) are collated by ``stoker.default_collate``
      (``torch.utils.data.default_collate``'s results and errors; torch's own function in a worker process of
      torch's DataLoader), exactly as without this class.

    Pad values: ``label_pad_id`` under ``"labels"`` (-100, which ``torch.nn.CrossEntropyLoss`` ignores),
    0 under ``"attention_mask"``, ``pad_id`` elsewhere. ``attention_mask`` is 1 on real tokens and 0 on
    padding; it is added when ``return_attention_mask`` unless the samples carry their own, which is padded
    with 0 like any other key. The padded keys of one sample must all have the same length (one mask
    covers them): sequence-to-sequence samples with a source and a target of different lengths are not
    supported yet.

    Example, ``PadCollate(pad_id=0, padding_side="left", pad_to_multiple_of=4)`` on
    ``[{"input_ids": [5, 6, 7], "labels": [6, 7, 8], "id": 0}, {"input_ids": [9], "labels": [2], "id": 1}]``::

        {"input_ids":      tensor([[   0,    5,    6,    7], [   0,    0,    0,    9]]),
         "labels":         tensor([[-100,    6,    7,    8], [-100, -100, -100,    2]]),
         "id":             tensor([0, 1]),
         "attention_mask": tensor([[   0,    1,    1,    1], [   0,    0,    0,    1]])}

    Errors name the sample's position in the batch and the key: ``TypeError`` for a value that is not a
    sequence of integers (floats, strings, None) or a sample of the wrong kind; ``ValueError`` for a
    sequence that is not 1-D, padded keys of different lengths in one sample, a sample whose keys differ
    from the first's, or an empty batch.

    Cost: one native call. Numpy arrays and CPU tensors of any integer or bool dtype and stride are read where
    they lie, with the GIL released; lists and tuples of Python ints are converted with the GIL held, straight
    into their rows (about 2 ns per token); the padded keys and the mask are written into one block of stoker's
    buffer pool. On a length-bucketed batch (256 sequences of about 250 tokens, one key, a 2-core machine) this
    is 3 times faster than the numpy implementation that preceded it for tensors, 5 times for numpy int32 arrays
    and 8 times for lists; against a tensor per sample padded by ``torch.nn.utils.rnn.pad_sequence`` (torch on
    one thread, as in DataLoader workers), 4, 18 and 33 times. When the longest sequence is many times the mean,
    writing the padding dominates and the gains shrink to 1.1 to 4.5 times the numpy implementation (2 to 15
    times ``pad_sequence``). See ``benchmarks/test_padding.py``. Batches the native call does not
    cover (other sequence types such as ``range``, lists of numpy scalars, byte-swapped or subclassed arrays,
    tensor subclasses, padded keys of different lengths, and every error) take that numpy implementation,
    which gives the results and errors described above at its cost. The output tensors are views of one pooled
    block, which goes back to the pool when the last of them is freed; nothing else shares their memory. In a
    worker process of ``stoker.DataLoader`` they are written into the batch's slot of the shared-memory ring
    instead (a shared-memory segment of their own when the slot lacks room), like the tensors
    ``stoker.default_collate`` stacks there, so the batch reaches the main process without a copy.
    The object holds no state and may be called from several threads and pickled to worker processes.
    """

    _use_native = True  # False on an instance: the numpy path only (the reference the tests compare with)

    def __init__(
        self,
        pad_id: int = 0,
        *,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        keys: Sequence[str] | None = None,
        label_pad_id: int = -100,
        return_attention_mask: bool = True,
    ) -> None:
        self.pad_id = _int_arg("pad_id", pad_id)
        self.label_pad_id = _int_arg("label_pad_id", label_pad_id)
        for name, value in (("pad_id", self.pad_id), ("label_pad_id", self.label_pad_id)):
            if not _INT64.min <= value <= _INT64.max:
                raise ValueError(f"{name}={value} does not fit in int64")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side should be 'right' or 'left', but got padding_side={padding_side!r}")
        self.padding_side = padding_side
        if pad_to_multiple_of is not None:
            pad_to_multiple_of = _int_arg("pad_to_multiple_of", pad_to_multiple_of, 1)
        self.pad_to_multiple_of = pad_to_multiple_of
        if keys is not None:
            if isinstance(keys, (str, bytes)):
                raise TypeError(f"keys should be a list of key names, not a single {type(keys).__name__} "
                                f"({keys!r}); write keys=[{keys!r}]")
            keys = tuple(keys)
            if not keys:
                raise ValueError("keys should name at least one key to pad (or be None: every 1-D sequence)")
            if len(set(keys)) != len(keys):
                raise ValueError(f"keys names a key twice: {list(keys)}")
        self.keys = keys
        self.return_attention_mask = bool(return_attention_mask)

    def __repr__(self) -> str:
        keys = None if self.keys is None else list(self.keys)
        return (f"PadCollate(pad_id={self.pad_id}, padding_side={self.padding_side!r}, "
                f"pad_to_multiple_of={self.pad_to_multiple_of}, keys={keys}, "
                f"label_pad_id={self.label_pad_id}, return_attention_mask={self.return_attention_mask})")

    def _pad_value(self, key: Any) -> int:
        if key == "labels":
            return self.label_pad_id
        if key == "attention_mask":
            return 0
        return self.pad_id

    def __call__(self, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
            raise TypeError(f"PadCollate expects a list of samples, got {type(batch).__name__}")
        if len(batch) == 0:
            raise ValueError("PadCollate got an empty batch")
        first = batch[0]
        if isinstance(first, Mapping):
            return self._collate_dicts(batch, first)
        padded = self._pad_native({"input_ids": batch if type(batch) is list else list(batch)}, ["input_ids"])
        if padded is not None:
            return padded
        columns = {"input_ids": [_sequence(_bare(s, i), i, "input_ids", "") for i, s in enumerate(batch)]}
        return self._pad(columns, {}, ["input_ids"])

    def _collate_dicts(self, batch: Sequence[Any], first: Mapping) -> dict[str, torch.Tensor]:
        order = list(first.keys())
        if self.keys is None:
            padded = [k for k in order if _is_sequence(first[k])]
            if not padded:
                raise ValueError(f"sample 0 has no 1-D sequence to pad (keys {order}); pass keys=[...] to name "
                                 f"them")
            hint = "; pass keys=[...] to pad only some keys (the others are collated by default_collate)"
        else:
            missing = [k for k in self.keys if k not in first]
            if missing:
                raise ValueError(f"sample 0 has no key {missing[0]!r} (keys= names it); its keys are {order}")
            padded = [k for k in order if k in self.keys]
            hint = ""
        known = first.keys()
        for i, sample in enumerate(batch):
            if not isinstance(sample, Mapping):
                raise TypeError(f"sample {i} is a {type(sample).__name__}, but sample 0 is a "
                                f"{type(first).__name__}: every sample of a batch should be a dict of sequences")
            if sample.keys() != known:
                lacks = [k for k in order if k not in sample]
                extra = [k for k in sample.keys() if k not in known]
                what = f"lacks key {lacks[0]!r}" if lacks else f"has key {extra[0]!r}"
                raise ValueError(f"sample {i} {what}, unlike sample 0 (keys {order})")
        values = {k: [s[k] for s in batch] for k in padded}
        native = self._pad_native(values, order)
        if native is None:  # the numpy path: its result, or its error naming the sample and key
            columns = {k: [_sequence(v, i, k, hint) for i, v in enumerate(values[k])] for k in padded}
        others = {}
        for k in order:
            if k not in values:
                try:
                    others[k] = _collate_field([s[k] for s in batch])
                except Exception as exc:
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"PadCollate: raised by default_collate for key {k!r} (not padded)")
                    raise
        if native is None:
            return self._pad(columns, others, order)
        out = {k: native[k] if k in values else others[k] for k in order}
        if "attention_mask" in native and "attention_mask" not in out:
            out["attention_mask"] = native["attention_mask"]
        return out

    def _pad_native(self, values: dict[Any, list], order: list) -> dict[Any, torch.Tensor] | None:
        """The padded keys (and the mask) from one native call, or None where that call does not cover the
        batch (values of other kinds, keys of different lengths): the numpy path decides. In a stoker worker
        process they are written into the slot the batch goes to (``_collate.current_arena()``), which then
        crosses to the main process without a copy; elsewhere into a pooled block."""
        multiple = self.pad_to_multiple_of or 0
        if not self._use_native or multiple > _INT64.max:
            return None
        keys = list(values)
        columns = list(values.values())
        pad_values = [self._pad_value(k) for k in keys]
        left = self.padding_side == "left"
        mask = self.return_attention_mask and "attention_mask" not in order
        tensors = None
        arena = _collate.current_arena()
        if arena is not None:
            target = _ArenaBlock(arena)
            if core.pad_sequences_into(columns, pad_values, multiple, left, mask, target):
                tensors = target.tensors
            elif not target.declined:
                return None
        if tensors is None:
            # stoker._collate's pool, not stoker._native.POOL: a stoker worker process replaces it after the
            # fork, and a loader pinning batches for a GPU sets a page-locked one.
            capsules = core.pad_sequences(columns, pad_values, multiple, left, mask, _collate.current_pool())
            if capsules is None:
                return None
            tensors = [from_dlpack(c) for c in capsules]
        out = dict(zip(keys, tensors))
        if mask:
            out["attention_mask"] = tensors[-1]
        return out

    def _pad(self, columns: dict[Any, list], others: dict, order: list) -> dict[Any, torch.Tensor]:
        keys = list(columns)
        arrays = columns[keys[0]]
        lengths = np.fromiter((a.shape[0] for a in arrays), np.int64, len(arrays))
        for key in keys[1:]:
            other = np.fromiter((a.shape[0] for a in columns[key]), np.int64, len(arrays))
            differ = np.flatnonzero(other != lengths)
            if differ.size:
                i = int(differ[0])
                raise ValueError(
                    f"sample {i}: {key!r} has length {int(other[i])} but {keys[0]!r} has length {int(lengths[i])}; "
                    f"the padded keys of a sample must have the same length (one attention_mask covers them)")
        longest = int(lengths.max())
        multiple = self.pad_to_multiple_of
        width = -(-longest // multiple) * multiple if multiple else longest
        positions = np.arange(width)
        if self.padding_side == "right":
            real = positions < lengths[:, None]
        else:
            real = positions >= (width - lengths)[:, None]
        out: dict[Any, torch.Tensor] = {}
        for key in order:
            if key in columns:
                filled = np.full((len(arrays), width), self._pad_value(key), np.int64)
                filled[real] = np.concatenate(columns[key], dtype=np.int64, casting="unsafe")  # kinds checked
                out[key] = torch.from_numpy(filled)
            else:
                out[key] = others[key]
        if self.return_attention_mask and "attention_mask" not in out:
            out["attention_mask"] = torch.from_numpy(real.astype(np.int64))
        return out


def _collate_field(values: list) -> Any:
    """default_collate for a field PadCollate does not pad: stoker's (torch's result and errors), which stacks
    tensors and arrays into the worker's slot, or into the pool; torch's own in a worker process of torch's
    DataLoader, where it stacks into shared memory that its queue sends without a copy."""
    if _collate.current_arena() is None and _torch_worker._worker_info is not None:
        return _default_collate(values)
    return _collate.default_collate(values)


class _ArenaBlock:
    """The ``allocate`` of ``core.pad_sequences_into`` in a stoker worker: the batch's int64 outputs
    ``[B, T]`` (``outputs`` of them) in one block from the worker's arena (its slot of the ring, or a
    shared-memory segment of its own when the slot lacks room), each starting at a multiple of
    ``arena.align`` bytes as the ring requires of a tensor it hands over; kept in ``tensors``.

    Padding can make a batch far larger than its samples (one long sample, a large ``pad_to_multiple_of``). A
    segment is memory the kernel hands out page by page as it is written, so one larger than the free shared
    memory would kill the worker with SIGBUS halfway through; such a block is ``declined`` instead, and the
    batch takes the pooled path (where a block larger than memory is a ``MemoryError``, as in the main
    process)."""

    __slots__ = ("arena", "tensors", "declined")

    def __init__(self, arena: Any) -> None:
        self.arena = arena
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.declined = False

    def __call__(self, outputs: int, batch: int, width: int) -> np.ndarray | None:
        step = max(self.arena.align // 8, 1)
        stride = -(-batch * width // step) * step  # cells from one output's start to the next
        nbytes = (outputs - 1) * stride * 8 + batch * width * 8
        if nbytes > self.arena.room() and nbytes > _free_shared_memory():
            self.declined = True
            return None
        block = self.arena.empty(((outputs - 1) * stride + batch * width,), torch.int64)
        if block is None:
            self.declined = True
            return None
        out = block.as_strided((outputs, batch, width), (stride, width, 1))
        self.tensors = out.unbind(0)
        return out.numpy()


def _free_shared_memory() -> int:
    """Bytes free in /dev/shm, where shared-memory segments live (0 when it cannot be read)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _bare(sample: Any, index: int) -> Any:
    if isinstance(sample, Mapping):
        raise TypeError(f"sample {index} is a {type(sample).__name__}, but sample 0 is a bare sequence: every "
                        f"sample of a batch should be the same kind")
    if not isinstance(sample, (*_SEQUENCE_TYPES, np.ndarray, torch.Tensor)):
        raise TypeError(f"sample {index} should be a 1-D sequence of integers (list, tuple, numpy array or "
                        f"tensor) or a dict of them, got {type(sample).__name__}")
    return sample


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------


class _EpochBatchSampler(Sampler):
    """What the two samplers share: lengths, seed, epoch, and batches computed per epoch and cached."""

    def __init__(self, lengths: Any, shuffle: bool, seed: int, drop_last: bool) -> None:
        super().__init__()
        self.lengths = _as_lengths(lengths)
        self.shuffle = bool(shuffle)
        self.seed = _int_arg("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iterator (and ``len``) serve epoch ``epoch``; its batches are a function of
        (seed, epoch). The epoch does not advance by itself: call this before each epoch, as with
        ``DistributedSampler`` (``DataLoader.set_epoch`` does not reach a ``batch_sampler``)."""
        self.epoch = _int_arg("epoch", epoch, 0)

    def batches(self) -> list[np.ndarray]:
        """The current epoch's batches, in the order they are served, as int64 arrays of indices."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._compute(self.epoch))
        return self._cached[1]

    def _compute(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.batches())


class LengthBucketSampler(_EpochBatchSampler):
    """A batch sampler (pass it as ``batch_sampler=``) whose batches of ``batch_size`` indices hold samples
    of similar length, so that padding them wastes little, while the order stays random.

    Each epoch: the indices are shuffled (a numpy ``Generator`` seeded with ``(seed, epoch)``), cut into
    buckets of ``bucket_size`` consecutive positions (default ``50 * batch_size``, rounded up to a multiple
    of ``batch_size`` so that no batch straddles two buckets), each bucket is sorted by length (stable) and
    cut into batches, and the order of the batches is shuffled. Larger buckets pad less and mix less.

    Every index is served exactly once per epoch, in ``ceil(n / batch_size)`` batches. With ``drop_last``,
    the ``n % batch_size`` indices at the end of the epoch's shuffled order are left out before bucketing
    (random ones, whatever their length; without ``shuffle``, the last ones of the dataset, as with
    ``BatchSampler``), giving ``n // batch_size`` full batches. Without it one batch (the last of the last
    bucket, before the batch order is shuffled) may be short.

    With ``shuffle=False`` nothing is random and every epoch is the same: buckets of consecutive indices,
    each sorted by length, batches in order. For ``lengths=[5, 1, 4, 2, 3, 9, 7]``, ``batch_size=2``,
    ``bucket_size=4``: buckets ``[0, 1, 2, 3]`` and ``[4, 5, 6]``, batches ``[1, 3], [2, 0], [4, 6], [5]``;
    with ``drop_last=True`` index 6 is left out: ``[1, 3], [2, 0], [4, 5]``.

    The batches of an epoch are a pure function of (lengths, arguments, seed, epoch). Cost: a permutation
    and a sort of the indices per epoch (about 2 s for 10 million samples), computed at the first ``iter``
    or :meth:`batches` of an epoch and kept until :meth:`set_epoch` moves to another one; ``len`` is
    arithmetic.
    """

    def __init__(
        self,
        lengths: Any,
        batch_size: int,
        *,
        bucket_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(lengths, shuffle, seed, drop_last)
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        if bucket_size is None:
            bucket_size = 50 * self.batch_size
        bucket_size = _int_arg("bucket_size", bucket_size, 1)
        self.bucket_size = -(-bucket_size // self.batch_size) * self.batch_size

    def __repr__(self) -> str:
        return (f"LengthBucketSampler({len(self.lengths)} lengths, batch_size={self.batch_size}, "
                f"bucket_size={self.bucket_size}, shuffle={self.shuffle}, seed={self.seed}, "
                f"drop_last={self.drop_last}, epoch={self.epoch})")

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size
        return n // size if self.drop_last else -(-n // size)

    def _compute(self, epoch: int) -> list[np.ndarray]:
        n, size = len(self.lengths), self.batch_size
        rng = _rng(self.seed, epoch)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: n - n % size]
        if len(order):
            # Sort by (bucket, length), stable: one argsort of bucket * (longest + 1) + length, which fits in
            # int64 unless the lengths are astronomical (then lexsort, three times slower).
            lengths = self.lengths[order]
            bucket_of = np.arange(len(order)) // self.bucket_size
            span = int(lengths.max()) + 1
            if int(bucket_of[-1]) < _INT64.max // span - 1:
                order = order[np.argsort(bucket_of * span + lengths, kind="stable")]
            else:
                order = order[np.lexsort((lengths, bucket_of))]
        batches = [order[start:start + size] for start in range(0, len(order), size)]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches


class TokenBudgetSampler(_EpochBatchSampler):
    """A batch sampler (pass it as ``batch_sampler=``) whose batches hold as many samples as fit in
    ``max_tokens``: many short samples or a few long ones, so that every batch costs about the same.

    The cost of a batch is ``len(batch) * max(length in batch)`` with ``padded=True`` (the size of the padded
    ``[B, T]`` tensor :class:`PadCollate` builds), or ``sum(lengths in batch)`` with ``padded=False`` (for
    models that take packed, unpadded tokens). A sample of length 0 counts as 1 token, so that batches stay
    finite. A sample longer than ``max_tokens`` fits in no batch: the constructor raises ``ValueError``.

    Each epoch: the indices are shuffled (a numpy ``Generator`` seeded with ``(seed, epoch)``) and cut into
    buckets of ``bucket_size`` positions (default: about 50 batches' worth, ``50 * max_tokens // mean
    length``); each bucket is sorted by length (stable) and filled greedily, a batch closing when the next
    sample would exceed the budget. The samples left after a bucket's last full batch join the next bucket,
    so only the epoch's very last batch may be under-filled; then the order of the batches is shuffled.
    Every index is served exactly once per epoch; ``drop_last=True`` leaves out that last batch (the
    leftover of the last bucket, always, before the batch order is shuffled).

    ``len(sampler)`` is the number of batches of the current epoch (it can change from one epoch to the
    next): the epoch's batches are computed at the first ``len``, ``iter`` or :meth:`batches` and kept until
    :meth:`set_epoch` moves to another one.

    With ``shuffle=False`` every epoch is the same. For ``lengths=[3, 8, 2, 5, 4, 1]``, ``max_tokens=10``,
    one bucket: sorted by length ``5, 2, 0, 4, 3, 1``; padded batches ``[5, 2, 0]`` (3 x 3 = 9 tokens),
    ``[4, 3]`` (2 x 5 = 10), ``[1]`` (8); with ``padded=False``: ``[5, 2, 0, 4]`` (1+2+3+4 = 10), ``[3]``,
    ``[1]``. With ``drop_last=True``, ``[1]`` is left out in both.

    The batches of an epoch are a pure function of (lengths, arguments, seed, epoch). Cost: a permutation, a
    sort per bucket, and a few numpy calls per batch (about 1 s for 2 million samples in 130,000 batches).
    """

    def __init__(
        self,
        lengths: Any,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int | None = None,
        padded: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(lengths, shuffle, seed, drop_last)
        self.max_tokens = _int_arg("max_tokens", max_tokens, 1)
        self.padded = bool(padded)
        too_long = np.flatnonzero(self.lengths > self.max_tokens)
        if too_long.size:
            i = int(too_long[0])
            more = f" ({too_long.size} samples are longer, the longest {int(self.lengths.max())})" \
                if too_long.size > 1 else ""
            raise ValueError(f"sample {i} has length {int(self.lengths[i])}, more than max_tokens="
                             f"{self.max_tokens}: it fits in no batch{more}")
        self._cost = np.maximum(self.lengths, 1)
        if bucket_size is None:
            mean = float(self._cost.mean()) if len(self._cost) else 1.0
            bucket_size = max(1, int(50 * self.max_tokens // mean))
        self.bucket_size = _int_arg("bucket_size", bucket_size, 1)

    def __repr__(self) -> str:
        return (f"TokenBudgetSampler({len(self.lengths)} lengths, max_tokens={self.max_tokens}, "
                f"shuffle={self.shuffle}, seed={self.seed}, bucket_size={self.bucket_size}, padded={self.padded}, "
                f"drop_last={self.drop_last}, epoch={self.epoch})")

    def _cut(self, cost: np.ndarray) -> list[int]:
        """Where greedy filling cuts ``cost`` (sorted ascending) into batches: the end of each batch."""
        budget, m, ends = self.max_tokens, len(cost), []
        start = 0
        if self.padded:
            while start < m:
                # The batch [start, start + k) costs k * cost[start + k - 1], which grows with k: the largest k
                # within budget is a binary search. No k above budget // cost[start] can fit.
                reach = min(m - start, budget // int(cost[start]))
                totals = np.arange(1, reach + 1) * cost[start:start + reach]
                start += int(np.searchsorted(totals, budget, side="right"))
                ends.append(start)
        else:
            cumulative = np.cumsum(cost)
            while start < m:
                before = int(cumulative[start - 1]) if start else 0
                start = int(np.searchsorted(cumulative, before + budget, side="right"))
                ends.append(start)
        return ends

    def _compute(self, epoch: int) -> list[np.ndarray]:
        n = len(self.lengths)
        rng = _rng(self.seed, epoch)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[np.ndarray] = []
        leftover = np.zeros(0, np.int64)
        for begin in range(0, n, self.bucket_size):
            bucket = np.concatenate((leftover, order[begin:begin + self.bucket_size]))
            bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
            ends = self._cut(self._cost[bucket])
            starts = [0, *ends[:-1]]
            batches.extend(bucket[s:e] for s, e in zip(starts[:-1], ends[:-1]))
            leftover = bucket[starts[-1]:]
        if leftover.size and not self.drop_last:
            batches.append(leftover)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches
