"""Spawned workers (spawn or forkserver) are forked from a zygote that received the dataset once: with
persistent_workers=False each epoch still gets new worker processes and a pristine copy, worker_init_fn and
seeding stay torch's, and the dataset is not sent (nor unpickled) again unless it changed; persistent workers
are forked once; faults and shutdown stay prompt."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time

import pytest
import torch
from helpers import TorchDataLoader, assert_batches_equal
from test_workers import Counting, Identity, Killer, _alive, _run_script, _wait_gone
from torch.utils.data import Dataset, get_worker_info

import stoker
from stoker import _workers

CONTEXTS = ["spawn", "forkserver"]


class Unpickles(Dataset):
    """Appends a line to `path` each time a copy is unpickled, and serves (offset + i, worker id)."""

    def __init__(self, path: str, n: int = 24) -> None:
        self.path, self.n, self.offset = path, n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = get_worker_info()
        return torch.tensor([self.offset + i, -1 if info is None else info.id])

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


def _unpickles(path) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.read().split())


@pytest.mark.parametrize("context", CONTEXTS)
def test_the_dataset_is_sent_once_and_each_epoch_has_fresh_workers(context, tmp_path):
    path = str(tmp_path / "unpickles")
    ds = Unpickles(path)
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context, shuffle=True,
                               seed=3)
    pids, zygotes = [], set()
    for epoch in range(3):
        it = iter(loader)
        batches = list(it)
        assert sorted(int(v) for b in batches for v in b[:, 0]) == list(range(24)), epoch
        assert {int(w) for b in batches for w in b[:, 1]} == {0, 1}
        pids.append([w.pid for w in it._workers])
        zygotes.add(loader._stoker_zygote.process.pid)
    assert _unpickles(path) == 1  # torch's loader: 2 workers x 3 epochs = 6
    assert len(zygotes) == 1
    assert len({p for ps in pids for p in ps}) == 6  # every epoch's workers are new processes


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_dataset_changed_between_epochs_reaches_the_workers(context, tmp_path):
    path = str(tmp_path / "unpickles")
    ds = Unpickles(path)
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    first = list(loader)
    ds.offset = 100
    second = list(loader)
    third = list(loader)
    torch_ds = Unpickles(str(tmp_path / "torch"))
    expected = []
    for offset in (0, 100, 100):
        torch_ds.offset = offset
        expected.append(list(TorchDataLoader(torch_ds, batch_size=4, num_workers=2, multiprocessing_context=context)))
    for got, want in zip((first, second, third), expected):
        assert_batches_equal(got, want)
    assert _unpickles(path) == 2  # sent again once, when it changed


@pytest.mark.parametrize("context", CONTEXTS)
def test_each_epoch_starts_from_a_pristine_copy(context):
    # A copy that counts what it served starts each epoch from the count it was sent with, as in torch.
    loader = stoker.DataLoader(Counting(), batch_size=4, num_workers=2, multiprocessing_context=context)
    torch_loader = TorchDataLoader(Counting(), batch_size=4, num_workers=2, multiprocessing_context=context)
    for _ in range(2):
        got = torch.cat(list(loader))
        want = torch.cat(list(torch_loader))
        assert torch.equal(got[:, :2], want[:, :2])  # index, and the copy's count (pids differ)


def _init_records(worker_id):
    info = get_worker_info()
    torch.manual_seed(0)  # nothing carried over from an earlier epoch could show through this
    info.dataset.tag = (worker_id, info.seed, os.getpid())


class Tagged(Identity):
    tag = None

    def __getitem__(self, i):
        return {"i": i, "tag": torch.tensor(self.tag), "r": torch.rand(())}


@pytest.mark.parametrize("context", CONTEXTS)
def test_worker_init_fn_and_seeds_per_epoch_as_torch(context):
    def run(make):
        loader = make(Tagged(), batch_size=4, num_workers=2, multiprocessing_context=context,
                      worker_init_fn=_init_records, generator=torch.Generator().manual_seed(5))
        return [list(loader) for _ in range(2)]

    ours, theirs = run(stoker.DataLoader), run(TorchDataLoader)
    for got_epoch, want_epoch in zip(ours, theirs):
        for got, want in zip(got_epoch, want_epoch, strict=True):
            assert got["i"].tolist() == want["i"].tolist()
            assert torch.equal(got["tag"][:, :2], want["tag"][:, :2])  # worker id and seed, per epoch
            assert torch.equal(got["r"], want["r"])
    pids = [{int(p) for b in epoch for p in b["tag"][:, 2]} for epoch in ours]
    assert len(pids[0]) == 2 and not pids[0] & pids[1]  # worker_init_fn ran in new processes each epoch


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_killed_zygote_worker_is_reported_with_its_signal(context):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid \d+\) is killed by signal: Killed"):
        list(stoker.DataLoader(Killer(), batch_size=4, num_workers=2, multiprocessing_context=context))
    assert time.monotonic() - start < 15


def test_a_dataset_that_only_a_spawning_pickler_takes_is_spawned_per_epoch():
    class WithQueue(Identity):  # a multiprocessing queue pickles only while a process is being spawned
        def __init__(self):
            super().__init__()
            self.queue = multiprocessing.get_context("spawn").Queue()

    # defined here, not importable by a spawned process: the loader must not even try a zygote for it
    ds = WithQueue()
    assert _workers._zygote_key(stoker.DataLoader(ds, num_workers=2), None, None) is None


def test_the_zygote_ends_with_its_loader():
    loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    list(loader)
    proc = loader._stoker_zygote.process
    assert proc.is_alive()
    del loader
    gc.collect()
    proc.join(timeout=10)
    assert proc.exitcode is not None


def test_the_zygote_and_its_workers_end_with_the_main_process():
    proc = _run_script("""
        import os, stoker
        from test_workers import Identity
        loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
        list(loader)
        it = iter(loader)
        next(it), next(it)
        print(loader._stoker_zygote.process.pid, " ".join(str(w.pid) for w in it._workers), flush=True)
        os._exit(0)  # no clean-up at all
    """)
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 3
    _wait_gone(pids, 15)
    assert not _alive(pids)


def test_break_and_del_of_a_zygote_iterator_stop_its_workers():
    loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    it = iter(loader)
    next(it), next(it)
    workers = list(it._workers)
    del it
    gc.collect()
    for w in workers:
        w.join(timeout=5)
    assert all(w.exitcode is not None for w in workers)
    assert [b["i"].tolist() for b in loader] == [list(range(k, k + 4)) for k in range(0, 48, 4)]  # the next epoch


@pytest.mark.parametrize("context", CONTEXTS)
def test_persistent_workers_are_forked_once(context, tmp_path):
    path = str(tmp_path / "unpickles")
    loader = stoker.DataLoader(Unpickles(path), batch_size=4, num_workers=2, multiprocessing_context=context,
                               persistent_workers=True)
    pids = []
    for _ in range(3):
        it = iter(loader)
        assert sorted(int(v) for b in it for v in b[:, 0]) == list(range(24))
        pids.append([w.pid for w in it._workers])
    assert pids[0] == pids[1] == pids[2]  # the same two workers every epoch
    assert _unpickles(path) == 1


def test_zygote_worker_seen_as_dead_when_signalled_while_idle():
    loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    it = iter(loader)
    next(it)
    victim = it._workers[1].pid
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=f"pid {victim}"):
        list(it)
    assert not _alive([victim])


def test_a_loader_with_a_zygote_copies_and_pickles():
    import copy
    import pickle

    loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    list(loader)
    assert loader._stoker_zygote is not None
    for twin in (copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))):
        assert twin._stoker_zygote is None
        assert [b["i"].tolist() for b in twin] == [list(range(k, k + 4)) for k in range(0, 48, 4)]
        assert twin._stoker_zygote is not None and twin._stoker_zygote is not loader._stoker_zygote


def test_a_zygote_that_cannot_start_leaves_the_workers_spawned_per_epoch(monkeypatch):
    monkeypatch.setattr(_workers.Zygote, "ready", lambda self: (self.close(), False)[1])
    loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    for _ in range(2):
        assert [b["i"].tolist() for b in loader] == [list(range(k, k + 4)) for k in range(0, 48, 4)]
        assert loader._stoker_zygote is None


class StartsAThread(Dataset):
    """Unpickling starts a thread that holds the dataset's lock most of the time (as a module's background
    flusher might, imported with the dataset); each sample takes that lock."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        with self.lock:
            return i

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        import threading

        self.lock = threading.Lock()

        def flush() -> None:
            while True:
                with self.lock:
                    time.sleep(0.05)
                time.sleep(0.001)

        threading.Thread(target=flush, daemon=True).start()


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_dataset_whose_unpickling_starts_threads_gets_workers_spawned_not_forked(context):
    # A fork made while that thread holds the lock would leave it held in the worker for good (a hang).
    ds = StartsAThread()
    ds.__setstate__({})
    loader = stoker.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context, timeout=60)
    for _ in range(2):
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert getattr(loader, "_stoker_zygote", None) is None
