"""Variable-length batching without packing: PadCollate's values, layouts and errors; LengthBucketSampler's and
TokenBudgetSampler's contracts (every index once per epoch, budgets, determinism per (seed, epoch), less
padding than random batches); and both end to end through stoker.DataLoader, compared with torch's."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch
from helpers import MapDataset, TorchDataLoader, assert_batches_equal, assert_same, raises_same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import BatchSampler, RandomSampler, default_collate

import stoker
from stoker import _collate
from stoker._varlen import LengthBucketSampler, PadCollate, TokenBudgetSampler


def _lengths(n: int, seed: int = 0, low: int = 1, high: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, n)


def _reference_pad(sequences, value, side):
    """What PadCollate should give for one key, built the slow, obvious way."""
    tensors = [torch.as_tensor(s, dtype=torch.int64) for s in sequences]
    if side == "left":
        tensors = [t.flip(0) for t in tensors]
    out = pad_sequence(tensors, batch_first=True, padding_value=value)
    return out.flip(1) if side == "left" else out


# --------------------------------------------------------------------------------------------------------------
# PadCollate: values and layout
# --------------------------------------------------------------------------------------------------------------


def test_bare_sequences_right_padded():
    out = PadCollate(pad_id=7)([[1, 2, 3], [4], [5, 6]])
    assert list(out) == ["input_ids", "attention_mask"]
    assert_same(out["input_ids"], torch.tensor([[1, 2, 3], [4, 7, 7], [5, 6, 7]]))
    assert_same(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))


def test_left_padding():
    out = PadCollate(pad_id=7, padding_side="left")([[1, 2, 3], [4], [5, 6]])
    assert_same(out["input_ids"], torch.tensor([[1, 2, 3], [7, 7, 4], [7, 5, 6]]))
    assert_same(out["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("lengths", "multiple", "width"), [
    ([5, 3], 4, 8), ([4, 1], 4, 4), ([1], 8, 8), ([5, 3], 1, 5), ([5, 3], None, 5), ([0, 0], 8, 0),
])
def test_pad_to_multiple_of(side, lengths, multiple, width):
    batch = [list(range(1, n + 1)) for n in lengths]
    out = PadCollate(pad_to_multiple_of=multiple, padding_side=side)(batch)
    assert out["input_ids"].shape == (len(lengths), width)
    assert out["attention_mask"].sum(1).tolist() == lengths
    assert_same(out["input_ids"], _reference_pad(batch + [[0] * width], 0, side)[:-1])


def test_dict_samples_labels_and_scalars():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [6, 7, 8], "id": 0, "score": 0.5, "text": "a"},
        {"input_ids": [9], "labels": [2], "id": 1, "score": 1.5, "text": "b"},
    ]
    out = PadCollate(pad_id=0, padding_side="left", pad_to_multiple_of=4)(batch)  # the docstring's example
    assert list(out) == ["input_ids", "labels", "id", "score", "text", "attention_mask"]
    assert_same(out["input_ids"], torch.tensor([[0, 5, 6, 7], [0, 0, 0, 9]]))
    assert_same(out["labels"], torch.tensor([[-100, 6, 7, 8], [-100, -100, -100, 2]]))
    assert_same(out["attention_mask"], torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]))
    for key in ("id", "score", "text"):  # what default_collate gives, exactly
        assert_same(out[key], default_collate([s[key] for s in batch]))


def test_label_pad_id_and_own_attention_mask():
    batch = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [3, 4]},
             {"input_ids": [5], "attention_mask": [1], "labels": [6]}]
    out = PadCollate(pad_id=9, label_pad_id=-1)(batch)
    assert list(out) == ["input_ids", "attention_mask", "labels"]  # the samples' own mask, padded with 0
    assert_same(out["input_ids"], torch.tensor([[1, 2], [5, 9]]))
    assert_same(out["attention_mask"], torch.tensor([[1, 1], [1, 0]]))
    assert_same(out["labels"], torch.tensor([[3, 4], [6, -1]]))


def test_no_attention_mask():
    out = PadCollate(return_attention_mask=False)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert list(out) == ["input_ids"]
    assert_same(out["input_ids"], torch.tensor([[1, 2], [3, 0]]))


def test_keys_pads_only_those_named():
    batch = [{"input_ids": np.array([1, 2, 3]), "weights": np.ones(4, np.float32), "token_type_ids": [0, 0, 1]},
             {"input_ids": np.array([4]), "weights": np.zeros(4, np.float32), "token_type_ids": [1]}]
    out = PadCollate(keys=["input_ids", "token_type_ids"], pad_id=3)(batch)
    assert list(out) == ["input_ids", "weights", "token_type_ids", "attention_mask"]
    assert_same(out["input_ids"], torch.tensor([[1, 2, 3], [4, 3, 3]]))
    assert_same(out["token_type_ids"], torch.tensor([[0, 0, 1], [1, 3, 3]]))
    assert_same(out["weights"], default_collate([s["weights"] for s in batch]))  # stacked, not padded


def test_input_kinds_give_the_same_batch():
    rows = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3], []]
    kinds = {
        "list": lambda r: list(r),
        "tuple": lambda r: tuple(r),
        "int32": lambda r: np.array(r, np.int32),
        "uint8": lambda r: np.array(r, np.uint8),
        "uint64": lambda r: np.array(r, np.uint64),
        "strided": lambda r: np.repeat(np.array(r, np.int64), 2)[::2] if r else np.zeros(0, np.int16),
        "tensor": lambda r: torch.tensor(r, dtype=torch.int64),
        "tensor16": lambda r: torch.tensor(r, dtype=torch.int16),
        "tensor view": lambda r: torch.tensor(r).repeat_interleave(2)[::2] if r else torch.zeros(0, dtype=torch.int8),
    }
    expected = PadCollate()(rows)
    assert_same(expected["input_ids"], _reference_pad(rows, 0, "right"))
    for name, kind in kinds.items():
        assert_same(PadCollate()([kind(r) for r in rows]), expected, f"{name} batch")
    mixed = [kind(rows[i % len(rows)]) for i, kind in enumerate(kinds.values())]
    expected_mixed = _reference_pad([rows[i % len(rows)] for i in range(len(kinds))], 0, "right")
    assert_same(PadCollate()(mixed)["input_ids"], expected_mixed)


def test_bool_sequences_pad_as_integers():
    out = PadCollate(keys=["input_ids", "special"])(
        [{"input_ids": [1, 2], "special": np.array([True, False])}, {"input_ids": [3], "special": [True]}])
    assert_same(out["special"], torch.tensor([[1, 0], [1, 0]]))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_matches_reference_on_random_batches(side, multiple):
    rng = np.random.default_rng(1)
    collate = PadCollate(pad_id=1, padding_side=side, pad_to_multiple_of=multiple)
    for _ in range(20):
        lengths = rng.integers(0, 40, rng.integers(1, 20))
        batch = [{"input_ids": rng.integers(0, 1000, n).tolist(), "labels": rng.integers(0, 9, n)} for n in lengths]
        out = collate(batch)
        width = out["input_ids"].shape[1]
        assert width == (-(-int(lengths.max()) // multiple) * multiple if multiple else int(lengths.max()))
        pad_row = [[0] * width]
        assert_same(out["input_ids"], _reference_pad([s["input_ids"] for s in batch] + pad_row, 1, side)[:-1])
        assert_same(out["labels"], _reference_pad([s["labels"] for s in batch] + pad_row, -100, side)[:-1])
        assert_same(out["attention_mask"], _reference_pad([[1] * n for n in lengths] + pad_row, 0, side)[:-1])


def test_is_picklable_and_has_a_repr():
    collate = PadCollate(5, padding_side="left", pad_to_multiple_of=8, keys=["input_ids"], label_pad_id=-1)
    again = pickle.loads(pickle.dumps(collate))
    batch = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]
    assert_same(again(batch), collate(batch))
    assert "pad_to_multiple_of=8" in repr(collate) and "padding_side='left'" in repr(collate)


# --------------------------------------------------------------------------------------------------------------
# PadCollate: errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "error", "match"), [
    ([{"input_ids": [1] * 3, "labels": [1] * 3}, {"input_ids": [1] * 5, "labels": [1] * 4}], ValueError,
     r"sample 1: 'labels' has length 4 but 'input_ids' has length 5"),
    ([[1, 2], [3], [1.5, 2.0]], TypeError, r"sample 2: 'input_ids' should hold integers, got dtype float64"),
    ([[1, 2], "hello"], TypeError, r"sample 1 should be a 1-D sequence of integers .* got str"),
    ([[1, 2], None], TypeError, r"sample 1 should be a 1-D sequence .* got NoneType"),
    ([[1, 2], 7], TypeError, r"sample 1 should be a 1-D sequence .* got int"),
    ([[1, 2], [3, None]], TypeError, r"sample 1: 'input_ids' should hold integers, got dtype object"),
    ([[1, 2], [3, "4"]], TypeError, r"sample 1: 'input_ids' should hold integers"),
    ([[1, 2], [3, 2**70]], TypeError, r"sample 1: 'input_ids' should hold integers, got dtype object"),
    ([[1, 2], np.zeros((2, 2), np.int64)], ValueError, r"sample 1: 'input_ids' should be 1-D, got shape \(2, 2\)"),
    ([[1, 2], [[1, 2], [3]]], ValueError, r"sample 1: 'input_ids' should be a 1-D sequence, got a nested ragged"),
    ([[1, 2], torch.tensor([1.0, 2.0])], TypeError, r"sample 1: 'input_ids' should hold integers, got dtype float32"),
    ([[1, 2], torch.tensor([1.0], dtype=torch.bfloat16)], TypeError, r"sample 1: 'input_ids' .*bfloat16"),
    ([[1, 2], {"input_ids": [1]}], TypeError, r"sample 1 is a dict, but sample 0 is a bare sequence"),
    ([{"input_ids": [1]}, [1, 2]], TypeError, r"sample 1 is a list, but sample 0 is a dict"),
    ([{"input_ids": [1], "labels": [1]}, {"input_ids": [1]}], ValueError, r"sample 1 lacks key 'labels'"),
    ([{"input_ids": [1]}, {"input_ids": [1], "x": 1}], ValueError, r"sample 1 has key 'x', unlike sample 0"),
    ([{"input_ids": [1], "labels": [1]}, {"input_ids": [2], "labels": 3}], TypeError,
     r"sample 1: 'labels' should be a 1-D sequence of integers .* got int"),
    ([{"input_ids": [1], "emb": np.ones(1, np.float32)}], TypeError,
     r"sample 0: 'emb' should hold integers, got dtype float32; pass keys=\[\.\.\.\]"),
    ([{"id": 1, "text": "a"}], ValueError, r"sample 0 has no 1-D sequence to pad"),
    ([], ValueError, r"empty batch"),
])
def test_collate_errors_name_the_sample_and_key(batch, error, match):
    with pytest.raises(error, match=match):
        PadCollate()(batch)


def test_collate_error_for_a_key_named_in_keys_but_absent():
    with pytest.raises(ValueError, match=r"sample 0 has no key 'labels' \(keys= names it\)"):
        PadCollate(keys=["input_ids", "labels"])([{"input_ids": [1]}])


def test_default_collate_error_gets_a_note():
    with pytest.raises(TypeError) as info:
        PadCollate()([{"input_ids": [1], "x": object()}, {"input_ids": [1], "x": object()}])
    assert "PadCollate: raised by default_collate for key 'x'" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"padding_side": "middle"}, ValueError, "padding_side should be 'right' or 'left'"),
    ({"pad_to_multiple_of": 0}, ValueError, "pad_to_multiple_of should be an integer >= 1"),
    ({"pad_to_multiple_of": 2.0}, ValueError, "pad_to_multiple_of should be an integer"),
    ({"keys": "input_ids"}, TypeError, r"a list of key names, not a single str .* keys=\['input_ids'\]"),
    ({"keys": []}, ValueError, "keys should name at least one key"),
    ({"keys": ["a", "a"]}, ValueError, "keys names a key twice"),
    ({"pad_id": 1.5}, ValueError, "pad_id should be an integer"),
    ({"pad_id": 2**64}, ValueError, "does not fit in int64"),
    ({"label_pad_id": True}, ValueError, "label_pad_id should be an integer"),
])
def test_collate_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PadCollate(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# PadCollate: the native path, against the numpy path and pad_sequence
# --------------------------------------------------------------------------------------------------------------


def _numpy_only(collate: PadCollate) -> PadCollate:
    """The same collate, held to the numpy path: the reference for the native one."""
    slow = pickle.loads(pickle.dumps(collate))
    slow._use_native = False
    return slow


def _pool_acquisitions() -> int:
    stats = _collate.POOL.stats()
    return stats["allocations"] + stats["reuses"]


def _collate_natively(collate: PadCollate, batch):
    """collate(batch), asserting that it took the native path (one pooled block per batch)."""
    before = _pool_acquisitions()
    out = collate(batch)
    assert _pool_acquisitions() == before + 1, "the native path was not taken"
    return out


# The element types the native path reads (uint64, whose values may not fit in int64, goes the numpy path).
_NUMPY_INTS = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32]
_TORCH_INTS = [torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
               torch.uint32]
_NATIVE_KINDS = ["list", "tuple", "numpy", "numpy strided", "numpy reversed", "tensor", "tensor strided"]


def _sequence_of(rng: np.random.Generator, kind: str, dtype: np.dtype, n: int):
    """A sequence of n integers in a form the native path reads, and its values as int64 Python ints."""
    if kind in ("list", "tuple"):  # any int64, small ones (cached objects) and bools mixed in
        values = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64, endpoint=True).tolist()
        for j in np.flatnonzero(rng.random(n) < 0.3):
            values[j] = bool(rng.integers(2)) if rng.random() < 0.5 else int(rng.integers(-5, 6))
        return (values if kind == "list" else tuple(values)), [int(v) for v in values]
    if dtype.kind == "b":
        array = rng.integers(0, 2, n).astype(bool)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    values = [int(v) for v in array.tolist()]
    torch_dtype = _TORCH_INTS[_NUMPY_INTS.index(dtype.type)]
    if kind == "numpy strided":
        array = np.repeat(array, 3)[::3]
    elif kind == "numpy reversed":
        array = array[::-1].copy()[::-1]
    elif kind == "tensor":
        array = torch.from_numpy(array.copy()).to(torch_dtype)
    elif kind == "tensor strided":
        array = torch.from_numpy(array.copy()).to(torch_dtype).repeat_interleave(2)[::2]
    return array, values


@st.composite
def _padding_case(draw):
    """A random batch (bare sequences or dicts of two keys) in every form and dtype, PadCollate's arguments, and
    the int64 values of each key's sequences. Hypothesis draws the shape of the case; numpy, the values."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = draw(st.lists(st.integers(0, 24), min_size=1, max_size=10))
    dicts = draw(st.booleans())
    keys = ["input_ids", "labels"] if dicts else ["input_ids"]
    forms = st.tuples(st.sampled_from(_NATIVE_KINDS), st.sampled_from(_NUMPY_INTS).map(np.dtype))
    columns = {k: [_sequence_of(rng, *draw(forms), n) for n in lengths] for k in keys}
    if dicts:
        batch = [{k: columns[k][i][0] for k in keys} for i in range(len(lengths))]
    else:
        batch = [seq for seq, _ in columns["input_ids"]]
    kwargs = dict(
        pad_id=draw(st.integers(-(1 << 53), 1 << 53)),  # pad_sequence's padding_value is a float
        label_pad_id=draw(st.sampled_from([-100, 0, 7])),
        padding_side=draw(st.sampled_from(["right", "left"])),
        pad_to_multiple_of=draw(st.sampled_from([None, 1, 3, 8, 64])),
        return_attention_mask=draw(st.booleans()),
    )
    values = {k: [ints for _, ints in columns[k]] for k in keys}
    return batch, kwargs, values, lengths


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_padding_case())
def test_native_matches_numpy_and_pad_sequence(case):
    batch, kwargs, values, lengths = case
    collate = PadCollate(**kwargs)
    out = _collate_natively(collate, batch)
    assert_same(out, _numpy_only(collate)(batch))
    longest, multiple = max(lengths), kwargs["pad_to_multiple_of"]
    width = -(-longest // multiple) * multiple if multiple else longest
    pad_row = [[0] * width]  # pad_sequence pads to the longest: a row of the width asked for sets it
    side = kwargs["padding_side"]
    for key, rows in values.items():
        pad = kwargs["label_pad_id"] if key == "labels" else kwargs["pad_id"]
        assert_same(out[key], _reference_pad(rows + pad_row, pad, side)[:-1], key)
    if kwargs["return_attention_mask"]:
        assert_same(out["attention_mask"], _reference_pad([[1] * n for n in lengths] + pad_row, 0, side)[:-1])
    assert list(out) == list(values) + (["attention_mask"] if kwargs["return_attention_mask"] else [])


@pytest.mark.parametrize("make", [
    *(pytest.param(lambda v, d=d: np.array(v).astype(d), id=np.dtype(d).name) for d in _NUMPY_INTS),
    *(pytest.param(lambda v, d=d: torch.tensor(v).to(d), id=str(d)) for d in _TORCH_INTS),
    pytest.param(list, id="list"), pytest.param(tuple, id="tuple"),
])
@pytest.mark.parametrize("side", ["right", "left"])
def test_native_every_dtype(make, side):
    rows = [[0, 1, 2, 127, 100], [], [1, 0], [255, 3, 9]]
    batch = [make(r) for r in rows]
    collate = PadCollate(pad_id=-7, padding_side=side, pad_to_multiple_of=4)
    out = _collate_natively(collate, batch)
    assert_same(out, _numpy_only(collate)(batch))
    expected_rows = [torch.as_tensor(np.asarray(make(r)).astype(np.int64)) for r in rows]
    assert_same(out["input_ids"], _reference_pad(expected_rows + [[0] * 8], -7, side)[:-1])


@pytest.mark.parametrize(("values", "dtype"), [
    ([-128, 127, -1], np.int8), ([-(1 << 15), (1 << 15) - 1], np.int16), ([-(1 << 31), (1 << 31) - 1], np.int32),
    ([-(1 << 63), (1 << 63) - 1], np.int64), ([255, 0], np.uint8), ([65535], np.uint16), ([(1 << 32) - 1], np.uint32),
])
def test_native_extreme_values(values, dtype):
    for make in (lambda v: np.array(v, dtype), lambda v: torch.from_numpy(np.array(v, dtype))):
        batch = [make(values), make(values[:1])]
        collate = PadCollate(pad_id=5)
        out = _collate_natively(collate, batch)
        assert_same(out, _numpy_only(collate)(batch))
        assert out["input_ids"][0].tolist() == values
    ints = [-(1 << 63), (1 << 63) - 1, True, False, 0, (1 << 30) - 1, 1 << 30, -(1 << 30), 1 - (1 << 30), -1, 1 << 62]
    assert _collate_natively(PadCollate(), [ints])["input_ids"].tolist() == [[int(v) for v in ints]]
    for pad in (-(1 << 63), (1 << 63) - 1, (1 << 53) + 1):
        collate = PadCollate(pad_id=pad, label_pad_id=pad - 1 if pad > 0 else pad + 1)
        batch = [{"input_ids": [1, 2], "labels": [3, 4]}, {"input_ids": [5], "labels": [6]}]
        out = _collate_natively(collate, batch)
        assert_same(out, _numpy_only(collate)(batch))
        assert out["input_ids"][1, 1].item() == pad and out["labels"][1, 1].item() == collate.label_pad_id


def test_uint64_values_are_padded_where_they_fit_in_int64_and_refused_where_not():
    for make in (lambda v: np.array(v, np.uint64), lambda v: torch.tensor(v, dtype=torch.uint64)):
        out = PadCollate(pad_id=5)([make([(1 << 63) - 1, 0, 7]), make([1])])
        assert out["input_ids"].tolist() == [[(1 << 63) - 1, 0, 7], [1, 5, 5]]
        with pytest.raises(ValueError, match=r"^sample 1: 'input_ids' holds 9223372036854775813, which does not fit "
                                             r"in int64"):
            PadCollate()([make([1]), make([1, 2**63 + 5])])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("lengths", "multiple"), [([0], None), ([0, 0, 0], 8), ([0, 3, 0], None), ([0, 5], 4),
                                                   ([1, 0], 1)])
def test_native_empty_sequences(side, lengths, multiple):
    kinds = [list, tuple, lambda r: np.array(r, np.int32), lambda r: torch.tensor(r, dtype=torch.int64),
             lambda r: np.zeros(0, np.uint8) if not r else np.array(r, np.uint8)]
    for make in kinds:
        batch = [{"input_ids": make(list(range(1, n + 1))), "labels": make([2] * n)} for n in lengths]
        collate = PadCollate(pad_id=9, padding_side=side, pad_to_multiple_of=multiple)
        out = _collate_natively(collate, batch)
        assert_same(out, _numpy_only(collate)(batch))
        assert out["attention_mask"].sum(1).tolist() == lengths


def test_batches_held_are_never_overwritten():
    rng = np.random.default_rng(3)
    collate = PadCollate(pad_id=-1, padding_side="left", pad_to_multiple_of=8)
    held, parts = [], []
    reuses = _collate.POOL.stats()["reuses"]
    for step in range(120):
        lengths = rng.integers(0, 60, int(rng.integers(1, 9)))  # widths 0..64: few block sizes, many reuses
        batch = [{"input_ids": rng.integers(0, 1000, n).tolist(), "labels": rng.integers(0, 9, n, np.int32)}
                 for n in lengths]
        out = _collate_natively(collate, batch)
        if step % 5 == 0:
            held.append((out, {k: v.clone() for k, v in out.items()}))
        elif step % 5 == 1:
            parts.append((out["labels"], out["labels"].clone()))  # one tensor keeps the whole block
        for value in out.values():
            value.add_(0)  # touching a batch not kept changes nothing
        del out
    assert _collate.POOL.stats()["reuses"] > reuses + 50  # the dropped batches' blocks did come back
    for out, copy in held:
        assert_same(out, copy)
    for part, copy in parts:
        assert_same(part, copy)


def test_native_outputs_are_one_block():
    out = _collate_natively(PadCollate(), [{"input_ids": [1, 2, 3], "labels": [4, 5, 6]}, {"input_ids": [7],
                                                                                            "labels": [8]}])
    starts = [t.data_ptr() for t in out.values()]
    assert starts == [starts[0] + k * 2 * 3 * 8 for k in range(3)]
    assert all(t.is_contiguous() and t.dtype is torch.int64 for t in out.values())


class _IntList(list):
    pass


class _Array(np.ndarray):
    pass


# Batches the native path leaves to the numpy path, which gives them its own result.
_FALLBACK_BATCHES = {
    "numpy scalars in a list": [[np.int64(3), np.int32(4)], [5]],
    "range": [range(3), [1]],
    "list subclass": [_IntList([1, 2]), [3]],
    "byte-swapped array": [np.array([1, 2, 300], ">i4"), [4]],
    "ndarray subclass": [np.arange(3).view(_Array), [4]],
    "empty float array": [np.zeros(0, np.float32), [4]],
    "empty float tensor": [torch.zeros(0), [4]],
    "parameter": [torch.nn.Parameter(torch.arange(3), requires_grad=False), [4]],
    "memmap and others": [np.arange(4)[1:], torch.arange(2), (7,)],  # native, as a control
}


@pytest.mark.parametrize("batch", _FALLBACK_BATCHES.values(), ids=_FALLBACK_BATCHES.keys())
def test_values_the_native_path_leaves_to_numpy(batch):
    collate = PadCollate(padding_side="left")
    assert_same(collate(batch), _numpy_only(collate)(batch))


def _good(i: int, n: int = 5) -> dict:
    return {"input_ids": list(range(i, i + n)), "labels": np.arange(n, dtype=np.int32), "id": i}


_BAD_BATCHES = {
    "float late in a list": [_good(i) for i in range(40)] + [{"input_ids": [1, 2.5], "labels": [1, 2], "id": 0}],
    "float array under labels": [_good(i) for i in range(7)] + [{"input_ids": [1], "labels": np.ones(1), "id": 0}],
    "lengths differ": [_good(i) for i in range(3)] + [{"input_ids": torch.arange(4), "labels": [1, 2], "id": 0}],
    "int beyond int64 in a list": [_good(0), {"input_ids": [1 << 63, 1], "labels": [1, 2], "id": 0}],
    "uint64 beyond int64": [_good(0), {"input_ids": np.array([1, 2**63 + 5], np.uint64), "labels": [1, 2], "id": 0}],
    "uint64 tensor beyond int64": [_good(0), {"input_ids": torch.tensor([2**64 - 1, 0], dtype=torch.uint64),
                                              "labels": [1, 2], "id": 0}],
    "string in a list": [_good(0), {"input_ids": [1, "2"], "labels": [1, 2], "id": 0}],
    "None in a list": [_good(0), {"input_ids": [1, 2], "labels": [1, None], "id": 0}],
    "2-D tensor": [_good(0), {"input_ids": torch.zeros(2, 2, dtype=torch.int64), "labels": [1, 2], "id": 0}],
    "nested list": [_good(0), {"input_ids": [[1, 2], [3, 4]], "labels": [1, 2], "id": 0}],
    "scalar under a padded key": [_good(0), {"input_ids": 3, "labels": [1, 2], "id": 0}],
    "bad field and lengths differ": [_good(0), {"input_ids": [1, 2], "labels": [1], "id": "x"}],
}


# Tensors numpy() refuses and the numpy path's second try (detach().cpu().numpy()) also refuses: torch's own
# error comes through, naming neither sample nor key. The native path leaves them to it.
_TORCH_REFUSES = {
    "negative-bit tensor": [_good(0), {"input_ids": torch._neg_view(torch.arange(2)), "labels": [1, 2], "id": 0}],
    "meta tensor": [_good(0), {"input_ids": torch.zeros(2, dtype=torch.int64, device="meta"), "labels": [1, 2],
                               "id": 0}],
}


@pytest.mark.parametrize("name", [*_BAD_BATCHES, *_TORCH_REFUSES])
def test_native_path_raises_the_numpy_path_error(name):
    batch = _BAD_BATCHES.get(name) or _TORCH_REFUSES[name]
    collate = PadCollate()
    error = raises_same(lambda: _numpy_only(collate)(batch), lambda: collate(batch))
    if name not in _TORCH_REFUSES:
        assert "sample" in str(error) or "default_collate" in "".join(getattr(error, "__notes__", []))


def test_native_path_error_names_the_sample_and_key():
    batch = [_good(i) for i in range(9)] + [{"input_ids": list(range(5)), "labels": [0, 1, 2, 3.5, 4], "id": 9}]
    with pytest.raises(TypeError, match=r"^sample 9: 'labels' should hold integers, got dtype float64"):
        PadCollate()(batch)
    batch[9] = {"input_ids": list(range(5)), "labels": np.arange(4), "id": 9}
    with pytest.raises(ValueError, match=r"^sample 9: 'labels' has length 4 but 'input_ids' has length 5"):
        PadCollate()(batch)


def test_native_path_from_several_threads():
    rng = np.random.default_rng(4)
    batches = [[rng.integers(0, 100, int(n)).astype(np.int32) for n in rng.integers(0, 300, 32)] for _ in range(40)]
    collate = PadCollate(padding_side="left")
    expected = [_numpy_only(collate)(b) for b in batches]
    results: dict[int, dict] = {}

    def work(first: int) -> None:
        for j in range(first, len(batches), 4):
            results[j] = collate(batches[j])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, out in sorted(results.items()):
        assert_same(out, expected[j], f"batch {j}")
    assert len(results) == len(batches)


def test_native_batches_cross_torch_worker_processes():
    dataset = MapDataset(_token_sample, 96)
    collate = PadCollate(padding_side="left")
    across = list(TorchDataLoader(dataset, batch_size=16, num_workers=2, collate_fn=collate))
    assert_batches_equal(across, list(TorchDataLoader(dataset, batch_size=16, collate_fn=_numpy_only(collate))))


# --------------------------------------------------------------------------------------------------------------
# Samplers: argument checks
# --------------------------------------------------------------------------------------------------------------

SAMPLERS = {
    "bucket": lambda lengths, **kw: LengthBucketSampler(lengths, 16, **kw),
    "tokens": lambda lengths, **kw: TokenBudgetSampler(lengths, 2048, **kw),
    "tokens unpadded": lambda lengths, **kw: TokenBudgetSampler(lengths, 2048, padded=False, **kw),
}


@pytest.mark.parametrize("make", SAMPLERS.values(), ids=SAMPLERS.keys())
@pytest.mark.parametrize(("lengths", "match"), [
    ([[1, 2], [3, 4]], r"lengths should be 1-D .* shape \(2, 2\)"),
    ([1.0, 2.0], "lengths should hold integers, got dtype float64"),
    (torch.tensor([1.0, 2.0]), "lengths should hold integers, got a tensor of dtype torch.float32"),
    (torch.tensor([True]), "lengths should hold integers"),
    ([3, 4, -1, -2], r"lengths should be non-negative, but lengths\[2\] = -1"),
    ([[1], [2, 3]], "lengths should be a 1-D sequence of non-negative integers"),
    (["a", "b"], "lengths should hold integers"),
    (5, r"lengths should be 1-D"),
])
def test_sampler_rejects_bad_lengths(make, lengths, match):
    with pytest.raises(ValueError, match=match):
        make(lengths)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: LengthBucketSampler([1, 2], 0), "batch_size should be an integer >= 1"),
    (lambda: LengthBucketSampler([1, 2], 2, bucket_size=0), "bucket_size should be an integer >= 1"),
    (lambda: LengthBucketSampler([1, 2], 2, seed=-1), "seed should be an integer >= 0"),
    (lambda: LengthBucketSampler([1, 2], 2.0), "batch_size should be an integer"),
    (lambda: TokenBudgetSampler([1, 2], 0), "max_tokens should be an integer >= 1"),
    (lambda: TokenBudgetSampler([1, 2], 4, bucket_size=0), "bucket_size should be an integer >= 1"),
    (lambda: TokenBudgetSampler([5, 9, 3, 12], 8),
     r"sample 1 has length 9, more than max_tokens=8: it fits in no batch \(2 samples are longer, the longest 12\)"),
    (lambda: TokenBudgetSampler(np.array([5, 3, 12]), 8), r"sample 2 has length 12, more than max_tokens=8"),
    (lambda: LengthBucketSampler([1, 2], 2).set_epoch(-1), "epoch should be an integer >= 0"),
])
def test_sampler_argument_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------------------------------------
# Samplers: contracts
# --------------------------------------------------------------------------------------------------------------


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def _padded_tokens(batches, lengths):
    return sum(len(b) * int(lengths[b].max()) for b in batches)


def test_docstring_examples():
    bucket = dict(batch_size=2, bucket_size=4, shuffle=False)
    assert list(LengthBucketSampler([5, 1, 4, 2, 3, 9, 7], **bucket)) == [[1, 3], [2, 0], [4, 6], [5]]
    assert list(LengthBucketSampler([5, 1, 4, 2, 3, 9, 7], **bucket, drop_last=True)) == [[1, 3], [2, 0], [4, 5]]
    lengths = [3, 8, 2, 5, 4, 1]
    assert list(TokenBudgetSampler(lengths, 10, shuffle=False)) == [[5, 2, 0], [4, 3], [1]]
    assert list(TokenBudgetSampler(lengths, 10, shuffle=False, padded=False)) == [[5, 2, 0, 4], [3], [1]]
    assert list(TokenBudgetSampler(lengths, 10, shuffle=False, drop_last=True)) == [[5, 2, 0], [4, 3]]
    assert list(TokenBudgetSampler(lengths, 10, shuffle=False, padded=False, drop_last=True)) == [[5, 2, 0, 4], [3]]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("bucket_size", [None, 1, 37, 10**6])
@pytest.mark.parametrize("n", [1, 999])
def test_every_index_once_per_epoch(name, shuffle, bucket_size, n):
    lengths = _lengths(n)
    sampler = SAMPLERS[name](lengths, shuffle=shuffle, bucket_size=bucket_size)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler)
        assert all(type(b) is list and b and all(type(i) is int for i in b) for b in batches)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("batch_size", [1, 16, 64])
@pytest.mark.parametrize("bucket_size", [None, 50, 1000])
def test_length_buckets_drop_last(batch_size, bucket_size):
    n = 1000
    sampler = LengthBucketSampler(_lengths(n), batch_size, bucket_size=bucket_size, drop_last=True)
    dropped = set()
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) == n // batch_size
        assert all(len(b) == batch_size for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) == n - n % batch_size
        dropped |= set(range(n)) - set(flat)
    assert batch_size == 1 or len(dropped) > n % batch_size  # random samples are dropped, not always the same


def test_length_buckets_sizes_without_drop_last():
    sampler = LengthBucketSampler(_lengths(1000), 64, bucket_size=100)  # rounded up to 128
    assert sampler.bucket_size == 128
    sizes = sorted(len(b) for b in sampler)
    assert len(sizes) == len(sampler) == 16 and sizes[0] == 1000 % 64 and set(sizes[1:]) == {64}


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("max_tokens", [600, 4096])
@pytest.mark.parametrize("bucket_size", [None, 7, 10**6])
def test_token_budget_respected(padded, max_tokens, bucket_size):
    lengths = _lengths(2000, high=600)
    lengths[::97] = 0  # empty samples count as one token
    sampler = TokenBudgetSampler(lengths, max_tokens, padded=padded, bucket_size=bucket_size)
    costs = np.maximum(lengths, 1)
    for epoch in range(2):
        batches = _epoch(sampler, epoch)
        used = [len(b) * int(costs[b].max()) if padded else int(costs[b].sum()) for b in batches]
        assert max(used) <= max_tokens
        if max_tokens > 4 * 600 and bucket_size != 7:  # greedy fill over sorted buckets: nearly full batches
            assert sum(used) / (len(used) * max_tokens) > 0.8


def test_token_budget_drop_last_leaves_out_only_the_last_batch():
    lengths = _lengths(3000, high=300)
    full = TokenBudgetSampler(lengths, 1000, shuffle=False)
    cut = TokenBudgetSampler(lengths, 1000, shuffle=False, drop_last=True)
    assert list(cut) == list(full)[:-1] and len(cut) == len(full) - 1
    shuffled = TokenBudgetSampler(lengths, 1000, seed=3, drop_last=True)
    for epoch in range(2):
        flat = [i for b in _epoch(shuffled, epoch) for i in b]
        assert len(set(flat)) == len(flat)
        missing = sorted(set(range(3000)) - set(flat))
        assert 0 < len(missing) and int(lengths[missing].max()) * len(missing) <= 1000  # one batch's worth


def test_zero_length_samples_and_empty_lengths():
    sampler = TokenBudgetSampler([0] * 10, 4, shuffle=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for make in SAMPLERS.values():
        empty = make([])
        assert len(empty) == 0 and list(empty) == []


@pytest.mark.parametrize("name", SAMPLERS)
def test_deterministic_per_seed_and_epoch(name):
    lengths = _lengths(1500)
    a, b = SAMPLERS[name](lengths, seed=11), SAMPLERS[name](lengths.tolist(), seed=11)
    c = SAMPLERS[name](torch.from_numpy(lengths).to(torch.int32), seed=11)
    epochs = [_epoch(a, e) for e in range(3)]
    assert [_epoch(b, e) for e in (2, 1, 0)] == epochs[::-1]  # any order of epochs, lengths of any kind
    assert [_epoch(c, e) for e in range(3)] == epochs
    assert _epoch(a, 1) == epochs[1] and list(a) == epochs[1]  # the epoch does not advance by itself
    assert epochs[0] != epochs[1] != epochs[2]
    assert _epoch(SAMPLERS[name](lengths, seed=12), 0) != epochs[0]
    assert pickle.loads(pickle.dumps(a)).batches() is not None
    assert list(pickle.loads(pickle.dumps(a))) == epochs[1]


@pytest.mark.parametrize("name", SAMPLERS)
def test_no_shuffle_is_the_same_every_epoch_and_sorted_per_bucket(name):
    lengths = _lengths(500)
    sampler = SAMPLERS[name](lengths, shuffle=False, bucket_size=100)
    first = _epoch(sampler, 0)
    assert _epoch(sampler, 5) == first
    flat = np.array([i for b in first for i in b])
    if name == "bucket":  # buckets of consecutive indices, each sorted by length
        for start in range(0, 500, sampler.bucket_size):
            part = flat[start:start + sampler.bucket_size]
            assert sorted(part) == list(range(start, min(500, start + sampler.bucket_size)))
            assert np.all(np.diff(lengths[part]) >= 0)


def test_lengths_are_copied():
    lengths = _lengths(100)
    sampler = LengthBucketSampler(lengths, 8, seed=1)
    before = list(sampler)
    lengths[:] = 0
    sampler.set_epoch(1)
    sampler.set_epoch(0)
    assert list(sampler) == before


def test_length_grouping_reduces_padding():
    lengths = _lengths(4096)
    random_batches = [np.array(b) for b in BatchSampler(RandomSampler(range(4096),
                                                                      generator=torch.Generator().manual_seed(0)),
                                                        32, False)]
    real = int(lengths.sum())
    random_waste = _padded_tokens(random_batches, lengths) - real
    bucketed = _padded_tokens([np.array(b) for b in LengthBucketSampler(lengths, 32)], lengths) - real
    budget = TokenBudgetSampler(lengths, 32 * 512)
    budgeted = _padded_tokens([np.array(b) for b in budget], lengths) - real
    assert bucketed < 0.05 * random_waste, (bucketed, random_waste)
    assert budgeted < 0.05 * random_waste, (budgeted, random_waste)
    assert len(budget) < len(random_batches)  # short samples share batches: fewer steps for the same tokens


def test_len_matches_iteration_across_epochs():
    lengths = _lengths(3000, high=1000)
    sampler = TokenBudgetSampler(lengths, 3000)
    counts = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        count = len(sampler)
        assert count == len(list(sampler)) == len(sampler.batches())
        counts.add(count)
    bucket = LengthBucketSampler(lengths, 7)
    assert len(bucket) == len(list(bucket)) == -(-3000 // 7)


# --------------------------------------------------------------------------------------------------------------
# End to end: stoker.DataLoader against torch's DataLoader
# --------------------------------------------------------------------------------------------------------------

_LENGTHS = _lengths(600, seed=5, high=200)


def _token_sample(i: int) -> dict:
    n = int(_LENGTHS[i])
    ids = ((np.arange(n) * 31 + i) % 1000).tolist()
    return {"input_ids": ids, "labels": ids[1:] + [-100], "index": i, "weight": float(i) / 7}


@pytest.mark.parametrize("make", [
    lambda: LengthBucketSampler(_LENGTHS, 24, seed=3),
    lambda: TokenBudgetSampler(_LENGTHS, 2000, seed=4, bucket_size=150),
    lambda: TokenBudgetSampler(_LENGTHS, 2000, seed=4, padded=False, drop_last=True),
], ids=["bucket", "tokens", "tokens unpadded"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stoker_loader_matches_torch(make, num_workers):
    dataset = MapDataset(_token_sample, len(_LENGTHS))
    collate = PadCollate(pad_id=0, padding_side="left", pad_to_multiple_of=8)
    mine, theirs = make(), make()
    loader = stoker.DataLoader(dataset, batch_sampler=mine, collate_fn=collate, num_workers=num_workers)
    reference = TorchDataLoader(dataset, batch_sampler=theirs, collate_fn=collate)
    for epoch in range(2):
        mine.set_epoch(epoch)
        theirs.set_epoch(epoch)
        batches = list(loader)
        assert len(loader) == len(batches) == len(mine)
        assert_batches_equal(batches, list(reference))
        for batch, indices in zip(batches, mine):  # each row is its sample, padded on the left
            assert batch["index"].tolist() == indices
            for row, i in enumerate(indices):
                n = int(_LENGTHS[i])
                width = batch["input_ids"].shape[1]
                assert batch["input_ids"][row, width - n:].tolist() == _token_sample(i)["input_ids"]
                assert batch["attention_mask"][row].sum() == n


def test_resume_with_length_buckets():
    dataset = MapDataset(_token_sample, len(_LENGTHS))
    collate = PadCollate()
    first = LengthBucketSampler(_LENGTHS, 16, seed=9)
    first.set_epoch(1)
    loader = stoker.DataLoader(dataset, batch_sampler=first, collate_fn=collate)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    rest = list(it)
    again = LengthBucketSampler(_LENGTHS, 16, seed=9)
    again.set_epoch(1)
    resumed = stoker.DataLoader(dataset, batch_sampler=again, collate_fn=collate)
    resumed.load_state_dict(state)
    assert_batches_equal(list(resumed), rest)
