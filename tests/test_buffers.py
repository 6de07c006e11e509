"""Pooled buffers: a batch the user keeps is never overwritten, batches are independent writable tensors, and
iterators (native threads, Python thread pools) are torn down without hangs or leaks."""

from __future__ import annotations

import gc
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from helpers import MapDataset, TorchDataLoader, assert_batches_equal, native_thread_count, run_with_deadline
from torch.utils.data import TensorDataset

import stoker

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

N = 240
WORKERS = [0, 2]


def _features(n=N):
    return np.arange(n * 6, dtype=np.float32).reshape(n, 6) / 4


def _numpy_sample(i):
    return np.arange(6, dtype=np.float32) / 4 + i * 1.5, np.int64(i)


def _slow_sample(i):
    time.sleep(0.002)
    return np.full(4, i, np.float32)


DATASETS = {
    "TensorDataset": lambda: TensorDataset(torch.from_numpy(_features()), torch.arange(N)),
    "ndarray": lambda: _features(),
    "ArrayDataset": lambda: stoker.ArrayDataset(_features(), label=np.arange(N)),
    "python-numpy": lambda: MapDataset(_numpy_sample, N),
}


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    return [t for v in batch for t in _tensors(v)]


def _clone(batch):
    return [t.clone() for t in _tensors(batch)]


def _scribble(batch):
    """Overwrites every tensor of a batch the caller is done with: if its block were still shared with a kept
    batch, the damage would show there."""
    for t in _tensors(batch):
        t.fill_(-7 if t.dtype != torch.bool else True)


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_kept_batches_stay_intact(dataset, num_workers):
    loader = stoker.DataLoader(DATASETS[dataset](), batch_size=8, shuffle=True, seed=0, num_workers=num_workers)
    kept = list(loader)
    snapshot = [_clone(b) for b in kept]

    def more_epochs():
        for _ in range(3):
            for batch in loader:
                _scribble(batch)
                del batch

    run_with_deadline(more_epochs)
    for i, (batch, snap) in enumerate(zip(kept, snapshot)):
        for t, s in zip(_tensors(batch), snap):
            assert torch.equal(t, s), f"kept batch {i} changed"


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_keep_every_batch_of_several_epochs(dataset, num_workers):
    ds = DATASETS[dataset]()
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=num_workers)  # 60 batches an epoch, all kept
    epochs = run_with_deadline(lambda: [list(loader) for _ in range(4)])
    expected = list(TorchDataLoader(ds, batch_size=4))
    for e in epochs:
        assert_batches_equal(e, expected)


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_keep_many_large_batches(num_workers):
    # blocks of 256 KiB; keeping all of them goes past any fixed prefetch depth and pool cache
    x = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)
    loader = stoker.DataLoader(x, batch_size=64, num_workers=num_workers)
    kept = run_with_deadline(lambda: [b for _ in range(40) for b in loader])
    assert len(kept) == 40
    ref = torch.from_numpy(x)
    assert all(torch.equal(b, ref) for b in kept)
    assert len({b.data_ptr() for b in kept}) == 40  # distinct blocks


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_batches_are_writable_and_independent(dataset, num_workers):
    ds = DATASETS[dataset]()
    before = list(TorchDataLoader(ds, batch_size=5))
    batches = list(stoker.DataLoader(ds, batch_size=5, num_workers=num_workers))
    first, second = batches[0], batches[1]
    for t in _tensors(first):
        assert not t.is_inference()
        t.add_(1)  # writable, no error
        assert t.numpy().flags.writeable
    # other batches and the dataset are untouched
    assert_batches_equal(batches[1:], before[1:])
    assert_batches_equal(list(TorchDataLoader(ds, batch_size=5)), before)
    # batches do not overlap in memory
    ptrs = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for b in (first, second) for t in _tensors(b)]
    ptrs.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ptrs, ptrs[1:]))


def test_batches_of_read_only_memmap_are_writable(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _features())
    data = np.load(path, mmap_mode="r")
    batch = next(iter(stoker.DataLoader(data, batch_size=4)))
    batch.mul_(2)
    assert torch.equal(batch, torch.from_numpy(_features()[:4] * 2))
    assert np.array_equal(np.load(path, mmap_mode="r")[:4], _features()[:4])


def test_writing_into_a_batch_does_not_touch_a_bare_tensor_dataset():
    data = torch.arange(40.0).reshape(20, 2)
    original = data.clone()
    for b in stoker.DataLoader(data, batch_size=3, shuffle=True, num_workers=2):
        b.zero_()
    assert torch.equal(data, original)


def test_dataset_returning_one_shared_array():
    # a dataset that returns the same buffer object every time: each batch must be its own copy, made when
    # the batch is collated, as torch's is (so batch 0 holds 1s, not the 5s the buffer ends with)
    shared = np.zeros(3, np.float32)

    def sample(i):
        shared[:] = i
        return shared

    for num_workers in (0, 1):
        batches = list(stoker.DataLoader(MapDataset(sample, 6), batch_size=2, num_workers=num_workers))
        assert_batches_equal(batches, list(TorchDataLoader(MapDataset(sample, 6), batch_size=2)))
        assert [b[0, 0].item() for b in batches] == [1.0, 3.0, 5.0]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_batches_pickle_round_trip(dataset):
    batch = next(iter(stoker.DataLoader(DATASETS[dataset](), batch_size=4)))
    again = pickle.loads(pickle.dumps(batch))
    for a, b in zip(_tensors(again), _tensors(batch)):
        assert torch.equal(a, b)


def test_batch_outlives_loader_and_iterator():
    def make():
        loader = stoker.DataLoader(TensorDataset(torch.arange(30.0).reshape(15, 2)), batch_size=4, shuffle=True, seed=1)
        it = iter(loader)
        return next(it)

    batch = make()
    gc.collect()
    x, = batch
    assert x.shape == (4, 2)
    assert torch.equal(x[:, 1] - x[:, 0], torch.ones(4))


def test_batch_outlives_dataset_arrays():
    def make():
        x = np.arange(600, dtype=np.float64).reshape(100, 6)
        return list(stoker.DataLoader(stoker.ArrayDataset(x), batch_size=10))

    batches = make()
    gc.collect()
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), np.arange(600.0).reshape(100, 6))


@pytest.mark.parametrize("dataset", ["ArrayDataset", "python"])
def test_loaders_iterated_from_several_threads_at_once(dataset):
    # the buffer pool and the engine are shared by every loader of the process
    n = 600
    x = np.arange(n * 8, dtype=np.float32).reshape(n, 8)

    def sample(i):
        return x[i], i

    def run(k):
        ds = stoker.ArrayDataset(x, np.arange(n)) if dataset == "ArrayDataset" else MapDataset(sample, n)
        loader = stoker.DataLoader(ds, batch_size=16 + k, shuffle=True, seed=k, num_workers=k % 3)
        for _ in range(3):
            seen = []
            for rows, idx in loader:
                assert torch.equal(rows, torch.from_numpy(x)[idx])
                seen.extend(idx.tolist())
            assert sorted(seen) == list(range(n))
        return True

    results = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, run(k))) for k in range(6)]

    def body():
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_with_deadline(body, 60)
    assert results == {k: True for k in range(6)}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_dataset_arrays_replaced_and_freed_mid_epoch(num_workers):
    # the engine reads raw memory: the arrays an iterator started with must stay alive until it is done
    def body():
        ds = TensorDataset(torch.arange(4000.0).reshape(1000, 4), torch.arange(1000))
        it = iter(stoker.DataLoader(ds, batch_size=10, shuffle=True, seed=0, num_workers=num_workers))
        first = next(it)
        ds.tensors = (torch.full((1000, 4), -1.0), torch.full((1000,), -1))  # the old tensors lose their owner
        gc.collect()
        _ = [torch.empty(1000, 4).fill_(7.0) for _ in range(20)]  # reuse freed memory, if any was freed
        rest = list(it)
        return [first, *rest]

    batches = run_with_deadline(body)
    seen = []
    for x, idx in batches:
        if bool((idx == -1).all()):  # (reading the new tensors is torch's lazy behaviour; also fine)
            continue
        assert torch.equal(x, torch.arange(4000.0).reshape(1000, 4)[idx])
        seen.extend(idx.tolist())
    assert len(seen) == len(set(seen))


# --------------------------------------------------------------------------------------------------------------
# Teardown: no hangs, no leaked threads
# --------------------------------------------------------------------------------------------------------------

TEARDOWN_DATASETS = {**DATASETS, "python-slow": lambda: MapDataset(_slow_sample, N)}


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(TEARDOWN_DATASETS))
def test_delete_iterator_mid_epoch(dataset, num_workers):
    ds = TEARDOWN_DATASETS[dataset]()

    def body():
        loader = stoker.DataLoader(ds, batch_size=4, num_workers=num_workers, shuffle=True)
        it = iter(loader)
        next(it)
        next(it)
        del it
        gc.collect()
        for i, _ in enumerate(loader):
            if i == 2:
                break
        # and the loader still works afterwards
        return sum(len(_tensors(b)[0]) for b in loader)

    assert run_with_deadline(body) == N


@pytest.mark.parametrize("num_workers", WORKERS, ids=lambda w: f"workers{w}")
def test_iterator_never_advanced_is_released(num_workers):
    def body():
        for make in TEARDOWN_DATASETS.values():
            it = iter(stoker.DataLoader(make(), batch_size=4, num_workers=num_workers))
            del it
        gc.collect()

    run_with_deadline(body)


def _warm_up_process_threads():
    """Starts the process-wide threads that are created lazily (torch's intra-op pool, a first loader of each
    kind), so thread counts taken afterwards measure only what the loaders under test leave behind."""
    torch.ones(1 << 20).add_(1).sum()
    torch.stack([torch.ones(1 << 16)] * 16).sum()
    for ds in (_features(), MapDataset(_numpy_sample, 16)):
        list(stoker.DataLoader(ds, batch_size=4, num_workers=2))
    gc.collect()


def test_many_loaders_do_not_leak_threads():
    _warm_up_process_threads()
    time.sleep(0.05)
    py_before = threading.active_count()
    os_before = native_thread_count()
    tds = TensorDataset(torch.from_numpy(_features()), torch.arange(N))
    pyds = MapDataset(_numpy_sample, N)

    def body():
        for k in range(50):
            for ds in (tds, pyds):
                loader = stoker.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
                it = iter(loader)
                for _ in range(3):
                    next(it)
                if k % 2:
                    del it  # half are dropped explicitly, half by rebinding

    run_with_deadline(body, 60)
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        py_now, os_now = threading.active_count(), native_thread_count()
        if py_now <= py_before + 2 and (os_now is None or os_now <= os_before + 4):
            break
        time.sleep(0.05)
    assert threading.active_count() <= py_before + 2, f"{threading.active_count()} Python threads, {py_before} before"
    if os_before is not None:
        assert native_thread_count() <= os_before + 4, f"{native_thread_count()} OS threads, {os_before} before"


def test_exhausted_iterators_release_threads():
    _warm_up_process_threads()
    os_before = native_thread_count()
    py_before = threading.active_count()
    iterators = []
    for _ in range(20):
        it = iter(stoker.DataLoader(_features(), batch_size=64, num_workers=3))
        list(it)
        iterators.append(it)  # kept alive, but exhausted: its threads should be gone
    time.sleep(0.1)
    if os_before is not None:
        assert native_thread_count() <= os_before + 4
    assert threading.active_count() <= py_before + 2


_FORK_WHILE_BUSY = r"""
import os, sys, threading, time
import numpy as np
import stoker

data = np.random.default_rng(0).random((20000, 64), dtype=np.float32)
stop = threading.Event()

def churn():  # native threads acquire and return pool blocks without pause
    loader = stoker.DataLoader(data, batch_size=256, shuffle=True, num_workers=2)
    while not stop.is_set():
        for _ in loader:
            if stop.is_set():
                break

t = threading.Thread(target=churn)
t.start()
time.sleep(0.2)
hung = failed = 0
for _ in range(40):
    pid = os.fork()
    if pid == 0:
        # The child allocates from the pool it inherited: a pool lock held by a parent thread at the fork would
        # never be released here.
        x = stoker.default_collate([np.ones(64, np.float32)] * 256)
        os._exit(0 if float(x.sum()) == 256 * 64 else 3)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            failed += os.waitstatus_to_exitcode(status) != 0
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            hung += 1
            break
        time.sleep(0.002)
stop.set()
t.join()
print(f"hung={hung} failed={failed}")
sys.exit(1 if hung or failed else 0)
"""


def test_fork_while_native_threads_use_the_pool():
    # A process forked while stoker's threads allocate (torch's DataLoader workers, a user's own fork) gets a
    # usable pool: fork waits until no thread holds a pool lock.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FORK_WHILE_BUSY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hung=0 failed=0" in proc.stdout


_FORK_THEN_DROP = r"""
import gc, os, sys
import numpy as np
import stoker

data = np.arange(40000, dtype=np.float32).reshape(-1, 4)
loader = stoker.DataLoader(data, batch_size=8, shuffle=True, num_workers=2)
it = iter(loader)
first = next(it)
pid = os.fork()
if pid == 0:
    code = 0
    try:
        next(it)
        code = 3  # the copied iterator's threads are not in the child: it must say so
    except RuntimeError as e:
        code = 0 if "(a fork)" in str(e) else 4
    del it  # dropping the copy must not join, or wait on, the parent's threads
    gc.collect()
    again = sum(len(b) for b in loader)  # a new iterator in the child loads with threads of its own
    os._exit(code if again == len(data) else 5)
import time
deadline = time.monotonic() + 60
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung")
        sys.exit(1)
    time.sleep(0.01)
rest = sum(len(b) for b in it)
print(f"child {os.waitstatus_to_exitcode(status)} parent {len(first) + rest}")
"""


def test_a_forked_child_drops_an_inherited_iterator_without_waiting():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FORK_THEN_DROP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "child 0 parent 10000", proc.stdout + proc.stderr


def test_a_full_cache_makes_room_for_the_sizes_in_use():
    from stoker._native import core, from_dlpack

    pool = core.BufferPool(1 << 20)
    old = [from_dlpack(pool.empty([256 << 10], 1, 8)) for _ in range(4)]  # four 256 KiB blocks: a full cache
    del old
    assert pool.stats()["cached_bytes"] == 1 << 20
    before = pool.stats()
    for _ in range(10):  # a new shape: its blocks are cached (evicting old ones) and come back
        t = from_dlpack(pool.empty([100 << 10], 1, 8))
        t.fill_(7)
        del t
    after = pool.stats()
    assert after["reuses"] - before["reuses"] == 9
    assert after["allocations"] - before["allocations"] == 1
    assert after["cached_bytes"] <= 1 << 20 and after["outstanding"] == 0
    # a block larger than the whole cache is never cached, and evicts nothing
    cached = after["cached_bytes"]
    del_me = from_dlpack(pool.empty([2 << 20], 1, 8))
    del del_me
    assert pool.stats()["cached_bytes"] == cached


def test_a_block_is_freed_when_its_own_size_fills_the_cache():
    from stoker._native import core, from_dlpack

    pool = core.BufferPool(1 << 20)
    blocks = [from_dlpack(pool.empty([256 << 10], 1, 8)) for _ in range(5)]
    del blocks  # four fill the cache; the fifth is freed
    stats = pool.stats()
    assert stats["cached_bytes"] == 1 << 20 and stats["outstanding"] == 0
    blocks = [from_dlpack(pool.empty([256 << 10], 1, 8)) for _ in range(4)]
    assert pool.stats()["reuses"] - stats["reuses"] == 4


def test_the_cache_grows_to_the_most_bytes_out_at_once_up_to_its_limit():
    from stoker._native import core, from_dlpack

    fixed = core.BufferPool(512 << 10)
    grows = core.BufferPool(512 << 10, grow_to=2 << 20)
    capped = core.BufferPool(512 << 10, grow_to=768 << 10)
    for pool in (fixed, grows, capped):
        for _ in range(3):  # four 256 KiB blocks out at once, three times over
            held = [from_dlpack(pool.empty([256 << 10], 1, 8)) for _ in range(4)]
            del held
    fixed_stats, grows_stats, capped_stats = fixed.stats(), grows.stats(), capped.stats()
    # The fixed cache keeps two of the four: the other two are allocated afresh each time.
    assert fixed_stats["allocations"] == 2 + 2 * 3 and fixed_stats["cached_bytes"] == 512 << 10
    # Grown to the peak, it keeps all four: allocated once, reused after.
    assert grows_stats["allocations"] == 4 and grows_stats["reuses"] == 8
    assert grows_stats["cached_bytes"] == grows_stats["cache_bound"] == 1 << 20
    assert grows_stats["peak_outstanding_bytes"] == 1 << 20 and grows_stats["outstanding_bytes"] == 0
    # Never past grow_to.
    assert capped_stats["cache_bound"] == 768 << 10 and capped_stats["cached_bytes"] == 768 << 10
    assert capped_stats["allocations"] == 4 + 1 * 2


def test_setting_the_cache_bound_forgets_the_peak_and_frees_past_it():
    from stoker._native import core, from_dlpack

    pool = core.BufferPool(256 << 10, grow_to=4 << 20)
    held = [from_dlpack(pool.empty([256 << 10], 1, 8)) for _ in range(8)]
    kept = held.pop()
    del held
    assert pool.stats()["cached_bytes"] == 7 * (256 << 10)
    pool.set_max_cached_bytes(0)  # the peak now counts from the one block still out
    stats = pool.stats()
    assert stats["peak_outstanding_bytes"] == 256 << 10 and stats["cache_bound"] == 256 << 10
    assert stats["cached_bytes"] == 256 << 10 and stats["outstanding"] == 1
    del kept
    assert pool.stats()["cached_bytes"] == 256 << 10  # the returned block took the room freed for it


def test_batches_larger_than_the_base_cache_are_reused_across_epochs():
    from stoker import _native

    # 24 MiB batches, several in flight at once: more than the 64 MiB base bound, within its growth. One tensor
    # per sample (a second, smaller one's blocks could be evicted to make room, and counted as allocated again):
    # row i is filled with i.
    data = torch.arange(48.0)[:, None].expand(48, 1 << 20).contiguous()
    loader = stoker.DataLoader(TensorDataset(data), batch_size=6, shuffle=True, seed=3)

    def epoch():  # every sample once, each row whole (a reused block rewritten whole)
        seen = []
        for (x,) in loader:
            assert torch.equal(x, x[:, :1].expand_as(x))
            seen += x[:, 0].long().tolist()
        assert sorted(seen) == list(range(48))

    epoch()  # sets the peak (a later epoch may find the loader's threads one batch further ahead)
    before = _native.POOL.stats()
    for _ in range(4):
        epoch()
    after = _native.POOL.stats()
    # 32 batches: blocks come from the cache, but for one or two more in flight than ever before (with a fixed
    # 64 MiB bound, two of every three or four out at once are cached, and each epoch allocates several afresh).
    assert after["allocations"] - before["allocations"] <= 2
    assert after["reuses"] - before["reuses"] >= 30



def test_batches_once_kept_do_not_keep_their_memory_cached_for_good():
    from stoker import _native

    # 20 batches of 10 MiB kept in a list (200 MiB out at once), then dropped: the cache may hold them through
    # the next epoch, which is the window after theirs, and no longer once another iterator begins.
    data = torch.zeros(200, 1 << 18)
    loader = stoker.DataLoader(TensorDataset(data), batch_size=10)
    kept = list(loader)
    del kept
    assert _native.POOL.stats()["cached_bytes"] > 100 << 20
    for _ in loader:  # an epoch whose batches are dropped as they come
        pass
    it = iter(loader)  # its start ends the window of the kept batches
    stats = _native.POOL.stats()
    assert stats["cached_bytes"] <= stats["cache_bound"] < 100 << 20
    del it


def test_a_failed_allocation_does_not_raise_the_cache_bound():
    from stoker._native import new_pool

    pool = new_pool()
    with pytest.raises(MemoryError):
        pool.empty([1 << 50], 1, 8)
    stats = pool.stats()
    assert stats["peak_outstanding_bytes"] == 0 and stats["outstanding"] == 0
    assert stats["cache_bound"] == 64 << 20

def _large_rows():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (1100, 3, 64, 64), dtype=torch.uint8, generator=g)  # 12 KiB a row
    return TensorDataset(images, torch.randn(1100, 1000, generator=g), torch.arange(1100))  # + 4000 B + 8 B


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
def test_large_batches_gathered_in_parts_equal_torchs(num_workers):
    # A batch of 4 MiB or more is cut into row ranges that idle threads gather beside the one that took it.
    ds = _large_rows()
    order = torch.randperm(1100, generator=torch.Generator().manual_seed(1)).tolist()
    negative = [i - 1100 if i % 3 == 0 else i for i in order]  # counted from the end, as Python does
    for batch_size in (300, 1000):  # 4.9 MB (and a 200-row tail under the bound), 16 MB
        for sampler in (order, negative):
            expected = list(TorchDataLoader(ds, batch_size=batch_size, sampler=sampler))
            got = run_with_deadline(lambda: [list(stoker.DataLoader(ds, batch_size=batch_size, sampler=sampler,
                                                                    num_workers=num_workers)) for _ in range(2)])
            for epoch in got:
                assert_batches_equal(epoch, expected)
        # stoker's own shuffle: the same batches whatever the thread count (one thread never splits)
        one = list(stoker.DataLoader(ds, batch_size=batch_size, shuffle=True, seed=4))
        many = run_with_deadline(lambda: list(stoker.DataLoader(ds, batch_size=batch_size, shuffle=True, seed=4,
                                                                num_workers=num_workers)))
        assert_batches_equal(many, one)


def test_an_index_out_of_range_in_a_batch_gathered_in_parts_fails_that_batch_only():
    ds = _large_rows()
    sampler = list(range(300)) + list(range(300, 599)) + [5000] + list(range(600, 900))
    loader = stoker.DataLoader(ds, batch_size=300, sampler=sampler, num_workers=3)
    it = iter(loader)
    first = next(it)
    with pytest.raises(IndexError, match="index 5000 is out of range for a dataset of 1100 samples"):
        next(it)
    third = next(it)
    assert first[2].tolist() == list(range(300)) and third[2].tolist() == list(range(600, 900))
    assert torch.equal(third[0], ds.tensors[0][600:900])
    with pytest.raises(StopIteration):
        next(it)
