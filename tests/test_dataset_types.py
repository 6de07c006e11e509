"""Array datasets: ArrayDataset's indexing contract, memory maps, element types, and row sizes from one byte
to 64 KiB, each checked against torch's loader over the same dataset and against the expected values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TorchDataLoader, assert_batches_equal, assert_loaders_match, assert_same, isolated
from torch.utils.data import TensorDataset

import stoker

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

N = 31


# --------------------------------------------------------------------------------------------------------------
# ArrayDataset indexing contract
# --------------------------------------------------------------------------------------------------------------


def _x():
    return np.arange(N * 3, dtype=np.float32).reshape(N, 3)


def _y():
    return torch.arange(N) * 2


def test_positional_item_is_tuple_of_rows():
    x, y = _x(), _y()
    ds = stoker.ArrayDataset(x, y)
    assert len(ds) == N
    for i in (0, 5, N - 1, -1, np.int64(3)):
        item = ds[i]
        assert type(item) is tuple and len(item) == 2
        assert_same(item[0], x[i])
        assert_same(item[1], y[i])


def test_single_column_item_is_one_tuple():
    x = _x()
    item = stoker.ArrayDataset(x)[4]
    assert type(item) is tuple and len(item) == 1
    assert_same(item[0], x[4])


def test_named_item_is_dict_in_argument_order():
    x, y = _x(), _y()
    ds = stoker.ArrayDataset(image=x, label=y)
    item = ds[7]
    assert type(item) is dict and list(item) == ["image", "label"]
    assert_same(item["image"], x[7])
    assert_same(item["label"], y[7])
    assert list(stoker.ArrayDataset(b=y, a=x)[0]) == ["b", "a"]


def test_mixed_item_is_rows_then_one_dict():
    x, y, w = _x(), _y(), np.linspace(0, 1, N)
    item = stoker.ArrayDataset(x, w, label=y)[9]
    assert type(item) is tuple and len(item) == 3
    assert_same(item[0], x[9])
    assert_same(item[1], w[9])
    assert type(item[2]) is dict and list(item[2]) == ["label"]
    assert_same(item[2]["label"], y[9])


def test_sequences_become_arrays():
    ds = stoker.ArrayDataset([1, 2, 3], [[1.5, 2.5]] * 3)
    assert isinstance(ds.arrays[0], np.ndarray) and isinstance(ds.arrays[1], np.ndarray)
    assert ds[1][0] == 2 and ds[1][1].tolist() == [1.5, 2.5]


def test_arrays_are_kept_not_copied():
    x, y = _x(), _y()
    ds = stoker.ArrayDataset(x, label=y)
    assert ds.arrays[0] is x and ds.named_arrays["label"] is y


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize(
    "make",
    [
        lambda: stoker.ArrayDataset(_x(), _y()),
        lambda: stoker.ArrayDataset(image=_x(), label=_y()),
        lambda: stoker.ArrayDataset(_x(), label=_y()),
        lambda: stoker.ArrayDataset(_y()),
    ],
    ids=["positional", "named", "mixed", "single"],
)
def test_batches_are_default_collate_of_items(make, num_workers):
    ds = make()
    batches = list(stoker.DataLoader(ds, batch_size=4, num_workers=num_workers))
    expected = [torch.utils.data.default_collate([ds[i] for i in range(s, min(s + 4, N))]) for s in range(0, N, 4)]
    assert_batches_equal(batches, expected)


@pytest.mark.parametrize("kind", ["ArrayDataset", "TensorDataset", "bare-ndarray"])
def test_in_place_changes_between_epochs_are_seen(kind):
    x = _x()
    if kind == "ArrayDataset":
        ds, arr = stoker.ArrayDataset(x), x
    elif kind == "TensorDataset":
        t = torch.from_numpy(x.copy())
        ds, arr = TensorDataset(t), t
    else:
        ds, arr = x, x
    loader = stoker.DataLoader(ds, batch_size=8)
    list(loader)
    arr[3] = -1
    assert_batches_equal(list(loader), list(TorchDataLoader(ds, batch_size=8)))


def test_replaced_tensors_between_epochs_are_seen():
    ds = TensorDataset(torch.arange(10.0))
    loader = stoker.DataLoader(ds, batch_size=4)
    list(loader)
    ds.tensors = (torch.arange(100.0, 110.0),)
    assert_batches_equal(list(loader), list(TorchDataLoader(ds, batch_size=4)))


# --------------------------------------------------------------------------------------------------------------
# Memory maps
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def npy_files(tmp_path):
    x = np.arange(N * 5, dtype=np.float32).reshape(N, 5) - 7
    labels = np.arange(N, dtype=np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path / "x.npy", tmp_path / "labels.npy", x, labels


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
def test_memmap_npy_bare(npy_files, num_workers):
    xpath, _, x, _ = npy_files
    data = np.load(xpath, mmap_mode="r")
    assert isinstance(data, np.memmap)
    batches = assert_loaders_match(data, batch_size=6, num_workers=num_workers)
    assert torch.equal(torch.cat(batches), torch.from_numpy(x))


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
def test_memmap_npy_in_array_dataset_shuffled(npy_files, num_workers):
    xpath, lpath, x, labels = npy_files
    ds = stoker.ArrayDataset(np.load(xpath, mmap_mode="r"), label=np.load(lpath, mmap_mode="r"))
    seen = []
    for batch in stoker.DataLoader(ds, batch_size=4, shuffle=True, seed=2, num_workers=num_workers):
        rows, lab = batch[0], batch[1]["label"]
        assert torch.equal(rows, torch.from_numpy(x)[lab])
        seen.extend(lab.tolist())
    assert sorted(seen) == labels.tolist()


def test_memmap_copy_on_write_mode(npy_files):
    xpath, _, x, _ = npy_files
    data = np.load(xpath, mmap_mode="c")
    assert_loaders_match(data, batch_size=5)
    data2 = np.load(xpath, mmap_mode="r+")
    assert_loaders_match(TensorDataset(torch.from_numpy(np.asarray(data2))), batch_size=5)


# --------------------------------------------------------------------------------------------------------------
# Element types
# --------------------------------------------------------------------------------------------------------------

TENSOR_DTYPES = [
    torch.bfloat16, torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
]
NUMPY_DTYPES = [
    np.bool_, np.float16, np.complex64, np.complex128, np.float32, np.float64, np.int8, np.uint8, np.int16,
    np.uint16, np.int32, np.uint32, np.int64,
]


def _tensor_values(dtype, shape):
    base = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    if dtype is torch.bool:
        return base.remainder(3) == 1
    if dtype.is_complex:
        return (base * 0.5 - 3).to(dtype) * (1 - 1j)
    if dtype.is_floating_point:
        return (base * 0.5 - 3).to(dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return base.to(torch.int64).remainder(251).add(60000 if dtype is not torch.uint16 else 100).to(dtype)
    return base.to(torch.int64).remainder(100).sub(50 if dtype is not torch.uint8 else 0).to(dtype)


@pytest.mark.parametrize("shape", [(N,), (N, 3)], ids=["1d", "2d"])
@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
def test_tensor_dtypes(dtype, shape):
    t = _tensor_values(dtype, shape)
    for ds in (stoker.ArrayDataset(t, label=torch.arange(N)), TensorDataset(t), t):
        batches = list(stoker.DataLoader(ds, batch_size=7, shuffle=True, seed=1))
        for batch in batches:
            rows = batch if isinstance(batch, torch.Tensor) else batch[0]
            assert rows.dtype == dtype
            assert rows.shape[1:] == t.shape[1:]
            if isinstance(batch, list) and isinstance(batch[-1], dict):
                assert torch.equal(rows, t[batch[-1]["label"]])
        if dtype not in (torch.uint32, torch.uint64):  # (torch's own collate of these 0-d rows is fine too)
            assert_loaders_match(ds, batch_size=7)


@pytest.mark.parametrize("shape", [(N,), (N, 2, 2)], ids=["1d", "3d"])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_dtypes(dtype, shape):
    a = (np.arange(int(np.prod(shape))).reshape(shape) % 7 - 2).astype(dtype)
    if np.dtype(dtype).kind == "c":
        a = a * (1 + 2j)
    for ds in (stoker.ArrayDataset(a, label=np.arange(N)), stoker.ArrayDataset(a), a):
        batches = assert_loaders_match(ds, batch_size=7)
        rows = torch.cat([b if isinstance(b, torch.Tensor) else b[0] for b in batches])
        assert rows.dtype == torch.from_numpy(a).dtype
        assert torch.equal(rows, torch.from_numpy(a))


def test_mixed_column_types_in_one_dataset():
    img = np.arange(N * 2 * 3 * 3, dtype=np.uint8).reshape(N, 2, 3, 3)
    mask = np.arange(N * 4).reshape(N, 4) % 3 == 0
    emb = _tensor_values(torch.bfloat16, (N, 5))
    ds = stoker.ArrayDataset(img, emb, mask=mask, target=np.linspace(-1, 1, N, dtype=np.float16), idx=torch.arange(N))
    assert_loaders_match(ds, batch_size=6)
    assert_loaders_match(ds, batch_size=6, num_workers=2)
    for batch in stoker.DataLoader(ds, batch_size=6, shuffle=True, seed=9, num_workers=2):
        idx = batch[2]["idx"]
        assert torch.equal(batch[0], torch.from_numpy(img)[idx])
        assert torch.equal(batch[1], emb[idx])
        assert torch.equal(batch[2]["mask"], torch.from_numpy(mask)[idx])


# --------------------------------------------------------------------------------------------------------------
# Row sizes: 1 byte ... 64 KiB
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("row_bytes", [1, 2, 3, 4, 5, 7, 8, 9, 16, 24, 63, 64, 65, 1000])
def test_row_sizes(row_bytes, num_workers):
    n = 97
    a = (np.arange(n * row_bytes) % 251).astype(np.uint8).reshape(n, row_bytes)
    ds = stoker.ArrayDataset(a, idx=np.arange(n))
    assert_loaders_match(ds, batch_size=10, num_workers=num_workers)
    for batch in stoker.DataLoader(ds, batch_size=10, shuffle=True, seed=row_bytes, num_workers=num_workers):
        assert torch.equal(batch[0], torch.from_numpy(a)[batch[1]["idx"]])


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.int16, np.float32, np.float64, np.complex128])
def test_one_element_rows(dtype):
    n = 50
    base = (np.arange(n) % 5).astype(dtype)
    for data in (base, base.reshape(n, 1), base.reshape(n, 1, 1), torch.from_numpy(base.copy())):
        assert_loaders_match(data, batch_size=8)
        assert_loaders_match(stoker.ArrayDataset(data), batch_size=8, num_workers=2)


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("kind", ["ndarray", "TensorDataset", "ArrayDataset"])
def test_large_rows_64k(kind, num_workers):
    n, width = 40, 16 * 1024  # float32: 64 KiB per row
    x = np.arange(n * width, dtype=np.float32).reshape(n, width)
    ds = {
        "ndarray": lambda: x,
        "TensorDataset": lambda: TensorDataset(torch.from_numpy(x), torch.arange(n)),
        "ArrayDataset": lambda: stoker.ArrayDataset(x, torch.arange(n)),
    }[kind]()
    assert_loaders_match(ds, batch_size=7, num_workers=num_workers)
    if kind != "ndarray":
        seen = []
        for rows, idx in stoker.DataLoader(ds, batch_size=7, shuffle=True, seed=3, num_workers=num_workers):
            assert torch.equal(rows, torch.from_numpy(x)[idx])
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(n))


def test_zero_size_numpy_rows():
    for data in (np.zeros((6, 0), np.float32), np.zeros((6, 3, 0)), stoker.ArrayDataset(np.zeros((6, 0)))):
        batches = assert_loaders_match(data, batch_size=4)
        assert len(batches) == 2


@pytest.mark.parametrize(
    "make",
    [lambda: torch.zeros(6, 0), lambda: TensorDataset(torch.zeros(6, 0), torch.arange(6)),
     lambda: stoker.ArrayDataset(torch.zeros(6, 2, 0))],
    ids=["tensor", "TensorDataset", "ArrayDataset"],
)
def test_zero_size_tensor_rows(make):
    expected = list(TorchDataLoader(make(), batch_size=4))
    batches, error, unraisable = isolated(lambda: list(stoker.DataLoader(make(), batch_size=4)))
    assert error is None, error
    assert not unraisable, unraisable
    assert_batches_equal(batches, expected)


def test_large_dataset_shuffled_rows_match_labels():
    n = 4097
    x = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    ds = stoker.ArrayDataset(x, torch.arange(n))
    seen = []
    for rows, idx in stoker.DataLoader(ds, batch_size=128, shuffle=True, seed=0, num_workers=2):
        assert torch.equal(rows, torch.from_numpy(x)[idx])
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(n))
