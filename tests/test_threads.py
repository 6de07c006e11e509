"""One loader's iterator used from several threads: each batch goes whole to one caller, never a hang, a torn
message or a batch served twice; an iterator asked for a batch while it is loading one, from the same thread,
raises instead of waiting on itself, and so does one asked from the loader's own worker threads."""

import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import stoker
from helpers import run_with_deadline

N, BATCH = 240, 4


class Numbers(torch.utils.data.Dataset):
    """A Python dataset (workers load it): sample i is [i]."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.tensor([i])


class Stream(torch.utils.data.IterableDataset):
    """Each worker's share of 0..N-1, one sample at a time."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(wid, N, nw):
            yield torch.tensor([i])


SETUPS = {
    "array-nw0": lambda: stoker.DataLoader(TensorDataset(torch.arange(N).view(N, 1)), batch_size=BATCH),
    "python-nw0": lambda: stoker.DataLoader(Numbers(), batch_size=BATCH),
    "python-threads": lambda: stoker.DataLoader(Numbers(), batch_size=BATCH, num_workers=2, worker_mode="thread"),
    "python-processes": lambda: stoker.DataLoader(Numbers(), batch_size=BATCH, num_workers=2),
    "python-persistent": lambda: stoker.DataLoader(Numbers(), batch_size=BATCH, num_workers=2,
                                                   persistent_workers=True),
    "iterable-processes": lambda: stoker.DataLoader(Stream(), batch_size=BATCH, num_workers=2),
}


def _values(batch) -> list[int]:
    t = batch[0] if isinstance(batch, (list, tuple)) else batch
    return t.flatten().tolist()


def _in_threads(*targets, seconds: float = 60) -> None:
    """Runs each target in a thread of its own, all at once; fails if they are not all done within `seconds`
    (a hang), and raises the first error one of them raised."""
    errors: list = []

    def reporting(target):
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)
        return run

    def all_of_them() -> None:
        threads = [threading.Thread(target=reporting(t)) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_with_deadline(all_of_them, seconds)
    if errors:
        raise errors[0]


def _drain_from_threads(it, threads: int = 3) -> list[list[int]]:
    """Every thread calls next(it) until the end; returns each batch as a list of its values."""
    got: list = []
    lock = threading.Lock()

    def consume() -> None:
        for batch in it:
            with lock:
                got.append(_values(batch))

    _in_threads(*[consume] * threads)
    return got


@pytest.mark.parametrize("setup", list(SETUPS))
def test_one_iterator_shared_by_threads_serves_every_sample_once(setup):
    loader = SETUPS[setup]()
    for _epoch in range(2):
        batches = _drain_from_threads(iter(loader))
        assert len(batches) == N // BATCH
        assert all(len(b) == BATCH for b in batches)
        assert sorted(v for b in batches for v in b) == list(range(N))
        if not setup.startswith("iterable"):  # a map-style batch is whole: BATCH consecutive indices
            assert all(b == list(range(b[0], b[0] + BATCH)) for b in batches)


def test_threads_iterating_one_persistent_loader_never_hang():
    """Each thread's iter() resets the loader's one iterator, ending the epoch the other is in (as torch's
    loader does): the threads get whole batches of the dataset, and the loader serves whole epochs after."""
    loader = SETUPS["python-persistent"]()
    got: list = []

    def epochs() -> None:
        for _ in range(3):
            for batch in loader:
                got.append(_values(batch))

    _in_threads(epochs, epochs)
    assert got and all(b == list(range(b[0], b[0] + BATCH)) and b[0] % BATCH == 0 for b in got)
    for _ in range(2):
        assert sorted(v for b in loader for v in _values(b)) == list(range(N))


def test_persistent_loaders_first_iter_from_two_threads_makes_one_iterator():
    loader = SETUPS["python-persistent"]()
    its: list = []
    barrier = threading.Barrier(2)

    def first() -> None:
        barrier.wait()
        its.append(iter(loader))

    _in_threads(first, first)
    assert len(its) == 2 and its[0] is its[1]
    assert sorted(v for b in its[0] for v in _values(b)) == list(range(N))


def test_packed_iterator_shared_by_threads_serves_every_batch_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=int(n)) for n in rng.integers(5, 60, size=200)]
    for num_threads in (0, 2):
        def packed():
            return stoker.PackedLoader(docs, seq_len=32, batch_size=2, num_threads=num_threads, seed=3)

        expected = sorted(b["input_ids"].flatten().tolist() for b in packed())
        got: list = []
        lock = threading.Lock()
        it = iter(packed())

        def consume() -> None:
            for b in it:
                with lock:
                    got.append(b["input_ids"].flatten().tolist())

        _in_threads(consume, consume, consume)
        assert sorted(got) == expected

        # close() from another thread stops the building ahead, never under a next(): the batches are all
        # served still (built on demand after it), each once.
        got.clear()
        it = iter(packed())

        def consume_slowly() -> None:
            for b in it:
                got.append(b["input_ids"].flatten().tolist())
                time.sleep(0.002)

        _in_threads(consume_slowly, lambda: (time.sleep(0.05), it.close()))
        assert sorted(got) == expected


class SlowNumbers(Numbers):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.tensor([i])


class SlowStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(wid, 40, nw):
            time.sleep(0.02)
            yield torch.tensor([i])


SLOW = {
    "python-nw0": lambda: stoker.DataLoader(SlowNumbers(), batch_size=BATCH),
    "python-threads": lambda: stoker.DataLoader(SlowNumbers(), batch_size=BATCH, num_workers=2, worker_mode="thread"),
    "python-processes": lambda: stoker.DataLoader(SlowNumbers(), batch_size=BATCH, num_workers=2),
    "python-persistent": lambda: stoker.DataLoader(SlowNumbers(), batch_size=BATCH, num_workers=2,
                                                   persistent_workers=True),
    "iterable-nw0": lambda: stoker.DataLoader(SlowStream(), batch_size=BATCH),
    # (fast to load: the loop is slow, so the close comes mid-epoch)
    "array-nw0": lambda: stoker.DataLoader(TensorDataset(torch.arange(N).view(N, 1)), batch_size=BATCH),
    "array-threads": lambda: stoker.DataLoader(TensorDataset(torch.arange(N).view(N, 1)), batch_size=BATCH,
                                               num_workers=2),
    "iterable-processes": lambda: stoker.DataLoader(SlowStream(), batch_size=BATCH, num_workers=2),
}


@pytest.mark.parametrize("setup", list(SLOW))
def test_close_from_another_thread_ends_the_loop_waiting_for_a_batch(setup):
    loader = SLOW[setup]()
    it = iter(loader)
    served = _values(next(it))

    def consume() -> None:
        for batch in it:  # ends with StopIteration at the close, whatever it was waiting for then
            served.extend(_values(batch))
            time.sleep(0.005)

    closed: list = []

    def close_soon() -> None:
        time.sleep(0.1)
        it.close()
        closed.append(it._closed)  # closed by the time close() returns, whichever thread did it

    _in_threads(consume, close_soon, seconds=30)
    assert closed == [True]
    assert len(set(served)) == len(served) and len(served) % BATCH == 0
    with pytest.raises(StopIteration):
        next(it)
    state = loader.state_dict()  # the epoch was left, not ended: a resume goes on after the batches served
    assert (state["epoch"], state["batches_served"]) == (0, len(served) // BATCH)
    if "processes" in setup:  # the workers end with the iterator
        for w in it._workers:
            w.join(10)
            assert w.exitcode is not None
    if "persistent" in setup:  # the workers outlive the iterator's epoch, as torch's: the next one is whole
        assert sorted(v for b in run_with_deadline(lambda: list(loader), 30) for v in _values(b)) == list(range(40))


class ClosesAtSample(torch.utils.data.Sampler):
    """Samples 0..63 in order; at sample 30 it closes the iterator it draws for (from inside its next())."""

    it = None

    def __len__(self):
        return 64

    def __iter__(self):
        for i in range(64):
            if i == 30 and self.it is not None:
                self.it.close()
            yield i


@pytest.mark.parametrize("kw", [{}, {"num_workers": 2, "worker_mode": "thread"}, {"num_workers": 2},
                                {"num_workers": 2, "persistent_workers": True}], ids=["nw0", "threads", "processes",
                                                                                     "persistent"])
def test_a_sampler_that_closes_the_iterator_it_draws_for_ends_the_loop(kw):
    sampler = ClosesAtSample()
    loader = stoker.DataLoader(Numbers(), batch_size=4, sampler=sampler, **kw)
    sampler.it = it = iter(loader)
    served = run_with_deadline(lambda: [v for b in it for v in _values(b)], 30)
    assert served == list(range(len(served))) and 4 <= len(served) < 64
    state = loader.state_dict()
    assert (state["epoch"], state["batches_served"]) == (0, len(served) // 4)
    if kw.get("persistent_workers"):  # the workers go on serving the next epoch
        sampler.it = None
        assert run_with_deadline(lambda: [v for b in loader for v in _values(b)], 30) == list(range(64))


def test_a_dataset_that_closes_its_iterator_from_a_worker_thread_ends_the_loop():
    class ClosesAtSample(torch.utils.data.Dataset):
        it = None

        def __len__(self):
            return 64

        def __getitem__(self, i):
            if i == 30:
                self.it.close()  # (from a worker thread, while the loop waits for this very batch)
            return torch.tensor([i])

    ds = ClosesAtSample()
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=1, worker_mode="thread")
    ds.it = it = iter(loader)
    served = run_with_deadline(lambda: [v for b in it for v in _values(b)], 30)
    assert served == list(range(len(served))) and len(served) < 64
    assert loader.state_dict()["epoch"] == 0


class AsksItsOwnIterator(torch.utils.data.Dataset):
    it = None

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 5:
            next(self.it)
        return i


def test_iterator_asked_for_a_batch_by_the_dataset_it_is_loading_raises():
    ds = AsksItsOwnIterator()
    ds.it = it = iter(stoker.DataLoader(ds, batch_size=4))
    assert next(it).tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match=r"was called while it was running, from the same thread"):
        run_with_deadline(lambda: next(it), 20)
    assert next(it).tolist() == [8, 9, 10, 11]  # the batch that raised took its turn, as any loading error


@pytest.mark.parametrize("persistent", [False, True])
def test_iterator_asked_for_a_batch_from_its_own_worker_thread_raises(persistent):
    ds = AsksItsOwnIterator()
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=1, worker_mode="thread", persistent_workers=persistent)
    ds.it = it = iter(loader)
    assert next(it).tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match=r"called from one of its own worker threads \(stoker_worker_0\)"):
        run_with_deadline(lambda: next(it), 20)
    assert run_with_deadline(lambda: [b.tolist() for b in it], 20) == [[8, 9, 10, 11], [12, 13, 14, 15]]


def test_worker_thread_may_iterate_another_loader():
    inner = stoker.DataLoader(TensorDataset(torch.arange(8)), batch_size=4)

    class UsesAnotherLoader(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return sum(int(b[0].sum()) for b in inner) + i

    loader = stoker.DataLoader(UsesAnotherLoader(), batch_size=2, num_workers=2, worker_mode="thread")
    assert run_with_deadline(lambda: [b.tolist() for b in loader], 20) == [[28, 29], [30, 31]]


def test_worker_thread_may_iterate_a_new_iterator_of_its_own_loader():
    class IteratesItsLoaderOnce(torch.utils.data.Dataset):
        loader, nested = None, False

        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 0 and not self.nested:  # (once: the new iterator's worker thread loads index 0 too)
                self.nested = True
                return sum(int(b.sum()) for b in self.loader)  # its own worker threads load its batches
            return i

    ds = IteratesItsLoaderOnce()
    ds.loader = stoker.DataLoader(ds, batch_size=2, num_workers=1, worker_mode="thread")
    assert run_with_deadline(lambda: [b.tolist() for b in ds.loader], 20) == [[6, 1], [2, 3]]


class _Counting(torch.utils.data.IterableDataset):
    """A stateful stream whose workers start slowly: the first batch is awaited while state_dict() is asked."""

    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]

    def __iter__(self):
        import time

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        time.sleep(0.3)
        for i in range(wid + nw * self.pos, N, nw):
            self.pos += 1
            yield torch.tensor([i])


def test_state_dict_from_another_thread_while_batches_load():
    # A checkpoint thread's state_dict() waits for the workers' pipe the iterating thread is reading (before, both
    # read it: a torn message, and a reader waiting for good).
    loader = stoker.DataLoader(_Counting(), batch_size=BATCH, num_workers=2, prefetch_factor=1)
    it = iter(loader)
    got: list = []

    def train() -> None:
        for b in it:
            got.extend(_values(b))

    def checkpoint() -> None:
        import time

        for _ in range(50):
            assert loader.state_dict()["epoch"] in (0, 1)  # 1 once the epoch has ended
            time.sleep(0.001)

    _in_threads(train, checkpoint)
    assert sorted(got) == list(range(N))
