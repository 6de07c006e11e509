"""Array datasets: what the native gather path serves, and how a dataset's columns are described to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "ArrayDataset", "ArrayPlan", "array_plan", "array_ranges", "dlpack_type_of_numpy", "dlpack_type_of_torch",
    "is_array_dataset",
]

# (DLPack code, bits) for each torch dtype stoker hands over.
_TORCH_TYPES = {
    torch.bool: (6, 8),
    torch.uint8: (1, 8),
    torch.int8: (0, 8),
    torch.int16: (0, 16),
    torch.int32: (0, 32),
    torch.int64: (0, 64),
    torch.uint16: (1, 16),
    torch.uint32: (1, 32),
    torch.uint64: (1, 64),
    torch.float16: (2, 16),
    torch.bfloat16: (4, 16),
    torch.float32: (2, 32),
    torch.float64: (2, 64),
    torch.complex64: (5, 64),
    torch.complex128: (5, 128),
}
_NUMPY_CODES = {"b": 6, "u": 1, "i": 0, "f": 2, "c": 5}
_SUPPORTED = "bool, int8-64, uint8-64, float16/32/64, bfloat16 (tensors), complex64/128"


def dlpack_type_of_torch(dtype: torch.dtype) -> tuple[int, int] | None:
    return _TORCH_TYPES.get(dtype)


def dlpack_type_of_numpy(dtype: np.dtype) -> tuple[int, int] | None:
    code = _NUMPY_CODES.get(dtype.kind)
    if code is None or dtype.byteorder == ">" or dtype.fields is not None:
        return None
    bits = dtype.itemsize * 8
    if code == 2 and bits not in (16, 32, 64) or code == 5 and bits not in (64, 128):
        return None
    return code, bits


def _c_strides(shape: tuple[int, ...], itemsize: int) -> list[int]:
    strides, s = [], itemsize
    for d in reversed(shape):
        strides.append(s)
        s *= d
    return strides[::-1]


def _inner_contiguous(shape, strides, itemsize) -> bool:
    return all(n <= 1 or s == e for n, s, e in zip(shape, strides, _c_strides(shape, itemsize)))


# A dataset's column whose rows are not contiguous in memory is copied (made contiguous) for the native gather.
# For a TensorDataset or bare array that copy is made at each iter(), beside the dataset: past this size it
# is not, and the dataset goes through Python indexing (as torch's loader does), which copies only the rows
# of each batch. (An ArrayDataset copies once, when it is built.)
NONCONTIGUOUS_COPY_LIMIT = 64 << 20


def _column(name: str, array: Any, strict: bool):
    """(spec, owner) for one column, or None when it cannot go native (only when not strict)."""
    if isinstance(array, torch.Tensor):
        t = array
        code_bits = _TORCH_TYPES.get(t.dtype)
        usable = (
            t.device.type == "cpu" and t.layout is torch.strided and not t.requires_grad
            and not t.is_conj() and not t.is_neg() and type(t) is torch.Tensor
        )
        if code_bits is None or not usable:
            if strict:
                what = f"dtype {t.dtype}" if code_bits is None else "a tensor that is not a plain CPU tensor"
                raise TypeError(f"ArrayDataset: column {name!r} is {what}; supported dtypes: {_SUPPORTED}")
            return None
        if t.dim() == 0:
            raise ValueError(f"ArrayDataset: column {name!r} is 0-d; a column needs a sample dimension")
        itemsize = t.element_size()
        if not _inner_contiguous(tuple(t.shape[1:]), t.stride()[1:], 1):
            if not strict and t.numel() * itemsize > NONCONTIGUOUS_COPY_LIMIT:
                return None
            t = t.contiguous()
        rows, row_shape = t.shape[0], list(t.shape[1:])
        row_bytes = itemsize * int(np.prod(row_shape, dtype=np.int64))
        stride0 = t.stride(0) * itemsize
        return (name, t.data_ptr(), rows, stride0, row_bytes, *code_bits, row_shape), t
    a = array if isinstance(array, np.ndarray) else np.asarray(array)
    code_bits = dlpack_type_of_numpy(a.dtype)
    if code_bits is None:
        if strict:
            raise TypeError(
                f"ArrayDataset: column {name!r} has dtype {a.dtype}, which torch cannot hold; "
                f"supported dtypes: {_SUPPORTED}"
            )
        return None
    if a.ndim == 0:
        raise ValueError(f"ArrayDataset: column {name!r} is 0-d; a column needs a sample dimension")
    if not _inner_contiguous(a.shape[1:], a.strides[1:], a.itemsize):
        if not strict and a.nbytes > NONCONTIGUOUS_COPY_LIMIT:
            return None
        a = np.ascontiguousarray(a)  # copied once, here, so every gather is a plain row copy
    rows, row_shape = a.shape[0], list(a.shape[1:])
    row_bytes = a.itemsize * int(np.prod(row_shape, dtype=np.int64))
    address = a.__array_interface__["data"][0]
    return (name, address, rows, a.strides[0], row_bytes, *code_bits, row_shape), a


class ArrayDataset(Dataset):
    """Column arrays (numpy arrays, CPU tensors, memory maps) served by stoker's native gather.

    ``ArrayDataset(x, y)[i]`` is ``(x[i], y[i])`` and ``ArrayDataset(image=x, label=y)[i]`` is
    ``{"image": x[i], "label": y[i]}``; with both, the named rows come last as one dict:
    ``ArrayDataset(x, label=y)[i] == (x[i], {"label": y[i]})``. Batches are what ``default_collate`` makes of
    those samples: a list of tensors, a dict of tensors, or ``[tensor, {"label": tensor}]``.

    Arrays are not copied unless a row is not contiguous in memory (then once, here). Every array needs the
    same first dimension; a dtype torch cannot hold (strings, objects, structured) raises TypeError here.
    """

    def __init__(self, *arrays: Any, **named_arrays: Any) -> None:
        if not arrays and not named_arrays:
            raise ValueError("ArrayDataset needs at least one array")
        self.arrays = tuple(a if isinstance(a, (np.ndarray, torch.Tensor)) else np.asarray(a) for a in arrays)
        self.named_arrays = {
            k: a if isinstance(a, (np.ndarray, torch.Tensor)) else np.asarray(a) for k, a in named_arrays.items()
        }
        columns = [(f"#{i}", a) for i, a in enumerate(self.arrays)] + list(self.named_arrays.items())
        specs = [_column(name, a, strict=True) for name, a in columns]
        # The arrays as the gather reads them: a column whose rows are not contiguous is its copy, made here once.
        owners = [spec[1] for spec in specs]
        self.arrays = tuple(owners[:len(self.arrays)])
        self.named_arrays = dict(zip(self.named_arrays, owners[len(self.arrays):]))
        lengths = {name: spec[0][2] for (name, _), spec in zip(columns, specs)}
        first = next(iter(lengths))
        for name, n in lengths.items():
            if n != lengths[first]:
                raise ValueError(
                    f"ArrayDataset: array {name!r} has {n} rows but array {first!r} has {lengths[first]}; "
                    "every array needs the same first dimension"
                )
        self._length = lengths[first]

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        rows = tuple(a[index] for a in self.arrays)
        if not self.named_arrays:
            return rows
        named = {k: a[index] for k, a in self.named_arrays.items()}
        return (*rows, named) if rows else named


@dataclass
class ArrayPlan:
    """How a dataset maps onto native columns, and how a batch of column tensors is shaped for the user."""

    specs: list
    owners: list  # the arrays the specs point into: kept alive while a source reads them
    positional: int  # columns that form the leading list (or the single tensor, for "single")
    names: list  # named columns, collated into a dict
    kind: str  # "single": one tensor; "list": a list (and dict) as default_collate builds from tuples

    def shape_batch(self, tensors: list):
        if self.kind == "single":
            return tensors[0]
        out = tensors[: self.positional]
        if self.names:
            named = dict(zip(self.names, tensors[self.positional:]))
            if not out:
                return named
            out.append(named)
        return out


def array_plan(dataset: Any) -> ArrayPlan | None:
    """The native plan for a dataset, or None when it must go through Python (`__getitem__`)."""
    if type(dataset) is ArrayDataset:
        columns = [(f"#{i}", a) for i, a in enumerate(dataset.arrays)] + list(dataset.named_arrays.items())
        kind, positional, names = "list", len(dataset.arrays), list(dataset.named_arrays)
    elif type(dataset) is TensorDataset:
        columns = [(f"#{i}", t) for i, t in enumerate(dataset.tensors)]
        kind, positional, names = "list", len(columns), []
    elif type(dataset) in (torch.Tensor, np.ndarray, np.memmap):  # subclasses may index differently
        columns = [("#0", dataset)]
        kind, positional, names = "single", 1, []
    else:
        return None
    if not columns:
        return None
    specs, owners = [], []
    for name, array in columns:
        col = _column(name, array, strict=False)
        if col is None:
            return None
        specs.append(col[0])
        owners.append(col[1])
    if len({spec[2] for spec in specs}) != 1:
        return None  # torch's own path raises or indexes as it would
    return ArrayPlan(specs, owners, positional, names, kind)


def is_array_dataset(dataset: Any) -> bool:
    """True for the dataset types that hold arrays (served on threads even when the native path declines
    them, say for tensors that need grad): indexing them needs no Python work worth a process. A subclass
    that indexes in a way of its own (its own __getitem__ or __getitems__: an augmentation, say) is a Python
    dataset, loaded by worker processes as torch would."""
    if type(dataset) is np.memmap:
        return True
    for base in (ArrayDataset, TensorDataset, np.ndarray, torch.Tensor):
        if isinstance(dataset, base):
            kind = type(dataset)
            return all(getattr(kind, name, None) is getattr(base, name, None) for name in ("__getitem__",
                                                                                         "__getitems__"))
    return False


def array_ranges(dataset: Any) -> list[tuple[int, int]]:
    """The byte ranges [start, end) of the memory an array dataset's columns lie in (empty for others)."""
    if isinstance(dataset, ArrayDataset):
        arrays = list(dataset.arrays) + list(dataset.named_arrays.values())
    elif isinstance(dataset, TensorDataset):
        arrays = list(dataset.tensors)
    elif isinstance(dataset, (np.ndarray, torch.Tensor)):
        arrays = [dataset]
    else:
        return []
    ranges = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            storage = a.untyped_storage()
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        elif isinstance(a, np.ndarray):
            base = a
            while isinstance(base.base, np.ndarray):
                base = base.base
            start = base.__array_interface__["data"][0]
            ranges.append((start, start + base.nbytes))
    return ranges
