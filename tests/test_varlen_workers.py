"""PadCollate in stoker's worker processes: the padded outputs (and the fields collated beside them) are written
straight into the batch's slot of the shared-memory ring, so they cross to the main process without a copy,
and the batches are the ones the main process builds, value by value. Also the native entry point behind it,
core.pad_sequences_into, against outputs it must refuse."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from helpers import MapDataset, TorchDataLoader, assert_batches_equal, assert_same
from torch.utils.data import Dataset

import stoker
from stoker import _collate, _varlen, _workers
from stoker._native import core
from stoker._varlen import PadCollate

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")

N = 40
_LENGTHS = np.random.default_rng(11).integers(0, 70, N)


def _ids(i: int) -> list[int]:
    return [(j * 13 + i) % 997 for j in range(int(_LENGTHS[i]))]


class Tokens(Dataset):
    """Sample i: its token ids as a list, an int32 array or a tensor (by i % 3), labels, two fields that are
    not padded (an int and a 2-D tensor), and how many blocks the loading process's buffer pool has allocated
    so far."""

    def __init__(self, own_mask: bool = False) -> None:
        self.own_mask = own_mask

    def __len__(self):
        return N

    def __getitem__(self, i):
        ids = _ids(i)
        form = (list, lambda v: np.array(v, np.int32), torch.tensor)[i % 3]
        sample = {"input_ids": form(ids), "labels": ids[1:] + [-100] if ids else [], "index": i,
                  "image": torch.full((2, 3), float(i))}
        if self.own_mask:
            sample["attention_mask"] = [1] * len(ids)
        sample["pool"] = _collate.POOL.stats()["allocations"]
        return sample


def _ring_ranges(path: str) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file at `path` (the worker ring)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if path in line:
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _in_ring(t: torch.Tensor, ranges) -> bool:
    """True for a tensor that is a view of the ring (not a shared-memory segment of its own, not a copy)."""
    ptr = t.data_ptr()
    return not t.is_shared() and any(lo <= ptr and ptr + t.numel() * t.element_size() <= hi for lo, hi in ranges)


def _worker_batches(dataset, collate, placed=None):
    """Copies of the batches of stoker's loader with 2 worker processes and batches of 8, each checked by
    placed(batch, ranges) while it still holds its slot. N / 8 = 5 batches and the ring's 6 slots: every batch
    has one, whatever order the workers answer in."""
    loader = stoker.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate, persistent_workers=True)
    assert len(loader) < (loader.prefetch_factor or 2) * 2 + 2
    batches = []
    try:
        for batch in loader:
            if placed is not None:
                placed(batch, _ring_ranges(loader._stoker_pool.ring_path))
            batches.append({k: v.clone() for k, v in batch.items()})
    finally:
        loader._stoker_pool.shutdown()
    return batches


def _without_pool(batches):
    for b in batches:
        b.pop("pool", None)
    return batches


_COLLATES = {
    "right": lambda: PadCollate(),
    "left, multiple of 8": lambda: PadCollate(pad_id=3, padding_side="left", pad_to_multiple_of=8),
    "multiple of 5, no mask": lambda: PadCollate(pad_to_multiple_of=5, return_attention_mask=False),
    "labels pad 7, keys": lambda: PadCollate(label_pad_id=7, keys=["labels", "input_ids"]),
}


@pytest.mark.parametrize("make", _COLLATES.values(), ids=_COLLATES.keys())
def test_padded_batches_are_written_into_the_ring(make):
    collate = make()
    padded = ["input_ids", "labels"] + (["attention_mask"] if collate.return_attention_mask else [])

    def placed(batch, ranges):
        for key in [*padded, "image"]:  # "image" goes through stoker's default_collate into the slot too
            assert _in_ring(batch[key], ranges), key

    batches = _worker_batches(Tokens(), collate, placed)
    # Nothing was padded into the workers' pools and then copied into the slot.
    assert all(int(n) == 0 for b in batches for n in b["pool"])
    expected = list(TorchDataLoader(Tokens(), batch_size=8, collate_fn=collate))
    assert_batches_equal(_without_pool(batches), _without_pool(expected))
    assert all(set(b) >= set(padded) for b in batches)


def test_samples_with_their_own_attention_mask():
    collate = PadCollate(padding_side="left", pad_to_multiple_of=4)

    def placed(batch, ranges):
        assert all(_in_ring(batch[k], ranges) for k in ("input_ids", "labels", "attention_mask"))

    batches = _worker_batches(Tokens(own_mask=True), collate, placed)
    expected = list(TorchDataLoader(Tokens(own_mask=True), batch_size=8, collate_fn=collate))
    assert_batches_equal(_without_pool(batches), _without_pool(expected))
    for b in batches:
        assert list(b) == ["input_ids", "labels", "index", "image", "attention_mask"]
        assert torch.equal(b["attention_mask"].sum(1), torch.as_tensor(_LENGTHS[b["index"]]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_bare_sequences(side):
    collate = PadCollate(pad_id=-1, padding_side=side)
    dataset = MapDataset(lambda i: np.array(_ids(i), np.uint16) if i % 2 else _ids(i), N)

    def placed(batch, ranges):
        assert _in_ring(batch["input_ids"], ranges) and _in_ring(batch["attention_mask"], ranges)

    batches = _worker_batches(dataset, collate, placed)
    assert_batches_equal(batches, list(TorchDataLoader(dataset, batch_size=8, collate_fn=collate)))


def test_batches_larger_than_a_slot_get_a_segment_of_their_own(monkeypatch):
    monkeypatch.setattr(_workers, "_DEFAULT_SLOT_BYTES", 256)  # smaller than any padded batch here
    collate = PadCollate(pad_to_multiple_of=16)

    def placed(batch, ranges):
        for key in ("input_ids", "labels", "attention_mask"):
            assert batch[key].is_shared() and not _in_ring(batch[key], ranges), key

    batches = _worker_batches(Tokens(), collate, placed)
    assert all(int(n) == 0 for b in batches for n in b["pool"])  # padded straight into the segment
    expected = list(TorchDataLoader(Tokens(), batch_size=8, collate_fn=collate))
    assert_batches_equal(_without_pool(batches), _without_pool(expected))


def test_batches_larger_than_free_shared_memory_take_the_pooled_path(monkeypatch):
    # A segment larger than the free shared memory would fault halfway: such a batch is padded into the pool,
    # as in the main process, and travels as any batch too large for its slot does.
    monkeypatch.setattr(_workers, "_DEFAULT_SLOT_BYTES", 256)
    monkeypatch.setattr(_varlen, "_free_shared_memory", lambda: 0)  # the workers are forked with it
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the patch reaches forked workers only")
    collate = PadCollate(padding_side="left")
    batches = _worker_batches(Tokens(), collate)
    assert any(int(n) > 0 for b in batches for n in b["pool"])
    expected = list(TorchDataLoader(Tokens(), batch_size=8, collate_fn=collate))
    assert_batches_equal(_without_pool(batches), _without_pool(expected))


def test_batches_without_a_slot_are_padded_into_shared_memory():
    collate = PadCollate(pad_to_multiple_of=8)
    loader = stoker.DataLoader(Tokens(), batch_size=4, num_workers=2, collate_fn=collate)
    kept = list(loader)  # 10 batches kept: those past the ring's 6 slots have none
    pickled = [b for b in kept if b["input_ids"].is_shared()]
    assert len(pickled) >= len(kept) - 6
    assert all(b["labels"].is_shared() and b["attention_mask"].is_shared() for b in pickled)
    assert all(int(n) == 0 for b in kept for n in b["pool"])
    expected = list(TorchDataLoader(Tokens(), batch_size=4, collate_fn=collate))
    assert_batches_equal(_without_pool(kept), _without_pool(expected))


def test_values_left_to_the_numpy_path_still_cross():
    # A range is not read natively: the numpy path pads it, and the batch is copied into its slot as before.
    dataset = MapDataset(lambda i: range(i % 7) if i == 5 else _ids(i), N)
    collate = PadCollate(padding_side="left")
    batches = _worker_batches(dataset, collate)
    assert_batches_equal(batches, list(TorchDataLoader(dataset, batch_size=8, collate_fn=collate)))


def test_errors_cross_from_a_worker():
    dataset = MapDataset(lambda i: [1, 2.5] if i == 13 else _ids(i), N)
    loader = stoker.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=PadCollate())
    with pytest.raises(TypeError, match=r"sample 5: 'input_ids' should hold integers, got dtype float64"):
        list(loader)


def test_thread_workers_match():
    collate = PadCollate(padding_side="left", pad_to_multiple_of=8)
    loader = stoker.DataLoader(Tokens(), batch_size=8, num_workers=2, worker_mode="thread", collate_fn=collate)
    expected = list(TorchDataLoader(Tokens(), batch_size=8, collate_fn=collate))
    assert_batches_equal(_without_pool(list(loader)), _without_pool(expected))


def test_fields_not_padded_stay_torchs_in_torch_workers():
    # In torch's worker processes the fields PadCollate does not pad are torch's default_collate's: stacked
    # into shared memory, which torch's queue sends without a copy.
    batches = list(TorchDataLoader(Tokens(), batch_size=8, num_workers=2, collate_fn=PadCollate()))
    assert all(b["image"].is_shared() for b in batches)


# --------------------------------------------------------------------------------------------------------------
# core.pad_sequences_into: what it accepts to write into
# --------------------------------------------------------------------------------------------------------------

_COLUMNS = [[[1, 2, 3], np.array([4], np.int8)], [torch.tensor([5, 6, 7]), (8,)]]


def _into(make_out, multiple=0, left=False, mask=True):
    asked = []

    def allocate(outputs, batch, width):
        asked.append((outputs, batch, width))
        return make_out((outputs, batch, width))

    done = core.pad_sequences_into(_COLUMNS, [0, -100], multiple, left, mask, allocate)
    return done, asked


@pytest.mark.parametrize(("multiple", "left", "mask"), [(0, False, True), (4, True, True), (3, False, False)])
def test_pad_sequences_into_matches_pad_sequences(multiple, left, mask):
    out = {}

    def make(shape):
        out["array"] = np.full(shape, 12345, np.int64)
        return out["array"]

    done, asked = _into(make, multiple, left, mask)
    assert done is True
    width = 3 if multiple == 0 else -(-3 // multiple) * multiple
    assert asked == [(3 if mask else 2, 2, width)]
    capsules = core.pad_sequences(_COLUMNS, [0, -100], multiple, left, mask, _collate.POOL)
    expected = torch.stack([torch.from_dlpack(c) for c in capsules])
    assert_same(torch.from_numpy(out["array"]), expected)


_BAD_OUTPUTS = {
    "not an array": (lambda shape: torch.zeros(shape, dtype=torch.int64), TypeError,
                     "out should be a numpy array, got Tensor"),
    "int32": (lambda shape: np.zeros(shape, np.int32), TypeError, "out should hold int64, got dtype int32"),
    "big-endian": (lambda shape: np.zeros(shape, ">i8"), TypeError, "out should hold int64"),
    "one row short": (lambda shape: np.zeros((shape[0], shape[1] - 1, shape[2]), np.int64), ValueError,
                      r"out should have shape \(3, 2, 3\), got \(3, 1, 3\)"),
    "flat": (lambda shape: np.zeros(shape[0] * shape[1] * shape[2], np.int64), ValueError,
             r"out should have shape \(3, 2, 3\), got \(18\)"),
    "wider": (lambda shape: np.zeros((*shape[:2], shape[2] + 1), np.int64), ValueError,
              r"out should have shape \(3, 2, 3\), got \(3, 2, 4\)"),
    "transposed": (lambda shape: np.zeros(shape[::-1], np.int64).T, ValueError,
                   r"out should hold each output C-contiguous, the next at least 48 bytes on; its strides are "
                   r"\(8, 24, 48\)"),
    "every other column": (lambda shape: np.zeros((*shape[:2], 2 * shape[2]), np.int64)[:, :, ::2], ValueError,
                           r"C-contiguous, .* its strides are \(96, 48, 16\)"),
    "outputs overlap": (lambda shape: np.lib.stride_tricks.as_strided(np.zeros(64, np.int64), shape, (40, 24, 8)),
                        ValueError, r"the next at least 48 bytes on; its strides are \(40, 24, 8\)"),
    "outputs backwards": (lambda shape: np.zeros(shape, np.int64)[::-1], ValueError, r"strides are \(-48, 24, 8\)"),
    "read-only": (lambda shape: _read_only(shape), ValueError, "out should be writable"),
    "misaligned": (lambda shape: np.frombuffer(bytearray(8 * 18 + 1), np.int64, 18, 1).reshape(shape), ValueError,
                   "out should be 8-byte aligned"),
}


def _read_only(shape):
    a = np.zeros(shape, np.int64)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", _BAD_OUTPUTS)
def test_pad_sequences_into_refuses_other_outputs(name):
    make, error, match = _BAD_OUTPUTS[name]
    with pytest.raises(error, match=match) as caught:
        _into(make)
    assert str(caught.value).startswith("pad_sequences_into: out should ")


def test_pad_sequences_into_outputs_apart():
    # Gaps between the outputs (each may start where its consumer wants it aligned) are left alone.
    block = np.full(3 * 16, 12345, np.int64)
    done, _ = _into(lambda shape: np.lib.stride_tricks.as_strided(block, shape, (16 * 8, 3 * 8, 8)))
    assert done is True
    out = block.reshape(3, 16)
    assert out[:, :6].tolist() == [[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, -100, -100], [1, 1, 1, 1, 0, 0]]
    assert (out[:, 6:] == 12345).all()


def test_pad_sequences_into_declined_or_not_covered():
    done, asked = _into(lambda shape: None)
    assert done is False and asked == [(3, 2, 3)]  # allocate declined: nothing written
    calls = []
    done = core.pad_sequences_into([[range(3), [1]]], [0], 0, False, True, lambda *a: calls.append(a))
    assert done is False and calls == []  # a range is the numpy path's: nothing allocated
    with pytest.raises(ZeroDivisionError):
        core.pad_sequences_into(_COLUMNS, [0, 0], 0, False, True, lambda *a: 1 / 0)


def test_pad_sequences_into_writes_what_it_measured():
    # allocate replacing every value of the columns changes nothing: the values measured are the ones written.
    columns = [[[1, 2, 3], [4]], [[5, 6, 7], [8]]]
    out = np.zeros((3, 2, 3), np.int64)

    def allocate(outputs, batch, width):
        for column in columns:
            column[:] = [[9] * 50]
        return out

    assert core.pad_sequences_into(columns, [0, 0], 0, False, True, allocate) is True
    assert out.tolist() == [[[1, 2, 3], [4, 0, 0]], [[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]]]
    # A list measured and then grown is not read past what was measured: the call leaves the batch to its caller.
    columns = [[[1, 2, 3], [4]]]
    assert core.pad_sequences_into(columns, [0], 0, False, False,
                                   lambda *a: (columns[0][1].extend(range(100)), out[:1])[1]) is False
