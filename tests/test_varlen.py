"""Variable-length batching without packing: PadCollate's values, layouts and errors; LengthBucketSampler's and
TokenBudgetSampler's contracts (every index once per epoch, budgets, determinism per (seed, epoch), less
padding than random batches); and both end to end through stoker.DataLoader, compared with torch's."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers import MapDataset, TorchDataLoader, assert_batches_equal, assert_same
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import BatchSampler, RandomSampler, default_collate

import stoker
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
