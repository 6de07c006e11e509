"""The device stage (device= on stoker.DataLoader) without a GPU: stoker's real stream, events and copies run
against the fake driver (tests/fake_libcuda.c, whose "device memory" is host memory, whose copies read their
source only when their stream runs, as a GPU's do, and whose events complete some queries after they are
recorded); only torch's side (its caching allocator, current stream and record_stream) is stood in for by CPU
tensors. What is checked: batches equal the CPU loader's value by value,
non-tensor members stay as they are, one copy per tensor and one stream wait per batch received, host buffers
held until their copy's event has completed, page-locked collation, the position that state_dict reports
(the batches received, not those staged), errors at their turn, and the transform.

tests/cuda/test_device_gpu.py runs the same stage on a real GPU.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

import stoker
from fake_cuda import run

# A CPU stand-in for torch's side of a CUDA device; stoker's stream and events are the fake driver's.
STAGE = """
import contextlib
from stoker import _device

class FakeTarget(_device.CudaTarget):
    used = []
    made = []  # every destination, kept: the fake's copies write them later, when their stream runs
    def __init__(self, device):
        self.device = torch.device("cpu")
        self.stream = core.CudaStream(device.index)
    def side(self):
        return contextlib.nullcontext()
    def empty(self, src):
        if src.dtype == torch.bool:
            dst = torch.empty(src.shape, dtype=src.dtype)
        else:
            dst = torch.full(src.shape, 7, dtype=src.dtype)
        FakeTarget.made.append(dst)
        return dst
    def consumer(self):
        return "consumer"
    @staticmethod
    def handle(consumer):
        return 0
    @staticmethod
    def used_by(tensor, consumer):
        FakeTarget.used.append(consumer)

_device.CudaTarget = FakeTarget
_cuda.resolve_device = lambda device: None if device in (None, "cpu") else torch.device("cuda", 0)
torch.cuda.current_device = lambda: 0

def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b

def epochs(loader, n):
    return [list(loader) for _ in range(n)]

def pin_as_torch_would_on_a_gpu():
    # pin_memory=True as on a machine where torch sees a GPU: stoker collates into its page-locked pool (the
    # fake's), and torch's pin_memory returns already pinned tensors as they are.
    from stoker import _iterators
    torch.cuda.is_available = lambda: True
    _iterators._pin_requested = lambda loader: bool(loader.pin_memory)
    _iterators._pin_memory = lambda batch: batch

def stream_runs():
    # What a torch op queued on stoker's stream would see: the copies queued before it done (the stand-in
    # reads destinations on the host at once, so it runs the stream first).
    _device.target_for(torch.device("cuda", 0)).stream.record().synchronize()
"""


def stage(code: str, fake_driver, **env) -> dict:
    return run(STAGE + textwrap.dedent(code), library=fake_driver["current"], package=True, **env)


def test_batches_equal_the_cpu_loaders_for_every_dataset_kind(fake_driver):
    out = stage("""
        class Py(torch.utils.data.Dataset):
            def __len__(self): return 23
            def __getitem__(self, i):
                return {"x": torch.full((3,), float(i)), "name": f"s{i}", "n": i, "img": np.full((2, 2), i, np.uint8)}

        class It(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(torch.arange(17.0).reshape(17, 1))

        tensors = torch.utils.data.TensorDataset(torch.randn(50, 4), torch.arange(50))
        results = {}
        for name, ds, kw in [("array", tensors, dict(batch_size=8, shuffle=True, seed=3)),
                             ("array_nw2", tensors, dict(batch_size=8, shuffle=True, seed=3, num_workers=2)),
                             ("python", Py(), dict(batch_size=4, shuffle=True, seed=5)),
                             ("python_processes", Py(), dict(batch_size=4, shuffle=True, seed=5, num_workers=2)),
                             ("iterable", It(), dict(batch_size=5)),
                             ("unbatched", Py(), dict(batch_size=None))]:
            cpu = epochs(stoker.DataLoader(ds, **kw), 3)
            dev_loader = stoker.DataLoader(ds, device="cuda", **kw)
            dev = epochs(dev_loader, 3)
            results[name] = same(cpu, dev) and (name == "iterable" or len(dev[0]) == len(dev_loader))
        out["same"] = results
        out["names_stay"] = dev[0][0]["name"] == "s0" and dev[0][0]["n"] == 0
        out["counts"] = {k: count(k) for k in ("bad_context", "bad_handle")}
    """, fake_driver)
    assert out["same"] == {k: True for k in out["same"]}
    assert out["names_stay"] is True
    assert out["counts"] == {"bad_context": 0, "bad_handle": 0}


def test_one_copy_per_tensor_one_wait_per_batch_and_pinned_collation(fake_driver):
    out = stage("""
        ds = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.arange(40))
        loader = stoker.DataLoader(ds, batch_size=10, device="cuda", device_prefetch=3)
        copies, waits = count("copy"), count("wait")
        batches = list(loader)
        out["copies"] = count("copy") - copies
        out["waits"] = count("wait") - waits
        out["used"] = len(FakeTarget.used)
        out["pool_pinned"] = _cuda.pinned_pool(0).pinned
        out["pinned_blocks"] = count("host_alloc")
        list(loader); list(loader)
        out["pinned_blocks_later"] = count("host_alloc")
    """, fake_driver)
    assert out["copies"] == 8 and out["waits"] == 4 and out["used"] == 8
    assert out["pool_pinned"] is True and out["pinned_blocks"] > 0
    assert out["pinned_blocks_later"] == out["pinned_blocks"]  # blocks reused: no page-lock call per batch


def test_host_buffers_are_held_until_their_copy_is_done(fake_driver):
    out = stage("""
        from stoker._device import DeviceIterator
        ds = torch.utils.data.TensorDataset(torch.arange(400.0).reshape(200, 2))
        it = iter(stoker.DataLoader(ds, batch_size=5, device="cuda", device_prefetch=2))
        held = []
        for batch in it:
            held.append(len(it._held))  # batches whose host buffers the stage still holds
        out["held"] = held
        out["after_end"] = len(it._held)
        it2 = iter(stoker.DataLoader(ds, batch_size=5, device="cuda", device_prefetch=4))
        next(it2)
        out["held_before_close"] = len(it2._held)
        it2.close()
        out["held_after_close"] = len(it2._held)
    """, fake_driver, STOKER_FAKE_CUDA_LAG="8")
    # With depth 2 the stage has 3 batches copied when the first is handed over; the fake's events complete
    # only after 8 queries or 8 later records, so none has then, and buffers are held until theirs has; after
    # that they are let go as their events complete (the count settles instead of growing with the epoch).
    held = out["held"]
    assert len(held) == 40 and held[0] == 3 and max(held) <= 3 + 8
    assert held[-1] == held[20] < 20
    assert out["after_end"] == 0
    assert out["held_before_close"] == 5 and out["held_after_close"] == 0


def test_state_counts_the_batches_received_not_those_staged(fake_driver):
    out = stage("""
        ds = torch.utils.data.TensorDataset(torch.arange(100.0))
        kw = dict(batch_size=7, shuffle=True, seed=11)
        full = [b[0].tolist() for b in stoker.DataLoader(ds, **kw)]
        cases = {}
        for k in (0, 1, 5, 14, 15):
            loader = stoker.DataLoader(ds, device="cuda", device_prefetch=3, **kw)
            it = iter(loader)
            got = [next(it)[0].tolist() for _ in range(k)]
            state = loader.state_dict()
            del it  # abandoned with batches staged: the position stays the user's
            later = loader.state_dict()
            fresh = stoker.DataLoader(ds, device="cuda", **kw)
            fresh.load_state_dict(state)
            rest = [b[0].tolist() for b in fresh]
            cases[k] = [state["batches_served"], later["batches_served"], got + rest == full]
        out["cases"] = cases

        class Counting(torch.utils.data.IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                wid, n = (0, 1) if info is None else (info.id, info.num_workers)
                return iter(torch.arange(wid, 40, n, dtype=torch.float32))
        it_cases = {}
        for nw in (0, 2):
            kw = dict(batch_size=3, num_workers=nw)
            full = [b.tolist() for b in stoker.DataLoader(Counting(), **kw)]
            loader = stoker.DataLoader(Counting(), device="cuda", device_prefetch=2, **kw)
            it = iter(loader)
            got = [next(it).tolist() for _ in range(4)]
            state = loader.state_dict()
            del it
            fresh = stoker.DataLoader(Counting(), device="cuda", **kw)
            fresh.load_state_dict(state)
            it_cases[nw] = [state["batches_served"], got + [b.tolist() for b in fresh] == full]
        out["iterable"] = it_cases
    """, fake_driver)
    for k, (served, later, exact) in out["cases"].items():
        assert served == later == int(k) and exact, (k, served, later, exact)
    assert out["iterable"] == {"0": [4, True], "2": [4, True]}


def test_close_from_another_thread_ends_the_loop_and_leaves_the_epoch_where_it_was(fake_driver):
    out = stage("""
        import threading, time

        class Slow(torch.utils.data.Dataset):
            def __len__(self): return 40
            def __getitem__(self, i):
                time.sleep(0.02)
                return torch.tensor([i])

        cases = {}
        for mode in ("process", "thread"):
            loader = stoker.DataLoader(Slow(), batch_size=4, num_workers=2, worker_mode=mode, device="cuda")
            it = iter(loader)
            got = [next(it).flatten().tolist()]
            errors = []

            def consume():
                try:
                    for b in it:
                        got.append(b.flatten().tolist())
                except BaseException as exc:
                    errors.append(repr(exc))

            t = threading.Thread(target=consume)
            t.start()
            time.sleep(0.1)
            it.close()
            closed = it._closed
            t.join(30)
            state = loader.state_dict()
            cases[mode] = [closed, t.is_alive(), errors, state["epoch"], state["batches_served"] == len(got),
                           len(got) < 10]
        out["cases"] = cases
    """, fake_driver)
    assert out["cases"] == {m: [True, False, [], 0, True, True] for m in ("process", "thread")}


def test_errors_arrive_at_their_turn_and_iteration_goes_on(fake_driver):
    out = stage("""
        class Bad(torch.utils.data.Dataset):
            def __len__(self): return 12
            def __getitem__(self, i):
                if i == 5:
                    raise KeyError(f"sample {i} is missing")
                return torch.tensor([i])
        seen = []
        it = iter(stoker.DataLoader(Bad(), batch_size=3, device="cuda"))
        while True:
            try:
                seen.append(next(it).flatten().tolist())
            except StopIteration:
                break
            except KeyError as exc:
                seen.append(["error", str(exc)])
        out["seen"] = seen
    """, fake_driver)
    assert out["seen"] == [[0, 1, 2], ["error", "'sample 5 is missing'"], [6, 7, 8], [9, 10, 11]]


def test_the_transform_runs_on_the_staged_batch(fake_driver):
    out = stage("""
        ds = torch.utils.data.TensorDataset(torch.arange(12, dtype=torch.uint8).reshape(6, 2))
        seen = []
        def transform(batch):
            seen.append(batch[0].device.type)
            stream_runs()
            return [batch[0].float() / 2]
        loader = stoker.DataLoader(ds, batch_size=4, device="cuda", device_transform=transform)
        out["batches"] = [b[0].tolist() for b in loader]
        out["dtype"] = str(next(iter(loader))[0].dtype)
        out["calls"] = len(seen)
    """, fake_driver)
    assert out["batches"] == [[[0, 0.5], [1, 1.5], [2, 2.5], [3, 3.5]], [[4, 4.5], [5, 5.5]]]
    assert out["dtype"] == "torch.float32" and out["calls"] >= 2


def test_tensors_a_transform_returns_in_a_dataclass_are_marked_as_used_by_the_consumer(fake_driver):
    # Made on stoker's stream, they must be marked as used by the consumer's (record_stream), or their memory
    # could go to the next batch's copy while the user's kernels still read them.
    out = stage("""
        import dataclasses

        @dataclasses.dataclass
        class Pair:
            x: torch.Tensor
            half: torch.Tensor
            name: str = "pair"

        ds = torch.utils.data.TensorDataset(torch.arange(12.0).reshape(6, 2))
        def transform(batch):
            stream_runs()
            return Pair(batch[0], batch[0] / 2)
        loader = stoker.DataLoader(ds, batch_size=2, device="cuda", device_transform=transform)
        got = list(loader)
        out["halves"] = [p.half.tolist() for p in got]
        out["used"] = len(FakeTarget.used)
    """, fake_driver)
    assert out["halves"] == [[[0, 0.5], [1, 1.5]], [[2, 2.5], [3, 3.5]], [[4, 4.5], [5, 5.5]]]
    assert out["used"] == 3 * 2  # both tensors of each of the three batches


def test_a_device_without_an_index_follows_torchs_current_device_at_each_iterator(monkeypatch):
    from stoker import _cuda

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # e.g. torch.cuda.set_device(local_rank)
    built = torch.device("cuda", 0)  # what resolve_device answered when the loader was built
    assert _cuda.current_target(built, "cuda") == torch.device("cuda", 1)
    assert _cuda.current_target(built, torch.device("cuda")) == torch.device("cuda", 1)
    assert _cuda.current_target(built, "cuda:0") == built
    assert _cuda.current_target(None, None) is None and _cuda.current_target(None, "cpu") is None


def test_device_arguments_are_checked():
    ds = torch.utils.data.TensorDataset(torch.arange(4.0))
    with pytest.raises(ValueError, match="device_prefetch"):
        stoker.DataLoader(ds, device="cpu", device_prefetch=0)
    with pytest.raises(TypeError, match="device_transform should be a callable"):
        stoker.DataLoader(ds, device="cpu", device_transform=3)
    with pytest.raises(ValueError, match="device_transform runs on the device"):
        stoker.DataLoader(ds, device_transform=lambda b: b)
    loader = stoker.DataLoader(ds, batch_size=2, device="cpu")
    assert [b[0].tolist() for b in loader] == [[0.0, 1.0], [2.0, 3.0]]
    assert loader.device == "cpu" and loader.device_prefetch == 2


def test_packed_batches_on_the_device_equal_the_cpu_ones_and_resume_exactly(fake_driver):
    out = stage("""
        rng = np.random.default_rng(0)
        docs = stoker.TokenDataset([rng.integers(1, 1000, int(n)) for n in rng.integers(5, 90, 60)])
        kw = dict(seq_len=64, batch_size=3, seed=2, window=8)
        cpu = [list(stoker.PackedLoader(docs, **kw)) for _ in range(1)][0]
        loader = stoker.PackedLoader(docs, device="cuda", device_prefetch=2, **kw)
        dev = list(loader)
        out["same"] = same(cpu, dev)
        out["aliased"] = all(b["cu_seq_lens_q"] is b["cu_seqlens"] is b["cu_seq_lens_k"] for b in dev)
        out["ints"] = all(type(b["max_length_q"]) is int for b in dev)
        loader = stoker.PackedLoader(docs, device="cuda", device_prefetch=3, **kw)
        it = iter(loader)
        got = [next(it) for _ in range(2)]
        state = loader.state_dict()
        del it
        fresh = stoker.PackedLoader(docs, device="cuda", **kw)
        fresh.load_state_dict(state)
        out["served"] = state["batches_served"]
        out["resumed"] = same(cpu, got + list(fresh))
    """, fake_driver)
    assert out == {"same": True, "aliased": True, "ints": True, "served": 2, "resumed": True}


def test_one_stream_for_the_process_and_a_failing_transform_raises_at_its_turn(fake_driver):
    out = stage("""
        ds = torch.utils.data.TensorDataset(torch.arange(10.0))
        calls = []
        def transform(batch):
            calls.append(1)
            if len(calls) == 2:
                raise ValueError("bad batch")
            return batch
        loader = stoker.DataLoader(ds, batch_size=2, device="cuda", device_transform=transform)
        before = count("stream_create")
        seen = []
        it = iter(loader)
        while True:
            try:
                seen.append(next(it)[0].tolist())
            except StopIteration:
                break
            except ValueError as exc:
                seen.append(str(exc))
                out["state_at_error"] = loader.state_dict()["batches_served"]
        out["seen"] = seen
        for _ in range(3):
            list(loader)
        list(stoker.DataLoader(ds, batch_size=3, device="cuda"))  # another loader: the same stream
        del loader
        gc.collect()
        out["streams"] = count("stream_create") - before
        out["destroyed"] = count("stream_destroy")
    """, fake_driver)
    assert out["seen"] == [[0.0, 1.0], "bad batch", [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    assert out["state_at_error"] == 2  # the failed batch's turn is taken, as with a loading error
    assert out["streams"] == 1 and out["destroyed"] == 0  # kept: torch's allocator files memory under it


@pytest.mark.parametrize("lag", ["1", "4"])
def test_a_consumer_that_keeps_batches_and_sleeps_at_random_never_sees_a_wrong_value(fake_driver, lag):
    # The fake's copies read their host buffers only when their event completes (after `lag` queries) or the
    # consumer's stream waits: a host buffer handed back to the pool early would be refilled with a later
    # batch by the loader's threads (or workers) first, and the batch would arrive with its bytes.
    out = stage("""
        import random, time
        rng = random.Random(5)

        class Py(torch.utils.data.Dataset):
            def __len__(self): return 90
            def __getitem__(self, i):
                return {"x": torch.full((64,), float(i)), "id": torch.tensor(i)}

        rows = torch.arange(300.0).repeat_interleave(256).reshape(300, 256)
        tensors = torch.utils.data.TensorDataset(rows, torch.arange(300))
        docs = stoker.TokenDataset([np.arange(i, i + 50 + (i * 37) % 400) for i in range(400)])
        cases = {
            "array": (tensors, dict(batch_size=16, shuffle=True, seed=1), stoker.DataLoader),
            "array_threads": (tensors, dict(batch_size=16, shuffle=True, seed=1, num_workers=2), stoker.DataLoader),
            "python": (Py(), dict(batch_size=6, shuffle=True, seed=2), stoker.DataLoader),
            "processes": (Py(), dict(batch_size=6, shuffle=True, seed=2, num_workers=2), stoker.DataLoader),
            "packed": (docs, dict(seq_len=2048, batch_size=8, seed=3, window=16), stoker.PackedLoader),  # helper on
        }
        results = {}
        for name, (ds, kw, cls) in cases.items():
            cpu = cls(ds, **kw)
            expected = [b for _ in range(3) for b in cpu]
            loader = cls(ds, device="cuda", device_prefetch=3, **kw)
            got, kept, wrong = [], [], 0
            for epoch in range(3):
                for batch in loader:
                    if not same(expected[len(got)], batch):
                        wrong += 1
                    got.append(len(got))
                    if rng.random() < 0.3:
                        kept.append((len(got) - 1, batch))
                    if len(kept) > 6:
                        kept.pop(rng.randrange(len(kept)))
                    if rng.random() < 0.2:
                        time.sleep(rng.random() * 0.003)
            later = sum(not same(expected[i], b) for i, b in kept)
            results[name] = [len(got) == len(expected), wrong, later]
        out["results"] = results
        out["counts"] = {k: count(k) for k in ("freed_in_flight", "bad_context", "bad_handle")}
    """, fake_driver, STOKER_FAKE_CUDA_LAG=lag)
    assert out["results"] == {k: [True, 0, 0] for k in out["results"]}
    assert out["counts"] == {"freed_in_flight": 0, "bad_context": 0, "bad_handle": 0}


@pytest.mark.parametrize("pattern", ["copy_and_drop", "kept_ahead", "listed", "detached_ahead", "numpy_alias"])
def test_pinned_batches_dropped_after_a_non_blocking_copy_are_not_refilled_before_it_runs(fake_driver, pattern):
    # pin_memory=True without device=: the user copies each batch on their current stream and drops it. The
    # fake's copies read the host memory only when that stream runs (here: when the test synchronises it at the
    # end, or an event on it completes), so memory handed back to the pool at the drop would be refilled with
    # later batches first. torch does not track copies from memory it did not allocate; stoker's fence does.
    out = stage("""
        import collections
        user = core.CudaStream(0)  # the user's current stream
        _device.current_stream_handle = lambda device: user.handle
        pin_as_torch_would_on_a_gpu()

        def copy(x, dsts):  # x.cuda(non_blocking=True), "device" memory being host memory
            dst = torch.full(x.shape, -1, dtype=x.dtype)
            user.copy_to_device(dst.data_ptr(), x.data_ptr(), x.numel() * x.element_size())
            dsts.append(dst)

        class Py(torch.utils.data.Dataset):
            def __len__(self): return 80
            def __getitem__(self, i):
                return torch.full((256,), float(i)), i

        rows = torch.arange(200.0).repeat_interleave(512).reshape(200, 512)
        tensors = torch.utils.data.TensorDataset(rows, torch.arange(200))
        cases = {
            "array": (tensors, dict(batch_size=10, shuffle=True, seed=1)),
            "array_threads": (tensors, dict(batch_size=10, shuffle=True, seed=1, num_workers=2)),
            "python": (Py(), dict(batch_size=8, shuffle=True, seed=2)),
            "processes": (Py(), dict(batch_size=8, shuffle=True, seed=2, num_workers=2)),
        }
        pattern = PATTERN
        results = {}
        for name, (ds, kw) in cases.items():
            cpu = stoker.DataLoader(ds, **kw)
            expected = [t.clone() for _ in range(2) for b in cpu for t in b]
            loader = stoker.DataLoader(ds, pin_memory=True, **kw)
            dsts = []
            for _ in range(2):
                if pattern == "copy_and_drop":
                    for x, y in loader:
                        copy(x, dsts)
                        copy(y, dsts)
                        del x, y
                elif pattern == "kept_ahead":  # a prefetching wrapper: four batches taken ahead of use
                    it, ahead = iter(loader), collections.deque()
                    for b in it:
                        ahead.append(b)
                        if len(ahead) > 4:
                            for t in ahead.popleft():
                                copy(t, dsts)
                        del b
                    while ahead:
                        for t in ahead.popleft():
                            copy(t, dsts)
                elif pattern == "detached_ahead":  # one batch ahead, kept as aliases that are not views
                    held = None
                    for b in loader:
                        if held is not None:
                            for t in held:
                                copy(t, dsts)
                        held = [t.detach() for t in b]
                        del b
                    for t in held:
                        copy(t, dsts)
                    del held
                elif pattern == "numpy_alias":  # through numpy and back: a new tensor over the same memory
                    for b in loader:
                        alias = [torch.from_numpy(t.numpy()) for t in b]
                        del b
                        for t in alias:
                            copy(t, dsts)
                        del alias
                else:
                    batches = list(loader)
                    for b in batches:
                        for t in b:
                            copy(t, dsts)
                    del batches, b
                gc.collect()
            user.record().synchronize()
            results[name] = [len(dsts) == len(expected),
                             sum(not torch.equal(d, e) for d, e in zip(dsts, expected))]
        # Everything released comes back once the GPU has passed: the pool lends nothing after the fences.
        del loader, cpu
        gc.collect()
        for _ in range(1000):  # each event completes after its LAG "not ready" answers, oldest first
            _device.stamp()
            if _device._fences.parked == 0:
                break
        out["outstanding"] = _cuda.pinned_pool(0).stats()["outstanding"]
        out["parked"] = _device._fences.parked
        out["results"] = results
        out["counts"] = {k: count(k) for k in ("freed_in_flight", "bad_context", "bad_handle")}
    """.replace("PATTERN", repr(pattern)), fake_driver, STOKER_FAKE_CUDA_LAG="3")
    assert out["results"] == {k: [True, 0] for k in out["results"]}
    assert out["counts"] == {"freed_in_flight": 0, "bad_context": 0, "bad_handle": 0}
    assert out["outstanding"] == 0 and out["parked"] == 0


def test_a_pinned_tensor_named_twice_in_a_batch_is_served_and_fenced(fake_driver):
    out = stage("""
        pin_as_torch_would_on_a_gpu()
        _device.current_stream_handle = lambda device: 0

        def collate(samples):
            b = stoker.default_collate(samples)
            return {"input_ids": b, "labels": b}  # the same tensor twice, as a causal LM's collate does
        ds = [torch.tensor([i, i + 1]) for i in range(20)]
        loader = stoker.DataLoader(ds, batch_size=4, pin_memory=True, collate_fn=collate)
        batches = [b for _ in range(2) for b in loader]
        out["same"] = all(b["input_ids"] is b["labels"] for b in batches)
        out["values"] = batches[1]["labels"].tolist()
    """, fake_driver)
    assert out == {"same": True, "values": [[4, 5], [5, 6], [6, 7], [7, 8]]}


def test_a_worker_ring_that_cannot_be_page_locked_warns_once_and_loads_as_usual(fake_driver):
    out = stage("""
        import warnings
        class Py(torch.utils.data.Dataset):
            def __len__(self): return 40
            def __getitem__(self, i):
                return torch.full((16,), float(i))
        kw = dict(batch_size=8, shuffle=True, seed=2, num_workers=2, persistent_workers=True)
        cpu = stoker.DataLoader(Py(), **kw)
        expected = [b.clone() for _ in range(2) for b in cpu]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = stoker.DataLoader(Py(), device="cuda", **kw)
            got = [b for _ in range(2) for b in loader]
        out["same"] = len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
        out["warnings"] = [str(w.message) for w in caught if "page-lock" in str(w.message)]
        out["registered"] = count("register")
    """, fake_driver, mode="noregister")
    assert out["same"] is True and out["registered"] == 0
    assert len(out["warnings"]) == 1 and "could not page-lock its worker ring" in out["warnings"][0]
    assert "CUDA_ERROR_OUT_OF_MEMORY" in out["warnings"][0]


def test_pinned_batches_copied_to_another_gpu_are_fenced_there_too(fake_driver):
    # pinned on GPU 0 (torch's current device when the loader started), copied to GPU 1 (x.to(1), as a DDP
    # script without set_device does): the fence covers every GPU the process has work on.
    out = stage("""
        users = {0: core.CudaStream(0)}  # torch's current stream of each GPU in use
        _device.current_stream_handle = lambda device: users[device].handle
        pin_as_torch_would_on_a_gpu()
        rows = torch.arange(200.0).repeat_interleave(512).reshape(200, 512)
        ds = torch.utils.data.TensorDataset(rows)
        kw = dict(batch_size=10, shuffle=True, seed=1, num_workers=2)
        cpu = stoker.DataLoader(ds, **kw)
        expected = [b[0].clone() for _ in range(2) for b in cpu]
        loader = stoker.DataLoader(ds, pin_memory=True, **kw)
        dsts = []
        for _ in range(2):
            for i, (x,) in enumerate(loader):
                if 1 not in users:  # GPU 1 first used in the middle of the first epoch
                    users[1] = core.CudaStream(1)
                dst = torch.full(x.shape, -1.0)
                users[1].copy_to_device(dst.data_ptr(), x.data_ptr(), x.numel() * 4)
                dsts.append(dst)
                del x
        users[1].record().synchronize()
        out["active"] = list(core.cuda_active_devices())
        out["wrong"] = sum(not torch.equal(d, e) for d, e in zip(dsts, expected))
        out["count"] = len(dsts) == len(expected)
    """, fake_driver, mode="two", STOKER_FAKE_CUDA_LAG="3")
    assert out == {"active": [0, 1], "wrong": 0, "count": True}


def test_worker_batches_of_growing_size_are_copied_from_page_locked_slots(fake_driver):
    # Each slot of the worker ring is page-locked as far as its batches reach, registered anew (larger) when a
    # later batch reaches further: every copy still reads page-locked memory (the fake counts copies from
    # pageable memory), none reads a range while it is registered anew, and each slot locks only what it uses.
    out = stage("""
        class Grow(torch.utils.data.Dataset):
            def __len__(self): return 96
            def __getitem__(self, i):
                return torch.full((1000 + 2000 * i,), float(i))  # 4 KiB to 770 KiB

        pad = lambda batch: torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
        kw = dict(batch_size=4, num_workers=2, collate_fn=pad, persistent_workers=True)
        cpu = epochs(stoker.DataLoader(Grow(), **kw), 2)
        loader = stoker.DataLoader(Grow(), device="cuda", device_prefetch=3, **kw)
        dev = epochs(loader, 2)
        ring = loader._stoker_pool.ring
        out["same"] = same(cpu, dev)
        out["ring"] = [ring.pinned, ring.pin_error, ring.pinned_bytes, ring.slots * ring.slot_bytes]
        out["largest_batch"] = max(b.numel() * 4 for b in dev[0])
        out["counts"] = {k: count(k) for k in ("pageable", "freed_in_flight", "register", "unregister",
                                                "bad_context")}
    """, fake_driver)
    assert out["same"] is True
    pinned, error, pinned_bytes, ring_bytes = out["ring"]
    assert pinned is True and error == ""
    c = out["counts"]
    assert c["pageable"] == 0 and c["freed_in_flight"] == 0 and c["bad_context"] == 0
    # The sizes grew batch after batch: slots were registered anew, each time in a larger class.
    assert c["register"] > c["unregister"] > 0
    # Each slot locks at most its largest batch's class (1/8 over it), far from the ring's 32 MiB slots.
    slots = ring_bytes // (32 << 20)
    assert pinned_bytes <= slots * out["largest_batch"] * 9 // 8 < ring_bytes // 8


def test_the_stage_and_pinned_batches_work_while_a_cuda_graph_is_captured(fake_driver):
    # A graph captured in the global mode all along (the fake refuses every memory, stream and event call on a
    # thread whose capture mode is not relaxed): the stage's copies, events and waits, the pool's page-locking
    # on the loader's threads, the ring's on the main thread, and the fences of pinned batches all go on.
    out = stage("""
        class Py(torch.utils.data.Dataset):
            def __len__(self): return 40
            def __getitem__(self, i):
                return torch.full((16 + i,), float(i))
        tensors = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.arange(64))
        pad = lambda batch: torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
        results = {}
        for name, ds, kw in [("array_threads", tensors, dict(batch_size=8, num_workers=2)),
                             ("processes", Py(), dict(batch_size=4, num_workers=2, collate_fn=pad))]:
            cpu = epochs(stoker.DataLoader(ds, **kw), 2)
            results[name] = same(cpu, epochs(stoker.DataLoader(ds, device="cuda", **kw), 2))
        pin_as_torch_would_on_a_gpu()
        _device.current_stream_handle = lambda device: 0
        pinned = epochs(stoker.DataLoader(tensors, batch_size=8, num_workers=2, pin_memory=True), 2)
        results["pinned"] = same(epochs(stoker.DataLoader(tensors, batch_size=8, num_workers=2), 2), pinned)
        out["same"] = results
        out["counts"] = {k: count(k) for k in ("capture_refused", "copy", "bad_context")}
    """, fake_driver, mode="capture")
    assert out["same"] == {"array_threads": True, "processes": True, "pinned": True}
    assert out["counts"]["capture_refused"] == 0 and out["counts"]["copy"] > 0
    assert out["counts"]["bad_context"] == 0
