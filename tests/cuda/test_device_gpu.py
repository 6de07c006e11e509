"""device= on a real GPU (skipped without one): batches on the device equal the CPU batches bit for bit over
several epochs; a consumer that launches work on each batch at once, keeps some batches while sleeping at
random and frees others never sees a wrong value; pin_memory=True batches are pinned where they are collated;
Normalize on the GPU equals the CPU reference; 100 loaders leave no page-locked memory or device memory behind;
pin_memory=True batches dropped right after a non-blocking copy arrive intact while the GPU lags behind; loaders
gone and torch's cache emptied with expandable segments.

Run where a GPU is lent: `PYTHONPATH=python python -m pytest tests/cuda -q`.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import time
import warnings
import weakref

import numpy as np
import pytest
import torch
from helpers import ring_pin_refused

import stoker
from stoker import _cuda, _normalize
from stoker._native import core

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch")


class Indexed(torch.utils.data.Dataset):
    """Sample i: a float32 [64, 64] filled with i and a uint8 image of i % 251; a Python dataset."""

    def __len__(self):
        return 512

    def __getitem__(self, i):
        return {"x": np.full((64, 64), i, np.float32), "img": np.full((3, 8, 8), i % 251, np.uint8), "i": i,
                "name": f"s{i}"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["array", "array_threads", "python", "python_processes"])
def test_device_batches_equal_cpu_batches_over_epochs(kind):
    if kind.startswith("array"):
        dataset = torch.utils.data.TensorDataset(torch.randn(1000, 37), torch.arange(1000))
    else:
        dataset = Indexed()
    workers = 2 if kind.endswith(("threads", "processes")) else 0
    kw = {"batch_size": 64, "shuffle": True, "seed": 5, "num_workers": workers}
    cpu = stoker.DataLoader(dataset, **kw)
    gpu = stoker.DataLoader(dataset, device="cuda", **kw)
    for _ in range(3):
        for a, b in zip(cpu, gpu, strict=True):
            for t in ([b] if isinstance(b, torch.Tensor) else (b.values() if isinstance(b, dict) else b)):
                if isinstance(t, torch.Tensor):
                    assert t.is_cuda
            assert _same(a, b)
    if kind.startswith("python"):
        assert isinstance(b["name"], list) and b["name"][0].startswith("s")  # strings stay on the CPU


def test_a_busy_consumer_holding_and_freeing_batches_never_sees_a_wrong_value():
    rng = random.Random(0)
    dataset = Indexed()
    loader = stoker.DataLoader(dataset, batch_size=32, shuffle=True, seed=1, num_workers=2, device="cuda",
                               device_prefetch=3)
    kept = []
    side = torch.cuda.Stream()
    for _epoch in range(3):
        for batch in loader:
            x, idx = batch["x"], batch["i"].cuda()
            # Work launched at once on the current stream: the batch must already be there.
            expected = idx.float().view(-1, 1, 1).expand_as(x)
            assert torch.equal(x, expected)
            heavy = (x @ x.transpose(1, 2)).sum()  # queue some work that reads x
            if rng.random() < 0.3:
                kept.append((x, expected, heavy))
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.01)
            if len(kept) > 8:
                old_x, old_expected, _ = kept.pop(rng.randrange(len(kept)))
                assert torch.equal(old_x, old_expected)
            del batch, x  # freed at once while work on it is queued: record_stream keeps its memory
        with torch.cuda.stream(side):  # another stream allocating meanwhile must not get those blocks early
            junk = torch.full((1 << 20,), -1.0, device="cuda")
            del junk
    for old_x, old_expected, _ in kept:
        assert torch.equal(old_x, old_expected)
    torch.cuda.synchronize()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pin_memory_batches_are_pinned_where_they_are_made(num_workers):
    arrays = torch.utils.data.TensorDataset(torch.randn(256, 16))
    datasets = [arrays, Indexed()]
    refused = ring_pin_refused(torch.cuda.current_device()) if num_workers else ""
    if refused:  # worker processes' batches come from their ring: not pinned here, and said so
        datasets.pop()
        warnings.warn(f"worker rings not checked: the driver refuses to page-lock shared memory here: {refused}")
    for dataset in datasets:
        loader = stoker.DataLoader(dataset, batch_size=32, pin_memory=True, num_workers=num_workers)
        for batch in loader:
            tensors = [batch[0]] if isinstance(batch, list) else [batch["x"], batch["img"]]
            assert all(t.is_pinned() for t in tensors)
    pool = _cuda.pinned_pool(torch.cuda.current_device())
    assert pool is not None and pool.pinned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_on_the_gpu_equals_the_cpu_reference(dtype, channels_last):
    rng = np.random.default_rng(0)
    shape = (16, 32, 32, 3) if channels_last else (16, 3, 32, 32)
    images = torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cpu = stoker.normalize(images, mean, std, dtype=dtype, channels_last=channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # kernels that fail to load must fail here, not fall back
        gpu = stoker.normalize(images.cuda(), mean, std, dtype=dtype, channels_last=channels_last)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_normalize_runs_stokers_kernel_where_built():
    reason = core.cuda_kernels_reason()
    if reason:
        pytest.skip(reason)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = stoker.normalize(images, 0.5, 0.25)
    torch.cuda.synchronize()
    assert _normalize._kernels is True  # the kernel ran: no fallback to torch ops
    assert torch.equal(out.cpu(), stoker.normalize(images.cpu(), 0.5, 0.25))


def test_normalize_as_device_transform():
    dataset = Indexed()
    t = stoker.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), dtype=torch.bfloat16, key="img")
    cpu = stoker.DataLoader(dataset, batch_size=64)
    gpu = stoker.DataLoader(dataset, batch_size=64, device="cuda", device_transform=t)
    for a, b in zip(cpu, gpu, strict=True):
        assert b["img"].is_cuda and b["img"].dtype == torch.bfloat16
        assert torch.equal(b["img"].cpu(), t(a)["img"])


def test_a_hundred_loaders_leave_nothing_behind():
    dataset = torch.utils.data.TensorDataset(torch.randn(4096, 256))
    torch.cuda.synchronize()
    gc.collect()
    base_allocated = torch.cuda.memory_allocated()
    pinned_after_first = None
    refs = []
    for n in range(100):
        loader = stoker.DataLoader(dataset, batch_size=256, shuffle=True, device="cuda")
        it = iter(loader)
        next(it)
        refs.append(weakref.ref(it))
        del it, loader
        gc.collect()
        stats = _cuda.pinned_pool(torch.cuda.current_device()).stats()
        if n == 0:
            pinned_after_first = stats["pinned_bytes"]
        else:
            assert stats["pinned_bytes"] <= max(pinned_after_first, 64 << 20)
    torch.cuda.synchronize()
    gc.collect()
    assert all(r() is None for r in refs)
    # Blocks freed while a stream still used them return once the allocator processes their events, which it
    # does at its next allocation.
    torch.empty(1, device="cuda")  # allocated and freed at once
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base_allocated + 512


class Rows(torch.utils.data.Dataset):
    """A Python dataset (worker processes write its batches into their ring): row i is 16384 floats of i."""

    def __len__(self):
        return 256

    def __getitem__(self, i):
        return torch.full((16384,), float(i)), i


@pytest.mark.parametrize("kind", ["arrays", "array_threads", "processes"])
@pytest.mark.parametrize("pattern", ["copy_and_drop", "side_stream", "prefetcher", "listed", "detached_ahead"])
def test_pinned_batches_dropped_after_a_non_blocking_copy_arrive_intact(kind, pattern):
    # torch tracks non-blocking copies only from its own host allocator's memory; stoker's pinned blocks and
    # ring slots are held after their release until the current stream has passed it. The GPU is kept behind
    # the loop (torch.cuda._sleep), so memory handed back at the release would be refilled before its copy ran.
    if kind == "processes":
        refused = ring_pin_refused(torch.cuda.current_device())
        if refused:
            pytest.skip(f"the driver refuses to page-lock shared memory here: {refused}")
        dataset = Rows()
    else:
        rows = torch.arange(256.0).repeat_interleave(16384).reshape(256, 16384)  # 64 KiB a row
        dataset = torch.utils.data.TensorDataset(rows, torch.arange(256))
    kw = {"batch_size": 16, "shuffle": True, "seed": 4, "num_workers": 0 if kind == "arrays" else 2}
    cpu = stoker.DataLoader(dataset, **kw)
    expected = [b[0].clone() for _ in range(2) for b in cpu]
    loader = stoker.DataLoader(dataset, pin_memory=True, **kw)
    side = torch.cuda.Stream()
    got = []
    for _ in range(2):
        if pattern == "copy_and_drop":
            for x, _ in loader:
                assert x.is_pinned()
                torch.cuda._sleep(2_000_000)
                got.append(x.cuda(non_blocking=True))
                del x
        elif pattern == "side_stream":  # a prefetcher copying on its own stream
            with torch.cuda.stream(side):
                for x, _ in loader:
                    torch.cuda._sleep(2_000_000)
                    got.append(x.cuda(non_blocking=True))
                    del x
        elif pattern == "prefetcher":
            # next() on the current stream, the copy on a side stream, which the current stream waits for before
            # the next next() (the usual CUDA prefetcher): the fence on the current stream covers the copy.
            it = iter(loader)

            def preload():
                for x, _ in it:
                    with torch.cuda.stream(side):
                        torch.cuda._sleep(2_000_000)
                        return x.cuda(non_blocking=True)  # x is dropped as this returns
                return None

            ahead = preload()
            while ahead is not None:
                torch.cuda.current_stream().wait_stream(side)
                got.append(ahead)
                ahead = preload()
        elif pattern == "detached_ahead":  # one batch ahead, kept as an alias that is not a view
            held = None
            for x, _ in loader:
                if held is not None:
                    torch.cuda._sleep(2_000_000)
                    got.append(held.cuda(non_blocking=True))
                held = x.detach()
                del x
            got.append(held.cuda(non_blocking=True))
            del held
        else:
            batches = list(loader)
            torch.cuda._sleep(50_000_000)
            for x, _ in batches:
                got.append(x.cuda(non_blocking=True))
            del batches, x
        gc.collect()
    torch.cuda.synchronize()
    assert len(got) == len(expected)
    assert [i for i, (g, e) in enumerate(zip(got, expected)) if not torch.equal(g.cpu(), e)] == []


def test_loaders_gone_then_the_cache_emptied_with_expandable_segments():
    # torch's allocator keeps memory allocated under stoker's stream (and, with expandable segments,
    # synchronises that stream's handle when unmapping it): the stream must outlive the loaders.
    code = """
import gc, torch, stoker
ds = torch.utils.data.TensorDataset(torch.randn(2048, 1024), torch.arange(2048))
for n in range(20):
    loader = stoker.DataLoader(ds, batch_size=256, shuffle=True, device="cuda")
    total = sum(float(b[0].sum()) for b in loader)
    del loader
    gc.collect()
torch.cuda.synchronize()
torch.cuda.empty_cache()
x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # maps new memory after the unmap
del x
torch.cuda.empty_cache()
torch.cuda.synchronize()
print("ok")
"""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_device_without_an_index_follows_set_device():
    dataset = torch.utils.data.TensorDataset(torch.arange(64.0))
    loader = stoker.DataLoader(dataset, batch_size=16, device="cuda")
    previous = torch.cuda.current_device()
    try:
        for index in (1, 0):
            torch.cuda.set_device(index)
            assert {b[0].device for b in loader} == {torch.device("cuda", index)}
    finally:
        torch.cuda.set_device(previous)


def test_loading_goes_on_while_a_cuda_graph_is_captured():
    # torch.cuda.graph captures in the global mode: a page-locking call on any thread of the process would
    # fail and invalidate the capture. A thread loads pinned batches of ever new sizes (each a new page-locked
    # block, allocated by the loader's native threads) on a stream of its own while graphs are captured.
    import threading

    data = torch.utils.data.TensorDataset(torch.arange(20_000.0)[:, None].expand(20_000, 256).contiguous())
    errors, done = [], threading.Event()
    stream = torch.cuda.Stream()  # made here, before any capture: torch's own stream pool is not stoker's to test

    def load():
        try:
            with torch.cuda.stream(stream):
                for batch_size in range(1000, 1040):  # blocks of a new size class every few loaders
                    loader = stoker.DataLoader(data, batch_size=batch_size, pin_memory=True, num_workers=2)
                    for (x,) in loader:
                        assert x.is_pinned() and torch.equal(x[:, 0], x[:, -1])
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=load)
    thread.start()
    static = torch.zeros(1 << 16, device="cuda")
    captured = 0
    while not done.is_set() and captured < 200:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static.add_(1)
        graph.replay()
        captured += 1
    thread.join(timeout=300)
    torch.cuda.synchronize()
    assert not errors, errors
    assert captured > 0 and torch.equal(static, torch.full_like(static, captured))
