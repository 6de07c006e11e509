"""IterableDataset in stoker.DataLoader: the main-process pass (num_workers=0) and worker processes that each
iterate their own copy, compared batch by batch with torch's loader in the same test."""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import torch
from helpers import TorchDataLoader, assert_batches_equal, assert_same
from torch.utils.data import IterableDataset, get_worker_info

import stoker

pytestmark = pytest.mark.timeout(120)


class PerWorker(IterableDataset):
    """Worker w yields sizes[w] items (w*100 + k, as a dict with a tensor); in the main process, sizes[0]."""

    def __init__(self, sizes, sized=None):
        self.sizes = sizes
        self.sized = sized

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        for k in range(self.sizes[wid]):
            yield {"v": wid * 100 + k, "x": torch.full((3,), float(wid * 100 + k)), "name": f"w{wid}-{k}"}

    def __len__(self):
        if self.sized is None:
            raise TypeError("no length")
        return self.sized


class Shard(IterableDataset):
    """range(n) split between the workers by get_worker_info(), as torch's documentation shows."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return iter(range(self.n))
        return iter(range(info.id, self.n, info.num_workers))


class Unsharded(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


class Counter(IterableDataset):
    """Each copy counts its own passes: persistent workers keep the count, fresh workers start again."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        info = get_worker_info()
        wid = 0 if info is None else info.id
        for k in range(3):
            yield np.array([wid, self.passes, k], dtype=np.int64)


class Failing(IterableDataset):
    """Raises at item `bad` of worker 0 (an iterator class, so iteration can go on after the error)."""

    def __init__(self, n, bad):
        self.n, self.bad = n, bad

    def __iter__(self):
        return _FailingIter(self.n, self.bad)


class _FailingIter:
    def __init__(self, n, bad):
        info = get_worker_info()
        self.wid = 0 if info is None else info.id
        self.k, self.n, self.bad = 0, n, bad

    def __iter__(self):
        return self

    def __next__(self):
        k = self.k
        if k >= self.n:
            raise StopIteration
        self.k += 1
        if self.wid == 0 and k == self.bad:
            raise ValueError(f"bad item {k}")
        return torch.tensor([self.wid, k])


class BrokenIter(IterableDataset):
    def __iter__(self):
        raise KeyError("cannot open the shard")


def _both(dataset, **kwargs):
    return (list(stoker.DataLoader(dataset, **kwargs)), list(TorchDataLoader(dataset, **kwargs)))


# ----------------------------------------------------------------------------------------------------------------
# Batches: the same as torch's, in the same order
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("kwargs", [dict(batch_size=7), dict(batch_size=7, drop_last=True), dict(batch_size=2),
                                    dict(batch_size=None), dict(batch_size=4, collate_fn=list)],
                         ids=["bs7", "bs7-drop", "bs2", "bs-None", "collate-list"])
def test_uneven_workers_match_torch(num_workers, kwargs):
    # Sizes [0, 4, 20]: a worker with nothing, one with a short batch only, one with several; torch's own test.
    dataset = PerWorker({0: [9], 1: [9], 2: [9, 4], 3: [0, 4, 20]}[num_workers])
    ours, theirs = _both(dataset, num_workers=num_workers, **kwargs)
    assert_batches_equal(ours, theirs)


def test_round_robin_with_a_worker_ending_first():
    # Worker sizes [3, 1], batch 2: w0 b0, w1 b0 (short), w0 b1 (short): torch's probe.
    ours, theirs = _both(PerWorker([3, 1]), num_workers=2, batch_size=2)
    assert [b["v"].tolist() for b in ours] == [[0, 1], [100], [2]]
    assert_batches_equal(ours, theirs)


def test_sharded_by_worker_info_covers_the_range_once():
    for nw in (1, 2, 3):
        ours, theirs = _both(Shard(50), num_workers=nw, batch_size=4)
        assert_batches_equal(ours, theirs)
        assert sorted(torch.cat(ours).tolist()) == list(range(50))


def test_unsharded_data_is_duplicated_per_worker_as_torch():
    ours, theirs = _both(Unsharded(4), num_workers=2, batch_size=None)
    assert [int(x) for x in ours] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert_batches_equal(ours, theirs)


def test_batches_travel_through_the_ring():
    loader = stoker.DataLoader(Shard(64), num_workers=2, batch_size=8)
    it = iter(loader)
    first = next(it)
    # Zero-copy: the batch lives in the loader's ring, not in a shared-memory segment of its own (the pickled
    # path, torch's, gives tensors for which is_shared() is True).
    assert not first.is_shared()
    assert first.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    rest = list(it)
    assert sorted(torch.cat([first, *rest]).tolist()) == list(range(64))


def test_in_order_false_gives_the_same_batches():
    ours = list(stoker.DataLoader(Shard(40), num_workers=2, batch_size=3, in_order=False))
    theirs = list(TorchDataLoader(Shard(40), num_workers=2, batch_size=3))
    key = sorted(tuple(b.tolist()) for b in ours)
    assert key == sorted(tuple(b.tolist()) for b in theirs)


def test_worker_init_fn_can_configure_the_copy():
    def init(worker_id):
        info = get_worker_info()
        info.dataset.n = 10 + worker_id  # each copy is the worker's own

    ours, theirs = _both(Unsharded(0), num_workers=2, batch_size=None, worker_init_fn=init)
    assert len(ours) == 21
    assert_batches_equal(ours, theirs)


@pytest.mark.parametrize("persistent", [False, True])
def test_epochs_restart_each_copy(persistent):
    kwargs = dict(num_workers=2, batch_size=2, persistent_workers=persistent)
    ours_loader = stoker.DataLoader(Counter(), **kwargs)
    theirs_loader = TorchDataLoader(Counter(), **kwargs)
    for _ in range(3):
        assert_batches_equal(list(ours_loader), list(theirs_loader))


def test_persistent_workers_abandoned_epoch():
    loader = stoker.DataLoader(Shard(40), num_workers=2, batch_size=3, persistent_workers=True)
    it = iter(loader)
    next(it)
    full = list(loader)  # a new epoch while the first was only begun: the old prefetch is dropped
    assert sorted(torch.cat(full).tolist()) == list(range(40))


def test_spawn_context_matches_torch():
    kwargs = dict(num_workers=2, batch_size=5, multiprocessing_context="spawn")
    ours, theirs = _both(PerWorker([7, 3]), **kwargs)
    assert_batches_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------------------------
# len() and its warnings
# ----------------------------------------------------------------------------------------------------------------


def _warnings_of(loader):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    return batches, [str(w.message) for w in caught if "Length of IterableDataset" in str(w.message)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("ask_len", [True, False])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_length_warnings_match_torch(num_workers, ask_len, batch_size):
    results = []
    dataset = Unsharded(6)  # one object: the warning names it
    for cls in (stoker.DataLoader, TorchDataLoader):
        loader = cls(dataset, batch_size=batch_size, num_workers=num_workers)
        if ask_len:
            assert len(loader) == (6 if batch_size is None else 3)
        results.append(_warnings_of(loader))
    (ours, our_warnings), (theirs, their_warnings) = results
    assert_batches_equal(ours, theirs)
    # torch compares the batches yielded with len(dataset) (not len(loader)): with two unsharded workers and
    # no batching, the 7th..12th items warn.
    assert len(our_warnings) == (6 if ask_len and num_workers and batch_size is None else 0)
    assert our_warnings == their_warnings


def test_iterator_len_raises_like_torch():
    for cls in (stoker.DataLoader, TorchDataLoader):
        with pytest.raises(TypeError):
            len(iter(cls(Shard(4), batch_size=2)))
        with pytest.raises(TypeError):
            len(cls(Shard(4), batch_size=2))


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_error_in_a_worker_keeps_its_type_and_iteration_goes_on():
    loader = stoker.DataLoader(Failing(6, bad=2), num_workers=2, batch_size=None)
    it = iter(loader)
    seen = []
    errors = []
    while True:
        try:
            seen.append(tuple(next(it).tolist()))
        except StopIteration:
            break
        except ValueError as exc:
            errors.append(exc)
    assert len(errors) == 1 and "bad item 2" in str(errors[0])
    notes = "\n".join(getattr(errors[0], "__notes__", []))
    assert "worker process 0" in notes
    assert sorted(seen) == sorted([(0, k) for k in range(6) if k != 2] + [(1, k) for k in range(6)])


def test_error_in_main_process_iteration_propagates_unchanged():
    it = iter(stoker.DataLoader(Failing(4, bad=1), batch_size=None))
    assert next(it).tolist() == [0, 0]
    with pytest.raises(ValueError, match="bad item 1"):
        next(it)
    assert [b.tolist() for b in it] == [[0, 2], [0, 3]]


def test_error_in_iter_of_a_worker_copy():
    it = iter(stoker.DataLoader(BrokenIter(), num_workers=2, batch_size=2))
    with pytest.raises(KeyError, match="cannot open the shard"):
        next(it)


def test_error_in_iter_in_the_main_process_at_iter_like_torch():
    for cls in (stoker.DataLoader, TorchDataLoader):
        with pytest.raises(KeyError, match="cannot open the shard"):
            iter(cls(BrokenIter(), batch_size=2))


def test_thread_mode_and_sample_seeds_refuse_iterable_datasets():
    with pytest.raises(ValueError, match="worker_mode='thread'"):
        iter(stoker.DataLoader(Shard(4), num_workers=2, worker_mode="thread"))
    with pytest.raises(ValueError, match="sample_seeds"):
        iter(stoker.DataLoader(Shard(4), sample_seeds=True))


def test_killed_worker_is_reported():
    import signal
    import time

    class Slow(IterableDataset):
        def __iter__(self):
            for k in range(1000):
                time.sleep(0.01)
                yield k

    it = iter(stoker.DataLoader(Slow(), num_workers=2, batch_size=4))
    next(it)
    pid = it._pool.workers[0].pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=f"pid {pid}"):
        for _ in it:
            pass


def test_break_and_del_stop_the_workers():
    it = iter(stoker.DataLoader(Shard(10_000), num_workers=2, batch_size=4))
    next(it), next(it)  # a batch of each worker: both are running
    workers = list(it._pool.workers)
    del it
    import gc

    gc.collect()
    for w in workers:
        w.join(timeout=5)
        assert w.exitcode is not None


def test_main_process_batches_match_value_by_value():
    dataset = PerWorker([13])
    ours, theirs = _both(dataset, batch_size=4)
    assert_same(ours, theirs)


# ----------------------------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ----------------------------------------------------------------------------------------------------------------


class Passes(IterableDataset):
    """A stateful IterableDataset (torchdata's protocol): each pass draws a fresh random seed, so replaying a
    pass cannot reproduce it; only its saved state (seed, position) can."""

    def __init__(self, n=23):
        self.n = n
        self.seed = None
        self.pos = 0
        self.loaded = False

    def __iter__(self):
        # Not a generator function: the pass's seed is drawn at iter(), so a state taken before the first
        # batch already holds it.
        if not self.loaded:
            self.seed, self.pos = int.from_bytes(os.urandom(4), "little"), 0
        self.loaded = False
        return self._items()

    def _items(self):
        info = get_worker_info()
        wid, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = list(range(wid, self.n, workers))
        while self.pos < len(mine):
            value = mine[self.pos] * 1000 + self.seed % 1000
            self.pos += 1
            yield value

    def state_dict(self):
        return {"seed": self.seed, "pos": self.pos}

    def load_state_dict(self, state):
        self.seed, self.pos, self.loaded = state["seed"], state["pos"], True


def _resume_case(make_dataset, num_workers, k, batch_size=3, **kwargs):
    """Serves k batches, saves (through json and torch.save), and checks that a fresh loader over a fresh
    dataset continues with exactly the batches the first loader goes on to serve, then the next epoch."""
    from helpers import roundtrip

    kwargs = dict(batch_size=batch_size, num_workers=num_workers, **kwargs)
    first = stoker.DataLoader(make_dataset(), **kwargs)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = roundtrip(first.state_dict())
    rest = list(it)
    assert len(head) + len(rest) > 0
    resumed = stoker.DataLoader(make_dataset(), **kwargs)
    resumed.load_state_dict(state)
    assert_batches_equal(list(resumed), rest)
    # The epoch after: each loader's next epoch (fresh passes of the same, deterministic datasets).
    return resumed


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_resume_replays_a_stateless_pass(num_workers, k):
    # PerWorker has no state: each worker's pass is drawn again and the served batches dropped.
    sizes = {0: [17], 1: [17], 2: [9, 4], 3: [0, 4, 20]}[num_workers]
    resumed = _resume_case(lambda: PerWorker(sizes), num_workers, k, batch_size=2)
    expected = list(TorchDataLoader(PerWorker(sizes), batch_size=2, num_workers=num_workers))
    assert_batches_equal(list(resumed), expected)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [0, 1, 2, 4, 7])
def test_resume_loads_each_copy_state(num_workers, k):
    # Each pass of Passes is random: only its saved state continues it. With workers, the state of each
    # worker's copy is the one after the last batch the user received from it, not after its prefetch.
    _resume_case(Passes, num_workers, k)


class Rewinds(IterableDataset):
    """Keeps its own position, and rewinds itself as its pass ends (ready for the next): worker w yields
    sizes[w] items. A state taken after the last batch of a pass holds the rewound position."""

    def __init__(self, sizes) -> None:
        self.sizes, self.pos = sizes, 0

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        while self.pos < self.sizes[wid]:
            self.pos += 1
            yield 100 * wid + self.pos - 1
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_a_pass_ended_gives_that_worker_no_more(num_workers):
    # Worker 1's pass (3 items, a short last batch) ends early; worker 0's with a short batch too (7 items).
    sizes = [7, 3]
    reference = [b.tolist() for b in stoker.DataLoader(Rewinds(sizes), batch_size=2, num_workers=num_workers)]
    for k in range(len(reference) + 1):
        resumed = _resume_case(lambda: Rewinds(sizes), num_workers, k, batch_size=2)
        assert [b.tolist() for b in resumed] == reference, k  # the next epoch: whole passes again


class CountsPasses(IterableDataset):
    """Rewinds itself as a pass ends and counts its passes (in its state): worker w's item is
    1000 w + 100 passes + position, so an epoch after a resume shows which pass each copy is on."""

    def __init__(self, sizes=(7, 3)) -> None:
        self.sizes, self.pos, self.passes = sizes, 0, 0

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        while self.pos < self.sizes[wid]:
            self.pos += 1
            yield 1000 * wid + 100 * self.passes + self.pos - 1
        self.pos, self.passes = 0, self.passes + 1

    def state_dict(self):
        return {"pos": self.pos, "passes": self.passes}

    def load_state_dict(self, state):
        self.pos, self.passes = state["pos"], state["passes"]


class KeepsEnd(IterableDataset):
    """torchdata's way: ``load_state_dict`` is applied at the next ``iter()`` (by its generator, so not before
    the first item is asked for), and a pass keeps its end position until then: iterated with an end state
    loaded, it gives nothing. Items as CountsPasses's: 1000 worker + 100 passes + position."""

    def __init__(self, sizes=(7, 3)) -> None:
        self.sizes, self.yielded, self.passes, self.pending = sizes, 0, 0, None

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        if self.pending is not None:
            (self.yielded, self.passes), self.pending = self.pending, None
        elif self.yielded >= self.sizes[wid]:
            self.yielded, self.passes = 0, self.passes + 1
        while self.yielded < self.sizes[wid]:
            self.yielded += 1
            yield 1000 * wid + 100 * self.passes + self.yielded - 1

    def state_dict(self):
        return {"yielded": self.yielded, "passes": self.passes}

    def load_state_dict(self, state):
        self.pending = (state["yielded"], state["passes"])


class EmptyOddPasses(CountsPasses):
    """Rewinds itself; every other pass is empty (a shard with nothing for this worker then): a look that
    finds nothing at a pass's start then finds no kept end but the pass to come."""

    def __iter__(self):
        if self.passes % 2 == 0:
            yield from super().__iter__()
        else:
            self.pos, self.passes = 0, self.passes + 1


@pytest.mark.parametrize("dataset", [CountsPasses, KeepsEnd, EmptyOddPasses])
@pytest.mark.parametrize(("sizes", "drop_last"), [((7, 3), False), ((6, 2), False), ((7, 3), True)],
                         ids=["short_last", "full_last", "drop_last"])
@pytest.mark.parametrize("kwargs", [dict(num_workers=0), dict(num_workers=2, persistent_workers=True),
                                    dict(num_workers=2)], ids=["main_process", "persistent_workers", "workers"])
def test_a_copy_goes_on_from_its_state_at_every_save_point(kwargs, sizes, drop_last, dataset):
    # Saved in the second epoch after k batches, or between the second and the third: the rest of that epoch
    # and the next are the uninterrupted run's, loaded into a fresh loader or back into the one that saved.
    # A pass ends with its last batch (a short one), or at the draw after it (a full one, or a short one
    # dropped): either way the copy's state for its next pass is the one its pass ended in. Each copy that
    # persists counts its passes; KeepsEnd reports the pass before's end until its generator runs, so a state
    # taken before a pass's first item, or after its last, is a pass's end: loaded as it is it would give an
    # empty pass.
    from helpers import roundtrip

    def epoch(loader):
        return [b.tolist() for b in loader]

    kwargs = dict(kwargs, batch_size=2, drop_last=drop_last)
    reference = stoker.DataLoader(dataset(sizes), **kwargs)
    epochs = [epoch(reference) for _ in range(4)]
    for k in [*range(len(epochs[1]) + 1), None]:
        first = stoker.DataLoader(dataset(sizes), **kwargs)
        epoch(first)
        if k is None:
            epoch(first)
            head, want = [], epochs[2:4]
        else:
            it = iter(first)
            head = [next(it).tolist() for _ in range(k)]
            want = [epochs[1][k:], epochs[2]]
        state = roundtrip(first.state_dict())
        for resumed in (stoker.DataLoader(dataset(sizes), **kwargs), first):
            resumed.load_state_dict(state)
            assert [epoch(resumed), epoch(resumed)] == want, (k, resumed is first)


def test_a_state_at_an_epoch_start_loads_into_other_worker_counts():
    # The main process's dataset state, taken between epochs, has no copy to go on in under two workers: they
    # start from the dataset as it is (with a warning), as a loader that never saved would.
    first = stoker.DataLoader(CountsPasses(), batch_size=2)
    list(first)
    state = first.state_dict()
    assert state["workers"] == [{"batches": 0, "ended": False, "state": {"pos": 0, "passes": 1}}]
    other = stoker.DataLoader(CountsPasses(), batch_size=2, num_workers=2)
    with pytest.warns(UserWarning, match="num_workers=0, with the own states of its dataset copies"):
        other.load_state_dict(state)
    fresh = stoker.DataLoader(CountsPasses(), batch_size=2, num_workers=2)
    assert [b.tolist() for b in other] == [b.tolist() for b in fresh]


def test_resume_with_in_order_false_serves_every_item_once():
    kwargs = dict(batch_size=2, num_workers=2, in_order=False)
    first = stoker.DataLoader(Shard(30), **kwargs)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    resumed = stoker.DataLoader(Shard(30), **kwargs)
    resumed.load_state_dict(first.state_dict())
    items = torch.cat(head + list(resumed)).tolist()
    assert sorted(items) == list(range(30))


def test_resume_with_persistent_workers():
    kwargs = dict(batch_size=2, num_workers=2, persistent_workers=True)
    first = stoker.DataLoader(Passes(), **kwargs)
    it = iter(first)
    next(it)
    next(it)
    state = first.state_dict()
    rest = list(it)
    resumed = stoker.DataLoader(Passes(), **kwargs)
    list(resumed)  # an epoch first: the loaded state then replaces the workers' positions
    resumed.load_state_dict(state)
    assert_batches_equal(list(resumed), rest)


def test_state_after_the_epoch_starts_the_next():
    loader = stoker.DataLoader(Shard(10), batch_size=4, num_workers=2)
    list(loader)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_served"] == 0 and state["workers"] is None
    other = stoker.DataLoader(Shard(10), batch_size=4, num_workers=1)
    other.load_state_dict(state)  # at an epoch's start the worker count may change
    assert sorted(torch.cat(list(other)).tolist()) == list(range(10))


def test_resume_refuses_another_worker_count_mid_epoch():
    loader = stoker.DataLoader(Shard(10), batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers=2"):
        stoker.DataLoader(Shard(10), batch_size=2, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        stoker.DataLoader(Shard(10), batch_size=3, num_workers=2).load_state_dict(state)


def test_error_batches_count_as_served_on_resume():
    kwargs = dict(batch_size=None, num_workers=2)
    first = stoker.DataLoader(Failing(6, bad=2), **kwargs)
    it = iter(first)
    got = []
    while len(got) < 6:
        try:
            got.append(tuple(next(it).tolist()))
        except ValueError:
            got.append("error")
    state = first.state_dict()
    rest = [tuple(b.tolist()) for b in it]
    resumed = stoker.DataLoader(Failing(6, bad=2), **kwargs)
    resumed.load_state_dict(state)
    assert [tuple(b.tolist()) for b in resumed] == rest


def test_the_look_at_a_loaded_state_gives_back_what_it_drew():
    # A state taken before a pass's first batch is looked at with one item drawn; the item, and the draws it
    # made from the process's random generators, are given back: the user's RNG stands as it did.
    class Draws(CountsPasses):
        def __iter__(self):
            for item in super().__iter__():
                random.random()
                np.random.random()
                yield item

    first = stoker.DataLoader(Draws(), batch_size=2)
    list(first)
    state = first.state_dict()
    resumed = stoker.DataLoader(Draws(), batch_size=2)
    resumed.load_state_dict(state)
    before = random.getstate(), np.random.get_state()[1].copy()
    it = iter(resumed)  # (torch's global RNG gives the iterator's base seed, as with torch)
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert [b.tolist() for b in it] == [[100, 101], [102, 103], [104, 105], [106]]


def test_a_resume_gives_back_the_draws_of_its_look():
    # A dataset that draws from the global RNG as its pass starts, saved between epochs with the RNG beside
    # it: the look at its state (a kept end) makes draws the saved run never made; they are given back, so
    # the epochs after the resume draw as the uninterrupted run's did.
    class DrawsAtStart(KeepsEnd):
        def __iter__(self):
            tag = random.randrange(1000)
            for item in super().__iter__():
                yield [item, tag]

    def tags(loader):
        return [b[1].tolist() for b in loader]

    random.seed(0)
    reference = stoker.DataLoader(DrawsAtStart((4,)), batch_size=2)
    want = [tags(reference) for _ in range(3)]
    random.seed(0)
    first = stoker.DataLoader(DrawsAtStart((4,)), batch_size=2)
    tags(first)
    state, rng = first.state_dict(), random.getstate()
    resumed = stoker.DataLoader(DrawsAtStart((4,)), batch_size=2)
    resumed.load_state_dict(state)
    random.setstate(rng)
    assert [tags(resumed), tags(resumed)] == want[1:]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_state_saved_straight_after_a_resume_is_the_one_loaded(k, num_workers):
    # Before the resumed pass's first batch its position is the state it was loaded with, whatever the
    # dataset says then (KeepsEnd applies it lazily; the look at it moved it).
    def epoch(loader):
        return [b.tolist() for b in loader]

    kwargs = dict(batch_size=2, num_workers=num_workers)
    want = epoch(stoker.DataLoader(KeepsEnd(), **kwargs))
    first = stoker.DataLoader(KeepsEnd(), **kwargs)
    it = iter(first)
    head = [next(it).tolist() for _ in range(k)]
    state = first.state_dict()
    resumed = stoker.DataLoader(KeepsEnd(), **kwargs)
    resumed.load_state_dict(state)
    it = iter(resumed)
    again = resumed.state_dict()
    assert again["workers"] == state["workers"]
    del it
    last = stoker.DataLoader(KeepsEnd(), **kwargs)
    last.load_state_dict(again)
    assert head + epoch(last) == want


class _Opaque:
    """A value without __eq__: equal only to itself under ==."""

    def __init__(self, value) -> None:
        self.value = value


@pytest.mark.parametrize("kind", ["tuple", "tensor", "nan", "bfloat16", "object"])
def test_a_kept_end_is_told_whichever_way_its_state_travelled(kind):
    # json makes a tuple a list, torch.load gives tensors back, NaN and objects without __eq__ are not equal
    # to their copies under ==: the state the look leaves is compared as values with the one loaded, so a
    # kept end is still told from a rewinding dataset's empty pass.
    import json

    class KeepsEndAs(KeepsEnd):
        def state_dict(self):
            at = (self.yielded, self.passes)
            extra = {"tuple": None, "tensor": None, "nan": float("nan"),
                     "bfloat16": torch.tensor([1.5, float("nan")], dtype=torch.bfloat16), "object": _Opaque(3)}[kind]
            return {"at": at if kind == "tuple" else torch.tensor(at), "extra": extra}

        def load_state_dict(self, state):
            self.pending = tuple(int(v) for v in state["at"])

    def epoch(loader):
        return [b.tolist() for b in loader]

    reference = stoker.DataLoader(KeepsEndAs((5,)), batch_size=2)
    want = [epoch(reference) for _ in range(3)]
    first = stoker.DataLoader(KeepsEndAs((5,)), batch_size=2)
    epoch(first)
    state = json.loads(json.dumps(first.state_dict())) if kind == "tuple" else first.state_dict()
    resumed = stoker.DataLoader(KeepsEndAs((5,)), batch_size=2)
    resumed.load_state_dict(state)
    assert [epoch(resumed), epoch(resumed)] == want[1:]
