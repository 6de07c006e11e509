"""Batch-for-batch conformance of stoker.DataLoader (and stoker.default_collate) with torch's.

Every test runs torch's DataLoader and stoker's over the same dataset and arguments and compares the batches
with helpers.assert_same: Python type and container type at every level, dtype, shape, strides and
bit-identical values. torch runs with num_workers=0 (for map-style datasets its batches do not depend on the
worker count); stoker runs with num_workers 0 and 2 (threads).
"""

from __future__ import annotations

import collections
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    MapDataset,
    TorchDataLoader,
    assert_batches_equal,
    assert_loaders_match,
    assert_same,
    raises_same,
)
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    StackDataset,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data._utils import collate as torch_collate

import stoker

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

N = 23  # array datasets: not a multiple of 3 or 7, so every batch size has a tail
N_PY = 17  # Python datasets

BATCH_SIZES = [1, 3, 7]
WORKERS = [0, 2]


# --------------------------------------------------------------------------------------------------------------
# Array datasets (the native gather path)
# --------------------------------------------------------------------------------------------------------------


def _x(n=N, cols=4, dtype=np.float32):
    return (np.arange(n * cols, dtype=np.float64).reshape(n, cols) * 0.5 - 3).astype(dtype)


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _memmap_npy(tmp_path, array):
    path = tmp_path / "data.npy"
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def _unaligned(n=N, cols=4):
    buf = bytearray(n * cols * 8 + 1)
    a = np.frombuffer(buf, dtype=np.float64, offset=1).reshape(n, cols)
    a[:] = _x(n, cols, np.float64)
    assert not a.flags.aligned
    return a


def _raw_memmap(tmp_path):
    path = tmp_path / "raw.bin"
    m = np.memmap(path, dtype=np.float32, mode="w+", shape=(N, 5))
    m[:] = _x(cols=5)
    m.flush()
    del m
    return np.memmap(path, dtype=np.float32, mode="r", shape=(N, 5))


ARRAY_DATASETS = {
    # TensorDataset
    "TensorDataset": lambda tmp: TensorDataset(torch.from_numpy(_x()), torch.arange(N)),
    "TensorDataset-one-tensor-3d": lambda tmp: TensorDataset(torch.arange(N * 6, dtype=torch.int32).reshape(N, 2, 3)),
    "TensorDataset-many-dtypes": lambda tmp: TensorDataset(
        torch.from_numpy(_x(dtype=np.float64)),
        torch.arange(N) % 3 == 0,
        torch.arange(N * 2, dtype=torch.uint8).reshape(N, 2),
        torch.arange(N, dtype=torch.float32).to(torch.complex64) * (1 - 2j),
        torch.from_numpy(_x()).to(torch.bfloat16),
        torch.arange(N, dtype=torch.int16) - 5,
        torch.arange(N, dtype=torch.float16) / 4,
    ),
    "TensorDataset-noncontiguous": lambda tmp: TensorDataset(
        torch.arange(N * 4.0).reshape(4, N).t(), torch.arange(2 * N)[::2]
    ),
    # bare numpy arrays
    "ndarray-1d-float64": lambda tmp: np.arange(N, dtype=np.float64) * 1.5,
    "ndarray-1d-int32": lambda tmp: np.arange(N, dtype=np.int32) - 7,
    "ndarray-1d-bool": lambda tmp: np.arange(N) % 3 == 1,
    "ndarray-2d-uint8": lambda tmp: np.arange(N * 3, dtype=np.uint8).reshape(N, 3),
    "ndarray-3d-float32": lambda tmp: _x(cols=6).reshape(N, 2, 3),
    "ndarray-2d-int64": lambda tmp: np.arange(N * 2, dtype=np.int64).reshape(N, 2) * -3,
    # bare CPU tensors
    "tensor-1d-int64": lambda tmp: torch.arange(N) * 11,
    "tensor-2d-float32": lambda tmp: torch.from_numpy(_x()),
    "tensor-3d-bfloat16": lambda tmp: torch.from_numpy(_x(cols=6)).reshape(N, 3, 2).to(torch.bfloat16),
    # memory maps
    "memmap-npy-2d": lambda tmp: _memmap_npy(tmp, _x()),
    "memmap-npy-1d": lambda tmp: _memmap_npy(tmp, np.arange(N, dtype=np.int16)),
    "np.memmap-raw": _raw_memmap,
    # stoker.ArrayDataset
    "ArrayDataset-positional": lambda tmp: stoker.ArrayDataset(_x(), np.arange(N)),
    "ArrayDataset-one-column": lambda tmp: stoker.ArrayDataset(_x(cols=2)),
    "ArrayDataset-named": lambda tmp: stoker.ArrayDataset(image=_x(cols=6).reshape(N, 2, 3), label=np.arange(N)),
    "ArrayDataset-mixed": lambda tmp: stoker.ArrayDataset(
        _x(), torch.arange(N, dtype=torch.float64), label=np.arange(N) % 5, weight=torch.linspace(0, 1, N)
    ),
    "ArrayDataset-list-column": lambda tmp: stoker.ArrayDataset(list(range(N)), [[i, -i] for i in range(N)]),
    # strided, non-contiguous, read-only, Fortran-order arrays and tensors
    "ndarray-step2": lambda tmp: _x(n=2 * N)[::2],
    "ndarray-reversed": lambda tmp: _x()[::-1],
    "ndarray-transposed": lambda tmp: _x(n=4, cols=N).T,
    "ndarray-fortran": lambda tmp: np.asfortranarray(_x(cols=5)),
    "ndarray-column-slice": lambda tmp: _x(cols=6)[:, 1:4],
    "ndarray-inner-transposed-3d": lambda tmp: _x(cols=6).reshape(N, 2, 3).transpose(0, 2, 1),
    "ndarray-readonly": lambda tmp: _readonly(_x()),
    "ndarray-1d-step3": lambda tmp: np.arange(3 * N, dtype=np.float32)[::3],
    "ndarray-large-row-stride": lambda tmp: np.arange(1000 * N, dtype=np.int64).reshape(N, 1000)[:, :3],
    "ndarray-unaligned": lambda tmp: _unaligned(),
    "tensor-step2": lambda tmp: torch.from_numpy(_x(n=2 * N))[::2],
    "tensor-transposed": lambda tmp: torch.from_numpy(_x(n=4, cols=N)).t(),
    "tensor-offset": lambda tmp: torch.from_numpy(_x(n=N + 5))[5:],
    "tensor-expanded-stride0": lambda tmp: torch.arange(4.0).expand(N, 4),
    # tensors the native path must not take (torch's own semantics apply)
    "tensor-requires-grad": lambda tmp: torch.from_numpy(_x()).requires_grad_(),
    "tensor-conj": lambda tmp: (torch.from_numpy(_x()) * (1 + 1j)).to(torch.complex64).conj(),
    "ndarray-big-endian-1d": lambda tmp: np.arange(N, dtype=">i4"),
    "ndarray-float16-2d": lambda tmp: _x(dtype=np.float16),
    "ndarray-complex64-2d": lambda tmp: _x().astype(np.complex64) * (1 + 2j),
}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("drop_last", [False, True], ids=["keep_last", "drop_last"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("name", list(ARRAY_DATASETS))
def test_array_dataset_matches_torch(name, batch_size, drop_last, num_workers, tmp_path):
    dataset = ARRAY_DATASETS[name](tmp_path)
    batches = assert_loaders_match(dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers)
    assert len(batches) == (N // batch_size if drop_last else -(-N // batch_size))


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_empty_array_dataset(num_workers):
    for dataset in (torch.zeros(0, 3), np.zeros((0, 2), np.float32), TensorDataset(torch.zeros(0), torch.zeros(0))):
        assert assert_loaders_match(dataset, batch_size=4, num_workers=num_workers) == []


def test_string_ndarray_raises_like_torch():
    for data in (np.array([["a", "b"]] * 6), np.array([[b"x"]] * 6), np.array([[object(), 1]] * 6, dtype=object)):
        raises_same(lambda: list(TorchDataLoader(data, batch_size=2)), lambda: list(stoker.DataLoader(data, batch_size=2)))


def test_datetime_ndarray_raises_like_torch():
    data = np.arange(12).astype("datetime64[s]").reshape(6, 2)
    raises_same(lambda: list(TorchDataLoader(data, batch_size=2)), lambda: list(stoker.DataLoader(data, batch_size=2)))


def test_string_ndarray_1d_matches_torch():
    # Rows of a 1-d string array are np.str_ (a str subclass): default_collate keeps them as a list.
    assert_loaders_match(np.array(["ab", "c", "def", "g", "h"]), batch_size=2)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_ndarray_subclass_indexing_is_respected():
    # np.matrix rows are (1, k) matrices, so torch's batches are (B, 1, k): a subclass's own indexing counts
    data = np.matrix(np.arange(12, dtype=np.float32).reshape(6, 2))
    assert_loaders_match(data, batch_size=4)


# --------------------------------------------------------------------------------------------------------------
# Python map-style datasets (the __getitem__ / __getitems__ + default_collate path)
# --------------------------------------------------------------------------------------------------------------

Point = collections.namedtuple("Point", ["xy", "weight"])
_BASE = torch.arange(N_PY * 3 * 4, dtype=torch.float32).reshape(N_PY, 3, 4)


def s_tensor(i):
    return torch.arange(6, dtype=torch.float32).reshape(2, 3) + i


def s_tensor_int64(i):
    return torch.full((3,), i, dtype=torch.int64)


def s_tensor_0d(i):
    return torch.tensor(i * 0.25, dtype=torch.float64)


def s_tensor_dtypes(i):
    return (
        torch.tensor([i, -i], dtype=torch.bfloat16),
        torch.tensor([i % 2], dtype=torch.bool),
        torch.tensor([i], dtype=torch.uint16),
        torch.tensor([i + 1j], dtype=torch.complex64),
        torch.tensor([i], dtype=torch.int8),
    )


def s_tensor_transposed_view(i):
    return _BASE[i].t()


def s_tensor_strided_view(i):
    return _BASE[i, :, ::2]


def s_tensor_requires_grad(i):
    return torch.full((2,), float(i), requires_grad=True)


def s_numpy(i):
    return np.arange(6, dtype=np.float32).reshape(2, 3) * i


def s_numpy_dtypes(i):
    return (
        np.full(2, i, np.uint8),
        np.full(2, -i, np.int16),
        np.full(2, i / 4, np.float16),
        np.full(2, i % 2, np.bool_),
        np.full(2, i + 1j, np.complex64),
        np.array(i * 0.5),  # 0-d array
        np.full(2, i, np.uint16),
        np.full((2, 2), i, np.float64),
    )


def s_numpy_noncontiguous(i):
    base = np.arange(40, dtype=np.float64).reshape(5, 8) + i
    return (base[::2, ::3], np.asfortranarray(base), base.T)


def s_numpy_readonly(i):
    a = np.full((2, 2), i, np.int32)
    a.flags.writeable = False
    return a


def s_numpy_empty(i):
    return np.zeros((0, 3), np.float32)


def s_numpy_scalars(i):
    return (
        np.float32(i / 2),
        np.float64(i / 3),
        np.int64(i),
        np.int32(-i),
        np.uint8(i),
        np.bool_(i % 2 == 0),
        np.float16(i),
        np.complex64(i - 1j),
    )


def s_python_scalars(i):
    return (i % 2 == 0, i, i * 0.5)


def s_python_int(i):
    return i * 3


def s_python_float(i):
    return i / 7


def s_mixed_int_first(i):
    # A batch that starts with an int and contains floats: torch.tensor([0, 1.5, ...]) -> float32 (quirk).
    return i if i % 2 == 0 else i + 0.5


def s_mixed_float_first(i):
    return i + 0.5 if i % 2 == 0 else i  # starts with a float: float64


def s_mixed_list(i):
    return [i, 2.5]


def s_str(i):
    return f"sample-{i}"


def s_bytes(i):
    return b"b" * (i % 3)


def s_dict(i):
    return {"x": np.full(3, i, np.float32), "y": i, "name": f"n{i}", "nested": {"t": torch.tensor([i, -i])}}


def s_ordereddict(i):
    return collections.OrderedDict([("b", i), ("a", torch.tensor(float(i)))])


def s_namedtuple(i):
    return Point(torch.tensor([i, i + 1]), i * 1.0)


def s_tuple(i):
    return (torch.tensor(i), np.float64(i), "s")


def s_nested_list(i):
    return [[i, i + 1], [np.float32(i), torch.tensor(i)], ("a", i), {"k": [i, i * 0.5]}]


def s_index_type(i):
    return (i, type(i).__name__)


PY_SAMPLES = {f.__name__[2:]: f for f in [
    s_tensor, s_tensor_int64, s_tensor_0d, s_tensor_dtypes, s_tensor_transposed_view, s_tensor_strided_view,
    s_tensor_requires_grad, s_numpy, s_numpy_dtypes, s_numpy_noncontiguous, s_numpy_readonly, s_numpy_empty,
    s_numpy_scalars, s_python_scalars, s_python_int, s_python_float, s_mixed_int_first, s_mixed_float_first,
    s_mixed_list, s_str, s_bytes, s_dict, s_ordereddict, s_namedtuple, s_tuple, s_nested_list, s_index_type,
]}


class GetitemsDataset(Dataset):
    """A dataset with __getitems__ (batched fetch); each sample records the container type it was asked with."""

    def __init__(self, n=N_PY):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("__getitem__ must not be called when __getitems__ exists")

    def __getitems__(self, indices):
        kind = type(indices).__name__
        return [{"i": i, "container": kind, "x": np.full(2, i, np.int64)} for i in indices]


class AddOneTensorDataset(TensorDataset):
    """A TensorDataset subclass that changes __getitem__: the native path must not bypass it."""

    def __getitem__(self, index):
        return tuple(t[index] + 1 for t in self.tensors)


class ScaledArrayDataset(stoker.ArrayDataset):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x * 2, y


def _py_dataset(name):
    if name == "__getitems__":
        return GetitemsDataset()
    return MapDataset(PY_SAMPLES[name], N_PY)


WRAPPED_DATASETS = {
    "Subset-of-TensorDataset": lambda: Subset(TensorDataset(torch.arange(40.0).reshape(20, 2)), [3, 1, 4, 1, 5, 9, 2, 6, 19]),
    "ConcatDataset-of-TensorDatasets": lambda: ConcatDataset(
        [TensorDataset(torch.arange(10.0)), TensorDataset(torch.arange(100.0, 107.0))]
    ),
    "TensorDataset-subclass-getitem": lambda: AddOneTensorDataset(torch.arange(30).reshape(15, 2)),
    "ArrayDataset-subclass-getitem": lambda: ScaledArrayDataset(_x(n=15), np.arange(15)),
    "Subset-of-ndarray": lambda: Subset(_x(), list(range(0, N, 2))),
    "list-of-ints": lambda: list(range(100, 113)),
    "list-of-tuples": lambda: [(i, float(i), str(i)) for i in range(13)],
    "list-of-tensors": lambda: [torch.full((2,), i) for i in range(13)],
    "range": lambda: range(5, 18),
    "StackDataset-dict": lambda: StackDataset(x=TensorDataset(torch.arange(12.0)), y=MapDataset(s_str, 12)),
    "StackDataset-tuple": lambda: StackDataset(_x(n=12), stoker.ArrayDataset(np.arange(12))),
}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("drop_last", [False, True], ids=["keep_last", "drop_last"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("name", [*PY_SAMPLES, "__getitems__"])
def test_python_dataset_matches_torch(name, batch_size, drop_last, num_workers):
    if name == "tensor_requires_grad" and num_workers > 0:
        # Autograd graphs cannot cross processes (torch's own workers refuse them too): threads keep them.
        assert_loaders_match(_py_dataset(name), batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                             worker_mode="thread")
        with pytest.raises(RuntimeError, match="requires_grad"):
            list(stoker.DataLoader(_py_dataset(name), batch_size=batch_size, num_workers=num_workers))
        return
    assert_loaders_match(_py_dataset(name), batch_size=batch_size, drop_last=drop_last, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("batch_size", [1, 4], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("name", list(WRAPPED_DATASETS))
def test_wrapped_dataset_matches_torch(name, batch_size, num_workers):
    assert_loaders_match(WRAPPED_DATASETS[name](), batch_size=batch_size, num_workers=num_workers)


class GrowingDataset(Dataset):
    def __init__(self):
        self.n = 5

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i * 10


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_dataset_length_read_at_each_epoch(num_workers):
    ds_t, ds_s = GrowingDataset(), GrowingDataset()
    t = TorchDataLoader(ds_t, batch_size=2)
    s = stoker.DataLoader(ds_s, batch_size=2, num_workers=num_workers)
    for n in (5, 8, 3):
        ds_t.n = ds_s.n = n
        assert len(s) == len(t)
        assert_batches_equal(list(s), list(t))
    shuffled = stoker.DataLoader(ds_s, batch_size=2, shuffle=True, num_workers=num_workers)
    ds_s.n = 9
    assert sorted(v for b in shuffled for v in b.tolist()) == [i * 10 for i in range(9)]


def test_mixed_int_float_quirk_is_float32():
    # Spelled out, since it is the quirk most likely to be "fixed" by mistake.
    (first, *_) = list(stoker.DataLoader(MapDataset(s_mixed_int_first, 4), batch_size=4))
    assert first.dtype == torch.float32
    (first, *_) = list(stoker.DataLoader(MapDataset(s_mixed_float_first, 4), batch_size=4))
    assert first.dtype == torch.float64


# --------------------------------------------------------------------------------------------------------------
# batch_size=None: no auto-collation, default_convert semantics
# --------------------------------------------------------------------------------------------------------------

UNBATCHED = {
    "python-int": lambda: MapDataset(s_python_int, 9),
    "python-scalars-tuple": lambda: MapDataset(s_python_scalars, 9),
    "dict": lambda: MapDataset(s_dict, 9),
    "numpy": lambda: MapDataset(s_numpy, 9),
    "numpy-scalars": lambda: MapDataset(s_numpy_scalars, 9),
    "namedtuple": lambda: MapDataset(s_namedtuple, 9),
    "__getitems__-dataset": lambda: _UnbatchedGetitems(),
    "TensorDataset": lambda: TensorDataset(torch.arange(18.0).reshape(9, 2), torch.arange(9)),
    "ndarray-2d": lambda: _x(n=9),
    "ndarray-1d": lambda: np.arange(9, dtype=np.int32),
    "tensor-2d": lambda: torch.arange(18).reshape(9, 2),
    "ArrayDataset-mixed": lambda: stoker.ArrayDataset(_x(n=9), label=np.arange(9)),
}


class _UnbatchedGetitems(GetitemsDataset):
    def __init__(self):
        super().__init__(9)

    def __getitem__(self, i):  # batch_size=None: torch indexes one sample at a time
        return {"i": i, "via": "__getitem__"}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("name", list(UNBATCHED))
def test_batch_size_none_matches_torch(name, num_workers):
    batches = assert_loaders_match(UNBATCHED[name](), batch_size=None, num_workers=num_workers)
    assert len(batches) == 9


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_batch_size_none_keeps_python_ints(num_workers):
    out = list(stoker.DataLoader(MapDataset(s_python_int, 5), batch_size=None, num_workers=num_workers))
    assert out == [0, 3, 6, 9, 12]
    assert all(type(v) is int for v in out)


def test_batch_size_none_with_sampler_matches_torch():
    assert_loaders_match(MapDataset(s_dict, 10), batch_size=None, sampler=[7, 2, 2, 9])
    assert_loaders_match(TensorDataset(torch.arange(10.0)), batch_size=None, sampler=[7, 2, 2, 9])


# --------------------------------------------------------------------------------------------------------------
# Explicit samplers and batch samplers: followed exactly, batch for batch
# --------------------------------------------------------------------------------------------------------------


def _gen(seed=7):
    return torch.Generator().manual_seed(seed)


SAMPLERS = {
    "SequentialSampler": lambda n: {"sampler": SequentialSampler(range(n))},
    "RandomSampler-generator": lambda n: {"sampler": RandomSampler(range(n), generator=_gen())},
    "RandomSampler-replacement": lambda n: {
        "sampler": RandomSampler(range(n), replacement=True, num_samples=2 * n, generator=_gen(3))
    },
    "SubsetRandomSampler": lambda n: {"sampler": SubsetRandomSampler([1, 4, 9, 16, 0, 3, 12], generator=_gen())},
    "WeightedRandomSampler": lambda n: {
        "sampler": WeightedRandomSampler(torch.linspace(0.1, 1.0, n), 20, generator=_gen(5))
    },
    "DistributedSampler-rank1-of-3": lambda n: {
        "sampler": DistributedSampler(range(n), num_replicas=3, rank=1, shuffle=True, seed=4)
    },
    "list": lambda n: {"sampler": [5, 3, 1]},
    "list-with-negative-and-repeated": lambda n: {"sampler": [-1, 0, -3, 2, 2, 2]},
    "tensor-of-indices": lambda n: {"sampler": torch.tensor([4, 2, 0, 8, 8])},
    "ndarray-of-indices": lambda n: {"sampler": np.array([4, 2, 0, 8, 11], dtype=np.int64)},
}

BATCH_SAMPLERS = {
    "BatchSampler-sequential": lambda n: {"batch_sampler": BatchSampler(SequentialSampler(range(n)), 4, False)},
    "BatchSampler-random-drop_last": lambda n: {
        "batch_sampler": BatchSampler(RandomSampler(range(n), generator=_gen()), 5, True)
    },
    "tuples": lambda n: {"batch_sampler": [(0, 1, 2), (5, 4), (9,)]},
    "uneven-lists": lambda n: {"batch_sampler": [[3], [0, 1, 2, 3, 4, 5, 6], [n - 1, n - 2]]},
    "generator": lambda n: {"batch_sampler": ([j, j + 1, j] for j in range(0, n - 1, 3))},
    "ndarray-batches": lambda n: {"batch_sampler": [np.array([4, 1, 2]), np.array([0]), np.arange(n - 3, n)]},
    "tensor-batches": lambda n: {"batch_sampler": [torch.tensor([4, 1, 2]), torch.tensor([n - 1, 0])]},
}

SAMPLER_DATASETS = {
    "TensorDataset": lambda: TensorDataset(torch.from_numpy(_x()), torch.arange(N)),
    "ndarray": lambda: _x(),
    "tensor-1d": lambda: torch.arange(N) * 2,
    "ArrayDataset-mixed": lambda: stoker.ArrayDataset(_x(), label=np.arange(N)),
    "python-dict": lambda: MapDataset(s_dict, N),
    "python-index-type": lambda: MapDataset(s_index_type, N),
    "python-__getitems__": lambda: GetitemsDataset(N),
}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("drop_last", [False, True], ids=["keep_last", "drop_last"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("dataset", list(SAMPLER_DATASETS))
def test_sampler_followed_exactly(dataset, sampler, drop_last, num_workers):
    assert_loaders_match(
        SAMPLER_DATASETS[dataset](),
        batch_size=3,
        drop_last=drop_last,
        num_workers=num_workers,
        kwargs_factory=lambda: SAMPLERS[sampler](N),
    )


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(SAMPLER_DATASETS))
def test_sampler_sharing_the_loaders_generator(dataset, num_workers):
    # torch draws the iterator's base seed from `generator` before the sampler draws from it: sharing one
    # generator between loader and sampler must give torch's order, epoch after epoch
    def kwargs():
        g = torch.Generator().manual_seed(11)
        return {"sampler": RandomSampler(range(N), generator=g), "generator": g}

    ds = SAMPLER_DATASETS[dataset]()
    kt, ks = kwargs(), kwargs()
    t = TorchDataLoader(ds, batch_size=4, **kt)
    s = stoker.DataLoader(ds, batch_size=4, num_workers=num_workers, **ks)
    for _ in range(3):
        assert_batches_equal(list(s), list(t))


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("batch_sampler", list(BATCH_SAMPLERS))
@pytest.mark.parametrize("dataset", list(SAMPLER_DATASETS))
def test_batch_sampler_followed_exactly(dataset, batch_sampler, num_workers):
    assert_loaders_match(
        SAMPLER_DATASETS[dataset](),
        num_workers=num_workers,
        kwargs_factory=lambda: BATCH_SAMPLERS[batch_sampler](N),
    )


class WindowSampler(torch.utils.data.Sampler):
    """A window of `k` rows per sample (a list, array or tensor of indices), as a sequence model's sampler
    gives: indexing an array dataset with it gives one sample of k rows."""

    def __init__(self, k: int, kind, n: int = N) -> None:
        self.k, self.kind, self.starts = k, kind, torch.randperm(n - k + 1, generator=_gen(7)).tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self):
        return (self.kind(list(range(i, i + self.k))) for i in self.starts)


WINDOW_DATASETS = {k: SAMPLER_DATASETS[k] for k in ("TensorDataset", "ndarray", "tensor-1d", "ArrayDataset-mixed")}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("kind", [list, np.array, torch.tensor], ids=["list", "ndarray", "tensor"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dataset", list(WINDOW_DATASETS))
def test_a_window_of_rows_per_sample_is_served_as_torch_indexes_it(dataset, k, kind, num_workers):
    if dataset in ("ndarray", "ArrayDataset-mixed") and kind is torch.tensor and k == 1:
        pytest.skip("numpy takes a one-element tensor as a scalar index (a row, not a window of one)")
    assert_loaders_match(
        WINDOW_DATASETS[dataset](),
        batch_size=3,
        num_workers=num_workers,
        kwargs_factory=lambda: {"sampler": WindowSampler(k, kind)},
    )


# --------------------------------------------------------------------------------------------------------------
# len(loader)
# --------------------------------------------------------------------------------------------------------------

LEN_CASES = {
    "bs1": dict(batch_size=1),
    "bs3": dict(batch_size=3),
    "bs7-drop_last": dict(batch_size=7, drop_last=True),
    "bs23": dict(batch_size=23),
    "bs24-drop_last": dict(batch_size=24, drop_last=True),
    "bs100": dict(batch_size=100),
    "bs-None": dict(batch_size=None),
    "shuffle-bs5": dict(batch_size=5, shuffle=True),
    "shuffle-bs5-drop_last": dict(batch_size=5, shuffle=True, drop_last=True),
    "sampler-list": dict(batch_size=2, sampler=[1, 2, 3]),
    "subset-sampler-drop_last": dict(batch_size=2, sampler=SubsetRandomSampler([1, 2, 3]), drop_last=True),
    "batch_sampler": dict(batch_sampler=[[1, 2], [3], [4, 5, 6]]),
    "BatchSampler": dict(batch_sampler=BatchSampler(range(N), 6, False)),
}


@pytest.mark.parametrize("dataset", ["TensorDataset", "python"])
@pytest.mark.parametrize("case", list(LEN_CASES))
def test_len_matches_torch(case, dataset):
    ds = TensorDataset(torch.arange(N)) if dataset == "TensorDataset" else MapDataset(s_python_int, N)
    kwargs = LEN_CASES[case]
    t, s = TorchDataLoader(ds, **kwargs), stoker.DataLoader(ds, **kwargs)
    assert len(s) == len(t)
    assert len(iter(s)) == len(iter(t))
    assert len(list(s)) == len(t)


# --------------------------------------------------------------------------------------------------------------
# User collate_fn and default_collate_fn_map extensions
# --------------------------------------------------------------------------------------------------------------


def _recording_collate(batch):
    """Returns a description of exactly what it was called with."""
    return {
        "container": type(batch).__name__,
        "len": len(batch) if hasattr(batch, "__len__") else -1,
        "types": [type(s).__name__ for s in batch] if isinstance(batch, list) else type(batch).__name__,
        "first": batch[0] if isinstance(batch, list) else batch,
    }


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("batch_size", [None, 1, 4], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("dataset", ["TensorDataset", "ndarray", "ArrayDataset", "python-dict"])
def test_user_collate_fn_called_as_given(dataset, batch_size, num_workers):
    ds = {
        "TensorDataset": lambda: TensorDataset(torch.arange(20.0).reshape(10, 2), torch.arange(10)),
        "ndarray": lambda: _x(n=10),
        "ArrayDataset": lambda: stoker.ArrayDataset(_x(n=10), label=np.arange(10)),
        "python-dict": lambda: MapDataset(s_dict, 10),
    }[dataset]()
    assert_loaders_match(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_recording_collate)


def test_collate_fn_torch_default_collate_explicitly():
    ds = TensorDataset(torch.arange(20.0).reshape(10, 2))
    assert_loaders_match(ds, batch_size=3, collate_fn=torch.utils.data.default_collate)
    assert_loaders_match(ds, batch_size=3, collate_fn=stoker.default_collate)


class Coord:
    def __init__(self, x, y):
        self.x, self.y = x, y


def _collate_coords(batch, *, collate_fn_map=None):
    return torch.tensor([[c.x, c.y] for c in batch], dtype=torch.int16) * 10


def _collate_tensor_plus_1000(batch, *, collate_fn_map=None):
    return torch.stack(batch, 0) + 1000


def _collate_ndarray_negated(batch, *, collate_fn_map=None):
    return -torch.as_tensor(np.stack(batch))


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_collate_fn_map_custom_type(num_workers):
    fmap = torch_collate.default_collate_fn_map
    assert Coord not in fmap
    fmap[Coord] = _collate_coords
    try:
        ds = MapDataset(lambda i: {"c": Coord(i, -i), "v": i}, 9)
        batches = assert_loaders_match(ds, batch_size=4, num_workers=num_workers)
        assert batches[0]["c"].dtype == torch.int16
        samples = [Coord(1, 2), Coord(3, 4)]
        assert_same(stoker.default_collate(samples), torch.utils.data.default_collate(samples))
    finally:
        del fmap[Coord]


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize(
    "dataset", ["TensorDataset", "tensor", "ArrayDataset", "python-tensor"]
)
def test_collate_fn_map_override_tensor_is_respected(dataset, num_workers):
    ds = {
        "TensorDataset": lambda: TensorDataset(torch.arange(20.0).reshape(10, 2)),
        "tensor": lambda: torch.arange(10),
        "ArrayDataset": lambda: stoker.ArrayDataset(torch.arange(10.0), label=torch.arange(10)),
        "python-tensor": lambda: MapDataset(s_tensor, 10),
    }[dataset]()
    fmap = torch_collate.default_collate_fn_map
    original = fmap[torch.Tensor]
    fmap[torch.Tensor] = _collate_tensor_plus_1000
    try:
        batches = assert_loaders_match(ds, batch_size=4, num_workers=num_workers)
        first = batches[0][0] if isinstance(batches[0], list) else batches[0]
        assert first.reshape(-1)[0] >= 1000
    finally:
        fmap[torch.Tensor] = original
    # restored: the ordinary path gives ordinary batches again
    assert_loaders_match(ds, batch_size=4, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", ["ndarray", "ArrayDataset", "python-numpy"])
def test_collate_fn_map_override_ndarray_is_respected(dataset, num_workers):
    ds = {
        "ndarray": lambda: _x(n=10) + 5,
        "ArrayDataset": lambda: stoker.ArrayDataset(_x(n=10) + 5),
        "python-numpy": lambda: MapDataset(lambda i: np.full(3, i + 1.0), 10),
    }[dataset]()
    fmap = torch_collate.default_collate_fn_map
    original = fmap[np.ndarray]
    fmap[np.ndarray] = _collate_ndarray_negated
    try:
        assert_loaders_match(ds, batch_size=4, num_workers=num_workers)
    finally:
        fmap[np.ndarray] = original


# --------------------------------------------------------------------------------------------------------------
# stoker.default_collate == torch.utils.data.default_collate, results and errors
# --------------------------------------------------------------------------------------------------------------


class _TensorSubclass(torch.Tensor):
    pass


COLLATE_OK = {
    "tensors": lambda: [torch.arange(3.0) + i for i in range(4)],
    "tensors-0d": lambda: [torch.tensor(i) for i in range(4)],
    "tensors-mixed-dtypes": lambda: [torch.zeros(2), torch.ones(2, dtype=torch.float64)],
    "tensors-int-then-float": lambda: [torch.zeros(2, dtype=torch.int64), torch.ones(2)],
    "tensors-noncontiguous": lambda: [torch.arange(12.0).reshape(3, 4).t() + i for i in range(3)],
    "tensors-requires-grad": lambda: [torch.ones(2, requires_grad=True) for _ in range(3)],
    "tensors-parameter": lambda: [torch.nn.Parameter(torch.ones(2)) for _ in range(2)],
    "tensors-conj": lambda: [(torch.ones(2) * (1 + 2j)).to(torch.complex64).conj() for _ in range(2)],
    "tensors-subclass": lambda: [torch.ones(2).as_subclass(_TensorSubclass) for _ in range(2)],
    "tensors-bfloat16": lambda: [torch.tensor([1.5, -2.0], dtype=torch.bfloat16)] * 3,
    "tensors-uint32": lambda: [torch.tensor([7], dtype=torch.uint32)] * 3,
    "tensors-float8": lambda: [torch.ones(2, dtype=torch.float8_e4m3fn)] * 2,
    "tensors-empty": lambda: [torch.zeros(2, 0)] * 3,
    "tensors-nan": lambda: [torch.tensor([float("nan"), 1.0])] * 2,
    "ndarrays": lambda: [np.arange(6, dtype=np.float32).reshape(2, 3) * i for i in range(3)],
    "ndarrays-mixed-dtypes": lambda: [np.zeros(2, np.int32), np.zeros(2, np.float32)],
    "ndarrays-0d": lambda: [np.array(1.5), np.array(2.5)],
    "ndarrays-float16": lambda: [np.arange(2, dtype=np.float16)] * 2,
    "ndarrays-uint16": lambda: [np.arange(2, dtype=np.uint16)] * 2,
    "ndarrays-uint64": lambda: [np.arange(2, dtype=np.uint64)] * 2,
    "ndarrays-bool": lambda: [np.array([True, False])] * 2,
    "ndarrays-complex128": lambda: [np.arange(2, dtype=np.complex128) * 1j] * 2,
    "ndarrays-strided": lambda: [np.arange(10.0)[::3]] * 2,
    "ndarrays-fortran": lambda: [np.asfortranarray(np.arange(6.0).reshape(2, 3))] * 2,
    "ndarrays-unaligned": lambda: [np.frombuffer(bytes(17), dtype=np.uint8)[1:].view(np.float64)] * 2,
    "ndarrays-empty": lambda: [np.zeros((2, 0))] * 3,
    "ndarrays-masked": lambda: [np.ma.masked_array([1.0, 2.0], mask=[0, 1])] * 2,
    "ndarray-then-tensor": lambda: [np.zeros(2), torch.zeros(2)],
    "numpy-scalars": lambda: [np.float32(1), np.float32(2)],
    "numpy-scalars-mixed": lambda: [np.float32(1), np.float64(2)],
    "numpy-scalars-float16": lambda: [np.float16(1), np.float16(2)],
    "ints": lambda: [1, 2, 3],
    "floats": lambda: [1.5, 2.5],
    "int-then-float": lambda: [1, 2.5],
    "float-then-int": lambda: [2.5, 1],
    "bools": lambda: [True, False],
    "strings": lambda: ["a", "bc"],
    "bytes": lambda: [b"a", b"bc"],
    "tuples": lambda: [(1, 2.0), (3, 4.0)],
    "lists": lambda: [[1, 2], [3, 4]],
    "dicts": lambda: [{"a": 1, "b": np.zeros(2)}, {"a": 2, "b": np.ones(2)}],
    "ordereddicts": lambda: [collections.OrderedDict(b=1, a=2)] * 2,
    "namedtuples": lambda: [Point(torch.ones(2), 1.0), Point(torch.zeros(2), 2.0)],
    "nested": lambda: [{"x": [(1, torch.ones(1)), {"y": "s"}]}] * 3,
}

COLLATE_ERRORS = {
    "tensors-different-shapes": lambda: [torch.zeros(2), torch.zeros(3)],
    "ndarrays-different-shapes": lambda: [np.zeros(2), np.zeros(3)],
    "ndarrays-object": lambda: [np.array([1, None]), np.array([1, None])],
    "ndarrays-str": lambda: [np.array(["a"]), np.array(["b"])],
    "ndarrays-bytes": lambda: [np.array([b"a"]), np.array([b"b"])],
    "ndarrays-datetime": lambda: [np.arange(2).astype("datetime64[s]")] * 2,
    "ndarrays-longdouble": lambda: [np.arange(2, dtype=np.longdouble)] * 2,
    "ndarrays-big-endian": lambda: [np.arange(3, dtype=">i4")] * 2,
    "ndarrays-negative-strides": lambda: [np.arange(3)[::-1]] * 2,
    "lists-unequal": lambda: [[1, 2], [1]],
    "dicts-missing-key": lambda: [{"a": 1}, {"b": 2}],
    "objects": lambda: [object(), object()],
    "python-complex": lambda: [1j, 2 + 0j],
    "sets": lambda: [{1, 2}, {3, 4}],
    "empty-batch": lambda: [],
    "sparse": lambda: [torch.eye(2).to_sparse()] * 2,
    "nones": lambda: [None, None],
    "tensor-then-ndarray": lambda: [torch.zeros(2), np.zeros(2)],
    "tensors-different-ndim": lambda: [torch.zeros(2), torch.zeros(1, 2)],
}


@pytest.mark.parametrize("name", list(COLLATE_OK))
def test_default_collate_matches_torch(name):
    make = COLLATE_OK[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.utils.data.default_collate(make())
        actual = stoker.default_collate(make())
    assert_same(actual, expected)


@pytest.mark.parametrize("name", list(COLLATE_ERRORS))
def test_default_collate_errors_match_torch(name):
    make = COLLATE_ERRORS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raises_same(lambda: torch.utils.data.default_collate(make()), lambda: stoker.default_collate(make()))


def test_default_collate_result_is_not_a_view_of_the_input():
    items = [np.arange(4.0) + i for i in range(3)]
    out = stoker.default_collate(items)
    out.fill_(-1)
    assert items[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    tensors = [torch.arange(4.0) + i for i in range(3)]
    out = stoker.default_collate(tensors)
    out.fill_(-1)
    assert tensors[1].tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("dataset", ["TensorDataset", "python"])
def test_batches_are_equal_across_repeated_epochs(dataset):
    ds = TensorDataset(torch.from_numpy(_x())) if dataset == "TensorDataset" else MapDataset(s_numpy, N)
    loader = stoker.DataLoader(ds, batch_size=5, num_workers=2)
    expected = list(TorchDataLoader(ds, batch_size=5))
    for _ in range(3):
        assert_batches_equal(list(loader), expected)


# ---- found by a drop-in audit: behaviours a user swapping loaders would otherwise meet ----------------------


class _Curriculum(torch.utils.data.Sampler):
    """A sampler the training loop steers: each index is drawn from the level the loop set last."""

    def __init__(self):
        self.level = 0

    def __len__(self):
        return 8

    def __iter__(self):
        for step in range(8):
            yield self.level * 100 + step


@pytest.mark.parametrize("dataset", [TensorDataset(torch.arange(1000)), list(range(1000))],
                         ids=["tensor_dataset", "list"])
def test_a_sampler_the_loop_steers_is_read_as_torch_reads_it_without_workers(dataset):
    def run(cls):
        sampler, seen = _Curriculum(), []
        for i, batch in enumerate(cls(dataset, batch_size=2, sampler=sampler)):
            seen.append((batch[0] if isinstance(batch, list) else batch).tolist())
            sampler.level = i + 1  # the loop moves the curriculum on after every batch
        return seen

    assert run(stoker.DataLoader) == run(TorchDataLoader) == [[0, 1], [102, 103], [204, 205], [306, 307]]


@pytest.mark.parametrize("kind", ["tensor", "tensor_dataset", "ndarray"])
@pytest.mark.parametrize("order", [dict(), dict(shuffle=True), dict(sampler=list(range(63, -1, -1)))],
                         ids=["sequential", "shuffled", "sampler"])
def test_a_dataset_the_loop_changes_is_read_at_each_batch_as_torch_reads_it_without_workers(kind, order):
    # A replay buffer, say: without workers torch indexes it at each next(), so every batch sees the loop's
    # latest writes.
    def run(cls):
        buffer = torch.zeros(64, 3)
        dataset = {"tensor": buffer, "tensor_dataset": TensorDataset(buffer), "ndarray": buffer.numpy()}[kind]
        generator = torch.Generator().manual_seed(5)
        seen = []
        for step, batch in enumerate(cls(dataset, batch_size=4, generator=generator, **order)):
            batch = batch[0] if isinstance(batch, list) else batch
            seen.append(torch.as_tensor(batch).unique().tolist())
            buffer.fill_(step + 1)
        return seen

    expected = run(TorchDataLoader)
    assert expected == [[float(step)] for step in range(16)]
    assert run(stoker.DataLoader) == expected


def _record_worker(worker_id):
    import os

    info = torch.utils.data.get_worker_info()
    _record_worker.calls.append((worker_id, os.getpid(), info.id if info else None))
    np.random.seed(1234 + worker_id)  # the usual recipe: must reseed the worker's generators, not the caller's


_record_worker.calls = []


@pytest.mark.parametrize("collate_fn", [None, lambda batch: batch], ids=["default_collate", "custom_collate"])
def test_worker_init_fn_with_an_array_dataset_runs_in_worker_processes_as_torchs(collate_fn):
    ds = TensorDataset(torch.arange(40.0))
    kw = dict(batch_size=4, num_workers=2, worker_init_fn=_record_worker)
    if collate_fn is not None:
        kw["collate_fn"] = collate_fn
    np.random.seed(0)
    expected_draw = np.random.rand()
    np.random.seed(0)
    batches = list(stoker.DataLoader(ds, **kw))
    assert np.random.rand() == expected_draw  # the main process's generator untouched
    assert _record_worker.calls == []  # called in the workers, not here
    assert_batches_equal(batches, list(TorchDataLoader(ds, **kw)))


class _Augmented(TensorDataset):
    """A TensorDataset subclass that indexes in a way of its own (a random augmentation)."""

    def __getitem__(self, i):
        import os

        x, = super().__getitem__(i)
        return x + torch.rand(()), os.getpid()


def test_a_tensor_dataset_subclass_with_its_own_indexing_is_loaded_by_worker_processes():
    import os

    ds = _Augmented(torch.zeros(32))

    def run(cls):
        torch.manual_seed(7)
        return list(cls(ds, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(1)))

    first, second = run(stoker.DataLoader), run(stoker.DataLoader)
    assert all(pid != os.getpid() for _, pids in first for pid in pids.tolist())  # worker processes
    # seeded per worker as torch seeds them: the same run twice gives the same augmentations
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


@pytest.mark.parametrize("kw", [dict(batch_size=None), dict(batch_size=2, collate_fn=lambda batch: batch[0])],
                         ids=["unbatched", "collate_returns_a_sample"])
def test_batches_from_threads_serving_an_array_dataset_are_copies_as_from_worker_processes(kw):
    # The dataset's rows are indexed in this process (threads): a batch that is a row of it must not be a view,
    # or writing into it would change the dataset, which torch's workers never do.
    data = torch.arange(12.0).reshape(6, 2)
    array = np.arange(12.0).reshape(6, 2)
    for ds in (TensorDataset(data), data, array):
        for batch in stoker.DataLoader(ds, num_workers=2, **kw):
            for t in batch if isinstance(batch, (list, tuple)) else [batch]:
                t.mul_(0) if isinstance(t, torch.Tensor) else np.multiply(t, 0, out=t)
    assert data.tolist() == torch.arange(12.0).reshape(6, 2).tolist()
    assert array.tolist() == np.arange(12.0).reshape(6, 2).tolist()


@pytest.mark.parametrize("dataset", [list(range(8)), torch.arange(8)], ids=["python", "array"])
def test_persistent_workers_reset_and_hand_out_their_one_iterator_again_as_torchs(dataset):
    # torch's loader with persistent workers has one iterator: iter() resets it, the epoch it served ends there,
    # and that same object serves the next epoch.
    seen = {}
    for cls in (stoker.DataLoader, TorchDataLoader):
        loader = cls(dataset, batch_size=2, num_workers=2, persistent_workers=True)
        it = iter(loader)
        first = next(it).tolist()
        again = iter(loader)
        seen[cls] = (again is it, first, [b.tolist() for b in it], [b.tolist() for b in loader],
                     len(iter(loader)))
    assert seen[stoker.DataLoader] == seen[TorchDataLoader]
    assert seen[TorchDataLoader][0] is True


def test_a_persistent_loader_dropped_with_its_iterator_ends_its_workers_at_once():
    import gc

    loader = stoker.DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    it = iter(loader)
    next(it)
    pids = [w.pid for w in it._workers]
    gc.disable()  # no reference cycle keeps them: the loader holds its iterator weakly
    try:
        del it, loader
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_running(pid) for pid in pids] == [False, False]
    finally:
        gc.enable()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_persistent_loader_whose_epoch_fails_to_begin_serves_the_next_from_the_same_iterator():
    class Sampler(torch.utils.data.Sampler):
        fail = False

        def __iter__(self):
            if self.fail:
                raise ValueError("the sampler cannot begin")
            return iter(range(8))

        def __len__(self):
            return 8

    sampler = Sampler()
    loader = stoker.DataLoader(list(range(8)), batch_size=4, sampler=sampler, num_workers=2,
                               persistent_workers=True)
    it = iter(loader)
    assert next(it).tolist() == [0, 1, 2, 3]
    sampler.fail = True
    with pytest.raises(ValueError, match="the sampler cannot begin"):
        next(iter(loader))  # raised at the batch it stops (torch raises it at iter(), reading ahead)
    assert iter(loader) is it
    sampler.fail = False
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_large_array_dataset_with_rows_not_contiguous_is_not_copied_whole_at_each_iter(monkeypatch):
    from stoker import _arrays

    monkeypatch.setattr(_arrays, "NONCONTIGUOUS_COPY_LIMIT", 32 << 10)  # the limit, scaled down
    nhwc = torch.arange(64 * 8 * 8 * 3, dtype=torch.float32).reshape(64, 8, 8, 3)
    small = TensorDataset(nhwc[:4].permute(0, 3, 1, 2))  # 3 KiB: copied, served natively
    large = TensorDataset(nhwc.permute(0, 3, 1, 2))      # 48 KiB: indexed in Python, row by row
    strided = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)[:, ::2]  # 128 KiB, every other column
    assert stoker.DataLoader(small, batch_size=2)._stoker_iterator_kind()[0] == "array"
    for ds in (large, strided):
        loader = stoker.DataLoader(ds, batch_size=8, shuffle=False)
        assert loader._stoker_iterator_kind()[0] == "python"
        assert_batches_equal(list(loader), list(TorchDataLoader(ds, batch_size=8)))


def test_a_loader_with_live_persistent_workers_refuses_pickling_as_torchs_does():
    import pickle

    for cls in (stoker.DataLoader, TorchDataLoader):
        loader = cls(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
        list(loader)
        with pytest.raises(NotImplementedError, match="cannot be pickled"):
            pickle.dumps(loader)


def test_an_array_dataset_with_rows_not_contiguous_is_copied_once_and_stays_native(monkeypatch):
    from stoker import _arrays

    monkeypatch.setattr(_arrays, "NONCONTIGUOUS_COPY_LIMIT", 32 << 10)
    nhwc = torch.arange(64 * 8 * 8 * 3, dtype=torch.float32).reshape(64, 8, 8, 3)
    ds = stoker.ArrayDataset(nhwc.permute(0, 3, 1, 2))  # 48 KiB, over the (scaled) limit: copied here, once
    assert ds.arrays[0].is_contiguous() and torch.equal(ds.arrays[0], nhwc.permute(0, 3, 1, 2))
    loader = stoker.DataLoader(ds, batch_size=8)
    assert loader._stoker_iterator_kind()[0] == "array"
    assert [b[0].tolist() for b in loader] == [nhwc.permute(0, 3, 1, 2)[i:i + 8].tolist() for i in range(0, 64, 8)]


def test_a_memory_map_is_an_array_dataset(tmp_path):
    from stoker._arrays import is_array_dataset

    path = tmp_path / "x.npy"
    np.save(path, np.arange(12.0).reshape(6, 2))
    assert is_array_dataset(np.load(path, mmap_mode="r"))


def test_thread_served_batches_in_other_containers_are_copies_too():
    import dataclasses

    @dataclasses.dataclass
    class Pair:
        x: torch.Tensor
        n: int

    data = torch.arange(12.0).reshape(6, 2)
    for collate in (lambda b: collections.OrderedDict(x=b[0][0]), lambda b: Pair(b[0][0], 1)):
        for batch in stoker.DataLoader(TensorDataset(data), batch_size=1, num_workers=2, collate_fn=collate):
            (batch["x"] if isinstance(batch, dict) else batch.x).mul_(0)
            assert type(batch) in (collections.OrderedDict, Pair)
    assert data.tolist() == torch.arange(12.0).reshape(6, 2).tolist()
