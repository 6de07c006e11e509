"""Worker processes for Python datasets: torch's worker contract (get_worker_info, seeding, worker_init_fn,
errors, timeouts, dead workers, shutdown) and the shared-memory ring (zero-copy, kept batches intact, the
pickled fallback)."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers import TorchDataLoader, assert_batches_equal, assert_same, in_small_shm
from torch.utils.data import Dataset, get_worker_info

import stoker
from stoker import _workers

N = 48


class Identity(Dataset):
    """Sample i: a float tensor, a numpy array, an int, a string, and which worker loaded it."""

    def __init__(self, n=N):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = get_worker_info()
        return {"x": torch.full((4,), float(i)), "a": np.arange(3) + i, "i": i, "s": f"s{i}",
                "w": -1 if info is None else info.id}


class Randomised(Dataset):
    """Draws from random, numpy and torch in the worker: the per-worker seeds decide the values."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64)


class Killer(Identity):
    def __getitem__(self, i):
        if i == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


class Sleepy(Identity):
    def __getitem__(self, i):
        if i == 10:
            time.sleep(3)
        return super().__getitem__(i)


class Failing(Identity):
    def __getitem__(self, i):
        if i % 10 == 7:
            raise KeyError(f"no sample {i}")
        return super().__getitem__(i)


class Counting(Dataset):
    """Counts the samples its own copy has served (in a worker process: that worker's count)."""

    def __init__(self):
        self.served = 0

    def __len__(self):
        return N

    def __getitem__(self, i):
        self.served += 1
        return torch.tensor([i, self.served, os.getpid()])


def _loader(dataset=None, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 2)
    return stoker.DataLoader(Identity() if dataset is None else dataset, **kw)


def test_python_dataset_uses_processes_and_matches_torch():
    ds = Identity()
    batches = list(_loader(ds))
    assert {int(w) for b in batches for w in b["w"]} == {0, 1}
    expected = list(TorchDataLoader(ds, batch_size=4, num_workers=2))
    assert_batches_equal(batches, expected)  # torch's workers number batches round-robin as ours do


def test_thread_mode_keeps_threads():
    import threading

    class WhereAmI(Identity):
        def __getitem__(self, i):
            info = get_worker_info()
            name = threading.current_thread().name
            return {"w": info.id, "n": info.num_workers, "how": info.worker_method, "same": info.dataset is self,
                    "thread": name, "pid": os.getpid()}

    ds = WhereAmI()
    seen_in_init = []
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=2, worker_mode="thread",
                               worker_init_fn=lambda wid: seen_in_init.append((wid, get_worker_info().id)))
    it = iter(loader)
    assert get_worker_info() is None  # the main thread is not a worker, while workers run
    batches = list(it)
    assert get_worker_info() is None
    assert sorted(seen_in_init) == [(0, 0), (1, 1)]
    rows = [dict(zip(b, values)) for b in batches for values in zip(*b.values())]
    assert {int(r["pid"]) for r in rows} == {os.getpid()}  # threads, not processes
    # Each thread answers for itself (which thread loads which batch is up to the scheduler; both threads'
    # answers were checked in worker_init_fn above).
    assert {int(r["w"]) for r in rows} <= {0, 1}
    for r in rows:
        assert r["thread"] == f"stoker_worker_{int(r['w'])}"
        assert int(r["n"]) == 2 and r["how"] == "thread" and bool(r["same"])
    # A worker process still gets its own (process-wide) answer after the per-thread one was installed.
    assert {int(w) for b in _loader(Identity()) for w in b["w"]} == {0, 1}


@pytest.mark.parametrize("batch_size", [None, 1, 5])
@pytest.mark.parametrize("in_order", [True, False])
def test_every_sample_once(batch_size, in_order):
    batches = list(_loader(batch_size=batch_size, shuffle=True, in_order=in_order, seed=3))
    seen = sorted(int(b["i"]) if batch_size is None else int(i) for b in batches
                  for i in ([b["i"]] if batch_size is None else b["i"]))
    assert seen == list(range(N))
    if in_order:
        reference = list(stoker.DataLoader(Identity(), batch_size=batch_size, shuffle=True, seed=3))
        assert [b["s"] for b in batches] == [b["s"] for b in reference]


def test_worker_info_and_seeds_follow_torch():
    class Info(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            info = get_worker_info()
            return torch.tensor([info.id, info.num_workers, info.seed, torch.initial_seed(), id(info.dataset) != 0])

    g = torch.Generator().manual_seed(0)
    base = int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(0)).item())
    rows = torch.cat(list(stoker.DataLoader(Info(), batch_size=2, num_workers=2, generator=g)))
    for wid, nw, seed, initial, _ in rows.tolist():
        assert nw == 2 and seed == base + wid and initial == seed


def test_random_augmentation_is_reproducible_and_differs_by_worker():
    def run():
        torch.manual_seed(7)
        return torch.cat(list(stoker.DataLoader(Randomised(), batch_size=4, num_workers=2)))

    a, b = run(), run()
    assert torch.equal(a, b)
    first, second = a[:4], a[4:8]  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(first, second)


def test_random_draws_in_workers_match_torchs_workers():
    # Each worker's random, numpy and torch generators are seeded as torch seeds its workers', so the same
    # augmentation draws the same values batch for batch.
    def run(loader_class):
        torch.manual_seed(3)
        return list(loader_class(Randomised(), batch_size=4, num_workers=2))

    assert_batches_equal(run(stoker.DataLoader), run(TorchDataLoader))


def test_seeding_torch_in_a_worker_is_torch_manual_seed():
    with torch.random.fork_rng():
        torch.manual_seed(123)
        expected = torch.rand(5)
        torch.manual_seed(0)
        _workers._seed_torch(123)
        assert torch.initial_seed() == 123
        assert torch.equal(torch.rand(5), expected)


class InitOrder(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return get_worker_info().id


def test_the_other_workers_start_while_the_first_is_still_in_worker_init_fn(tmp_path):
    # The first worker's worker_init_fn returns only once the second worker's has run: forking the second
    # only after the first has replied would never end (it waits 60 s at most, then fails the test).
    def init(worker_id):
        mark = tmp_path / "second-started"
        if worker_id == 1:
            mark.touch()
            return
        deadline = time.monotonic() + 60
        while not mark.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the second worker never started")
            time.sleep(0.01)

    loader = stoker.DataLoader(InitOrder(), batch_size=2, num_workers=2, worker_init_fn=init,
                               multiprocessing_context="fork")
    assert torch.cat(list(loader)).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_forked_workers_start_one_at_iter_and_the_others_once_it_is_set_up():
    it = iter(_loader(multiprocessing_context="fork"))
    assert [w.pid is not None for w in it._workers] == [True, False]  # the first, while tasks are made
    first = next(it)
    assert [int(w) for w in first["w"]] == [0] * 4
    second = next(it)  # the second worker's: forked once the first said it was set up
    assert all(w.pid is not None for w in it._workers)
    assert [int(w) for w in second["w"]] == [1] * 4
    it.close()


def test_workers_forked_after_the_first_serve_torchs_batches():
    # Four workers: the three forked once the first is set up get their tasks as torch's would.
    batches = list(_loader(Identity(64), num_workers=4, multiprocessing_context="fork"))
    assert_batches_equal(batches, list(TorchDataLoader(Identity(64), batch_size=4, num_workers=4)))


def test_an_iterator_that_cannot_begin_ends_the_worker_it_forked(monkeypatch):
    import multiprocessing
    from stoker import _iterators

    def refuse(*args, **kwargs):
        raise ValueError("no tasks today")

    before = {p.pid for p in multiprocessing.active_children()}
    monkeypatch.setattr(_iterators, "ProcessBatches", refuse)
    for persistent in (False, True):
        loader = _loader(multiprocessing_context="fork", persistent_workers=persistent)
        with pytest.raises(ValueError, match="no tasks today"):
            iter(loader)
        assert {p.pid for p in multiprocessing.active_children()} == before
        assert getattr(loader, "_stoker_pool", None) is None


def test_kept_batches_stay_intact_and_keeping_all_does_not_block():
    loader = _loader(batch_size=4, num_workers=2, shuffle=True, seed=1)
    kept = list(loader)  # more batches than the ring has slots
    snapshot = [b["x"].clone() for b in kept]
    for _ in range(3):
        for batch in loader:
            batch["x"].fill_(-1)  # scribble on every fresh batch
    for b, s in zip(kept, snapshot):
        assert torch.equal(b["x"], s)
    assert all(torch.equal(b["x"][:, 0].long(), b["i"]) for b in kept)


class PoolAllocations(Identity):
    """Identity, and how many blocks the loading process's buffer pool has allocated so far."""

    def __getitem__(self, i):
        import stoker._collate

        return {**super().__getitem__(i), "pool": stoker._collate.POOL.stats()["allocations"]}


def test_batches_without_a_slot_are_collated_into_shared_memory():
    ds = PoolAllocations()
    kept = list(_loader(ds))  # 12 batches kept: those past the ring's 6 slots have none
    pickled = [b for b in kept if b["x"].is_shared()]  # a batch over a slot is a view of the ring instead
    assert len(pickled) >= len(kept) - 6
    assert all(b["a"].is_shared() for b in pickled)
    # Stacked straight into shared memory, as torch's collate does in a worker: no block of the worker's pool.
    assert all(int(n) == 0 for b in kept for n in b["pool"])
    expected = list(TorchDataLoader(ds, batch_size=4, num_workers=2))
    for b in kept + expected:
        del b["pool"]  # torch's workers report the pool they inherited from this process
    assert_batches_equal(kept, expected)


def test_ring_slots_return_when_batches_are_freed():
    loader = _loader(persistent_workers=True)
    for batch in loader:
        pass
    del batch
    ring = loader._stoker_pool.ring
    assert ring.free_slots == ring.slots


def test_batches_larger_than_a_slot_travel_pickled(monkeypatch):
    monkeypatch.setattr(_workers, "_DEFAULT_SLOT_BYTES", 128)  # every batch is too large for its slot
    ds = Identity()
    assert_batches_equal(list(_loader(ds)), list(TorchDataLoader(ds, batch_size=4, num_workers=2)))


class SmallAndLarge(Dataset):
    """Sample i: a small tensor, a large one, the large one as a numpy array, and how many blocks the loading
    process's buffer pool has allocated so far."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        import stoker._collate

        return {"small": torch.full((2,), i), "large": torch.full((64,), float(i)),
                "array": np.full(48, i, dtype=np.int16), "pool": stoker._collate.POOL.stats()["allocations"]}


def test_tensors_too_large_for_the_slot_get_a_segment_of_their_own(monkeypatch):
    # The slot holds the batch's small tensor (4 x 2 int64) and not its large ones (4 x 64 float32, 4 x 48 int16).
    monkeypatch.setattr(_workers, "_DEFAULT_SLOT_BYTES", 256)
    ds = SmallAndLarge()
    batches = list(_loader(ds))
    for b in batches:
        assert not b["small"].is_shared()  # a view of the ring
        assert b["large"].is_shared() and b["array"].is_shared()  # collated into segments of their own
    assert all(int(n) == 0 for b in batches for n in b["pool"])  # nothing stacked into the pool, then copied
    expected = list(TorchDataLoader(ds, batch_size=4, num_workers=2))
    for b in batches + expected:
        del b["pool"]
    assert_batches_equal(batches, expected)


def _own_segments_mapped(pid: int) -> list[str]:
    """The shared-memory segments process `pid` made (torch names them /torch_<pid>_...) and still maps."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.split()[5] for line in f if f"/torch_{pid}_" in line]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/<pid>/maps")
@pytest.mark.parametrize("slot_bytes", [None, 256])
def test_workers_keep_no_segment_of_a_batch_they_sent(monkeypatch, slot_bytes):
    # Kept batches hold every slot, so later ones travel pickled; with 256-byte slots the large tensors of
    # every batch get segments of their own. Either way the segments are the main process's once sent.
    if slot_bytes is not None:
        monkeypatch.setattr(_workers, "_DEFAULT_SLOT_BYTES", slot_bytes)
    loader = _loader(SmallAndLarge(), batch_size=2, persistent_workers=True)  # 10 batches, 6 slots
    kept = list(loader)
    assert any(b["large"].is_shared() for b in kept)
    pids = loader._stoker_pool.pids()
    deadline = time.monotonic() + 10
    while any(_own_segments_mapped(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [_own_segments_mapped(pid) for pid in pids] == [[], []]
    loader._stoker_pool.shutdown()


def test_exception_in_a_worker_names_the_index_and_iteration_goes_on():
    it = iter(_loader(Failing(), batch_size=5))
    outcomes = []
    while True:
        try:
            outcomes.append(("ok", next(it)["i"].tolist()))
        except StopIteration:
            break
        except KeyError as exc:
            notes = "".join(getattr(exc, "__notes__", []))
            outcomes.append(("error", str(exc)))
            assert "DataLoader worker process" in notes and "dataset indices" in notes
    errors = [o for o in outcomes if o[0] == "error"]
    assert len(errors) == 5 and errors[0][1] == "'no sample 7'"
    served = sorted(i for kind, v in outcomes if kind == "ok" for i in v)
    assert served == [i for i in range(N) if i // 5 not in {1, 3, 5, 7, 9}]


def test_worker_init_fn_error_is_raised_in_the_main_process():
    def bad_init(worker_id):
        raise ValueError(f"init failed in {worker_id}")

    with pytest.raises(ValueError, match="init failed in"):
        list(_loader(worker_init_fn=bad_init, multiprocessing_context="fork"))


def test_killed_worker_raises_promptly():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid \d+\) is killed by signal: Killed"):
        list(_loader(Killer()))
    assert time.monotonic() - start < 10


def test_timeout_raises_like_torch():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="DataLoader timed out after 1 seconds"):
        list(_loader(Sleepy(), timeout=1))
    assert time.monotonic() - start < 2.9  # the worker still sleeping is not waited for


def _wait_gone(pids, seconds: float) -> None:
    """Waits up to `seconds` for the processes to end (they may be another process's children)."""
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pids):
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:  # a zombie still answers kill(0): read its state
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    continue
        except OSError:
            continue
        out.append(pid)
    return out


def test_break_and_del_stop_the_workers():
    it = iter(_loader())
    next(it), next(it)  # a batch of each worker: both are running
    pids = [w.pid for w in it._workers]
    assert len(_alive(pids)) == 2
    del it
    _wait_gone(pids, 10)
    assert not _alive(pids)


def test_persistent_workers_keep_their_dataset_copy():
    loader = stoker.DataLoader(Counting(), batch_size=4, num_workers=2, persistent_workers=True)
    first = torch.cat(list(loader))
    second = torch.cat(list(loader))
    assert set(first[:, 2].tolist()) == set(second[:, 2].tolist())  # the same two processes
    assert second[:, 1].max() > first[:, 1].max()  # their copies kept counting


def test_spawn_context_works():
    ds = Identity(12)
    batches = list(stoker.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn"))
    assert_batches_equal(batches, list(TorchDataLoader(ds, batch_size=4, num_workers=2)))


class FreezeCount(Dataset):
    """Sample i: i and how many objects the worker's collector holds frozen (gc.get_freeze_count())."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([i, gc.get_freeze_count()])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_forked_workers_start_with_the_parents_objects_frozen_and_the_parent_unfrozen(context):
    assert gc.get_freeze_count() == 0
    loader = stoker.DataLoader(FreezeCount(), batch_size=2, num_workers=2, multiprocessing_context=context)
    it = iter(loader)
    assert gc.get_freeze_count() == 0  # the workers have started: the parent's freeze is undone
    rows = torch.cat(list(it))
    assert sorted(rows[:, 0].tolist()) == list(range(8))
    if context == "fork":
        # The parent's objects sit in the worker's permanent generation: its collections never visit them.
        assert (rows[:, 1] > 0).all()
    else:
        assert (rows[:, 1] == 0).all()  # a spawned worker has nothing of the parent's
    assert gc.get_freeze_count() == 0


def test_a_users_own_freeze_is_left_alone():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        rows = torch.cat(list(stoker.DataLoader(FreezeCount(), batch_size=2, num_workers=2,
                                                multiprocessing_context="fork")))
        assert sorted(rows[:, 0].tolist()) == list(range(8))
        assert gc.get_freeze_count() >= frozen  # not unfrozen by the loader
    finally:
        gc.unfreeze()


def test_a_failed_start_unfreezes_the_parent(monkeypatch):
    import multiprocessing.process

    def refuse(self):
        raise OSError("no more processes")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    with pytest.raises(OSError, match="no more processes"):
        iter(stoker.DataLoader(FreezeCount(), batch_size=2, num_workers=2, multiprocessing_context="fork"))
    assert gc.get_freeze_count() == 0


def test_ring_file_is_gone_once_workers_attached():
    it = iter(_loader(persistent_workers=True))
    for _ in it:
        pass
    assert not os.path.exists(it._pool.ring_path)


def _run_script(body: str, timeout=60):
    code = textwrap.dedent(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_interpreter_exit_with_live_workers_is_prompt():
    start = time.monotonic()
    proc = _run_script("""
        import stoker
        from test_workers import Identity
        it = iter(stoker.DataLoader(Identity(), batch_size=4, num_workers=2))
        next(it), next(it)  # a batch of each worker: both are running
        print(" ".join(str(w.pid) for w in it._workers))
    """)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 30
    pids = [int(p) for p in proc.stdout.split()]
    _wait_gone(pids, 10)
    assert not _alive(pids)


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_orphaned_workers_exit(context):
    proc = _run_script(f"""
        import os, stoker
        from stoker import _workers
        from test_workers import Identity
        _workers.WorkerPool._unlink = lambda self: None  # as if killed before the ring's file could be removed
        it = iter(stoker.DataLoader(Identity(), batch_size=4, num_workers=2, persistent_workers=True,
                                    multiprocessing_context={context!r}))
        next(it), next(it)  # a batch of each worker: both are running
        print(" ".join(str(w.pid) for w in it._workers), flush=True)
        print(it._pool.ring_path, flush=True)
        os._exit(0)  # no clean-up at all: the workers must notice on their own
    """)
    pid_line, ring_path = proc.stdout.splitlines()
    pids = [int(p) for p in pid_line.split()]
    assert len(pids) == 2
    _wait_gone(pids, 15)
    assert not _alive(pids)
    assert not os.path.exists(ring_path)  # the orphans removed it


class Bulky(Dataset):
    """Samples whose batches travel pickled and fill a result pipe: one batch is several pipe buffers."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return ("%08d" % i) * 40_000  # 320 kB of string: collated into a list, pickled beside the ring


def test_workers_waiting_to_send_end_at_once_when_the_iterator_goes():
    it = iter(stoker.DataLoader(Bulky(), batch_size=2, num_workers=2, prefetch_factor=2))
    assert next(it) == ["%08d" % 0 * 40_000, "%08d" % 1 * 40_000]
    assert next(it) == ["%08d" % 2 * 40_000, "%08d" % 3 * 40_000]  # a batch of each worker: both run
    workers = list(it._workers)
    time.sleep(0.5)  # every worker has written what fits in its pipe and waits to write the rest
    del it
    gc.collect()
    for w in workers:
        w.join(timeout=5)
    # They ended on their own (the closed pipe), not by the terminate() that follows a grace period.
    assert [w.exitcode for w in workers] == [0, 0]


def test_orphaned_workers_waiting_to_send_exit():
    proc = _run_script("""
        import os, time, stoker
        from test_workers import Bulky
        it = iter(stoker.DataLoader(Bulky(), batch_size=2, num_workers=2))
        next(it), next(it)  # a batch of each worker: both are running
        time.sleep(0.5)  # the workers wait for room in their result pipes
        print(" ".join(str(w.pid) for w in it._workers), flush=True)
        os._exit(0)
    """)
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    _wait_gone(pids, 15)
    assert not _alive(pids)


class SlowFirstWorker(Identity):
    """Worker 0 is slow: in order, the other worker's batches wait for its."""

    def __getitem__(self, i):
        info = get_worker_info()
        if info is not None and info.id == 0:
            time.sleep(0.01)
        return super().__getitem__(i)


def test_batches_waiting_for_their_turn_keep_to_the_ring():
    # Batches received ahead of their turn count against the prefetch limit, as in torch's loader: a fast
    # worker cannot run ahead of a slow one by more than it allows, so a user who keeps no batch gets every
    # one in a slot of the ring (none falls back to a shared-memory segment of its own), in order.
    loader = stoker.DataLoader(SlowFirstWorker(), batch_size=2, num_workers=2, prefetch_factor=2)
    expected = iter(TorchDataLoader(SlowFirstWorker(), batch_size=2))
    seen = 0
    for batch in loader:
        assert not batch["x"].is_shared() and not batch["a"].is_shared(), f"batch {seen} is outside the ring"
        want = next(expected)
        for key in ("x", "a", "i", "s"):
            assert_same(batch[key], want[key], f"batch {seen}[{key!r}]")
        seen += 1
    assert seen == N // 2


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_idle_workers_of_other_start_methods_stay(context):
    # A forkserver worker's parent is the fork server, not the main process: idle for longer than its check
    # of the parent, it must not take itself for an orphan.
    loader = stoker.DataLoader(Identity(), batch_size=4, num_workers=2, multiprocessing_context=context,
                               persistent_workers=True)
    it = iter(loader)
    head = [next(it), next(it)]
    time.sleep(_workers._PARENT_CHECK_S * 2.5)
    assert all(w.is_alive() for w in it._workers)
    got = head + list(it)
    assert [b["i"].tolist() for b in got] == [list(range(k, k + 4)) for k in range(0, N, 4)]
    assert [b["i"].tolist() for b in loader] == [list(range(k, k + 4)) for k in range(0, N, 4)]  # a second epoch


def test_bad_worker_mode_raises():
    with pytest.raises(ValueError, match="worker_mode"):
        stoker.DataLoader(Identity(), worker_mode="fibers")


def test_array_datasets_stay_on_threads_in_auto_mode():
    loader = stoker.DataLoader(np.arange(20), batch_size=4, num_workers=2)
    it = iter(loader)
    assert type(it).__name__ == "ArrayIterator"
    assert [int(x) for b in it for x in b] == list(range(20))


class RandomCrop(Dataset):
    """An augmentation drawing from random, numpy and torch; with sample_seeds its output is a function of
    (seed, epoch, index) alone."""

    def __len__(self):
        return 30

    def __getitem__(self, i):
        return torch.tensor([i, random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64)


def _epochs(loader, count=2):
    return [torch.cat(list(loader)) for _ in range(count)]


@pytest.mark.parametrize("batch_size", [None, 4])
def test_sample_seeds_make_augmentation_independent_of_workers(batch_size):
    def make(nw, **kw):
        return stoker.DataLoader(RandomCrop(), batch_size=batch_size, shuffle=True, seed=5, num_workers=nw,
                                 sample_seeds=True, **kw)

    if batch_size is None:
        def cat(loader):
            return [torch.stack(list(loader)) for _ in range(2)]
    else:
        cat = _epochs
    reference = cat(make(0))
    for nw in (1, 2):
        got = cat(make(nw))
        assert all(torch.equal(a, b) for a, b in zip(got, reference))
    assert not torch.equal(reference[0][:, 1:].sort(0).values, reference[1][:, 1:].sort(0).values)  # epochs differ


def test_sample_seeds_survive_a_resume():
    def make(nw):
        return stoker.DataLoader(RandomCrop(), batch_size=4, shuffle=True, seed=9, num_workers=nw, sample_seeds=True)

    full = list(make(2))
    first = make(0)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = make(2)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(head + list(resumed), full))


def test_sample_seeds_refuse_threads():
    with pytest.raises(ValueError, match="sample_seeds"):
        iter(stoker.DataLoader(RandomCrop(), batch_size=4, num_workers=2, worker_mode="thread", sample_seeds=True))


# ---- a small /dev/shm (a container's default of 64 MiB) ------------------------------------------------------

_SMALL_SHM = r"""
import json, sys
import numpy as np
import torch
import stoker


class Rows(torch.utils.data.Dataset):  # 1 MiB samples
    def __len__(self):
        return 96

    def __getitem__(self, i):
        return np.full((256, 1024), i, np.float32)


out = {}
for name, cls in (("stoker", stoker.DataLoader), ("torch", torch.utils.data.DataLoader)):
    for batch in (4, 32):
        try:
            sums = [float(b[:, 0, 0].sum()) for b in cls(Rows(), batch_size=batch, num_workers=2)]
            out[f"{name}-{batch}"] = ["ok", sums]
        except Exception as exc:
            out[f"{name}-{batch}"] = [type(exc).__name__, str(exc)]
print("RESULT " + json.dumps(out))
"""


def test_a_small_dev_shm_fails_as_torch_does_never_by_sigbus():
    # The ring's file is sparse: a page written where /dev/shm is full would kill the worker with SIGBUS. Each
    # slot's pages are reserved before a batch is written there; a batch without room travels as shared-memory
    # segments, whose allocation then fails with torch's own clear error (torch's loader fails there alike).
    out = in_small_shm(_SMALL_SHM, 64)
    expected = [float(sum(range(i, i + 4))) for i in range(0, 96, 4)]
    # small batches fit (how much room is left to torch's segments depends on the machine: either may run short)
    for key in ("torch-4", "stoker-4", "torch-32"):  # torch's loader is a reference only: room varies by run
        assert out[key] == ["ok", expected] or "shared memory" in out[key][1] or "No space left" in out[key][1], out
    assert out["stoker-32"][0] == "RuntimeError", out["stoker-32"]
    assert "unable to allocate shared memory" in out["stoker-32"][1], out["stoker-32"]


class _NestedSamples(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.nested.nested_tensor([torch.full((2,), float(i)), torch.full((3,), float(i))])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_nested_tensor_from_a_worker_arrives_as_torchs_does():
    # The ring cannot describe it (its sizes are ragged): it travels pickled, never killing the worker.
    got = list(stoker.DataLoader(_NestedSamples(), batch_size=None, num_workers=2))
    expected = list(TorchDataLoader(_NestedSamples(), batch_size=None, num_workers=2))
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        assert a.is_nested and all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind()))


def _init_fails(worker_id):
    raise ValueError(f"worker_init_fn failed in worker {worker_id}")


def test_a_worker_init_fn_that_raises_in_worker_threads_raises_its_error_at_the_first_batch_as_torchs():
    it = iter(stoker.DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=_init_fails,
                                worker_mode="thread"))  # iter() itself succeeds, as torch's
    with pytest.raises(ValueError, match=r"worker_init_fn failed in worker \d"):
        next(it)
    with pytest.raises(StopIteration):  # the epoch has ended
        next(it)
    with pytest.raises(ValueError, match=r"worker_init_fn failed in worker \d"):
        next(iter(TorchDataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=_init_fails)))


def test_a_ring_left_behind_by_a_killed_process_of_the_same_pid_is_no_obstacle():
    # A process killed before it removed its ring leaves the file; a later process may get the same pid.
    from stoker import _workers

    nxt = next(_workers._counter)
    left = [os.path.join(_workers._ring_dir(), f"stoker-ring-{os.getpid()}-{k}") for k in range(nxt + 1, nxt + 4)]
    for path in left:
        open(path, "wb").close()
    try:
        batches = list(stoker.DataLoader(Identity(), batch_size=4, num_workers=2))
        assert sorted(int(i) for b in batches for i in b["i"]) == list(range(N))
    finally:
        for path in left:
            os.unlink(path)


class CollatesItsOwn(Dataset):
    """Builds each sample with stoker.default_collate, in the worker's serving thread or in threads of its own,
    and keeps what it built: every sample it made before must still hold its values (a tensor made in the
    ring slot of the batch being loaded would be overwritten once that slot is lent again)."""

    def __init__(self, threads: bool) -> None:
        self.threads, self.kept, self.pool = threads, {}, None

    def __len__(self):
        return 96

    def _build(self, i):
        return stoker.default_collate([torch.full((256,), float(i))] * 8)

    def __getitem__(self, i):
        if self.threads:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = self.pool or ThreadPoolExecutor(3)
            built = list(self.pool.map(self._build, [i] * 3))[0]
        else:
            built = self._build(i)
        self.kept[i] = built
        intact = all(bool((t == j).all()) for j, t in self.kept.items())
        return torch.tensor([float(built.sum()), float(intact)])


@pytest.mark.parametrize("threads", [False, True], ids=["serving_thread", "own_threads"])
def test_what_a_dataset_collates_itself_is_not_in_the_ring(threads):
    loader = stoker.DataLoader(CollatesItsOwn(threads), batch_size=4, num_workers=2, prefetch_factor=4)
    for _ in range(2):
        out = torch.cat(list(loader))
        assert out[:, 0].tolist() == [2048.0 * i for i in range(96)]
        assert out[:, 1].all(), "a tensor the dataset kept was overwritten"


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        info = get_worker_info()
        yield from (torch.full((1024,), float(i)) for i in range(info.id, 64, info.num_workers))


class _StatefulMap(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((1024,), float(i))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dataset", [_Stream, _StatefulMap], ids=["iterable", "stateful_map"])
def test_an_ended_epoch_lets_go_of_its_ring(dataset):
    # The workers' positions are followed for these datasets; once the epoch has ended nothing keeps its
    # workers' shared-memory ring mapped while the loader lives on (a kept validation loader, say).
    loader = stoker.DataLoader(dataset(), batch_size=4, num_workers=2)
    for batch in loader:
        pass
    del batch
    gc.collect()
    with open("/proc/self/maps") as f:
        assert "stoker-ring" not in f.read()
    assert loader.state_dict()["epoch"] == 1


def _ring_file_bytes() -> dict[str, int]:
    """Bytes of memory each stoker ring file this process holds open takes (its allocated blocks)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "stoker-ring" in target:
                out[target] = os.stat(f"/proc/self/fd/{fd}").st_blocks * 512
        except OSError:  # closed meanwhile (the listing's own descriptor among them)
            pass
    return out


class _Planes(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        return torch.full((64, 1024), float(i))  # 256 KiB: a batch of 16 is 4 MiB


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("persistent", [False, True], ids=["epoch_ends", "loader_dropped"])
def test_a_batch_kept_after_its_workers_end_holds_its_own_slot_not_the_ring(persistent):
    # Every slot of the ring was written during the epoch; once the workers are gone, the ring's other slots give
    # their memory back at once, and the kept batch's slot as it goes. The kept batch is intact.
    loader = stoker.DataLoader(_Planes(), batch_size=16, num_workers=2, persistent_workers=persistent)
    kept, during = None, 0
    for i, batch in enumerate(loader):
        during = max(during, sum(_ring_file_bytes().values()))
        if i == 3:
            kept = batch
    del batch
    if persistent:
        del loader
    gc.collect()
    batch_bytes = kept.numel() * kept.element_size()
    assert during >= 4 * batch_bytes  # the slots the epoch wrote
    after = _ring_file_bytes()
    assert len(after) == 1 and sum(after.values()) <= batch_bytes + (1 << 20), (during, after)
    assert torch.equal(kept, torch.arange(48.0, 64.0).view(16, 1, 1).expand(16, 64, 1024))
    del kept
    gc.collect()
    assert _ring_file_bytes() == {}


class _Slow(Dataset):
    def __init__(self) -> None:
        import threading

        self.calls, self.lock = 0, threading.Lock()

    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(0.2)
        with self.lock:
            self.calls += 1
        return i


def test_worker_threads_stop_a_batch_between_samples_once_its_iterator_closes():
    # Batches of 8 samples of 0.2 s: a thread in the middle of one when the iterator closes loads no more of it
    # than the sample it is in (before, it loaded the batch to its end: up to 1.6 s more, which the interpreter's
    # exit waited for).
    dataset = _Slow()
    it = iter(stoker.DataLoader(dataset, batch_size=8, num_workers=2, worker_mode="thread", prefetch_factor=1))
    next(it)
    next(it)  # ready with the first: batches 2 and 3 begin now, one in each thread
    time.sleep(0.3)
    it.close()
    at_close = dataset.calls
    time.sleep(1.0)
    assert dataset.calls <= at_close + 2, (at_close, dataset.calls)
    assert dataset.calls < 8 * 3


def test_a_loop_left_by_break_cancels_the_batches_its_worker_threads_had_queued():
    # 16 batches are queued (prefetch_factor 8, two threads); once the iterator a `break` left is freed, the
    # threads finish the batches they are loading and start no other (before, every queued batch was loaded,
    # and the interpreter's exit waited for them).
    dataset = _Slow()
    loader = stoker.DataLoader(dataset, batch_size=1, num_workers=2, worker_mode="thread", prefetch_factor=8)
    for _ in loader:
        break
    gc.collect()
    time.sleep(2.0)  # long enough for 10 more batches, were they still loaded
    assert dataset.calls <= 7, dataset.calls
