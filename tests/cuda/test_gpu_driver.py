"""The driver layer on a real GPU (skipped without one): the driver sees the devices torch sees and shares
torch's primary context; blocks of the page-locked pool and of a pinned worker ring are pinned for torch; a copy
on stoker's stream followed by an event that torch's stream waits on delivers the bytes.

Run in full where a GPU is lent: `PYTHONPATH=python python -m pytest tests/cuda -q`.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from helpers import ring_pin_refused

from stoker import _core as core
from stoker import _cuda
from stoker._native import from_dlpack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch")


@pytest.fixture(scope="module")
def device() -> int:
    torch.cuda.init()
    return torch.cuda.current_device()


def test_driver_sees_the_gpus_torch_sees(device):
    status = _cuda.cuda_status()
    assert status["available"], status["reason"]
    assert status["device_count"] == torch.cuda.device_count()
    assert status["driver_version"] >= 11000 and status["proc_address"] is True
    assert _cuda.resolve_device("cuda") == torch.device("cuda", device)


def test_driver_uses_the_primary_context_torch_uses(device):
    torch.zeros(1, device="cuda")  # torch's context is current on this thread from here on
    torch.cuda.synchronize()
    assert core.cuda_current_context() == core.cuda_primary_context(device) != 0
    # A thread torch never ran on has no context; stoker's calls there leave it as they found it.
    seen = []

    def fresh_thread():
        seen.append(core.cuda_current_context())
        core.CudaStream(device).record().synchronize()
        seen.append(core.cuda_current_context())

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert seen == [0, 0]


def test_pinned_pool_blocks_are_pinned_in_torch(device):
    pool = _cuda.pinned_pool(device)
    assert pool is not None and pool.pinned
    block = from_dlpack(pool.empty([1 << 20], 2, 32))
    assert block.is_pinned()
    assert not from_dlpack(core.BufferPool(1 << 20).empty([1024], 2, 32)).is_pinned()
    arrays = [np.full((64, 64), i, np.float32) for i in range(8)]
    stacked = from_dlpack(core.stack_arrays(arrays, pool))
    assert stacked.is_pinned()
    on_gpu = stacked.to("cuda", non_blocking=True)
    assert torch.equal(on_gpu.cpu(), torch.from_numpy(np.stack(arrays)))


def test_native_threads_gather_into_pinned_blocks(device):
    pool = _cuda.pinned_pool(device)
    data = np.arange(256 * 32, dtype=np.float32).reshape(256, 32)
    source = core.ArraySource([("x", data.ctypes.data, 256, 128, 128, 2, 32, [32])])
    pipe = core.ArrayPipeline(source, pool, (256, 16, False, True, 3, 0, 0, 1), 0, 4, 6)
    order = core.IndexStream(256, 16, False, True, 3, 0)
    b = 0
    while (capsules := pipe.next()) is not None:
        batch = from_dlpack(capsules[0])
        assert batch.is_pinned()
        assert torch.equal(batch.to("cuda", non_blocking=True).cpu(), torch.from_numpy(data[order.batch(b)]))
        b += 1
    pipe.stop()
    assert b == 16


def test_side_stream_copy_then_torch_stream_waits_on_its_event(device):
    pool = _cuda.pinned_pool(device)
    n = 8 << 20
    src = from_dlpack(pool.empty([n], 1, 8))
    src.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = core.CudaStream(device)
    allocated = core.CudaEvent(device)
    allocated.record(torch.cuda.current_stream().cuda_stream)
    stream.wait(allocated)  # the copy is ordered after dst's allocation on torch's stream, without a host wait
    stream.copy_to_device(dst.data_ptr(), src.data_ptr(), n)
    done = stream.record()
    done.block_stream(torch.cuda.current_stream().cuda_stream)  # the device waits, the host does not
    assert torch.equal(dst.cpu(), src)
    done.synchronize()
    assert done.query()


def test_worker_ring_slots_pinned_as_far_as_their_batches_reach(device):
    from stoker import _workers

    # where worker rings live (tmpfs): a file on disk may not be page-locked at all (long-term pins of shared
    # file pages are refused by recent kernels)
    path = os.path.join(_workers._ring_dir(), f"stoker-test-ring-{os.getpid()}")
    with open(path, "wb") as f:
        f.truncate(2 << 20)
    refused = ring_pin_refused(device)
    if refused:
        pytest.skip(f"the driver refuses to page-lock shared memory here: {refused}")
    try:
        ring = core.SlotRing(path, 1 << 20, 2)
        ring.pin(device)
        ring.pin(device)
        assert ring.pinned
        lease = ring.lease(ring.acquire(), 4096)  # a batch of 4 KiB: that slot's first page is locked
        view = from_dlpack(lease.tensor(0, [1024], 2, 32))
        assert view.is_pinned() and ring.pin_error == "" and ring.pinned_bytes == 4096
        grown = ring.lease(ring.acquire(), 1 << 20)  # the second slot, whole
        whole = from_dlpack(grown.tensor(0, [1 << 18], 2, 32))
        assert whole.is_pinned() and ring.pinned_bytes == 4096 + (1 << 20)
        del view, lease, whole, grown, ring
    finally:
        os.unlink(path)


def test_many_pools_and_streams_come_and_go(device):
    for i in range(100):
        pool = core.BufferPool(1 << 20, pin_device=device)
        block = from_dlpack(pool.empty([1 << 16], 2, 32))
        block.fill_(i)
        stream = core.CudaStream(device)
        dst = torch.empty_like(block, device="cuda")
        torch.cuda.current_stream().synchronize()
        stream.copy_to_device(dst.data_ptr(), block.data_ptr(), block.numel() * 4)
        stream.record().synchronize()
        assert float(dst[-1]) == i
        del pool, block, stream, dst
