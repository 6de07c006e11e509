"""Sequence packing (stoker.TokenDataset, stoker.PackedLoader, stoker.write_token_files), through the public API.

Most workloads use *positional* tokens: the token at global position ``p`` of the flat token array has the
value ``p``. A packed batch then says by itself where every token came from (its document is the one whose
offsets contain it, its offset within the document is ``p - offsets[doc]``), so coverage, segment and
resume checks need no bookkeeping beyond the offsets.

``check_batch`` asserts the batch contract of ``PackedLoader`` (keys, dtypes, shapes, ``cu_seqlens``,
``seq_idx``, ``position_ids``, ``labels``, padding) and is applied to every batch the tests draw.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same, native_thread_count, roundtrip, settled_thread_count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stoker

KEYS = {"input_ids", "labels", "position_ids", "cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
        "max_length_k", "seq_idx"}
IGNORE = -100
FORMAT = "stoker.PackedLoader/2"


# --------------------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------------------


def lognormal_lengths(rng, n, mean, *, sigma=1.0, lo=1, hi=None):
    """n document lengths, lognormal with the given mean, clipped to [lo, hi]."""
    mu = math.log(mean) - sigma ** 2 / 2
    lengths = rng.lognormal(mu, sigma, n).astype(np.int64)
    return np.clip(lengths, lo, hi if hi is not None else max(lo, int(lengths.max())))


def offsets_of(lengths):
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    return offsets


def positional(lengths, dtype=np.int64):
    """Documents of the given lengths whose tokens are their global positions; returns (documents, offsets)."""
    offsets = offsets_of(lengths)
    tokens = np.arange(offsets[-1], dtype=dtype)
    return [tokens[offsets[i]:offsets[i + 1]] for i in range(len(lengths))], offsets


L = 32  # seq_len of the small workloads


def small_lengths(seed=0, n=150):
    """Lognormal lengths around 20 with the edge cases planted: empty documents, exactly one row, one more
    than a row, exactly two rows, several rows plus a remainder."""
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, n, 20, lo=1, hi=3 * L)
    for i, v in zip((3, 17, 40, 41, 77, 90, 120, 121, 149), (0, 0, L, L + 1, 2 * L, 3 * L + 5, 5 * L, 0, 1)):
        lengths[i * n // 150] = v
    return lengths


# --------------------------------------------------------------------------------------------------------------
# The batch contract
# --------------------------------------------------------------------------------------------------------------


def check_batch(batch, seq_len, *, pad_id=0, doc_ids=False, rows=None, shift_labels=False):
    """Asserts the structure every packed batch must have; returns the flattened numpy views
    (ids, labels, positions, seq_idx, cu, docs or None). Labels are checked unshifted (-100 at each segment's
    first token) or, with ``shift_labels``, shifted (the next token, -100 at each segment's last)."""
    assert isinstance(batch, dict)
    assert set(batch) == KEYS | ({"doc_ids"} if doc_ids else set()), sorted(batch)
    assert "attention_mask" not in batch
    ids_t = batch["input_ids"]
    assert ids_t.dim() == 2 and ids_t.shape[1] == seq_len and ids_t.shape[0] >= 1, ids_t.shape
    B = ids_t.shape[0]
    if rows is not None:
        assert B == rows
    for key in ("input_ids", "labels", "position_ids") + (("doc_ids",) if doc_ids else ()):
        assert batch[key].dtype == torch.int64, (key, batch[key].dtype)
        assert tuple(batch[key].shape) == (B, seq_len), key
    assert batch["seq_idx"].dtype == torch.int32 and tuple(batch["seq_idx"].shape) == (B, seq_len)
    cu_t = batch["cu_seqlens"]
    assert cu_t.dtype == torch.int32 and cu_t.dim() == 1
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and torch.equal(batch[key], cu_t), key
    for key in ("max_length_q", "max_length_k"):
        assert type(batch[key]) is int, (key, type(batch[key]))

    ids = batch["input_ids"].numpy().reshape(-1)
    labels = batch["labels"].numpy().reshape(-1)
    pos = batch["position_ids"].numpy().reshape(-1)
    sidx = batch["seq_idx"].numpy().reshape(-1)
    cu = cu_t.numpy().astype(np.int64)
    N = B * seq_len

    # cu_seqlens: 0 .. B*L, strictly increasing, every row boundary a segment boundary
    assert cu[0] == 0 and cu[-1] == N, cu
    seg_len = np.diff(cu)
    assert (seg_len > 0).all(), cu
    assert set(range(0, N + 1, seq_len)) <= set(cu.tolist()), "a segment crosses a row boundary"
    S = len(seg_len)
    assert batch["max_length_q"] == batch["max_length_k"] == int(seg_len.max())

    starts = np.zeros(N, dtype=bool)
    starts[cu[:-1]] = True
    ends = np.zeros(N, dtype=bool)
    ends[cu[1:] - 1] = True
    following = np.append(ids[1:], pad_id)  # the next token (never read at a segment's end)
    # position_ids count 0, 1, 2, ... within each segment (so == 0 exactly at the starts)
    assert np.array_equal(pos, np.arange(N) - np.repeat(cu[:-1], seg_len))
    assert np.array_equal(pos == 0, starts)
    # seq_idx: the segment number, from 0, +1 at each boundary
    assert np.array_equal(sidx, np.repeat(np.arange(S), seg_len))

    docs = None
    if doc_ids:
        docs = batch["doc_ids"].numpy().reshape(-1)
        assert np.array_equal(docs, np.repeat(docs[cu[:-1]], seg_len)), "doc_ids vary within a segment"
        pad = docs == -1
        assert (docs[~pad] >= 0).all()
        assert (ids[pad] == pad_id).all(), "padding not filled with pad_id"
        if shift_labels:
            assert np.array_equal(labels, np.where(ends | pad, IGNORE, following)), "shifted labels"
        else:
            assert np.array_equal(labels, np.where(starts | pad, IGNORE, ids)), "labels"
        pad2 = pad.reshape(B, seq_len)
        for r in range(B):
            if pad2[r].any():
                first = int(np.argmax(pad2[r]))
                assert pad2[r, first:].all(), f"row {r}: padding is not the row's tail"
                # the tail is exactly one segment
                assert r * seq_len + first in set(cu.tolist())
                assert sidx[r * seq_len + first] == sidx[(r + 1) * seq_len - 1]
    elif shift_labels:
        assert (labels[ends] == IGNORE).all()
        rest = ~ends
        assert ((labels[rest] == following[rest]) | ((labels[rest] == IGNORE) & (ids[rest] == pad_id))).all()
    else:
        assert (labels[starts] == IGNORE).all()
        rest = ~starts
        assert ((labels[rest] == ids[rest]) | ((labels[rest] == IGNORE) & (ids[rest] == pad_id))).all()
    return ids, labels, pos, sidx, cu, docs


def real_segments(batch, seq_len):
    """(row in batch, flat start, length, doc) of every non-padding segment (needs doc_ids)."""
    cu = batch["cu_seqlens"].numpy().astype(np.int64)
    docs = batch["doc_ids"].numpy().reshape(-1)
    return [(int(s // seq_len), int(s), int(e - s), int(docs[s])) for s, e in zip(cu[:-1], cu[1:]) if docs[s] >= 0]


def rows_of(batches, offsets):
    """Every row served, in order, as a tuple of its segments (doc, offset in the doc, length); padding left
    out. Needs positional tokens and doc_ids."""
    out = []
    for b in batches:
        B, Lb = b["input_ids"].shape
        ids = b["input_ids"].numpy().reshape(-1)
        rows = [[] for _ in range(B)]
        for r, s, n, d in real_segments(b, Lb):
            rows[r].append((d, int(ids[s] - offsets[d]), n))
        out.extend(tuple(r) for r in rows)
    return out


def check_positional_tokens(batches, offsets, seq_len, long_docs="split", pad_id=0):
    """Checks that every real token of positional documents sits in the right document, in consecutive runs
    that are whole pieces of it; returns all real tokens served (a flat int64 array)."""
    lengths = np.diff(offsets)
    served = []
    for b in batches:
        _, _, _, _, cu, docs = check_batch(b, seq_len, pad_id=pad_id, doc_ids=True)
        ids = b["input_ids"].numpy().reshape(-1)
        real = docs >= 0
        # each token's doc_id is the document containing it
        owner = np.searchsorted(offsets, ids[real], side="right") - 1
        assert np.array_equal(owner, docs[real]), "a token carries the wrong doc_id"
        for _, s, n, d in real_segments(b, seq_len):
            seg = ids[s:s + n]
            assert np.array_equal(seg, np.arange(seg[0], seg[0] + n)), "a segment's tokens are not consecutive"
            off = int(seg[0] - offsets[d])
            if long_docs == "split":
                # a whole piece: starts at a multiple of seq_len of its document, runs to the piece's end
                assert off % seq_len == 0, (d, off)
                assert n == min(seq_len, lengths[d] - off), (d, off, n)
            else:
                assert off == 0 and n == min(seq_len, lengths[d])
        served.append(ids[real])
    return np.concatenate(served) if served else np.empty(0, np.int64)


# --------------------------------------------------------------------------------------------------------------
# 1. Every token exactly once per epoch (long_docs="split"), and the batch contract on every batch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,drop_last", [(1, False), (9, False), (9, True), (64, False)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("window", [None, 1, 3, 1000])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_every_token_once_per_epoch(dtype, window, shuffle, batch_size, drop_last):
    lengths = small_lengths()
    docs, offsets = positional(lengths, dtype)
    loader = stoker.PackedLoader(docs, L, batch_size, shuffle=shuffle, seed=5, window=window,
                                 drop_last=drop_last, return_doc_ids=True)
    assert loader.documents.tokens.dtype == dtype
    expected_batches = len(loader)
    stats = loader.stats()
    assert stats["epoch"] == 0
    batches = list(loader)
    assert len(batches) == expected_batches
    rows = stats["rows"]
    assert stats["tokens"] == offsets[-1] and stats["documents"] == len(lengths)
    assert stats["documents_split"] == int((lengths > L).sum())
    full, partial = divmod(rows, batch_size)
    if batch_size == 9:
        assert partial, "the workload should leave a partial last batch"
    assert len(batches) == (full if drop_last else full + (partial > 0))
    for i, b in enumerate(batches):
        want = batch_size if (i < full) else partial
        assert b["input_ids"].shape[0] == want
    tokens = check_positional_tokens(batches, offsets, L)
    if drop_last:
        assert len(np.unique(tokens)) == len(tokens), "a token served twice"
        assert sum(b["input_ids"].shape[0] for b in batches) == full * batch_size
    else:
        assert np.array_equal(np.sort(tokens), np.arange(offsets[-1])), "not every token exactly once"
    # a second epoch also serves every token once (and the loader works again)
    if not drop_last:
        again = check_positional_tokens(list(loader), offsets, L)
        assert np.array_equal(np.sort(again), np.arange(offsets[-1]))


@pytest.mark.parametrize("window", [None, 2])
def test_seq_len_one_every_token_is_a_segment(window):
    docs, offsets = positional([3, 0, 1, 4])
    loader = stoker.PackedLoader(docs, 1, 3, window=window, seed=0, return_doc_ids=True)
    batches = list(loader)
    tokens = check_positional_tokens(batches, offsets, 1)
    assert np.array_equal(np.sort(tokens), np.arange(8))
    assert all((b["labels"] == IGNORE).all() for b in batches)
    assert loader.stats()["documents_split"] == 2


# --------------------------------------------------------------------------------------------------------------
# 2. Batch structure
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 4])
def test_batch_structure_with_nonzero_pad_id(window):
    docs, offsets = positional(small_lengths(1, 60))
    pad_id = 123_456_789
    loader = stoker.PackedLoader(docs, L, 5, window=window, seed=2, pad_id=pad_id, return_doc_ids=True)
    padded = 0
    for b in loader:
        ids, labels, pos, sidx, cu, docs_flat = check_batch(b, L, pad_id=pad_id, doc_ids=True)
        padded += int((docs_flat == -1).sum())
        assert (ids[docs_flat == -1] == pad_id).all()
        # real tokens are never pad_id here (positional tokens are small)
        assert (ids[docs_flat >= 0] != pad_id).all()
    assert padded > 0, "the workload should leave some padding"

    # without doc_ids: the same batches, less the doc_ids key
    plain = stoker.PackedLoader(docs, L, 5, window=window, seed=2, pad_id=pad_id)
    with_ids = stoker.PackedLoader(docs, L, 5, window=window, seed=2, pad_id=pad_id, return_doc_ids=True)
    for a, b in zip(plain, with_ids, strict=True):
        check_batch(a, L, pad_id=pad_id)
        assert "doc_ids" not in a
        b.pop("doc_ids")
        assert_same(a, b)


def test_batch_fields_on_a_known_batch():
    # rows: [A(3) B(3) pad(2)] [C(8)] with window=1 (next fit, in order)
    docs = [np.array([1, 2, 3]), np.array([4, 5, 6]), np.arange(10, 18)]
    loader = stoker.PackedLoader(docs, 8, 2, shuffle=False, window=1, pad_id=-7, return_doc_ids=True)
    (b,) = list(loader)
    check_batch(b, 8, pad_id=-7, doc_ids=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, -7, -7], list(range(10, 18))]
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, 6, IGNORE, IGNORE], [IGNORE] + list(range(11, 18))]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1], list(range(8))]
    assert b["cu_seqlens"].tolist() == [0, 3, 6, 8, 16]
    assert b["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [3] * 8]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1, -1, -1], [2] * 8]
    assert b["max_length_q"] == b["max_length_k"] == 8


# --------------------------------------------------------------------------------------------------------------
# 2b. Shifted labels (shift_labels=True)
# --------------------------------------------------------------------------------------------------------------


def shifted_labels_reference(batch):
    """The shifted labels of a batch, token by token from seq_idx, position_ids and doc_ids alone: the next
    token while it is in the same segment (same row, same seq_idx, the next position), else -100; -100 on
    padding (doc_ids -1)."""
    B, Lb = batch["input_ids"].shape
    ids = batch["input_ids"].tolist()
    sidx = batch["seq_idx"].tolist()
    pos = batch["position_ids"].tolist()
    docs = batch["doc_ids"].tolist()
    out = []
    for r in range(B):
        row = []
        for t in range(Lb):
            same = t + 1 < Lb and sidx[r][t + 1] == sidx[r][t] and pos[r][t + 1] == pos[r][t] + 1
            row.append(ids[r][t + 1] if same and docs[r][t] >= 0 else IGNORE)
        out.append(row)
    return out


@pytest.mark.parametrize("num_threads", [0, 2])
@pytest.mark.parametrize("long_docs", ["split", "truncate"])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_shift_labels_token_by_token(window, long_docs, num_threads):
    lengths = small_lengths(11, 120)  # documents of one row, one more than a row, several rows: split pieces
    docs, offsets = positional(lengths)
    kwargs = dict(seed=8, window=window, long_docs=long_docs, pad_id=-5, return_doc_ids=True)
    shifted = stoker.PackedLoader(docs, L, 3, shift_labels=True, num_threads=num_threads, **kwargs)
    plain = stoker.PackedLoader(docs, L, 3, **kwargs)
    assert shifted.shift_labels and not plain.shift_labels
    for _ in range(2):  # two epochs
        n = 0
        for a, b in zip(shifted, plain, strict=True):
            check_batch(a, L, pad_id=-5, doc_ids=True, shift_labels=True)
            assert a["labels"].tolist() == shifted_labels_reference(a)
            # the same batch in every other key: shift_labels changes the labels only
            assert_same({k: v for k, v in a.items() if k != "labels"}, {k: v for k, v in b.items() if k != "labels"})
            # shifted[t] == unshifted[t + 1] within a row; the last token of a row has no label
            assert torch.equal(a["labels"][:, :-1], b["labels"][:, 1:])
            assert (a["labels"][:, -1] == IGNORE).all()
            n += 1
        assert n > 10
    if long_docs == "split":  # a split piece's last token has no label, though its document goes on
        assert shifted.stats()["documents_split"] > 0


def test_shift_labels_on_a_known_batch():
    # the docstring's example: [11, 12, 13] and [21, 22] in a row of 8, then a document split over two rows
    docs = [[11, 12, 13], [21, 22], list(range(30, 40))]
    loader = stoker.PackedLoader(docs, 8, 3, shuffle=False, window=1, shift_labels=True)
    (b,) = list(loader)
    check_batch(b, 8, shift_labels=True)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0], list(range(30, 38)),
                                       [38, 39, 0, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[12, 13, IGNORE, 22, IGNORE, IGNORE, IGNORE, IGNORE],
                                    list(range(31, 38)) + [IGNORE],
                                    [39, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    (plain,) = list(stoker.PackedLoader(docs, 8, 3, shuffle=False, window=1))
    assert plain["labels"].tolist()[0] == [IGNORE, 12, 13, IGNORE, 22, IGNORE, IGNORE, IGNORE]


def hf_causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index=IGNORE):
    """transformers' ForCausalLMLoss (loss_utils.py): pad the labels by one -100, shift them left, take the
    cross entropy over every position (mean, or sum / num_items_in_batch)."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=ignore_index)
    shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, logits.size(-1))
    shift_labels = shift_labels.view(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if reduction == "sum" else loss


@pytest.mark.parametrize("window", [None, 3])
def test_shift_labels_loss_equals_hf_shifted_loss(window):
    docs, _ = positional(small_lengths(12, 80))
    vocab = int(sum(map(len, docs))) + 1
    shifted = stoker.PackedLoader(docs, L, 4, seed=1, window=window, shift_labels=True)
    plain = stoker.PackedLoader(docs, L, 4, seed=1, window=window)
    g = torch.Generator().manual_seed(0)
    for a, b in zip(shifted, plain, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        logits = torch.randn(*a["input_ids"].shape, vocab, generator=g)
        # no shift by the user: the logits at t score labels[t]
        ours = F.cross_entropy(logits.flatten(0, 1), a["labels"].flatten(), ignore_index=IGNORE)
        torch.testing.assert_close(ours, hf_causal_lm_loss(logits, b["labels"]), rtol=0, atol=0)
        items = int((a["labels"] != IGNORE).sum())
        assert items == int((b["labels"] != IGNORE).sum())
        ours_sum = F.cross_entropy(logits.flatten(0, 1), a["labels"].flatten(), ignore_index=IGNORE,
                                   reduction="sum") / items
        torch.testing.assert_close(ours_sum, hf_causal_lm_loss(logits, b["labels"], items), rtol=1e-6, atol=0)


@pytest.mark.parametrize("point", ["1", "mid", "stopped"])
def test_resume_shift_labels(point):
    docs, _ = positional(small_lengths(6, 90))
    resume_check(lambda: stoker.PackedLoader(docs, L, 4, seed=3, window=4, shift_labels=True), point)


# --------------------------------------------------------------------------------------------------------------
# 3. A worked example
# --------------------------------------------------------------------------------------------------------------

A, B_, C, D, E = (list(range(11, 16)), list(range(21, 24)), list(range(31, 37)), [41, 42], list(range(51, 61)))


def _row_token_lists(batches):
    out = []
    for b in batches:
        Lb = b["input_ids"].shape[1]
        ids = b["input_ids"].numpy().reshape(-1)
        rows = [[] for _ in range(b["input_ids"].shape[0])]
        for r, s, n, _ in real_segments(b, Lb):
            rows[r].append(ids[s:s + n].tolist())
        out.extend(rows)
    return out


def test_worked_example_best_fit():
    loader = stoker.PackedLoader([A, B_, C, D, E], 8, 2, shuffle=False, window=None, return_doc_ids=True)
    batches = list(loader)
    for b in batches:
        check_batch(b, 8, doc_ids=True)
    rows = _row_token_lists(batches)
    # whole documents in rows; E split into a full row and its continuation
    assert sorted(map(sorted, rows)) == sorted(map(sorted, [[E[:8]], [C, D], [A, B_], [E[8:]]]))
    pieces = [seg for row in rows for seg in row]
    assert sorted(pieces) == sorted([A, B_, C, D, E[:8], E[8:]])
    # the continuation piece [59, 60] is its own segment: label -100 at its first token, positions restart
    for b in batches:
        ids = b["input_ids"].numpy().reshape(-1)
        where = np.flatnonzero(ids == 59)
        if len(where):
            i = int(where[0])
            assert ids[i + 1] == 60
            assert b["labels"].reshape(-1)[i].item() == IGNORE and b["labels"].reshape(-1)[i + 1].item() == 60
            assert b["position_ids"].reshape(-1)[i].item() == 0
            assert b["doc_ids"].reshape(-1)[i].item() == 4
    stats = loader.stats()
    assert (stats["rows"], stats["tokens"], stats["documents_split"]) == (4, 26, 1)
    assert stats["efficiency"] == 26 / 32


def test_worked_example_streaming_window_one():
    # window=1 is next fit in arrival order
    loader = stoker.PackedLoader([A, B_, C, D, E], 8, 3, shuffle=False, window=1, return_doc_ids=True)
    rows = _row_token_lists(list(loader))
    assert rows == [[A, B_], [C, D], [E[:8]], [E[8:]]]


# --------------------------------------------------------------------------------------------------------------
# 4. long_docs="truncate" and "drop"
# --------------------------------------------------------------------------------------------------------------

LONG_LENGTHS = [5, 20, 8, 0, 17, 3, 9, 1]  # seq_len 8: documents 1, 4 and 6 are longer than a row


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("long_docs", ["split", "truncate", "drop"])
def test_long_docs(long_docs, window):
    docs, offsets = positional(LONG_LENGTHS)
    loader = stoker.PackedLoader(docs, 8, 2, long_docs=long_docs, window=window, seed=1, return_doc_ids=True)
    stats = loader.stats()
    batches = list(loader)
    long = [i for i, n in enumerate(LONG_LENGTHS) if n > 8]
    total = sum(LONG_LENGTHS)
    tokens = check_positional_tokens(batches, offsets, 8, long_docs="split" if long_docs == "split" else "cut")
    served_docs = {d for b in batches for d in b["doc_ids"].unique().tolist() if d >= 0}
    assert stats["documents"] == len(LONG_LENGTHS)
    if long_docs == "split":
        assert (stats["documents_split"], stats["documents_dropped"], stats["tokens_dropped"]) == (3, 0, 0)
        assert np.array_equal(np.sort(tokens), np.arange(total))
    elif long_docs == "truncate":
        dropped = sum(LONG_LENGTHS[i] - 8 for i in long)
        assert (stats["documents_split"], stats["documents_dropped"], stats["tokens_dropped"]) == (0, 0, dropped)
        expected = np.concatenate([docs[i][:8] for i in range(len(docs))])
        assert np.array_equal(np.sort(tokens), np.sort(expected)), "truncated documents keep their first 8 tokens"
        assert stats["tokens"] == total - dropped
    else:
        dropped = sum(LONG_LENGTHS[i] for i in long)
        assert (stats["documents_split"], stats["documents_dropped"], stats["tokens_dropped"]) == (0, 3, dropped)
        assert served_docs.isdisjoint(long), "a dropped document was served"
        expected = np.concatenate([docs[i] for i in range(len(docs)) if i not in long])
        assert np.array_equal(np.sort(tokens), np.sort(expected))
        assert stats["tokens"] == total - dropped
    assert served_docs == {i for i, n in enumerate(LONG_LENGTHS) if n > 0} - (set(long) if long_docs == "drop"
                                                                                  else set())


# --------------------------------------------------------------------------------------------------------------
# 5. stats()
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lognormal_workload():
    """5,000 documents, mean ~600 tokens, clipped to [16, 8192] (no token values needed: zeros)."""
    rng = np.random.default_rng(0)
    lengths = lognormal_lengths(rng, 5000, 600, lo=16, hi=8192)
    offsets = offsets_of(lengths)
    return stoker.TokenDataset.from_flat(np.zeros(int(offsets[-1]), np.uint16), offsets), lengths


def test_stats_lognormal_best_fit(lognormal_workload):
    ds, lengths = lognormal_workload
    seq_len = 4096
    loader = stoker.PackedLoader(ds, seq_len, 8, seed=3)
    s = loader.stats()
    tokens = int(lengths.sum())
    assert s["tokens"] == tokens and s["documents"] == 5000 and s["epoch"] == 0 and s["seq_len"] == seq_len
    assert s["documents_split"] == int((lengths > seq_len).sum()) > 0
    assert s["documents_dropped"] == s["tokens_dropped"] == 0 and s["max_delay_rows"] == 0
    assert s["rows"] <= math.ceil(tokens / seq_len) + 1
    assert s["efficiency"] == tokens / (s["rows"] * seq_len)
    assert len(loader) == math.ceil(s["rows"] / 8)


@pytest.mark.parametrize("window", [1, 100, 1000])
def test_stats_lognormal_window(lognormal_workload, window):
    ds, lengths = lognormal_workload
    loader = stoker.PackedLoader(ds, 4096, 8, seed=3, window=window)
    s = loader.stats()
    tokens = int(lengths.sum())
    assert s["tokens"] == tokens
    assert s["efficiency"] == tokens / (s["rows"] * 4096)
    assert isinstance(s["max_delay_rows"], int) and s["max_delay_rows"] >= 1
    if window == 1000:
        assert s["efficiency"] > 0.995
    if window == 1:
        assert s["max_delay_rows"] == 1  # a piece that does not fit waits exactly for the next row


def test_stats_and_len_match_iteration():
    docs, offsets = positional(small_lengths(4, 80))
    for window in (None, 5):
        loader = stoker.PackedLoader(docs, L, 4, seed=0, window=window, return_doc_ids=True)
        n = len(loader)
        s = loader.stats()
        batches = list(loader)
        assert n == len(batches)
        assert s["rows"] == sum(b["input_ids"].shape[0] for b in batches)
        real = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
        assert s["tokens"] == real
        assert s["efficiency"] == real / (s["rows"] * L)


def test_stats_of_the_epoch_set():
    docs, _ = positional(small_lengths(2, 40))
    loader = stoker.PackedLoader(docs, L, 4, seed=0)
    loader.set_epoch(5)
    assert loader.stats()["epoch"] == 5


def test_stats_describe_the_epoch_served_not_the_one_planned_ahead():
    docs, _ = positional(small_lengths(2, 40))
    loader = stoker.PackedLoader(docs, L, 4, seed=0, window=3)
    for epoch in range(3):
        batches = list(loader)  # iter() starts planning the next epoch in the background
        assert loader.stats()["epoch"] == epoch
        assert loader.stats()["rows"] == sum(b["input_ids"].shape[0] for b in batches)


@pytest.mark.parametrize("window", [None, 3])
def test_plans_built_ahead_change_nothing_served(window):
    docs, _ = positional(small_lengths(3, 60))
    loader = stoker.PackedLoader(docs, L, 4, seed=2, window=window)

    def fresh(epoch):
        other = stoker.PackedLoader(docs, L, 4, seed=2, window=window)
        other.set_epoch(epoch)
        return list(other)

    assert_same(list(loader), fresh(0))
    assert_same(list(loader), fresh(1))  # planned ahead while epoch 0 was served
    loader.set_epoch(5)  # not the epoch planned ahead (2)
    assert_same(list(loader), fresh(5))
    assert len(loader) == len(fresh(6))  # len() takes the plan built ahead for epoch 6
    assert_same(list(loader), fresh(6))


@pytest.mark.parametrize("docs", [[], [[], []]])
def test_empty_epoch(docs):
    loader = stoker.PackedLoader(docs, 8, 2, seed=0)
    assert len(loader) == 0
    assert list(loader) == []
    s = loader.stats()
    assert s["rows"] == 0 and s["tokens"] == 0 and s["efficiency"] == 1.0
    assert s["documents"] == len(docs)


def _reference_window(lengths, seq_len, window):
    """A plain-Python model of the documented streaming packer over documents in order 0, 1, ...: a buffer
    of ``window`` pieces; each row takes the oldest buffered pieces while they fit, then the longest that
    still fits (the oldest of equal ones), refilling after every take. Returns (rows of (doc, offset, len),
    max_delay_rows)."""
    pieces = []
    for d, n in enumerate(lengths):
        for off in range(0, n, seq_len):
            pieces.append((d, off, min(seq_len, n - off)))
    buf, nxt, rows, delay, entered = [], 0, [], 0, {}

    def refill():
        nonlocal nxt
        while len(buf) < window and nxt < len(pieces):
            buf.append(nxt)
            entered[nxt] = len(rows)
            nxt += 1

    refill()
    while buf:
        room, row = seq_len, []

        def take(p):
            nonlocal room, delay
            buf.remove(p)
            row.append(pieces[p])
            room -= pieces[p][2]
            delay = max(delay, len(rows) - entered[p])
            refill()

        while buf and pieces[buf[0]][2] <= room:
            take(buf[0])
        while room > 0:
            fits = [p for p in buf if pieces[p][2] <= room]
            if not fits:
                break
            take(max(fits, key=lambda p: (pieces[p][2], -p)))
        rows.append(tuple(row))
        refill()
    return rows, delay


@pytest.mark.parametrize("window", [1, 2, 5, 40])
def test_window_packing_follows_the_documented_rule(window):
    lengths = small_lengths(7, 120)
    docs, offsets = positional(lengths)
    loader = stoker.PackedLoader(docs, L, 3, shuffle=False, window=window, return_doc_ids=True)
    rows = rows_of(list(loader), offsets)
    expected_rows, expected_delay = _reference_window(lengths, L, window)
    assert rows == expected_rows
    assert loader.stats()["max_delay_rows"] == expected_delay


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_rows_pairwise_overfull(seed):
    """Best-fit decreasing opens a row only when no open row has room, so any two rows together hold more
    than seq_len tokens (at most one row is half empty)."""
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, 300, 12, lo=0, hi=2 * L)
    docs, offsets = positional(lengths)
    loader = stoker.PackedLoader(docs, L, 16, seed=seed, return_doc_ids=True)
    used = sorted(sum(n for _, _, n in row) for row in rows_of(list(loader), offsets))
    assert len(used) >= 2 and used[0] + used[1] > L


# --------------------------------------------------------------------------------------------------------------
# 6. Determinism
# --------------------------------------------------------------------------------------------------------------


def epochs(loader, n):
    return [list(loader) for _ in range(n)]


@pytest.mark.parametrize("window", [None, 6])
def test_same_seed_same_batches_and_epochs_differ(window):
    docs, _ = positional(small_lengths(3, 100))
    a = epochs(stoker.PackedLoader(docs, L, 4, seed=11, window=window), 2)
    b = epochs(stoker.PackedLoader(docs, L, 4, seed=11, window=window), 2)
    assert_same(a, b)
    assert not torch.equal(torch.cat([x["input_ids"] for x in a[0]]), torch.cat([x["input_ids"] for x in a[1]]))
    other = epochs(stoker.PackedLoader(docs, L, 4, seed=12, window=window), 1)
    assert not torch.equal(torch.cat([x["input_ids"] for x in a[0]]),
                           torch.cat([x["input_ids"] for x in other[0]]))
    # set_epoch(e) reproduces epoch e
    c = stoker.PackedLoader(docs, L, 4, seed=11, window=window)
    c.set_epoch(1)
    assert_same(list(c), a[1])
    c.set_epoch(0)
    assert_same(list(c), a[0])


@pytest.mark.parametrize("window", [None, 6])
def test_no_shuffle_is_the_same_every_epoch_and_seed(window):
    docs, _ = positional(small_lengths(3, 100))
    a = epochs(stoker.PackedLoader(docs, L, 4, shuffle=False, seed=1, window=window), 2)
    b = epochs(stoker.PackedLoader(docs, L, 4, shuffle=False, seed=2, window=window), 1)
    assert_same(a[0], a[1])
    assert_same(a[0], b[0])


def test_seed_none_draws_from_torch_global_rng():
    docs, _ = positional(small_lengths(3, 100))
    torch.manual_seed(42)
    a = list(stoker.PackedLoader(docs, L, 4))
    torch.manual_seed(42)
    b = list(stoker.PackedLoader(docs, L, 4))
    torch.manual_seed(43)
    c = list(stoker.PackedLoader(docs, L, 4))
    assert_same(a, b)
    assert not torch.equal(torch.cat([x["input_ids"] for x in a]), torch.cat([x["input_ids"] for x in c]))
    # the seed is drawn once per loader: later epochs follow from it
    torch.manual_seed(42)
    loader = stoker.PackedLoader(docs, L, 4)
    first = list(loader)
    torch.manual_seed(0)  # does not matter any more
    second = list(loader)
    torch.manual_seed(42)
    again = stoker.PackedLoader(docs, L, 4)
    assert_same([first, second], epochs(again, 2))


def test_generator():
    docs, _ = positional(small_lengths(3, 100))
    a = list(stoker.PackedLoader(docs, L, 4, generator=torch.Generator().manual_seed(7)))
    state = torch.random.get_rng_state()
    b = list(stoker.PackedLoader(docs, L, 4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.random.get_rng_state(), state), "generator= must not touch the global RNG"
    c = list(stoker.PackedLoader(docs, L, 4, generator=torch.Generator().manual_seed(8)))
    assert_same(a, b)
    assert not torch.equal(torch.cat([x["input_ids"] for x in a]), torch.cat([x["input_ids"] for x in c]))


def test_largest_seed():
    docs, _ = positional(small_lengths(3, 50))
    loader = stoker.PackedLoader(docs, L, 4, seed=2 ** 64 - 1)
    a = list(loader)
    assert a and loader.state_dict()["seed"] == 2 ** 64 - 1
    assert_same(a, list(stoker.PackedLoader(docs, L, 4, seed=2 ** 64 - 1)))


# --------------------------------------------------------------------------------------------------------------
# 7. Resume
# --------------------------------------------------------------------------------------------------------------

POINTS = ["0", "1", "mid", "last-1", "last", "stopped"]


def resume_check(build, point):
    torch.manual_seed(1234)
    a = build()
    last = len(a)  # the epoch the next iterator serves (after iter(a), len(a) is the next epoch's)
    it = iter(a)
    assert len(it) == last >= 3
    k = {"0": 0, "1": 1, "mid": last // 2, "last-1": last - 1, "last": last, "stopped": last}[point]
    for _ in range(k):
        next(it)
    if point == "stopped":
        with pytest.raises(StopIteration):
            next(it)
    state = a.state_dict()
    assert state["format"] == FORMAT
    assert (state["epoch"], state["batches_served"]) == ((1, 0) if point == "stopped" else (0, k))
    expected = ([] if point == "stopped" else list(it)) + list(iter(a)) + list(iter(a))
    assert a.state_dict()["seed"] == state["seed"]

    state = roundtrip(state)
    torch.manual_seed(98765)  # a fresh process
    b = build()
    b.load_state_dict(state)
    assert b.state_dict() == state, "a loaded loader reports the loaded position before iterating"
    n_iters = 2 if point == "stopped" else 3
    resumed = [batch for _ in range(n_iters) for batch in iter(b)]
    assert len(resumed) == len(expected)
    assert_same(resumed, expected)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("window", [None, 4])
def test_resume_seed_from_global_rng(window, point):
    docs, _ = positional(small_lengths(5, 90))
    resume_check(lambda: stoker.PackedLoader(docs, L, 5, window=window, return_doc_ids=True), point)


@pytest.mark.parametrize("point", ["0", "mid", "last", "stopped"])
@pytest.mark.parametrize("window", [None, 4])
def test_resume_explicit_seed_drop_last(window, point):
    docs, _ = positional(small_lengths(6, 90))
    resume_check(lambda: stoker.PackedLoader(docs, L, 4, seed=77, window=window, drop_last=True, pad_id=3),
                 point)


def test_resume_after_set_epoch():
    docs, _ = positional(small_lengths(6, 90))
    a = stoker.PackedLoader(docs, L, 4, seed=5)
    a.set_epoch(3)
    it = iter(a)
    next(it)
    state = roundtrip(a.state_dict())
    assert (state["epoch"], state["batches_served"]) == (3, 1)
    expected = list(it) + list(iter(a))
    b = stoker.PackedLoader(docs, L, 4, seed=5)
    b.load_state_dict(state)
    assert_same(list(b) + list(b), expected)


def test_resume_then_set_epoch():
    """A training loop calls set_epoch(e) before each epoch: naming the loaded epoch keeps the loaded
    position, naming another starts that epoch from its first batch."""
    docs, _ = positional(small_lengths(6, 90))
    a = stoker.PackedLoader(docs, L, 4, seed=9)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    rest, epoch1 = list(it), list(iter(a))
    b = stoker.PackedLoader(docs, L, 4, seed=9)
    b.load_state_dict(state)
    b.set_epoch(0)
    assert_same(list(b), rest)
    b.set_epoch(1)
    assert_same(list(b), epoch1)
    c = stoker.PackedLoader(docs, L, 4, seed=9)
    c.load_state_dict(state)
    c.set_epoch(1)
    assert_same(list(c), epoch1)


def test_resume_rejects_other_settings():
    docs, _ = positional(small_lengths(6, 90))
    torch.manual_seed(0)
    a = stoker.PackedLoader(docs, L, 4, window=3)
    it = iter(a)
    next(it)
    state = a.state_dict()
    other_docs, _ = positional(small_lengths(6, 91))
    fewer_tokens = [d[:-1] if i == 0 else d for i, d in enumerate(docs)]
    bad = {  # the word the error names: the loader that must refuse the state
        "seq_len": lambda: stoker.PackedLoader(docs, L + 1, 4, window=3),
        "batch_size": lambda: stoker.PackedLoader(docs, L, 5, window=3),
        "num_documents": lambda: stoker.PackedLoader(other_docs, L, 4, window=3),
        "num_tokens": lambda: stoker.PackedLoader(fewer_tokens, L, 4, window=3),
        "window": lambda: stoker.PackedLoader(docs, L, 4, window=None),
        "long_docs": lambda: stoker.PackedLoader(docs, L, 4, window=3, long_docs="drop"),
        "shuffle": lambda: stoker.PackedLoader(docs, L, 4, window=3, shuffle=False),
        "drop_last": lambda: stoker.PackedLoader(docs, L, 4, window=3, drop_last=True),
        "shift_labels": lambda: stoker.PackedLoader(docs, L, 4, window=3, shift_labels=True),
        "world_size": lambda: stoker.PackedLoader(docs, L, 4, window=3, rank=0, world_size=2),
        "seed": lambda: stoker.PackedLoader(docs, L, 4, window=3, seed=(state["seed"] + 1) % 2 ** 64),
    }
    for name, build in bad.items():
        with pytest.raises(ValueError, match=name):
            build().load_state_dict(state)
    ok = stoker.PackedLoader(docs, L, 4, window=3)
    for broken in ({**state, "format": "stoker.DataLoader/1"}, {**state, "batches_served": -1},
                   {**state, "epoch": 1.5}, {**state, "batches_served": 10 ** 6},
                   {k: v for k, v in state.items() if k != "seq_len"}, [1, 2]):
        with pytest.raises(ValueError):
            ok.load_state_dict(broken)
    for seed in ("abc", -3, 2**70, 1.5, True):
        with pytest.raises(ValueError, match=r"the state's seed must be an integer in \[0, 2\*\*64\) or None"):
            ok.load_state_dict({**state, "seed": seed})
    # Refused states leave it as it was: it still loads a good one and serves as the saved loader goes on.
    ok.load_state_dict(state)
    assert_same(list(ok), list(it))


# --------------------------------------------------------------------------------------------------------------
# 8. Sharding by documents
# --------------------------------------------------------------------------------------------------------------


def check_padding_rows(batch, seq_len, pad_id=0):
    """Asserts that every row of padding only (doc_ids all -1) is well formed: pad_id, labels -100, positions
    0..L-1, one segment; returns how many there are."""
    cu = set(batch["cu_seqlens"].tolist())
    n = 0
    for r in range(batch["input_ids"].shape[0]):
        if (batch["doc_ids"][r] >= 0).any():
            continue
        n += 1
        assert (batch["input_ids"][r] == pad_id).all()
        assert (batch["labels"][r] == IGNORE).all()
        assert batch["position_ids"][r].tolist() == list(range(seq_len))
        assert {c for c in cu if r * seq_len <= c <= (r + 1) * seq_len} == {r * seq_len, (r + 1) * seq_len}
        assert len(set(batch["seq_idx"][r].tolist())) == 1
    return n


def documents_served(batches, offsets):
    """{document: its tokens served, in the order of its pieces} over batches of positional tokens."""
    pieces = {}
    for b in batches:
        ids = b["input_ids"].numpy().reshape(-1)
        for _, s, n, d in real_segments(b, b["input_ids"].shape[1]):
            pieces.setdefault(d, []).append(ids[s:s + n])
    return {d: np.sort(np.concatenate(p)) for d, p in pieces.items()}


def shard_run(docs, world, batch_size=3, **kwargs):
    """Every rank's loader over one epoch: [(loader, len before iterating, batches, stats)] by rank."""
    out = []
    for rank in range(world):
        loader = stoker.PackedLoader(docs, L, batch_size, return_doc_ids=True, rank=rank, world_size=world,
                                     **kwargs)
        n = len(loader)
        stats = loader.stats()
        out.append((loader, n, list(loader), stats))
    return out


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_sharding_by_documents(world, window, drop_last, batch_size, shuffle):
    lengths = small_lengths(21, 61)
    docs, offsets = positional(lengths)
    torch.manual_seed(99)  # a sharded loader without seed= packs with seed 0 whatever the global RNG
    runs = shard_run(docs, world, window=window, drop_last=drop_last, batch_size=batch_size, shuffle=shuffle,
                     pad_id=-3)
    counts = runs[0][3]["shard_rows"]
    assert len(counts) == world and len(set(counts)) > 1, f"the workload should leave the ranks uneven: {counts}"
    assert len({n for _, n, _, _ in runs}) == 1, "ranks yield different numbers of batches"
    served_docs, served_tokens, cut = [], [], 0
    for rank, (loader, n, batches, stats) in enumerate(runs):
        assert len(batches) == n and stats["rank"] == rank and stats["world_size"] == world
        assert stats["shard_rows"] == counts and stats["rows"] == counts[rank]
        assert stats["documents"] == len(range(rank, len(docs), world))
        padding = 0
        for b in batches:
            check_batch(b, L, pad_id=-3, doc_ids=True)
            padding += check_padding_rows(b, L, pad_id=-3)
        rows = sum(b["input_ids"].shape[0] for b in batches)
        assert (stats["rows_served"], stats["padding_rows"]) == (rows, padding)
        if drop_last:
            assert rows == min(counts) // batch_size * batch_size and padding == 0
            assert stats["rows_cut"] == counts[rank] - rows
        else:
            assert rows == max(counts) and padding == max(counts) - counts[rank]
            assert stats["rows_cut"] == stats["tokens_cut"] == 0
        tokens = check_positional_tokens(batches, offsets, L, pad_id=-3)
        assert len(tokens) + stats["tokens_cut"] == stats["tokens"]
        cut += stats["tokens_cut"]
        got = documents_served(batches, offsets)
        if not drop_last:  # the rank's documents come back whole
            for d, t in got.items():
                assert np.array_equal(t, np.arange(offsets[d], offsets[d + 1])), f"document {d} not whole"
        if not shuffle:  # no shuffle: the order is 0, 1, 2, ..., so rank r has documents r, r + W, ...
            assert set(got) <= set(range(rank, len(docs), world))
        served_docs.append(set(got))
        served_tokens.append(tokens)
    for a, b in itertools.combinations(served_docs, 2):
        assert a.isdisjoint(b), "a document packed on two ranks"
    tokens = np.concatenate(served_tokens)
    assert len(np.unique(tokens)) == len(tokens), "a token served twice"
    if drop_last:
        assert len(tokens) + cut == offsets[-1]
    else:
        assert set().union(*served_docs) == {d for d, n in enumerate(lengths) if n > 0}
        assert np.array_equal(np.sort(tokens), np.arange(offsets[-1])), "not every token exactly once"


@pytest.mark.parametrize("window", [None, 1, 4])
def test_a_rank_packs_its_documents_as_a_loader_of_them_alone(window):
    """Without shuffling, rank r's real rows are the rows one loader makes of documents r, r + W, ... (its
    padding rows aside)."""
    lengths = small_lengths(22, 70)
    docs, _ = positional(lengths)
    world = 3
    for rank in range(world):
        sharded = stoker.PackedLoader(docs, L, 2, shuffle=False, window=window, rank=rank, world_size=world,
                                      return_doc_ids=True)
        alone = stoker.PackedLoader(docs[rank::world], L, 2, shuffle=False, window=window, return_doc_ids=True)
        rows = [r for r in _row_token_lists(list(sharded)) if r]
        assert rows == _row_token_lists(list(alone))


def test_padding_rows_are_spread_through_the_epoch():
    # rows of one document each, no shuffle: rank 0 gets documents 0, 2, 4, 6, 8 (5 rows), rank 1 gets 1, 3, 5
    # and an empty one (3 rows); with batch 2, rank 1 serves [pad, row 0], [pad, row 1], [row 2]
    docs = [[1] * 8, [10] * 8, [2] * 8, [11] * 8, [3] * 8, [12] * 8, [4] * 8, [], [5] * 8]
    a = stoker.PackedLoader(docs, 8, 2, shuffle=False, rank=0, world_size=2, return_doc_ids=True)
    b = stoker.PackedLoader(docs, 8, 2, shuffle=False, rank=1, world_size=2, return_doc_ids=True)
    assert a.stats()["shard_rows"] == [5, 3]
    assert len(a) == len(b) == 3
    rows = [row[0] if row else None for row in _row_token_lists(list(b))]
    assert rows == [None, [10] * 8, None, [11] * 8, [12] * 8]
    assert b.stats()["padding_rows"] == 2
    cut = stoker.PackedLoader(docs, 8, 2, shuffle=False, rank=0, world_size=2, drop_last=True, return_doc_ids=True)
    assert len(cut) == 1 and [r[0] for r in _row_token_lists(list(cut))] == [[1] * 8, [2] * 8]
    s = cut.stats()
    assert (s["rows_served"], s["rows_cut"], s["tokens_cut"]) == (2, 3, 24)


def test_sharding_fewer_documents_than_ranks():
    docs, offsets = positional([8, 3])
    for rank in range(3):
        sh = stoker.PackedLoader(docs, 8, 1, rank=rank, world_size=3, shuffle=False, return_doc_ids=True)
        assert len(sh) == 1
        (b,) = list(sh)
        check_batch(b, 8, doc_ids=True)
        if rank < 2:
            assert rows_of([b], offsets) == [((rank, 0, [8, 3][rank]),)]
        else:  # no document: one row of padding, as many batches as the others
            assert check_padding_rows(b, 8) == 1 and sh.stats()["documents"] == 0
        sh = stoker.PackedLoader(docs, 8, 1, rank=rank, world_size=3, drop_last=True)
        assert list(sh) == [] and len(sh) == 0 and sh.stats()["shard_rows"] == [1, 1, 0]


@pytest.mark.parametrize("window", [None, 4])
def test_sharded_batches_are_deterministic_and_epochs_differ(window):
    docs, _ = positional(small_lengths(23, 80))
    for rank in range(2):
        torch.manual_seed(rank)  # does not matter: seed 0 on every rank
        a = epochs(stoker.PackedLoader(docs, L, 2, window=window, rank=rank, world_size=2), 2)
        torch.manual_seed(rank + 10)
        b = epochs(stoker.PackedLoader(docs, L, 2, window=window, rank=rank, world_size=2), 2)
        assert_same(a, b)
        assert not torch.equal(torch.cat([x["input_ids"] for x in a[0]]),
                               torch.cat([x["input_ids"] for x in a[1]]))
        c = stoker.PackedLoader(docs, L, 2, window=window, rank=rank, world_size=2, seed=0)
        c.set_epoch(1)
        assert_same(list(c), a[1])


def test_world_size_one_is_the_unsharded_loader():
    docs, _ = positional(small_lengths(24, 60))
    for window in (None, 3):
        plain = epochs(stoker.PackedLoader(docs, L, 3, seed=4, window=window), 2)
        for kwargs in ({"world_size": 1}, {"rank": 0, "world_size": 1}):
            assert_same(epochs(stoker.PackedLoader(docs, L, 3, seed=4, window=window, **kwargs), 2), plain)


@pytest.mark.parametrize("point", ["1", "mid", "last", "stopped"])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_resume_every_rank(rank, window, drop_last, point):
    docs, _ = positional(small_lengths(6, 120))
    resume_check(lambda: stoker.PackedLoader(docs, L, 2, window=window, drop_last=drop_last, rank=rank,
                                             world_size=3, return_doc_ids=True), point)


def test_sharded_state_names_rank_and_world_size():
    docs, _ = positional(small_lengths(6, 90))
    loader = stoker.PackedLoader(docs, L, 2, rank=1, world_size=3)
    len(loader)  # plans, drawing the seed
    state = loader.state_dict()
    assert (state["format"], state["rank"], state["world_size"], state["seed"]) == (FORMAT, 1, 3, 0)
    for rank, world in ((0, 3), (1, 2), (0, 1)):
        with pytest.raises(ValueError, match="rank|world_size"):
            stoker.PackedLoader(docs, L, 2, rank=rank, world_size=world).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):  # a state of the loader that sharded rows
        loader.load_state_dict({**state, "format": "stoker.PackedLoader/1"})


def test_sharding_bad_arguments():
    docs, _ = positional([4, 4])
    for kwargs in ({"rank": 1}, {"world_size": 2}, {"rank": 2, "world_size": 2}):
        with pytest.raises(ValueError):
            list(stoker.PackedLoader(docs, 8, 1, **kwargs))
    for kwargs in ({"rank": -1, "world_size": 2}, {"rank": 0, "world_size": 0}):
        with pytest.raises(ValueError):
            stoker.PackedLoader(docs, 8, 1, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# 9. Files
# --------------------------------------------------------------------------------------------------------------

FILE_DTYPES = {np.uint16: 2 ** 16 - 1, np.int32: 2 ** 31 - 1, np.uint32: 2 ** 32 - 1, np.int64: 2 ** 63 - 1}


@pytest.mark.parametrize("dtype", list(FILE_DTYPES))
def test_write_token_files_round_trip(tmp_path, dtype):
    top = FILE_DTYPES[dtype]
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, n) for n in (5, 0, 13, 1, 40)] + [np.array([top, top - 1, 0])]
    prefix = tmp_path / "corpus"
    tokens_path, offsets_path = stoker.write_token_files(prefix, docs, dtype=dtype)
    assert (tokens_path, offsets_path) == (str(prefix) + ".tokens.npy", str(prefix) + ".offsets.npy")
    assert np.load(offsets_path).dtype == np.int64 and np.load(tokens_path).dtype == dtype
    for ds in (stoker.TokenDataset.open(prefix), stoker.TokenDataset.open(str(prefix)),
               stoker.TokenDataset.open(tokens_path, offsets_path)):
        assert ds.tokens.dtype == dtype
        assert len(ds) == len(docs) and ds.num_tokens == sum(map(len, docs))
        assert ds.lengths.tolist() == [len(d) for d in docs]
        for i, d in enumerate(docs):
            assert ds[i].tolist() == list(d)
        batches = list(stoker.PackedLoader(ds, 16, 2, seed=0, return_doc_ids=True))
        served = np.concatenate([b["input_ids"][b["doc_ids"] >= 0].numpy() for b in batches])
        assert sorted(served.tolist()) == sorted(int(t) for d in docs for t in d)
        assert top in served.tolist(), "large unsigned tokens must come out unchanged in int64"


def test_write_token_files_default_dtype_is_uint16(tmp_path):
    tokens_path, _ = stoker.write_token_files(tmp_path / "x", [[1, 2], [3]])
    assert np.load(tokens_path).dtype == np.uint16
    with pytest.raises(ValueError):
        stoker.write_token_files(tmp_path / "y", [[1, 70000]])


def test_raw_token_files(tmp_path):
    docs = [[1, 2, 3], [], [4, 5]]
    tokens = np.array([1, 2, 3, 4, 5], dtype=np.uint16)
    offsets = np.array([0, 3, 3, 5], dtype=np.int64)
    tok_bin, off_npy, off_bin = tmp_path / "t.bin", tmp_path / "o.npy", tmp_path / "o.bin"
    tokens.tofile(tok_bin)
    np.save(off_npy, offsets)
    offsets.tofile(off_bin)
    for off in (off_npy, off_bin):
        ds = stoker.TokenDataset.open(tok_bin, off, dtype=np.uint16)
        assert ds.tokens.dtype == np.uint16 and [ds[i].tolist() for i in range(3)] == docs
    with pytest.raises(ValueError, match="dtype"):
        stoker.TokenDataset.open(tok_bin, off_npy)
    # 5 uint16 = 10 bytes is not a whole number of int32
    with pytest.raises(ValueError) as info:
        stoker.TokenDataset.open(tok_bin, off_npy, dtype=np.int32)
    assert str(tok_bin) in str(info.value)


def test_open_files_of_zero_tokens(tmp_path):
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    np.save(tmp_path / "z.npy", np.array([0], np.int64))
    ds = stoker.TokenDataset.open(empty, tmp_path / "z.npy", dtype=np.int32)
    assert len(ds) == 0 and ds.num_tokens == 0
    np.save(tmp_path / "t.npy", np.zeros(0, np.uint16))
    np.save(tmp_path / "o.npy", np.zeros(3, np.int64))
    ds = stoker.TokenDataset.open(tmp_path / "t.npy", tmp_path / "o.npy")
    assert len(ds) == 2 and list(stoker.PackedLoader(ds, 8, 2)) == []


def _valid_files(tmp_path, name="c"):
    return stoker.write_token_files(tmp_path / name, [[1, 2, 3], [4, 5, 6, 7], [8]], dtype=np.int32)


def _raises_naming(path, fn, exc=ValueError, match=None):
    with pytest.raises(exc) as info:
        fn()
    assert str(path) in str(info.value), f"{info.value!s} does not name {path}"
    if match is not None:
        assert match in str(info.value), f"{info.value!s} does not say {match!r}"
    return info.value


def test_file_errors_truncated_and_garbage(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    for path in (tokens_path, offsets_path):
        data = open(path, "rb").read()
        for cut in (0, 5, 40, len(data) - 3):
            with open(path, "wb") as f:
                f.write(data[:cut])
            _raises_naming(path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))
        with open(path, "wb") as f:
            f.write(bytes(range(7, 7 + 64)))  # garbage: no .npy magic
        _raises_naming(path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))
        with open(path, "wb") as f:
            f.write(data)
    stoker.TokenDataset.open(tokens_path, offsets_path)  # restored: valid again


def test_file_errors_pickled_npy(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    np.save(offsets_path, np.array([0, 3, 7, 8], dtype=object), allow_pickle=True)
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))


@pytest.mark.parametrize("offsets,index", [
    ([0, 5, 3, 8], "offsets[2]"),      # decreasing
    ([0, 3, 20, 8], "offsets[2]"),     # past the end (8 tokens)
    ([0, 3, 20], "offsets[2]"),        # past the end, last entry
    ([0, 3, 7], "offsets[2]"),         # the last offset is not the number of tokens
    ([2, 3, 8], "offsets[0]"),         # does not start at 0
    ([0, 3, -1, 8], "offsets[2]"),
])
def test_file_errors_bad_offsets(tmp_path, offsets, index):
    tokens_path, offsets_path = _valid_files(tmp_path)
    np.save(offsets_path, np.array(offsets, dtype=np.int64))
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path), match=index)
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tmp_path / "c"), match=index)
    # the same offsets given in memory
    with pytest.raises(ValueError, match=index.replace("[", r"\[").replace("]", r"\]")):
        stoker.TokenDataset.from_flat(np.arange(8, dtype=np.int32), offsets)


def test_file_errors_huge_unsigned_offset(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    np.save(offsets_path, np.array([0, 3, 2 ** 64 - 1, 8], dtype=np.uint64))
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path), match="offsets[2]")
    np.save(offsets_path, np.array([0, 3, 7, 8], dtype=np.uint32))  # other integer types are fine
    assert len(stoker.TokenDataset.open(tokens_path, offsets_path)) == 3


def test_file_errors_shapes_and_dtypes(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    good_tokens = np.load(tokens_path)
    np.save(tokens_path, good_tokens.reshape(2, 4))
    _raises_naming(tokens_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))
    np.save(tokens_path, good_tokens.astype(np.float32))
    _raises_naming(tokens_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path), exc=TypeError)
    for bad in (np.int8, np.uint64, np.dtype(">i4")):
        np.save(tokens_path, good_tokens.astype(bad))
        _raises_naming(tokens_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path), exc=TypeError)
    np.save(tokens_path, good_tokens)
    np.save(offsets_path, np.array([[0, 3], [7, 8]], dtype=np.int64))
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))
    np.save(offsets_path, np.array([0.0, 3, 7, 8]))
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path), exc=TypeError)
    np.save(offsets_path, np.array([], dtype=np.int64))
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))
    np.save(offsets_path, np.array([0, 3, 7, 8], dtype=np.int64))
    assert len(stoker.TokenDataset.open(tokens_path, offsets_path)) == 3


def test_file_errors_missing_files(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    missing = tmp_path / "nope.npy"
    _raises_naming(missing, lambda: stoker.TokenDataset.open(tokens_path, missing))
    _raises_naming(missing, lambda: stoker.TokenDataset.open(missing, offsets_path))
    os.remove(offsets_path)
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tmp_path / "c"))
    _raises_naming(tmp_path / "absent", lambda: stoker.TokenDataset.open(tmp_path / "absent"))
    # an existing file without an offsets file
    with pytest.raises(ValueError):
        stoker.TokenDataset.open(tokens_path)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_fuzz_counter = itertools.count()


def _header_bug(path, find, replace):
    """Rewrites one spot of a .npy header in place."""
    data = open(path, "rb").read()
    at = data.index(find)
    with open(path, "wb") as f:
        f.write(data[:at] + replace + data[at + len(find):])


def test_npy_header_nul_byte_raises_value_error(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    _header_bug(offsets_path, b"{'descr'", b"\x00'descr'")
    _raises_naming(offsets_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))


def test_npy_header_bytes_key_raises_value_error(tmp_path):
    tokens_path, offsets_path = _valid_files(tmp_path)
    _header_bug(tokens_path, b", 'fortran_order'", b",b'fortran_order'")
    _raises_naming(tokens_path, lambda: stoker.TokenDataset.open(tokens_path, offsets_path))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=12),
    dtype=st.sampled_from([np.uint16, np.int32, np.uint32, np.int64]),
    which=st.sampled_from(["offsets", "offsets", "tokens"]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
def test_fuzz_corrupt_files(fuzz_dir, lengths, dtype, which, edits, cut):
    """A corrupted file either raises ValueError/TypeError naming a file, or opens as a consistent dataset
    that packs without trouble — never a crash or a read outside the files."""
    prefix = fuzz_dir / f"f{next(_fuzz_counter)}"
    docs, _ = positional(lengths, dtype)
    tokens_path, offsets_path = stoker.write_token_files(prefix, docs, dtype=dtype)
    path = offsets_path if which == "offsets" else tokens_path
    data = bytearray(open(path, "rb").read())
    for where, value in edits:
        data[where % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    with open(path, "wb") as f:
        f.write(bytes(data))
    try:
        ds = stoker.TokenDataset.open(tokens_path, offsets_path)
    except Exception as exc:  # noqa: BLE001 - classified below
        assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
        assert tokens_path in str(exc) or offsets_path in str(exc), str(exc)
        return
    offsets = np.asarray(ds.offsets)
    n = len(ds.tokens)
    assert offsets.ndim == 1 and len(offsets) >= 1
    assert offsets[0] == 0 and offsets[-1] == n and (np.diff(offsets) >= 0).all()
    assert np.array_equal(ds.lengths, np.diff(offsets)) and len(ds) == len(offsets) - 1
    loader = stoker.PackedLoader(ds, 8, 3, seed=0, return_doc_ids=True)
    served = []
    for b in loader:
        check_batch(b, 8, doc_ids=True)
        served.append(b["input_ids"][b["doc_ids"] >= 0].numpy())
    served = np.concatenate(served) if served else np.empty(0, np.int64)
    assert np.array_equal(np.sort(served), np.sort(np.asarray(ds.tokens).astype(np.int64)))


# --------------------------------------------------------------------------------------------------------------
# 10. Attention over a packed batch equals attention over each document on its own
# --------------------------------------------------------------------------------------------------------------


def _rope(x, pos):
    """Rotary position embedding of x [..., N, d] at integer positions pos [N]."""
    d = x.shape[-1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    ang = pos.to(x.dtype)[:, None] * freqs[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class TinyAttention:
    """One head of causal self-attention over token ids, with rotary positions."""

    def __init__(self, vocab, dim=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.wq, self.wk, self.wv = (torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
                                     for _ in range(3))

    def __call__(self, ids, pos, mask=None):
        """ids, pos [N]; mask [N, N] bool (True = may attend) or None for plain causal."""
        x = self.emb[ids]
        q, k, v = (x @ w for w in (self.wq, self.wk, self.wv))
        q, k = _rope(q, pos), _rope(k, pos)
        q, k, v = (t[None, None] for t in (q, k, v))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out[0, 0]


@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_equals_per_document_attention(window):
    lengths = small_lengths(9, 40)
    docs, offsets = positional(lengths)
    ds = stoker.TokenDataset(docs)
    attn = TinyAttention(int(offsets[-1]) + 1)
    loader = stoker.PackedLoader(ds, L, 3, seed=4, window=window, return_doc_ids=True)
    checked = leaked = 0
    for b in itertools.islice(loader, 4):
        check_batch(b, L, doc_ids=True)
        ids = b["input_ids"].reshape(-1)
        pos = b["position_ids"].reshape(-1)
        sidx = b["seq_idx"].reshape(-1)
        N = ids.numel()
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        packed = attn(ids, pos, (sidx[:, None] == sidx[None, :]) & causal)
        naive = attn(ids, pos, causal)  # attends across documents: must differ somewhere
        for _, s, n, d in real_segments(b, L):
            off = int(ids[s]) - int(offsets[d])
            piece = torch.from_numpy(np.asarray(ds[d][off:off + n], dtype=np.int64))
            alone = attn(piece, torch.arange(n))
            torch.testing.assert_close(packed[s:s + n], alone, atol=1e-5, rtol=0)
            checked += 1
            if s % L and not torch.allclose(naive[s:s + n], alone, atol=1e-5, rtol=0):
                leaked += 1
    assert checked > 10 and leaked > 0


def test_position_ids_feed_positions_consistently():
    """Rotary queries/keys computed from position_ids of the packed batch are those of each document at
    positions 0..n-1 (the first token of a continuation piece is position 0 of its own segment)."""
    docs, offsets = positional(small_lengths(10, 30))
    loader = stoker.PackedLoader(docs, L, 4, seed=0, return_doc_ids=True)
    x_all = torch.randn(int(offsets[-1]) + 1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for b in loader:
        ids = b["input_ids"].reshape(-1)
        rotated = _rope(x_all[ids], b["position_ids"].reshape(-1))
        for _, s, n, _ in real_segments(b, L):
            torch.testing.assert_close(rotated[s:s + n], _rope(x_all[ids[s:s + n]], torch.arange(n)))


# --------------------------------------------------------------------------------------------------------------
# 11. TokenDataset basics and bad arguments
# --------------------------------------------------------------------------------------------------------------


def test_token_dataset_basics():
    ds = stoker.TokenDataset([[1, 2, 3], [], [4]])
    assert len(ds) == 3 and ds.num_tokens == 4
    assert ds.lengths.dtype == np.int64 and ds.lengths.tolist() == [3, 0, 1]
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [] and ds[2].tolist() == [4]
    assert ds[-1].tolist() == [4] and ds[-3].tolist() == [1, 2, 3] and ds[np.int64(0)].tolist() == [1, 2, 3]
    for bad in (3, -4, 100):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]
    assert "3 documents" in repr(ds)


@pytest.mark.parametrize("build", ["list", "empty_docs", "from_flat"])
def test_token_dataset_of_zero_tokens(build):
    ds = {"list": lambda: stoker.TokenDataset([]),
          "empty_docs": lambda: stoker.TokenDataset([[], []]),
          "from_flat": lambda: stoker.TokenDataset.from_flat(np.zeros(0, np.int32), [0, 0])}[build]()
    assert ds.num_tokens == 0 and ds.lengths.tolist() == [0] * len(ds)


def test_token_dataset_from_tensors_and_dtypes():
    docs = [torch.tensor([5, 6], dtype=torch.int32), torch.tensor([7], dtype=torch.int32)]
    ds = stoker.TokenDataset(docs)
    assert ds.tokens.dtype == np.int32 and ds[0].tolist() == [5, 6] and ds[1].tolist() == [7]
    ds = stoker.TokenDataset([np.array([1, 2], np.uint16), np.array([3], np.uint16)])
    assert ds.tokens.dtype == np.uint16
    ds = stoker.TokenDataset([[1, 2], [3]], dtype=np.uint32)
    assert ds.tokens.dtype == np.uint32
    for dtype, bad_doc in ((np.uint16, [1, 2 ** 16]), (np.uint16, [-1]), (np.int32, [2 ** 31]),
                           (np.uint32, [2 ** 32]), (np.uint32, [-5])):
        with pytest.raises(ValueError, match="document 1"):
            stoker.TokenDataset([[0], bad_doc], dtype=dtype)
    with pytest.raises(ValueError, match="document 1"):
        stoker.TokenDataset([[0], np.zeros((2, 2), np.int64)])
    with pytest.raises(ValueError):
        stoker.TokenDataset([np.int64(3)])  # a 0-d "document"
    with pytest.raises(TypeError):
        stoker.TokenDataset([[0.5, 1.5]])
    for dtype in (np.float32, np.int8, np.uint64):
        with pytest.raises(TypeError):
            stoker.TokenDataset([[1]], dtype=dtype)


def test_token_dataset_from_flat():
    tokens = np.arange(10, dtype=np.int32)
    ds = stoker.TokenDataset.from_flat(tokens, [0, 4, 4, 10])
    assert np.shares_memory(ds.tokens, tokens), "from_flat does not copy"
    assert [ds[i].tolist() for i in range(3)] == [[0, 1, 2, 3], [], [4, 5, 6, 7, 8, 9]]
    ds = stoker.TokenDataset.from_flat(torch.arange(6, dtype=torch.int64), torch.tensor([0, 2, 6]))
    assert ds.tokens.dtype == np.int64 and ds[1].tolist() == [2, 3, 4, 5] and ds.num_tokens == 6
    with pytest.raises(ValueError):
        stoker.TokenDataset.from_flat(np.zeros((2, 3), np.int32), [0, 6])
    with pytest.raises(TypeError):
        stoker.TokenDataset.from_flat(np.zeros(4, np.float64), [0, 4])
    with pytest.raises(ValueError):
        stoker.TokenDataset.from_flat(np.zeros(4, np.int32), [])
    with pytest.raises(TypeError):
        stoker.TokenDataset.from_flat(np.zeros(4, np.int32), [0.0, 4.0])
    # a non-contiguous view works (and is served correctly)
    base = np.arange(20, dtype=np.int64)
    ds = stoker.TokenDataset.from_flat(base[::2], [0, 3, 10])
    assert ds[1].tolist() == [6, 8, 10, 12, 14, 16, 18]


def test_lengths_cannot_corrupt_the_dataset():
    ds = stoker.TokenDataset([np.arange(5), np.arange(5, 8)])
    lengths = ds.lengths
    try:
        lengths[0] = 2
    except ValueError:
        pass  # read-only: fine
    assert ds.lengths.tolist() == [5, 3]
    batches = list(stoker.PackedLoader(ds, 8, 2, shuffle=False))
    served = sorted(int(t) for b in batches for t in b["input_ids"][b["labels"] != IGNORE].tolist())
    # every token but the first of each document has a label
    assert served == [1, 2, 3, 4, 6, 7]


def test_loader_accepts_documents_directly():
    docs = [[1, 2, 3], torch.tensor([4, 5]), np.array([6])]
    loader = stoker.PackedLoader(docs, 4, 2, shuffle=False, return_doc_ids=True)
    assert isinstance(loader.documents, stoker.TokenDataset)
    served = sorted(t for b in loader for t in b["input_ids"][b["doc_ids"] >= 0].tolist())
    assert served == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("pad_id", [2 ** 63, -(2 ** 63) - 1])
def test_pad_id_outside_int64_is_a_bad_argument(pad_id):
    with pytest.raises(ValueError, match="pad_id"):
        stoker.PackedLoader([[1, 2, 3]], 8, 2, pad_id=pad_id)


def test_extreme_pad_ids_are_served():
    for pad_id in (2 ** 63 - 1, -(2 ** 63)):
        (b,) = list(stoker.PackedLoader([[1, 2, 3]], 8, 2, pad_id=pad_id, return_doc_ids=True))
        check_batch(b, 8, pad_id=pad_id, doc_ids=True)
        assert b["input_ids"].tolist() == [[1, 2, 3] + [pad_id] * 5]


@pytest.mark.parametrize("kwargs", [
    {"seq_len": 0}, {"seq_len": -1}, {"seq_len": 2.0}, {"seq_len": True},
    {"batch_size": 0}, {"batch_size": -2}, {"batch_size": None},
    {"window": 0}, {"window": -1}, {"window": 1.5}, {"window": True},
    {"long_docs": "x"}, {"long_docs": None},
    {"seed": -1}, {"seed": 2 ** 64}, {"seed": 1.0}, {"seed": True},
    {"pad_id": 1.0}, {"pad_id": None},
])
def test_bad_arguments(kwargs):
    args = {"seq_len": 8, "batch_size": 2, **kwargs}
    seq_len, batch_size = args.pop("seq_len"), args.pop("batch_size")
    with pytest.raises(ValueError):
        stoker.PackedLoader([[1, 2, 3]], seq_len, batch_size, **args)


def test_batches_beyond_int32_cu_seqlens_are_refused():
    with pytest.raises(ValueError, match="cu_seqlens"):
        stoker.PackedLoader([[1, 2, 3]], 1 << 20, 1 << 11)


@pytest.mark.parametrize("make", [lambda: stoker.PackedLoader([[1, 2, 3]], 8, 2),
                                  lambda: stoker.DataLoader(np.arange(10), batch_size=2)],
                         ids=["PackedLoader", "DataLoader"])
def test_negative_epoch_is_refused(make):
    with pytest.raises(ValueError, match="epoch"):
        make().set_epoch(-1)


# ----------------------------------------------------------------------------------------------------------------
# Batches built ahead by threads
# ----------------------------------------------------------------------------------------------------------------


def _docs_for_threads():
    rng = np.random.default_rng(7)
    lengths = lognormal_lengths(rng, 400, 12, hi=3 * L)
    return stoker.TokenDataset([np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)])


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("num_threads,prefetch", [(1, 1), (2, 4), (3, 2), (2, 50)])
def test_threads_build_the_same_batches(window, num_threads, prefetch):
    docs = _docs_for_threads()
    reference = stoker.PackedLoader(docs, L, 4, seed=3, window=window, num_threads=0)
    loader = stoker.PackedLoader(docs, L, 4, seed=3, window=window, num_threads=num_threads, prefetch=prefetch)
    for _ in range(2):  # two epochs: the second differs from the first, identically for both loaders
        expected = list(reference)
        assert len(expected) > 10
        assert_same(list(loader), expected)


def test_kept_batches_are_not_overwritten_by_batches_built_ahead():
    docs = _docs_for_threads()
    expected = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                for b in stoker.PackedLoader(docs, L, 4, seed=1, num_threads=0)]
    kept = list(stoker.PackedLoader(docs, L, 4, seed=1, num_threads=2, prefetch=8))
    assert_same(kept, expected)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_state_counts_batches_received_not_built(k):
    docs = _docs_for_threads()
    loader = stoker.PackedLoader(docs, L, 4, seed=5, num_threads=2, prefetch=6)
    it = iter(loader)
    head = [next(it) for _ in range(k)]
    state = roundtrip(loader.state_dict())
    assert state["batches_served"] == k
    rest = list(it)
    resumed = stoker.PackedLoader(docs, L, 4, seed=5, num_threads=1)
    resumed.load_state_dict(state)
    assert_same(list(resumed), rest)
    assert len(head) + len(rest) == len(loader)


def _join_plan_ahead():
    import threading

    for t in threading.enumerate():
        if t.name == "stoker_plan_ahead":
            t.join(timeout=10)
            assert not t.is_alive()


def test_abandoned_iterator_stops_its_threads():
    docs = _docs_for_threads()
    list(stoker.PackedLoader(docs, L, 4, seed=5))
    _join_plan_ahead()
    before = settled_thread_count()
    loader = stoker.PackedLoader(docs, L, 4, seed=5, num_threads=2, prefetch=4)
    it = iter(loader)
    next(it)
    if before is not None:
        assert native_thread_count() >= before + 2  # the builders
    it.close()
    it.close()  # idempotent
    del it
    list(loader)  # the loader goes on: a new epoch
    _join_plan_ahead()
    if before is not None:
        _assert_threads_back_to(before)


def _assert_threads_back_to(before: int) -> None:
    # a joined thread can linger in /proc/self/task for a moment after join() returns
    deadline = time.monotonic() + 5
    while native_thread_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert native_thread_count() == before


_FORK_CHILD = r"""
import os, sys
import numpy as np
import stoker

threads = int(sys.argv[1])
if threads:
    docs = stoker.TokenDataset([np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate([5, 9, 17, 3] * 60)])
    loader = stoker.PackedLoader(docs, 16, 4, seed=1, num_threads=threads, prefetch=4)
else:
    # batches of 8192 tokens or more, and no plan built ahead: the helper has begun the second batch when
    # the process forks
    docs = stoker.TokenDataset([np.arange(n, dtype=np.int32) + 1000 * i
                                for i, n in enumerate([500, 900, 1700, 300] * 60)])
    loader = stoker.PackedLoader(docs, 4096, 4, seed=1)
    loader._plan_ahead = lambda epoch: None
alone = stoker.PackedLoader(docs, loader.seq_len, 4, seed=1, helper_thread=False)
expected_next = [b["input_ids"].clone() for b in alone]
it = iter(loader)
first = next(it)
pid = os.fork()
if pid == 0:
    code = 0
    try:
        second = next(it)
        # built on demand, the copy goes on alone (its helper thread is not in the child); with builder
        # threads, it must say that they are not here rather than wait for them
        code = 0 if not threads and (second["input_ids"] == expected_next[1]).all() else 3
    except RuntimeError as e:
        code = 0 if threads and "(a fork)" in str(e) else 4
    del it  # must not join threads that are not there
    # the loader works on in the child: epoch 1 (with builders, planned ahead by a thread of the parent) is
    # planned again here and built by new threads
    reference = stoker.PackedLoader(docs, loader.seq_len, 4, seed=1, helper_thread=False)
    reference.set_epoch(1)
    again, expected = list(loader), list(reference)
    if len(again) != len(expected) or not all((a["input_ids"] == b["input_ids"]).all()
                                              for a, b in zip(again, expected)):
        code = 5
    os._exit(code)
_, status = os.waitpid(pid, 0)
rest = list(it)
assert len(rest) + 1 == len(expected_next)
assert all((b["input_ids"] == e).all() for b, e in zip(rest, expected_next[1:]))
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("num_threads", [0, 2], ids=["helper", "builders"])
def test_a_forked_child_neither_uses_nor_joins_the_parents_threads(tmp_path, num_threads):
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    out = subprocess.run([sys.executable, str(script), str(num_threads)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "child 0", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------------
# The helper thread: rows written from the back by a second thread while the caller writes them from the front
# ----------------------------------------------------------------------------------------------------------------


# The helper takes part in batches of at least 8192 tokens (2 rows or more): rows of 1024 tokens here.
HL = 1024


def _helper_docs(dtype, seed, n=400):
    lengths = lognormal_lengths(np.random.default_rng(seed), n, 260, hi=3 * HL)
    return stoker.TokenDataset([(np.arange(k) % 50_000 + i).astype(dtype) for i, k in enumerate(lengths)])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32, np.int64])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("batch_size", [2, 8, 9, 33])
@pytest.mark.parametrize("options", [{}, dict(shift_labels=True), dict(return_doc_ids=True, pad_id=-7),
                                     dict(long_docs="truncate", drop_last=True)])
def test_the_helper_thread_writes_the_same_batches(dtype, window, batch_size, options):
    docs = _helper_docs(dtype, batch_size, n=1500 if batch_size < 33 else 4000)
    make = lambda helper: stoker.PackedLoader(docs, HL if batch_size > 2 else 4 * HL, batch_size, seed=4,
                                              window=window, helper_thread=helper, **options)
    helped, alone = make(True), make(False)
    # No plan built ahead: while one is built, batches are written without the helper.
    helped._plan_ahead = lambda epoch: None
    for epoch in range(2):
        alone.set_epoch(epoch)
        helped.set_epoch(epoch)
        expected = list(alone)
        it = iter(helped)
        got = [next(it)]
        if it._helper is not None:  # None where the process may use one CPU only
            # The second batch was begun on the helper before the first was handed over: while this thread
            # waits, the helper writes its rows (a new thread can wait long for a core under load).
            deadline = time.monotonic() + 60
            while it._helper.rows_written == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert it._helper.rows_written > 0
        got += [next(it) for _ in range(len(it) - 1)]
        assert list(it) == []
        assert len(got) == len(expected) >= 3
        assert_same(got, expected)


def test_sharded_ranks_with_padding_rows_are_the_same_with_the_helper():
    docs = _helper_docs(np.int32, 3, n=300)
    padding = 0
    for rank in range(3):
        make = lambda helper: stoker.PackedLoader(docs, HL, 8, seed=1, rank=rank, world_size=3, helper_thread=helper)
        loader = make(True)
        assert_same(list(loader), list(make(False)))
        padding += loader.stats()["padding_rows"]
    assert padding > 0


def test_batches_kept_while_the_helper_writes_the_next_are_intact():
    docs = _helper_docs(np.int32, 5, n=2000)
    loader = stoker.PackedLoader(docs, HL, 8, seed=2)
    loader._plan_ahead = lambda epoch: None
    expected = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                for b in stoker.PackedLoader(docs, HL, 8, seed=2, helper_thread=False)]
    kept = list(loader)  # every batch held while the next ones are written
    assert_same(kept, expected)
    for b in kept:
        b["input_ids"].fill_(-1)  # the caller's to write: nothing the loader does later sees it
    assert_same(list(stoker.PackedLoader(docs, HL, 8, seed=2)), expected)


def test_a_batch_begun_ahead_and_not_asked_for_is_finished_and_dropped():
    from stoker._native import POOL, core, from_dlpack

    docs = _helper_docs(np.uint16, 6, n=1500)
    loader = stoker.PackedLoader(docs, HL, 8, seed=3)
    plan, source = loader._plan(0).plan, docs._source
    rows = loader._plan(0).rows
    helper = core.RowHelper()
    outstanding = POOL.stats()["outstanding"]

    def tensors(built):
        return [from_dlpack(c) for c in built[:5]]

    alone = lambda r: tensors(core.materialize_packed(plan, source, r, 0, False, False, POOL))
    a, b, c = rows[0:8], rows[8:16], rows[16:24]
    first = tensors(core.materialize_packed(plan, source, a, 0, False, False, POOL, helper, b))
    assert POOL.stats()["outstanding"] == outstanding + 1 + 1  # this batch, and b's begun by the helper
    other = tensors(core.materialize_packed(plan, source, c, 0, False, False, POOL, helper, None))  # not b
    assert POOL.stats()["outstanding"] == outstanding + 2  # b was written out and its block given back
    for got, want in ((first, alone(a)), (other, alone(c))):
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    again = tensors(core.materialize_packed(plan, source, b, 0, False, False, POOL, helper, a))
    assert all(torch.equal(x, y) for x, y in zip(again, alone(b)))
    helper.stop()  # drops a's copy begun ahead
    del first, other, again, got, want
    assert POOL.stats()["outstanding"] == outstanding


def test_a_batch_of_more_rows_than_the_helper_takes_is_written_alone():
    docs = stoker.TokenDataset([np.array([i], dtype=np.int32) for i in range(70_000)])
    batches = list(stoker.PackedLoader(docs, 1, 66_000, shuffle=False))
    assert [b["input_ids"].shape for b in batches] == [(66_000, 1), (4_000, 1)]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]).flatten(), torch.arange(70_000))


def test_the_helper_thread_ends_with_its_iterator():
    docs = _docs_for_threads()
    list(stoker.PackedLoader(docs, L, 4, seed=5, helper_thread=False))
    _join_plan_ahead()
    before = settled_thread_count()
    loader = stoker.PackedLoader(docs, L, 4, seed=5)
    it = iter(loader)
    next(it)
    it.close()
    list(loader)  # a whole epoch: its helper ends when the epoch does
    _join_plan_ahead()
    it = iter(loader)
    next(it)
    del it
    _join_plan_ahead()
    if before is not None:
        _assert_threads_back_to(before)


@pytest.mark.parametrize("kwargs", [dict(num_threads=-1), dict(prefetch=0), dict(num_threads=1.5)])
def test_thread_arguments_are_checked(kwargs):
    with pytest.raises(ValueError):
        stoker.PackedLoader(_docs_for_threads(), L, 4, **kwargs)
