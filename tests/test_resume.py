"""Mid-epoch resumption (state_dict / load_state_dict) and sharding (rank= / world_size=), through the public API.

The resume contract
-------------------
``loader.state_dict()`` is a small dict of plain values (format ``"stoker.DataLoader/2"``) that survives
``json`` and ``torch.save``/``torch.load(weights_only=True)``. It describes the newest iterator of the loader:
its epoch and the batches it has yielded (a batch whose loading raised counts as served). A finished iterator
(one that raised StopIteration) stands at the start of the next epoch.

Every resume test follows the pattern of torchdata's tests:

1. build loader A, take ``k`` batches of an epoch, save ``state = A.state_dict()``;
2. drain the rest of that epoch and two more epochs from A (``iter(A)`` again each epoch): ``expected``;
3. in a "fresh process" (torch's global RNG reseeded to something else) build loader B the same way, possibly
   with another ``num_workers``, ``B.load_state_dict(state)``, then collect the rest of the epoch and two more
   epochs from B: they must equal ``expected`` batch by batch, value by value (``helpers.assert_same``).

``k`` runs over 0, 1, the middle, last-1 and last (= ``len(loader)``: every batch yielded but StopIteration not
yet raised, so B's first iterator yields nothing), and "stopped" (state taken after StopIteration: B starts the
next epoch and never replays the finished one).

Sharding without torch.distributed: rank ``r`` of ``W`` serves what ``DistributedSampler(num_replicas=W,
rank=r, drop_last=drop_last)`` assigns; shuffled shards share one permutation (seed 0 unless ``seed=``).

"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import MapDataset, YieldCounting, assert_same, roundtrip
from torch.utils.data import (
    BatchSampler,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

import stoker

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

N = 23  # samples: not a multiple of the batch size, so drop_last matters
BS = 4  # 6 batches per epoch (5 with drop_last)
FORMAT = "stoker.DataLoader/2"
STATE_KEYS = {"format", "dataset_len", "batch_size", "drop_last", "shuffle", "sampler", "rank", "world_size",
              "seed", "epoch", "batches_served", "served_ahead", "base_seed", "rng", "sampler_epoch", "sampler_drawn",
              "sampler_state", "dataset_state", "workers", "next_worker"}

# Where the state is taken: after k batches of the epoch, or after the epoch's iterator raised StopIteration.
POINTS = ["0", "1", "mid", "last-1", "last", "stopped"]


# --------------------------------------------------------------------------------------------------------------
# Datasets: every sample carries its index, so the order served can be read back from any batch
# --------------------------------------------------------------------------------------------------------------


def _rows(n):
    """Row i is [10 i, 10 i + 1, 10 i + 2] (float32)."""
    return np.arange(n, dtype=np.float32)[:, None] * 10 + np.arange(3, dtype=np.float32)


def _identity(i):
    return i


def _sample_dict(i):
    return {"x": np.arange(3, dtype=np.float32) + 10 * i, "index": i}


def _sample_tuple(i):
    return (torch.tensor([i, -i]), i / 2, i)


KINDS = {
    # name: (dataset factory, the sample indices of a batch)
    "TensorDataset": (lambda n: TensorDataset(torch.from_numpy(_rows(n)), torch.arange(n)), lambda b: b[1]),
    "ndarray": (lambda n: np.arange(2 * n, dtype=np.int64).reshape(n, 2), lambda b: b[:, 0] // 2),
    "ArrayDataset": (lambda n: stoker.ArrayDataset(x=_rows(n), index=np.arange(n)), lambda b: b["index"]),
    "python_dict": (lambda n: MapDataset(_sample_dict, n), lambda b: b["index"]),
    "python_tuple": (lambda n: MapDataset(_sample_tuple, n), lambda b: b[2]),
}


def make(kind, *, n=N, batch_size=BS, **kwargs):
    """A new loader over a new dataset of ``kind`` (what a fresh process would build)."""
    return stoker.DataLoader(KINDS[kind][0](n), batch_size=batch_size, **kwargs)


def indices(kind, batches):
    """The sample indices a list of batches served, in order."""
    of = KINDS[kind][1]
    out = []
    for b in batches:
        out.extend(int(v) for v in torch.as_tensor(of(b)).reshape(-1).tolist())
    return out


def flat(batches):
    """The values of batches over a dataset whose samples are their own index (ints or 1-d tensors)."""
    out = []
    for b in batches:
        out.extend([int(b)] if isinstance(b, int) else [int(v) for v in b.reshape(-1).tolist()])
    return out


# --------------------------------------------------------------------------------------------------------------
# The resume harness
# --------------------------------------------------------------------------------------------------------------


def _epoch(loader, epoch, hook):
    """A new iterator of ``loader`` for ``epoch`` (``hook`` is what a training loop does before it)."""
    if hook is not None:
        hook(loader, epoch)
    return iter(loader)


def assert_epochs_equal(actual, expected):
    assert [len(e) for e in actual] == [len(e) for e in expected], "batches per resumed iterator differ"
    for i, (got, want) in enumerate(zip(actual, expected)):
        for j, (a, e) in enumerate(zip(got, want)):
            assert_same(a, e, f"resumed iterator {i}, batch {j}")


def resume_check(build, point, *, workers=(0, 0), first_epoch=0, hook=None, more_epochs=2):
    """Runs the save/resume pattern (see the module docstring) and asserts B continues A exactly.

    ``build(num_workers)`` makes a new loader. Returns (batches A served before the save, the state,
    expected, resumed), where expected/resumed are lists of epochs (the first one the rest of the saved
    epoch, unless the state was taken after StopIteration)."""
    torch.manual_seed(1234)
    a = build(workers[0])
    last = len(a)
    stopped = point == "stopped"
    k = {"0": 0, "1": 1, "mid": last // 2, "last-1": last - 1, "last": last, "stopped": last}[point]
    for e in range(first_epoch):
        list(_epoch(a, e, hook))
    it = _epoch(a, first_epoch, hook)
    before = [next(it) for _ in range(k)]
    if stopped:
        with pytest.raises(StopIteration):
            next(it)
    state = a.state_dict()
    assert set(state) == STATE_KEYS
    assert (state["epoch"], state["batches_served"]) == ((first_epoch + 1, 0) if stopped else (first_epoch, k))
    expected = [] if stopped else [list(it)]
    for e in range(first_epoch + 1, first_epoch + 1 + more_epochs):
        expected.append(list(_epoch(a, e, hook)))
    if not stopped:
        assert len(expected[0]) == last - k
    assert a.state_dict()["seed"] == state["seed"], "the shuffle seed is drawn once per loader"

    state = roundtrip(state)
    torch.manual_seed(98765)  # a fresh process: torch's global RNG is somewhere else
    b = build(workers[1])
    b.load_state_dict(state)
    assert b.state_dict() == state, "before iterating, a loaded loader reports the loaded position"
    resumed = [list(_epoch(b, state["epoch"] + i, hook)) for i in range(len(expected))]
    assert_epochs_equal(resumed, expected)
    return before, state, expected, resumed


# --------------------------------------------------------------------------------------------------------------
# The state itself
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_is_plain_data(kind):
    torch.manual_seed(0)
    loader = make(kind, shuffle=True)
    fresh = loader.state_dict()
    assert fresh == {"format": FORMAT, "dataset_len": N, "batch_size": BS, "drop_last": False, "shuffle": True,
                     "sampler": "native", "rank": 0, "world_size": 1, "seed": None, "epoch": 0,
                     "batches_served": 0, "served_ahead": None, "base_seed": None, "rng": None,
                     "sampler_epoch": None, "sampler_drawn": None, "sampler_state": None, "dataset_state": None,
                     "workers": None, "next_worker": 0}
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    assert set(state) == STATE_KEYS
    assert (state["epoch"], state["batches_served"]) == (0, 2)
    assert isinstance(state["seed"], int) and not isinstance(state["seed"], bool) and state["seed"] >= 0
    assert json.loads(json.dumps(state)) == state
    assert roundtrip(state) == state
    for value in state.values():
        assert value is None or type(value) in (str, int, bool)


def test_state_with_a_64_bit_seed_round_trips():
    loader = make("ndarray", shuffle=True, seed=2**64 - 1)
    it = iter(loader)
    head = [next(it), next(it)]
    state = roundtrip(loader.state_dict())
    assert state["seed"] == 2**64 - 1
    rest = list(it)
    resumed = make("ndarray", shuffle=True, seed=2**64 - 1)
    resumed.load_state_dict(state)
    assert_epochs_equal([list(resumed)], [rest])
    assert sorted(indices("ndarray", head + rest)) == list(range(N))


def test_state_counts_batches_and_epochs():
    loader = make("ndarray", shuffle=False)
    it = iter(loader)
    for served in range(len(loader)):
        assert loader.state_dict()["batches_served"] == served
        next(it)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_served"]) == (0, len(loader))
    assert list(it) == []
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_served"]) == (1, 0)
    list(loader)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_served"]) == (2, 0)


# --------------------------------------------------------------------------------------------------------------
# Resume = the uninterrupted run
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("drop_last", [False, True], ids=["keep_last", "drop_last"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_matches_uninterrupted_run(kind, shuffle, drop_last, point):
    before, _, expected, resumed = resume_check(
        lambda w: make(kind, shuffle=shuffle, drop_last=drop_last, num_workers=w), point)
    # Between them, A before the save and B after it serve each sample of the epoch exactly once.
    served = indices(kind, before) + (indices(kind, resumed[0]) if point != "stopped" else [])
    assert len(set(served)) == len(served)
    assert len(served) == ((N // BS) * BS if drop_last else N)
    if not drop_last:
        assert sorted(served) == list(range(N))
    if point == "last":
        assert expected[0] == [] and resumed[0] == []
    # the epochs after the resumed one are full and, when shuffled, different orders
    assert len(resumed[-1]) == len(resumed[-2]) == (N // BS if drop_last else -(-N // BS))
    if shuffle:
        assert indices(kind, resumed[-1]) != indices(kind, resumed[-2])
    else:
        assert indices(kind, resumed[-1]) == indices(kind, resumed[-2])[:len(indices(kind, resumed[-1]))]


@pytest.mark.parametrize("workers", [(2, 2), (0, 2), (2, 0)], ids=lambda w: f"workers{w[0]}to{w[1]}")
@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_with_workers_and_different_num_workers(kind, workers):
    for point in POINTS:
        resume_check(lambda w: make(kind, shuffle=True, num_workers=w), point, workers=workers)


@pytest.mark.parametrize("workers", [(0, 0), (2, 0), (0, 2)], ids=lambda w: f"workers{w[0]}to{w[1]}")
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_resume_per_sample(shuffle, point, workers):
    """batch_size=None: the loader yields samples, and a "batch" of the state is one sample."""
    before, state, expected, resumed = resume_check(
        lambda w: make("python_tuple", batch_size=None, shuffle=shuffle, num_workers=w), point, workers=workers)
    assert state["batch_size"] is None
    assert all(type(s) is list and type(s[2]) is int for s in before)  # default_convert, as torch
    if point != "stopped":
        order = [s[2] for s in before] + [s[2] for s in resumed[0]]
        assert sorted(order) == list(range(N))


@pytest.mark.parametrize("point", ["0", "mid", "last", "stopped"])
@pytest.mark.parametrize("kind", ["ndarray", "ArrayDataset", "python_dict"])
def test_resume_in_a_later_epoch(kind, point):
    resume_check(lambda w: make(kind, shuffle=True, num_workers=w), point, workers=(0, 2), first_epoch=2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_sample_exactly_once_across_a_resume(kind):
    torch.manual_seed(7)
    for k in (1, 3, 5):
        for workers in ((0, 2), (2, 0)):
            a = make(kind, shuffle=True, num_workers=workers[0])
            it = iter(a)
            before = [next(it) for _ in range(k)]
            state = roundtrip(a.state_dict())
            torch.manual_seed(100 + k)
            b = make(kind, shuffle=True, num_workers=workers[1])
            b.load_state_dict(state)
            order = indices(kind, before) + indices(kind, list(b))
            assert sorted(order) == list(range(N)), f"k={k}, workers={workers}"
            assert order != list(range(N))


# --------------------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["TensorDataset", "python_dict"])
@pytest.mark.parametrize("seed", [None, 5])
def test_resume_with_or_without_seed(kind, seed):
    _, state, _, _ = resume_check(lambda w: make(kind, shuffle=True, seed=seed, num_workers=w), "mid")
    if seed is not None:
        assert state["seed"] == seed


@pytest.mark.parametrize("kind", ["ndarray", "python_tuple"])
def test_resume_with_generator(kind):
    """Without seed=, the seed comes from generator=; B's generator may be anywhere: the state carries it."""
    gens = iter([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    resume_check(lambda w: make(kind, shuffle=True, generator=next(gens), num_workers=w), "mid")


def test_state_with_seed_loads_into_same_seed_only():
    a = make("ndarray", shuffle=True, seed=5)
    it = iter(a)
    next(it)
    state = roundtrip(a.state_dict())
    rest = list(it)

    same = make("ndarray", shuffle=True, seed=5)
    same.load_state_dict(state)
    assert_epochs_equal([list(same)], [rest])

    other = make("ndarray", shuffle=True, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_unsharded_seed_is_drawn_from_torch_rng():
    def first_epoch(seed):
        torch.manual_seed(seed)
        loader = make("ndarray", n=200, batch_size=200, shuffle=True)
        return indices("ndarray", list(loader)), loader.state_dict()["seed"]

    a, seed_a = first_epoch(1)
    b, seed_b = first_epoch(1)
    c, seed_c = first_epoch(2)
    assert (a, seed_a) == (b, seed_b)
    assert seed_a != seed_c and a != c


# --------------------------------------------------------------------------------------------------------------
# Several resumes, set_epoch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sequential_resumes_within_an_epoch(kind, shuffle):
    torch.manual_seed(11)
    reference = make(kind, shuffle=shuffle)
    uninterrupted = [list(reference) for _ in range(3)]

    torch.manual_seed(11)
    first = make(kind, shuffle=shuffle, num_workers=2)
    it = iter(first)
    got = [next(it)]  # k1 = 1
    state = roundtrip(first.state_dict())

    torch.manual_seed(12)
    second = make(kind, shuffle=shuffle, num_workers=0)
    second.load_state_dict(state)
    it = iter(second)
    got += [next(it), next(it)]  # k2 = 3
    state = roundtrip(second.state_dict())
    assert (state["epoch"], state["batches_served"]) == (0, 3)

    torch.manual_seed(13)
    third = make(kind, shuffle=shuffle, num_workers=2)
    third.load_state_dict(state)
    it = iter(third)
    got.append(next(it))  # k3 = 4
    state = roundtrip(third.state_dict())

    torch.manual_seed(14)
    fourth = make(kind, shuffle=shuffle, num_workers=0)
    fourth.load_state_dict(state)
    got += list(fourth)
    assert_epochs_equal([got, list(fourth), list(fourth)], uninterrupted)


@pytest.mark.parametrize("kind", ["ndarray", "python_dict"])
def test_set_epoch_after_load_state_dict(kind):
    torch.manual_seed(21)
    a = make(kind, shuffle=True)
    epochs = [list(a)]  # epoch 0
    it = iter(a)  # epoch 1
    head = [next(it), next(it)]
    state = roundtrip(a.state_dict())
    assert (state["epoch"], state["batches_served"]) == (1, 2)
    rest = list(it)
    epochs.append(head + rest)
    epochs += [list(a), list(a)]  # epochs 2 and 3

    # set_epoch(the loaded epoch) keeps the position
    torch.manual_seed(22)
    b = make(kind, shuffle=True)
    b.load_state_dict(state)
    b.set_epoch(1)
    assert b.state_dict() == state
    assert_epochs_equal([list(b), list(b)], [rest, epochs[2]])

    # set_epoch(another) starts that epoch from its first batch
    for other in (3, 0):
        torch.manual_seed(23)
        c = make(kind, shuffle=True)
        c.load_state_dict(state)
        c.set_epoch(other)
        moved = c.state_dict()
        assert (moved["epoch"], moved["batches_served"], moved["seed"]) == (other, 0, state["seed"])
        assert_epochs_equal([list(c)], [epochs[other]])


@pytest.mark.parametrize("workers", [(0, 0), (0, 2)], ids=lambda w: f"workers{w[0]}to{w[1]}")
@pytest.mark.parametrize("kind", ["TensorDataset", "python_tuple"])
def test_training_loop_that_calls_set_epoch_every_epoch(kind, workers):
    """for epoch in range(start, E): loader.set_epoch(epoch); for batch in loader: ... (interrupted at 1, 3)."""
    torch.manual_seed(31)
    a = make(kind, shuffle=True, num_workers=workers[0])
    served, state = [], None
    for epoch in range(4):
        a.set_epoch(epoch)
        for i, batch in enumerate(a):
            served.append(batch)
            if (epoch, i) == (1, 2):
                state = roundtrip(a.state_dict())
                mark = len(served)
    assert (state["epoch"], state["batches_served"]) == (1, 3)

    torch.manual_seed(32)
    b = make(kind, shuffle=True, num_workers=workers[1])
    b.load_state_dict(state)
    resumed = []
    for epoch in range(state["epoch"], 4):
        b.set_epoch(epoch)
        resumed.extend(b)
    assert_epochs_equal([resumed], [served[mark:]])


# --------------------------------------------------------------------------------------------------------------
# Samplers the user passes
# --------------------------------------------------------------------------------------------------------------


def _set_sampler_epoch(loader, epoch):
    """What a training loop does before each epoch: DistributedSampler.set_epoch, or reseeding the generator of
    a RandomSampler (restoring its state), so that both runs draw the same order for the same epoch."""
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(1000 + epoch)


USER_SAMPLERS = {
    "SequentialSampler": lambda ds: {"sampler": SequentialSampler(ds), "batch_size": BS},
    "DistributedSampler": lambda ds: {"sampler": DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True),
                                      "batch_size": BS},
    "RandomSampler_generator": lambda ds: {
        "sampler": RandomSampler(ds, generator=torch.Generator()), "batch_size": BS},
    "BatchSampler": lambda ds: {"batch_sampler": BatchSampler(SequentialSampler(ds), 5, drop_last=False)},
    "BatchSampler_Distributed": lambda ds: {
        "batch_sampler": BatchSampler(DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3), 3,
                                      drop_last=True)},
}


@pytest.mark.parametrize("sampler", list(USER_SAMPLERS))
@pytest.mark.parametrize("kind", ["TensorDataset", "python_tuple"])
def test_resume_with_user_sampler(kind, sampler):
    def build(w):
        ds = KINDS[kind][0](N)
        args = USER_SAMPLERS[sampler](ds)
        return stoker.DataLoader(ds, num_workers=w, **args)

    for point in POINTS:
        for workers in ((0, 2), (2, 0)):
            _, state, _, _ = resume_check(build, point, workers=workers, hook=_set_sampler_epoch)
            assert state["sampler"] == "user" and state["shuffle"] is None


@pytest.mark.parametrize("sampler", ["SequentialSampler", "BatchSampler"])
def test_user_sampler_state_served_beyond_the_epoch_is_rejected(sampler):
    def build():
        ds = KINDS["ndarray"][0](N)
        return stoker.DataLoader(ds, **USER_SAMPLERS[sampler](ds))

    state = build().state_dict()
    loader = build()
    state["batches_served"] = len(loader) + 1
    with pytest.raises(ValueError, match="served|batches"):
        loader.load_state_dict(state)


def test_user_sampler_state_does_not_load_into_native_loader():
    a = stoker.DataLoader(np.arange(N), batch_size=BS, sampler=SequentialSampler(range(N)))
    with pytest.raises(ValueError, match="sampler"):
        stoker.DataLoader(np.arange(N), batch_size=BS).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------------------------------------------
# A batch that raised counts as served
# --------------------------------------------------------------------------------------------------------------


BAD = 9  # the index whose loading raises


class Flaky(Exception):
    pass


class FlakyDataset(Dataset):
    def __init__(self, n, bad):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise Flaky(f"sample {i} is corrupt")
        return torch.tensor([i, 2 * i])


def _steps(it):
    """Everything an iterator gives: batches, and "error" for a batch whose loading raised Flaky."""
    out = []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except Flaky:
            out.append("error")


@pytest.mark.parametrize("workers", [(0, 0), (2, 2), (0, 2)], ids=lambda w: f"workers{w[0]}to{w[1]}")
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_failed_batch_counts_as_served(shuffle, workers):
    torch.manual_seed(41)
    a = stoker.DataLoader(FlakyDataset(N, bad=BAD), batch_size=BS, shuffle=shuffle, num_workers=workers[0])
    it = iter(a)
    before = []
    while True:
        try:
            before.append(next(it))
        except Flaky:
            break
    state = roundtrip(a.state_dict())
    assert (state["epoch"], state["batches_served"]) == (0, len(before) + 1)
    expected = [_steps(it), _steps(iter(a))]
    assert "error" not in expected[0]  # the failing batch is not served again
    assert expected[1].count("error") == 1

    torch.manual_seed(42)
    b = stoker.DataLoader(FlakyDataset(N, bad=BAD), batch_size=BS, shuffle=shuffle, num_workers=workers[1])
    b.load_state_dict(state)
    resumed = [_steps(iter(b)), _steps(iter(b))]
    assert [[s if isinstance(s, str) else "batch" for s in e] for e in resumed] == \
        [[s if isinstance(s, str) else "batch" for s in e] for e in expected]
    for got, want in zip(resumed, expected):
        for x, y in zip(got, want):
            if not isinstance(y, str):
                assert_same(x, y)
    # every sample but those of the failed batch is served exactly once over A's head and B's rest
    served = [int(v) for b in before + resumed[0] for v in b[:, 0].tolist()]
    assert len(set(served)) == len(served) and BAD not in served
    assert len(served) in (N - BS, N - N % BS)  # the failed batch is a full one or the short last one
    if not shuffle:
        assert served == [i for i in range(N) if i // BS != BAD // BS]


# --------------------------------------------------------------------------------------------------------------
# Rejected states
# --------------------------------------------------------------------------------------------------------------


def _saved(**kwargs):
    loader = stoker.DataLoader(np.arange(N), batch_size=BS, shuffle=True, **kwargs)
    it = iter(loader)
    next(it)
    return loader.state_dict()


def _with(**changes):
    def mutate(state):
        state = dict(state)
        state.update(changes)
        return state
    return mutate


def _without(key):
    def mutate(state):
        state = dict(state)
        del state[key]
        return state
    return mutate


BAD_STATES = {
    "not_a_dict": (lambda s: [1, 2, 3], "format|stoker"),
    "none": (lambda s: None, "format|stoker"),
    "string": (lambda s: json.dumps(s), "format|stoker"),
    "empty_dict": (lambda s: {}, "format|stoker"),
    "wrong_format": (_with(format="torchdata/1"), "format|stoker"),
    "missing_key": (_without("batches_served"), "batches_served"),
    "served_beyond_epoch": (_with(batches_served=-(-N // BS) + 1), "served|batches"),
    "served_negative": (_with(batches_served=-1), "batches_served"),
    "served_float": (_with(batches_served=1.5), "batches_served"),
    "negative_epoch": (_with(epoch=-1), "epoch"),
    "no_epoch": (_with(epoch=None), "epoch should be an integer"),
    "no_batches_served": (_with(batches_served=None), "batches_served should be an integer"),
    "negative_seed": (_with(seed=-3), "seed"),
    "string_seed": (_with(seed="5"), "seed"),
}


@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_garbage_state_is_rejected(bad):
    mutate, match = BAD_STATES[bad]
    state = mutate(_saved())
    loader = stoker.DataLoader(np.arange(N), batch_size=BS, shuffle=True)
    untouched = loader.state_dict()
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(state)
    assert loader.state_dict() == untouched, "a rejected state leaves the loader as it was"


def test_served_equal_to_the_epoch_is_accepted():
    loader = stoker.DataLoader(np.arange(N), batch_size=BS, shuffle=True)
    loader.load_state_dict(_with(batches_served=len(loader))(_saved()))
    assert list(loader) == []
    assert len(list(loader)) == len(loader)


MISMATCHES = {
    # name: (loader arguments of the saving loader, of the loading one, what the message names)
    "dataset_len": ({"n": N}, {"n": N + 1}, None),
    "batch_size": ({"batch_size": 4}, {"batch_size": 5}, "batch_size"),
    "drop_last": ({"drop_last": False}, {"drop_last": True}, "drop_last"),
    "shuffle": ({"shuffle": True}, {"shuffle": False}, "shuffle"),
    "world_size": ({"rank": 0, "world_size": 2}, {"rank": 0, "world_size": 3}, "world_size"),
    "rank": ({"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}, "rank"),
    "sharded_into_unsharded": ({"rank": 0, "world_size": 2}, {}, "world_size"),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_state_of_a_different_loader_is_rejected(mismatch):
    saver_args, loader_args, match = MISMATCHES[mismatch]

    def build(args):
        args = dict(args)
        n = args.pop("n", N)
        args.setdefault("batch_size", BS)
        args.setdefault("shuffle", True)
        return stoker.DataLoader(np.arange(n), **args)

    saver = build(saver_args)
    it = iter(saver)
    next(it)
    state = roundtrip(saver.state_dict())
    loader = build(loader_args)
    with pytest.raises(ValueError) as info:
        loader.load_state_dict(state)
    if match is None:  # the dataset length: both lengths are named
        assert str(N) in str(info.value) and str(N + 1) in str(info.value)
    else:
        assert match in str(info.value)


class Numbers(IterableDataset):
    def __iter__(self):
        return iter(range(10))


def test_iterable_dataset_state_is_not_a_map_state():
    # IterableDataset states are tested in tests/test_iterable.py; the two kinds do not mix.
    loader = stoker.DataLoader(Numbers(), batch_size=3)
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    state = loader.state_dict()
    assert state["dataset"] == "iterable"
    with pytest.raises(ValueError, match="map-style"):
        loader.load_state_dict(_saved())
    with pytest.raises(ValueError, match="iterable"):
        stoker.DataLoader(list(range(10)), batch_size=3).load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------
# A sampler's randomness, its own state, and torch's global RNG (fresh processes: tests/test_resume_fresh.py)
# --------------------------------------------------------------------------------------------------------------


def _rng_after(draws):
    g = torch.Generator().manual_seed(11)
    torch.rand(draws, generator=g)
    return g.get_state()


@pytest.mark.parametrize("state", [
    torch.Generator().manual_seed(0).get_state(),
    torch.Generator().manual_seed(2**64 - 1).get_state(),
    _rng_after(1),
    _rng_after(1000),
    torch.get_rng_state(),
], ids=["fresh_0", "fresh_max", "one_draw", "many_draws", "global"])
def test_rng_states_round_trip_as_short_strings(state):
    from stoker._resume import decode_rng, encode_rng

    text = encode_rng(state)
    assert isinstance(text, str) and json.loads(json.dumps(text)) == text
    assert torch.equal(decode_rng(text, "rng"), state)
    assert encode_rng(decode_rng(text, "rng")) == text
    fresh = torch.equal(state, torch.Generator().manual_seed(int.from_bytes(state.numpy().tobytes()[:8], "little"))
                        .get_state())
    assert len(text) <= 26 if fresh else 3300 < len(text) < 3500


@pytest.mark.parametrize("text", ["", "seed:", "seed:x", "mt19937:!!", "mt19937:" + "A" * 8, "raw:bm90IHpsaWI=",
                                  "other:abc", 5, None])
def test_garbage_rng_strings_are_rejected(text):
    from stoker._resume import decode_rng

    with pytest.raises(ValueError, match="rng"):
        decode_rng(text, "rng['torch']")


def _user_loader(sampler=None, **kwargs):
    ds = MapDataset(_identity, N)
    return stoker.DataLoader(ds, batch_size=BS, sampler=RandomSampler(ds) if sampler is None else sampler, **kwargs)


@pytest.mark.parametrize("kind", ["native_array", "native_python", "user_sampler", "user_generator"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_draws_nothing_from_the_global_rng(kind, workers):
    """The saved run drew this epoch's base seed (and a sampler's seed) before its save point: the resumed
    iterator leaves torch's global RNG where the user put it, so a user who restores it stays in step."""
    def build():
        if kind == "native_array":
            return make("ndarray", shuffle=True, num_workers=workers)
        if kind == "native_python":
            return make("python_dict", shuffle=True, num_workers=workers)
        if kind == "user_generator":
            return _user_loader(RandomSampler(range(N), generator=torch.Generator().manual_seed(1)),
                                num_workers=workers)
        return _user_loader(num_workers=workers)

    torch.manual_seed(5)
    a = build()
    it = iter(a)
    head = [next(it), next(it)]
    state = roundtrip(a.state_dict())
    at_save = torch.get_rng_state()
    rest = list(it)
    after_epoch = torch.get_rng_state()

    torch.manual_seed(6)
    b = build()
    torch.set_rng_state(at_save)
    b.load_state_dict(state)
    resumed = list(b)
    assert_epochs_equal([resumed], [rest])
    assert torch.equal(torch.get_rng_state(), after_epoch)
    order = (indices({"native_array": "ndarray", "native_python": "python_dict"}[kind], head + resumed)
             if kind.startswith("native") else flat(head + resumed))
    assert order != list(range(N)) and sorted(order) == list(range(N))


def test_global_rng_sampler_resumes_wherever_the_global_rng_stands():
    """RandomSampler without a generator seeds itself from the global RNG at its first draw: the state holds
    the global RNG as the epoch began, and the rest of the epoch comes out the same from anywhere."""
    torch.manual_seed(1)
    torch.rand(5)  # the global RNG is on its way (a fresh one would be saved as "seed:1")
    a = _user_loader(num_workers=2)
    it = iter(a)
    head = [next(it)]
    state = roundtrip(a.state_dict())
    assert set(state["rng"]) == {"torch"} and state["sampler_drawn"] >= 1 and state["base_seed"] is not None
    assert 3300 < len(json.dumps(state)) < 4000, "one compact RNG state and a few numbers"
    rest = list(it)
    for seed in (2, 3):
        torch.manual_seed(seed)
        b = _user_loader()
        b.load_state_dict(state)
        before = torch.get_rng_state()
        assert_epochs_equal([list(b)], [rest])
        assert torch.equal(torch.get_rng_state(), before)
    assert sorted(flat(head + rest)) == list(range(N))


def test_user_generator_is_left_where_the_uninterrupted_run_left_it():
    def build():
        return _user_loader(RandomSampler(range(N), generator=torch.Generator().manual_seed(9)))

    a = build()
    list(a)
    it = iter(a)
    next(it)
    state = roundtrip(a.state_dict())
    assert set(state["rng"]) == {"sampler_generator"}
    expected = [list(it), list(a), list(a)]
    b = build()
    b.load_state_dict(state)
    assert_epochs_equal([list(b), list(b), list(b)], expected)
    assert torch.equal(b.sampler.generator.get_state(), a.sampler.generator.get_state())


def test_state_between_epochs_sets_the_generators_at_loading():
    def build():
        return _user_loader(RandomSampler(range(N), generator=torch.Generator().manual_seed(9)),
                            generator=torch.Generator().manual_seed(4))

    a = build()
    list(a)
    state = roundtrip(a.state_dict())
    assert state["base_seed"] is None and set(state["rng"]) == {"sampler_generator", "loader_generator"}
    b = build()
    b.load_state_dict(state)
    assert torch.equal(b.sampler.generator.get_state(), a.sampler.generator.get_state())
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    assert b.state_dict() == state
    assert_epochs_equal([list(b)], [list(a)])


class EagerSampler(torch.utils.data.Sampler):
    """Draws its permutation from the global RNG in __iter__ itself (not lazily, as a generator would)."""

    def __len__(self):
        return N

    def __iter__(self):
        return iter(torch.randperm(N).tolist())


@pytest.mark.parametrize("batch_size", [None, BS])
def test_sampler_iter_comes_before_the_base_seed_as_with_torch(batch_size):
    from helpers import TorchDataLoader

    torch.manual_seed(0)
    expected = flat(TorchDataLoader(MapDataset(_identity, N), batch_size=batch_size, sampler=EagerSampler()))
    torch.manual_seed(0)
    got = flat(stoker.DataLoader(MapDataset(_identity, N), batch_size=batch_size, sampler=EagerSampler()))
    assert got == expected


ORDER = [(7 * i) % N for i in range(N)]


@pytest.mark.parametrize("workers", [(0, 0), (2, 2), (0, 2), (2, 0)], ids=lambda w: f"workers{w[0]}to{w[1]}")
@pytest.mark.parametrize("kind", ["ndarray", "python_tuple"])
def test_stateful_sampler_is_loaded_not_replayed(kind, workers):
    for k in range(len(_user_loader(YieldCounting(ORDER))) + 1):
        a = stoker.DataLoader(KINDS[kind][0](N), batch_size=BS, sampler=YieldCounting(ORDER), num_workers=workers[0])
        it = iter(a)
        head = [next(it) for _ in range(k)]
        state = roundtrip(a.state_dict())
        assert state["sampler_state"] == {"yielded": min(k * BS, N)}, k  # (k=0: as it was before its iter())
        assert state["sampler_drawn"] is None and state["rng"] is None
        rest = list(it)
        sampler = YieldCounting(ORDER)
        b = stoker.DataLoader(KINDS[kind][0](N), batch_size=BS, sampler=sampler, num_workers=workers[1])
        b.load_state_dict(state)
        assert b.state_dict() == state
        resumed = list(b)
        assert_epochs_equal([resumed], [rest])
        # Only the samples still to serve are drawn; at an epoch's start one batch of indices more, looked at and
        # undone (it tells a sampler's state at a pass's start from one at a pass's end).
        assert sampler.produced == N - min(k * BS, N) + (BS if k == 0 else 0)
        assert indices(kind, head + resumed) == ORDER
        assert_epochs_equal([list(b)], [list(a)])  # the next epoch starts the sampler afresh


class Rewinding(torch.utils.data.Sampler):
    """A sampler with its own state that moves itself on to its next pass as one ends: each pass is a new
    permutation (of its pass number), and its position rewinds as the pass ends."""

    def __init__(self, n: int) -> None:
        self.n, self.passes, self.pos = n, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng((7, self.passes)).permutation(self.n).tolist()
        while self.pos < self.n:
            self.pos += 1
            yield order[self.pos - 1]
        self.pos, self.passes = 0, self.passes + 1

    def state_dict(self):
        return {"passes": self.passes, "pos": self.pos}

    def load_state_dict(self, state):
        self.passes, self.pos = state["passes"], state["pos"]


def _resumes_in_step(build, points, restore_rng: bool = False) -> None:
    """For each save point of the second epoch (None: between the first two; k: after k of its batches), a
    loader built anew and loaded with the state serves the rest of that epoch, then the third, as an
    uninterrupted run does. With `restore_rng`, each run starts from one seed of torch's global RNG and the
    resumed one gets that RNG back as the saved run left it (another seed before it is built)."""
    if restore_rng:
        torch.manual_seed(0)
    reference = build()
    epochs = [flat(reference) for _ in range(3)]
    for k in points:
        if restore_rng:
            torch.manual_seed(0)
        a = build()
        list(a)
        head = []
        if k is not None:
            it = iter(a)
            head = flat([next(it) for _ in range(k)])
        state, rng = roundtrip(a.state_dict()), torch.get_rng_state()
        if restore_rng:
            torch.manual_seed(5)
        b = build()
        b.load_state_dict(state)
        if restore_rng:
            torch.set_rng_state(rng)
        assert head + flat(b) == epochs[1], k
        assert flat(b) == epochs[2], k


@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize(("n", "drop_last"), [(N, False), (N, True), (4 * BS, False)],
                         ids=["short_last", "drop_last", "full_last"])
def test_a_sampler_that_moves_itself_on_resumes_in_step_at_every_point(n, drop_last, workers):
    def build():
        return stoker.DataLoader(MapDataset(_identity, n), batch_size=BS, sampler=Rewinding(n), drop_last=drop_last,
                                 num_workers=workers)

    reference = build()
    assert flat(reference) != flat(reference)  # a new order each pass
    _resumes_in_step(build, [None, *range(len(reference) + 1)])


class RewindingGlobal(Rewinding):
    """Rewinding, its pass's permutation drawn from torch's global RNG as the pass starts (kept in its state)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.order = None

    def __iter__(self):
        if self.order is None:
            self.order = torch.randperm(self.n).tolist()
        while self.pos < self.n:
            self.pos += 1
            yield self.order[self.pos - 1]
        self.pos, self.passes, self.order = 0, self.passes + 1, None

    def state_dict(self):
        return {**super().state_dict(), "order": self.order}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.order = state["order"]


@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers{w}")
def test_the_look_at_a_samplers_state_draws_nothing_from_the_global_rng(workers):
    # The resume's one draw (undone) at an epoch's start, or after its last batch, makes torch's global RNG
    # draw for the sampler's next permutation: it is put back, so a restored RNG gives the uninterrupted run.
    def build():
        return stoker.DataLoader(MapDataset(_identity, N), batch_size=BS, sampler=RewindingGlobal(N),
                                 num_workers=workers)

    # (Not k=0 with workers: their read-ahead drew the permutation before the save, after the state it starts
    # from, which does not hold it; the resumed epoch draws its own. See the README.)
    last = len(build())
    _resumes_in_step(build, [None, 0, 1, last] if workers == 0 else [None, 1, last], restore_rng=True)


def test_a_state_between_epochs_loaded_back_into_its_own_loader_serves_the_next_epoch():
    # The sampler keeps its end position until its next iter() (as torchdata's does): loading that state back
    # must not make the next epoch empty; nor rolling back to a state taken before an epoch that has run since.
    a = stoker.DataLoader(MapDataset(_identity, N), batch_size=BS, sampler=YieldCounting(ORDER))
    checkpoint = roundtrip(a.state_dict())
    first = flat(a)
    a.load_state_dict(roundtrip(a.state_dict()))
    assert flat(a) == first == ORDER
    a.load_state_dict(checkpoint)
    assert flat(a) == ORDER
    it = iter(a)
    at_start = roundtrip(a.state_dict())  # an epoch begun, nothing served
    del it
    assert flat(a) == ORDER
    a.load_state_dict(at_start)
    assert flat(a) == ORDER


class RewindsAndDraws(torch.utils.data.Sampler):
    """Keeps its own state (position, order, generator); as a pass ends it rewinds and draws its next order
    from its generator."""

    def __init__(self, n: int) -> None:
        self.n, self.pos, self.generator = n, 0, torch.Generator().manual_seed(3)
        self.order = torch.randperm(n, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield self.order[self.pos - 1]
        self.pos, self.order = 0, torch.randperm(self.n, generator=self.generator).tolist()

    def state_dict(self):
        return {"pos": self.pos, "order": self.order, "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state):
        self.pos, self.order = state["pos"], state["order"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class Eager(YieldCounting):
    """Takes its loaded position at iter() itself (not at its first draw, as a generator function would)."""

    def __iter__(self):
        start, self.resume_at = self.resume_at or 0, None
        self.yielded = start
        return self._from(start)

    def _from(self, start):
        for i in self.order()[start:]:
            self.yielded += 1
            self.produced += 1
            yield i


class CountsItsEpochs(Rewinding):
    """Rewinding, its pass count its epoch: it moves itself on to its next epoch as a pass ends."""

    @property
    def epoch(self) -> int:
        return self.passes


@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("make", [lambda: RewindsAndDraws(N), lambda: Eager(ORDER), lambda: CountsItsEpochs(N)],
                         ids=["draws_at_end", "eager", "epoch_in_state"])
def test_a_state_after_the_last_batch_resumes_in_step(make, workers):
    def build():
        return stoker.DataLoader(MapDataset(_identity, N), batch_size=BS, sampler=make(), num_workers=workers)

    # Saved after the last batch, resumed, saved again before a batch, and resumed from that; with drop_last the
    # pass ends only at the draw after the last batch.
    def dropping():
        return stoker.DataLoader(MapDataset(_identity, N), batch_size=BS, sampler=make(), num_workers=workers,
                                 drop_last=True)

    once = dropping()
    after = [flat(once) for _ in range(2)]
    a = dropping()
    it = iter(a)
    for _ in range(len(a)):
        next(it)
    b = dropping()
    b.load_state_dict(roundtrip(a.state_dict()))
    it = iter(b)
    c = dropping()
    c.load_state_dict(roundtrip(b.state_dict()))
    assert flat(c) == [] and flat(c) == after[1]

    _resumes_in_step(build, [None, 0, 1, len(build())])


class EpochOutsideState(YieldCounting):
    """As torchdata's StatefulDistributedSampler: its own state is its position; its epoch (set_epoch) is not
    in it."""

    def __init__(self) -> None:
        super().__init__(ORDER)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list:
        return ORDER[self.epoch:] + ORDER[:self.epoch]


class EpochInState(EpochOutsideState):
    """A sampler that keeps its own state, its epoch (set_epoch) among it."""

    def state_dict(self):
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.epoch = state["epoch"]


@pytest.mark.parametrize("kind", [EpochOutsideState, EpochInState], ids=["epoch_outside_state", "epoch_in_state"])
def test_a_sampler_that_keeps_its_own_state_resumes_at_its_saved_epoch(kind):
    # Its epoch outside its state (torchdata's): set_epoch is needed, else iter() says so. Inside: loading the
    # state sets it.
    a = stoker.DataLoader(MapDataset(_identity, N), batch_size=BS, sampler=kind())
    a.sampler.set_epoch(2)
    it = iter(a)
    head = flat([next(it), next(it)])
    state = roundtrip(a.state_dict())
    assert state["sampler_epoch"] == 2  # as it said with that state
    b = stoker.DataLoader(MapDataset(_identity, N), batch_size=BS, sampler=kind())
    b.load_state_dict(state)
    if kind is EpochOutsideState:
        with pytest.raises(ValueError, match=r"served as epoch 2 \(set_epoch\); this loader's sampler says epoch 0"):
            iter(b)
        b.sampler.set_epoch(2)
    assert head + flat(b) == ORDER[2:] + ORDER[:2]


class WorkerSeeds(IterableDataset):
    """Each worker's copy yields (its worker id, its seed) six times."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return iter([(info.id, info.seed)] * 6)


def test_a_resumed_iterable_epoch_keeps_its_base_seed():
    """The workers of a resumed epoch get the seeds the saved epoch's workers had (its base seed is in the
    state), and the resumed iterator draws nothing from torch's global RNG."""
    torch.manual_seed(8)
    a = stoker.DataLoader(WorkerSeeds(), batch_size=2, num_workers=2)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    state = roundtrip(a.state_dict())
    assert isinstance(state["base_seed"], int) and state["rng"] is None
    at_save = torch.get_rng_state()
    rest = list(it)
    torch.manual_seed(9)
    b = stoker.DataLoader(WorkerSeeds(), batch_size=2, num_workers=2)
    torch.set_rng_state(at_save)
    b.load_state_dict(state)
    assert_epochs_equal([list(b)], [rest])
    assert torch.equal(torch.get_rng_state(), at_save)
    assert {int(s) for batch in head + rest for s in batch[1]} == {state["base_seed"], state["base_seed"] + 1}


def test_states_of_format_1_still_load():
    """A state saved before states held the epoch's draws resumes as it did then."""
    torch.manual_seed(3)
    a = _user_loader(RandomSampler(range(N), generator=torch.Generator().manual_seed(2)))
    it = iter(a)
    next(it)
    state = a.state_dict()
    rest = list(it)
    old = {k: v for k, v in state.items() if k in STATE_KEYS - {"base_seed", "rng", "sampler_drawn", "sampler_state",
                                                                "dataset_state", "workers", "next_worker"}}
    old["format"] = "stoker.DataLoader/1"
    b = _user_loader(RandomSampler(range(N), generator=torch.Generator().manual_seed(2)))
    b.load_state_dict(old)  # /1: the sampler is drawn again from where its generator stands (here: as built)
    assert_epochs_equal([list(b)], [rest])
    native = make("ndarray", shuffle=True)
    it = iter(native)
    next(it)
    state = native.state_dict()
    rest = list(it)
    old = {k: state[k] for k in ("dataset_len", "batch_size", "drop_last", "shuffle", "sampler", "rank",
                                 "world_size", "seed", "epoch", "batches_served")}
    c = make("ndarray", shuffle=True)
    c.load_state_dict({**old, "format": "stoker.DataLoader/1"})
    assert_epochs_equal([list(c)], [rest])


def _mid_state(build):
    a = build()
    it = iter(a)
    next(it)
    return roundtrip(a.state_dict())


def _generator_loader():
    return _user_loader(RandomSampler(range(N), generator=torch.Generator().manual_seed(2)))


REJECTED_DRAWS = {
    # name: (the saving loader, the loading one, a change to the state, what the message names)
    "sampler_generator_missing": (_generator_loader, _user_loader, None, "generator"),
    "sampler_generator_added": (_user_loader, _generator_loader, None, "generator"),
    "loader_generator_missing": (lambda: _user_loader(generator=torch.Generator()), _user_loader, None, "generator"),
    "rng_not_a_dict": (_user_loader, _user_loader, {"rng": "abc"}, "rng"),
    "rng_garbage": (_user_loader, _user_loader, {"rng": {"torch": "mt19937:AAAA"}}, "rng"),
    "rng_unknown_key": (_user_loader, _user_loader, {"rng": {"numpy": "seed:1"}}, "RNG"),
    "base_seed_negative": (_user_loader, _user_loader, {"base_seed": -1}, "base_seed"),
    "drawn_below_served": (_user_loader, _user_loader, {"sampler_drawn": 0}, "sampler_drawn"),
    "drawn_beyond_epoch": (_user_loader, _user_loader, {"sampler_drawn": 7}, "sampler_drawn"),
    "sampler_state_without_stateful_sampler": (_user_loader, _user_loader, {"sampler_state": {"yielded": 4}},
                                               "sampler_state"),
    "workers_without_processes": (_user_loader, _user_loader,
                                  {"workers": [{"batches": 1, "ended": False, "state": None}]}, "worker"),
}


@pytest.mark.parametrize("name", list(REJECTED_DRAWS))
def test_states_that_do_not_fit_the_loaders_randomness_are_rejected(name):
    saver, loader_of, change, match = REJECTED_DRAWS[name]
    state = _mid_state(saver)
    if change:
        state = {**state, **change}
    loader = loader_of()
    untouched = loader.state_dict()
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(state)
    assert loader.state_dict() == untouched, "a rejected state leaves the loader as it was"


# --------------------------------------------------------------------------------------------------------------
# Sharding with rank= / world_size= (no torch.distributed)
# --------------------------------------------------------------------------------------------------------------


SHARD_KINDS = {
    "ndarray": lambda n: np.arange(n),
    "python": lambda n: MapDataset(_identity, n),
}


def _chunks(seq, size, drop_last):
    out = [seq[i:i + size] for i in range(0, len(seq), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


@pytest.mark.parametrize("drop_last", [False, True], ids=["keep_last", "drop_last"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 10, 11, 17])
@pytest.mark.parametrize("kind", ["ndarray", "python"])
def test_unshuffled_shards_are_distributed_samplers(kind, n, world, drop_last):
    for rank in range(world):
        expected = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False,
                                           drop_last=drop_last))
        for batch_size in (1, 3):
            loader = stoker.DataLoader(SHARD_KINDS[kind](n), batch_size=batch_size, rank=rank, world_size=world,
                                       drop_last=drop_last, num_workers=2 if kind == "python" else 0)
            batches = [b.tolist() for b in loader]
            assert batches == _chunks(expected, batch_size, drop_last), f"rank {rank}, batch_size {batch_size}"
            assert len(loader) == len(batches)
            assert (loader.state_dict()["rank"], loader.state_dict()["world_size"]) == (rank, world)
        if not drop_last:  # per sample (torch forbids batch_size=None with drop_last)
            loader = stoker.DataLoader(SHARD_KINDS[kind](n), batch_size=None, rank=rank, world_size=world)
            samples = flat(loader)
            assert samples == expected and len(loader) == len(samples)


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("drop_last", [False, True], ids=["keep_last", "drop_last"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [2, 10, 11, 17])
@pytest.mark.parametrize("kind", ["ndarray", "python"])
def test_shuffled_shards(kind, n, world, drop_last, seed):
    batch_size = 3
    num_samples = DistributedSampler(range(n), num_replicas=world, rank=0, drop_last=drop_last).num_samples
    per_rank_served = (num_samples // batch_size) * batch_size if drop_last else num_samples
    # the reference: the same epoch of an unsharded loader with the same seed (0 when sharded without seed=)
    reference = stoker.DataLoader(SHARD_KINDS[kind](n), batch_size=n, shuffle=True,
                                  seed=0 if seed is None else seed)
    for epoch in range(2):
        shards = []
        for rank in range(world):
            torch.manual_seed(1000 * rank + epoch)  # the global RNG plays no part when sharded
            loader = stoker.DataLoader(SHARD_KINDS[kind](n), batch_size=batch_size, shuffle=True, seed=seed,
                                       rank=rank, world_size=world, drop_last=drop_last)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(loader) == len(batches)
            shards.append(flat(batches))
            assert loader.state_dict()["seed"] == (0 if seed is None else seed)
        for shard in shards:
            assert len(shard) == per_rank_served
        union = [i for shard in shards for i in shard]
        if not drop_last:
            assert set(union) == set(range(n)), "the ranks together cover every index"
        if drop_last or n % world == 0:
            assert len(set(union)) == len(union), "ranks are disjoint"
        # all ranks agree on one permutation: rank r holds its positions r, r + W, ...
        interleaved = [shards[p % world][p // world] for p in range(world * per_rank_served)]
        order = flat(list(reference))
        assert sorted(order) == list(range(n))
        assert interleaved == (order * (world + 1))[:len(interleaved)]
        if epoch == 0:
            first = interleaved
        elif n >= 10:
            assert interleaved != first, "each epoch is a new permutation"


def test_world_size_one_is_unsharded():
    torch.manual_seed(3)
    plain = flat(stoker.DataLoader(np.arange(17), batch_size=4, shuffle=True))
    torch.manual_seed(3)
    loader = stoker.DataLoader(np.arange(17), batch_size=4, shuffle=True, rank=0, world_size=1)
    single = flat(loader)
    assert single == plain and sorted(single) == list(range(17))
    assert single != flat(stoker.DataLoader(np.arange(17), batch_size=4, shuffle=True, seed=0))
    assert (loader.state_dict()["rank"], loader.state_dict()["world_size"]) == (0, 1)
    assert len(stoker.DataLoader(np.arange(17), batch_size=4, world_size=1)) == 5


@pytest.mark.parametrize("args", [{"rank": 2, "world_size": 2}, {"rank": 5, "world_size": 3}])
def test_rank_out_of_range_is_rejected(args):
    with pytest.raises(ValueError, match="Invalid rank"):
        stoker.DataLoader(np.arange(10), batch_size=2, **args)


@pytest.mark.parametrize("args", [{"rank": 0, "world_size": 0}, {"rank": -1, "world_size": 2},
                                  {"world_size": -2}, {"rank": True, "world_size": 2}, {"world_size": 1.0}])
def test_bad_shard_arguments_are_rejected(args):
    with pytest.raises(ValueError):
        stoker.DataLoader(np.arange(10), batch_size=2, **args)


@pytest.mark.parametrize("args", [{"world_size": 2}, {"rank": 1}])
def test_incomplete_shard_without_distributed_fails_at_iter_and_len(args):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    loader = stoker.DataLoader(np.arange(10), batch_size=2, **args)  # no error until the shard is needed
    with pytest.raises(ValueError, match="rank|world_size"):
        iter(loader)
    with pytest.raises(ValueError, match="rank|world_size"):
        len(loader)


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("kind", ["ndarray", "TensorDataset", "python_tuple"])
def test_resume_sharded(kind, shuffle, rank):
    for point in ("0", "mid", "last", "stopped"):
        _, state, _, _ = resume_check(
            lambda w: make(kind, n=17, shuffle=shuffle, rank=rank, world_size=3, num_workers=w), point,
            workers=(0, 2))
        assert (state["rank"], state["world_size"]) == (rank, 3)
        if shuffle:
            assert state["seed"] == 0


# --------------------------------------------------------------------------------------------------------------
# Any position costs the same
# --------------------------------------------------------------------------------------------------------------


def test_deep_position_loads_directly():
    """10M samples, batch 1000: a state at batch 9000 of epoch 1 resumes at once, at the right batch."""
    n, batch_size = 10_000_000, 1000
    data = np.arange(n, dtype=np.int64)
    a = stoker.DataLoader(data, batch_size=batch_size, shuffle=True, seed=3)
    a.set_epoch(1)
    state = a.state_dict()
    assert (state["epoch"], state["batches_served"]) == (1, 0)
    state = dict(state, batches_served=9000)

    # the reference: epoch 1 with the same seed in batches of a million; batch 9000 is the start of the 10th
    reference = stoker.DataLoader(data, batch_size=1_000_000, shuffle=True, seed=3)
    reference.set_epoch(1)
    big = list(reference)
    assert len(big) == 10

    b = stoker.DataLoader(data, batch_size=batch_size, shuffle=True, seed=3)
    b.load_state_dict(roundtrip(state))
    it = iter(b)
    assert torch.equal(next(it), big[9][:1000])
    assert torch.equal(next(it), big[9][1000:2000])
    assert (b.state_dict()["epoch"], b.state_dict()["batches_served"]) == (1, 9002)
    del it

    c = stoker.DataLoader(data, batch_size=batch_size, shuffle=True, seed=3, num_workers=2)
    c.load_state_dict(dict(state, batches_served=9999))
    tail = list(c)
    assert len(tail) == 1 and torch.equal(tail[0], big[9][-1000:])
    assert (c.state_dict()["epoch"], c.state_dict()["batches_served"]) == (2, 0)


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
def test_a_bad_index_after_a_resume_names_its_batch_in_the_whole_epoch(num_workers):
    # A sampler you pass, with an index past the end in batch 3: the error names batch 3 however many batches
    # were served before the state was saved.
    data = torch.arange(10.0)
    order = [0, 1, 2, 3, 4, 5, 6, 99, 8, 9]

    def loader():
        return stoker.DataLoader(data, batch_size=2, sampler=order, num_workers=num_workers)

    first = loader()
    it = iter(first)
    assert [next(it).tolist() for _ in range(2)] == [[0.0, 1.0], [2.0, 3.0]]
    resumed = loader()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    with pytest.raises(IndexError, match=r"index 99 is out of range for a dataset of 10 samples \(in batch 3\)"):
        list(resumed)


class Gated(Dataset):
    """Sample `held` waits for `gate` (an event of the fork context, shared with the worker processes): with
    in_order=False, the other worker's batches after its batch are served while it is held."""

    def __init__(self, n: int, gate, held: int) -> None:
        self.n, self.gate, self.held = n, gate, held

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.held:
            assert self.gate.wait(60), "the gate was never opened"
        return i


def _gated_order(n):
    return {"native": lambda: {"shuffle": True, "seed": 5},
            "sampler": lambda: {"sampler": RandomSampler(range(n), generator=torch.Generator().manual_seed(3)),
                                "seed": 5}}


@pytest.mark.parametrize("mode", ["process", "thread"])
@pytest.mark.parametrize("order", ["native", "sampler"])
def test_a_resume_after_batches_served_out_of_order_serves_each_of_the_rest_once(order, mode):
    import multiprocessing

    n, bs = 40, 2
    make_order = _gated_order(n)[order]
    # The uninterrupted run's epochs: the one saved, and the next.
    reference = stoker.DataLoader(list(range(n)), batch_size=bs, **make_order())
    epochs = [[b.tolist() for b in reference] for _ in range(2)]
    gate = multiprocessing.get_context("fork").Event()
    ds = Gated(n, gate, held=epochs[0][1][0])  # batch 1, the second worker's first, is held
    first = stoker.DataLoader(ds, batch_size=bs, num_workers=2, in_order=False, multiprocessing_context="fork",
                              worker_mode=mode, **make_order())
    it = iter(first)
    got = [next(it).tolist() for _ in range(3)]
    state = roundtrip(first.state_dict())
    gate.set()
    del it
    # While batch 1 was held by a worker: worker processes take batches in turn, threads as they are free.
    served = [0, 2, 4] if mode == "process" else [0, 2, 3]
    assert got == [epochs[0][b] for b in served]
    assert (state["batches_served"], state["served_ahead"]) == (1, served[1:])
    resumed_kinds = {
        "processes, out of order": dict(num_workers=2, in_order=False, multiprocessing_context="fork"),
        "threads, out of order": dict(num_workers=2, in_order=False, worker_mode="thread"),
        "processes": dict(num_workers=2),
        "main process": dict(num_workers=0),
        "threads": dict(num_workers=2, worker_mode="thread"),
    }
    for kind, kwargs in resumed_kinds.items():
        resumed = stoker.DataLoader(ds, batch_size=bs, **make_order(), **kwargs)
        resumed.load_state_dict(state)
        rest = [b.tolist() for b in resumed]
        assert sorted(map(tuple, got + rest)) == sorted(map(tuple, epochs[0])), kind
        assert sorted(i for b in got + rest for i in b) == list(range(n)), kind
        following = [b.tolist() for b in resumed]
        assert sorted(map(tuple, following)) == sorted(map(tuple, epochs[1])), kind
        if kwargs.get("in_order", True):
            assert following == epochs[1], kind
    if order == "native":  # an array dataset resumed from it: gathered inline, and by native threads
        for nw in (0, 2):
            arrays = stoker.DataLoader(torch.arange(n), batch_size=bs, num_workers=nw, **make_order())
            arrays.load_state_dict(state)
            rest = [b.tolist() for b in arrays]
            assert sorted(i for b in got + rest for i in b) == list(range(n)), nw
            assert [b.tolist() for b in arrays] == epochs[1], nw


def test_a_state_with_served_ahead_out_of_place_is_refused():
    loader = stoker.DataLoader(range(N), batch_size=BS, shuffle=True, seed=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["served_ahead"] is None and state["batches_served"] == 1
    for bad in ([1], [3, 2], [2, 2], [2, 6], [], "2", [2.0]):
        with pytest.raises(ValueError, match="served_ahead must be None or a sorted list of distinct batch"):
            stoker.DataLoader(range(N), batch_size=BS, shuffle=True, seed=1).load_state_dict(
                {**state, "served_ahead": bad})
    without = {k: v for k, v in state.items() if k != "served_ahead"}  # saved before states held it
    resumed = stoker.DataLoader(range(N), batch_size=BS, shuffle=True, seed=1)
    resumed.load_state_dict(without)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in it]


def _set_epoch(sampler, epoch: int) -> None:
    (sampler if hasattr(sampler, "set_epoch") else sampler.sampler).set_epoch(epoch)  # (a BatchSampler's)


@pytest.mark.parametrize("make", [
    lambda: DistributedSampler(range(N), num_replicas=2, rank=1, shuffle=True, seed=3),
    lambda: BatchSampler(DistributedSampler(range(N), num_replicas=2, rank=0, shuffle=True, seed=3), BS, False),
    lambda: stoker.LengthBucketSampler([i % 7 for i in range(N)], BS, bucket_size=8, seed=2),
], ids=["DistributedSampler", "BatchSampler", "LengthBucketSampler"])
def test_a_resume_needs_the_sampler_at_the_epoch_it_was_saved_in(make):
    def build(sampler):
        key = "sampler" if isinstance(sampler, DistributedSampler) else "batch_sampler"
        return stoker.DataLoader(range(N), **{key: sampler}, **({"batch_size": BS} if key == "sampler" else {}))

    saving = make()
    loader = build(saving)
    list(loader)
    _set_epoch(saving, 3)
    it = iter(loader)
    next(it)
    state = roundtrip(loader.state_dict())
    assert state["sampler_epoch"] == 3
    rest = [b.tolist() for b in it]
    resumed_sampler = make()
    resumed = build(resumed_sampler)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"its sampler served as epoch 3 \(set_epoch\); this loader's sampler "
                                         r"says epoch 0\. Call set_epoch\(3\)"):
        iter(resumed)
    _set_epoch(resumed_sampler, 3)
    assert [b.tolist() for b in resumed] == rest


class RaisesAtTwo:
    """A batch sampler whose third batch raises (and the iteration goes on after it)."""

    def __len__(self):
        return 5

    def __iter__(self):
        return self._Batches()

    class _Batches:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            if self.n > 5:
                raise StopIteration
            if self.n == 3:
                raise RuntimeError("bad draw")
            return [2 * (self.n - 1), 2 * (self.n - 1) + 1]


LOADING = {"main_process": dict(num_workers=0), "processes": dict(num_workers=2),
           "threads": dict(num_workers=2, worker_mode="thread")}


@pytest.mark.parametrize("kwargs", list(LOADING.values()), ids=list(LOADING))
def test_a_draw_that_raised_and_was_served_ahead_is_not_raised_again(kwargs):
    def build():
        return stoker.DataLoader(MapDataset(_identity, 10), batch_sampler=RaisesAtTwo(), **kwargs)

    a = build()
    it = iter(a)
    assert flat([next(it)]) == [0, 1]
    state = roundtrip(a.state_dict())
    # As a run with workers serving out of order would have saved it: batch 1 still awaited, batch 2 (the draw
    # that raised) received.
    state["served_ahead"] = [2]
    b = build()
    b.load_state_dict(state)
    assert [flat([x]) for x in b] == [[2, 3], [6, 7], [8, 9]]
