"""The CUDA driver layer without a GPU: no driver is an answer (cuda_available() is False, device="cuda" says
why), never a crash; and, through a fake driver (tests/fake_libcuda.c, loaded with STOKER_LIBCUDA), the code
paths a GPU takes: entry points resolved at their pinned versions, the page-locked pool allocating once per
block in the primary context from native threads and freeing from any thread, streams and events owned and
released, the worker ring registered once, forked children kept off CUDA.

The driver is loaded once per process, so each machine (no library, fake driver in each mode) runs in a
subprocess of its own. tests/cuda/ holds the tests that need a real GPU.
"""

from __future__ import annotations

import os
import re

import pytest

import stoker
from fake_cuda import run
from stoker import _cuda

# Each entry point and the version its current signature began at: what stoker must ask cuGetProcAddress for.
PINNED_VERSIONS = {
    "cuGetErrorName": 6000, "cuGetErrorString": 6000, "cuInit": 2000, "cuDriverGetVersion": 2020,
    "cuDeviceGetCount": 2000, "cuDeviceGet": 2000, "cuDevicePrimaryCtxRetain": 7000,
    "cuDevicePrimaryCtxRelease": 11000, "cuCtxSetCurrent": 4000, "cuCtxGetCurrent": 4000,
    "cuMemHostAlloc": 2020, "cuMemFreeHost": 2000, "cuMemHostRegister": 6050, "cuMemHostUnregister": 4000,
    "cuStreamCreate": 2000, "cuStreamDestroy": 4000, "cuStreamWaitEvent": 3020, "cuEventCreate": 2000,
    "cuEventRecord": 2000, "cuEventQuery": 2000, "cuEventSynchronize": 2000, "cuEventDestroy": 4000,
    "cuMemcpyHtoDAsync": 3020,
    # optional: the kernels' (a driver without them keeps CUDA available, kernels off), and which devices have
    # work (fences for pinned batches)
    "cuModuleLoadData": 2000, "cuModuleGetFunction": 2000, "cuLaunchKernel": 4000,
    "cuDevicePrimaryCtxGetState": 7000,
    # optional: the thread's stream-capture mode (page-locking while a user's CUDA graph is captured)
    "cuThreadExchangeStreamCaptureMode": 10010,
}

# ---- this machine, as it is ----------------------------------------------------------------------------------


def test_cuda_available_is_exported_and_never_raises():
    assert "cuda_available" in stoker.__all__
    assert stoker.__all__ == sorted(stoker.__all__)
    assert isinstance(stoker.cuda_available(), bool)
    status = _cuda.cuda_status()
    assert status["available"] is stoker.cuda_available()
    assert set(status) == {"available", "library", "driver_version", "device_count", "proc_address", "reason"}
    assert (status["reason"] == "") is status["available"]


def test_device_check_accepts_the_cpu_and_rejects_other_devices():
    assert _cuda.resolve_device(None) is None
    assert _cuda.resolve_device("cpu") is None
    assert _cuda.resolve_device(__import__("torch").device("cpu")) is None
    with pytest.raises(ValueError, match=r"device='meta': stoker delivers batches to the CPU or to a CUDA GPU"):
        _cuda.resolve_device("meta")
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device"):
        _cuda.resolve_device("gpu0")


class _Status:
    """Stands in for the extension in stoker._cuda, with a driver status of the test's choosing."""

    def __init__(self, available, reason="", device_count=0):
        self.status = {"available": available, "library": "libcuda.so.1", "driver_version": 12040 if available else 0,
                       "device_count": device_count, "proc_address": available, "reason": reason}

    def cuda_status(self):
        return dict(self.status)

    def cuda_available(self):
        return self.status["available"]


def test_device_check_messages(monkeypatch):
    import torch

    reason = "cuInit failed: CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)"
    monkeypatch.setattr(_cuda, "core", _Status(False, reason))
    with pytest.raises(RuntimeError) as info:
        _cuda.resolve_device("cuda:0")
    assert str(info.value) == (f"device='cuda:0' needs a CUDA GPU, but CUDA is not available: {reason}. "
                               "Leave device unset to receive batches on the CPU.")
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    with pytest.raises(RuntimeError, match=r"\(this torch is a ROCm build: stoker's device stage needs NVIDIA's"):
        _cuda.resolve_device("cuda")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)

    monkeypatch.setattr(_cuda, "core", _Status(True, device_count=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match=r"^device='cuda': the CUDA driver sees 2 GPU\(s\), but this torch build "
                                           r"has no CUDA support \(torch .*\), and batches on the GPU are torch CUDA"):
        _cuda.resolve_device("cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _cuda.resolve_device("cuda") == torch.device("cuda", 1)
    assert _cuda.resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^device='cuda:2': there is no CUDA device 2; 2 are visible$"):
        _cuda.resolve_device("cuda:2")


@pytest.mark.skipif(stoker.cuda_available(), reason="this machine has a usable CUDA driver and GPU")
def test_device_cuda_without_cuda_says_why():
    reason = _cuda.cuda_status()["reason"]
    with pytest.raises(RuntimeError, match=r"device='cuda' needs a CUDA GPU, but CUDA is not available: ") as info:
        _cuda.resolve_device("cuda")
    assert reason in str(info.value) and "Leave device unset" in str(info.value)
    with pytest.raises(RuntimeError, match=r"device='cuda:1' needs a CUDA GPU"):
        _cuda.resolve_device("cuda:1")
    assert _cuda.pinned_pool() is None


# ---- no driver library -----------------------------------------------------------------------------------


def test_without_a_driver_library_nothing_crashes(tmp_path):
    missing = str(tmp_path / "no" / "libcuda.so.1")
    out = run("""
        out["available"] = stoker.cuda_available()
        out["status"] = _cuda.cuda_status()
        out["device"] = error_of(_cuda.resolve_device, "cuda")
        out["pool"] = _cuda.pinned_pool() is None
        out["pinned_pool"] = error_of(core.BufferPool, 1 << 20, pin_device=0)
        out["stream"] = error_of(core.CudaStream, 0)
        out["context"] = error_of(core.cuda_primary_context, 0)
        ds = torch.utils.data.TensorDataset(torch.arange(10.0))
        out["batches"] = [b[0].tolist() for b in stoker.DataLoader(ds, batch_size=4)]
    """, library=missing, package=True)
    assert out["available"] is False
    status = out["status"]
    assert status["library"] == missing and status["driver_version"] == 0 and status["device_count"] == 0
    assert "the CUDA driver library could not be loaded" in status["reason"]
    assert missing in status["reason"] and "STOKER_LIBCUDA" in status["reason"]
    kind, text = out["device"]
    assert kind == "RuntimeError" and status["reason"] in text
    assert out["pool"] is True
    for key in ("pinned_pool", "stream", "context"):
        assert out[key][0] == "RuntimeError" and out[key][1].startswith("CUDA is not available: the CUDA driver"), out
    assert out["batches"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_library_that_is_not_a_driver_is_refused(tmp_path):
    # Any shared object without the driver's entry points, e.g. the C library.
    libc = next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib/libc.so.6")
                 if os.path.exists(p)), None)
    if libc is None:
        pytest.skip("no libc.so.6 at a known path")
    out = run("out['status'] = core.cuda_status()", library=libc)
    assert out["status"]["available"] is False
    assert out["status"]["reason"] == f"{libc} is not a CUDA driver: it exports no cuDriverGetVersion"


# ---- fake driver: machines without a usable GPU ------------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [
    ("nodevice", "cuInit failed: CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected (fake driver))"),
    ("zero", "the CUDA driver 13.0 sees no device"),
    ("old", "the CUDA driver is version 10.2; stoker needs 11.0 or newer"),
], ids=["cuInit-fails", "no-device", "old-driver"])
def test_a_driver_without_a_usable_gpu_reports_why(fake_driver, mode, expected):
    out = run("""
        out["available"] = core.cuda_available()
        out["status"] = core.cuda_status()
        out["stream"] = error_of(core.CudaStream, 0)
        out["pool"] = error_of(core.BufferPool, 1 << 20, pin_device=0)
    """, library=fake_driver["current"], mode=mode)
    assert out["available"] is False
    assert out["status"]["reason"] == expected
    assert out["stream"] == out["pool"] == ["RuntimeError", f"CUDA is not available: {expected}"]


def test_hidden_devices_are_named_in_the_reason(fake_driver):
    out = run("out['status'] = core.cuda_status()", library=fake_driver["current"], mode="zero",
              CUDA_VISIBLE_DEVICES="")
    assert out["status"]["reason"] == "the CUDA driver 13.0 sees no device (CUDA_VISIBLE_DEVICES='')"


# ---- fake driver with one device: the GPU code paths -------------------------------------------------------


def test_entry_points_come_from_cuGetProcAddress_at_pinned_versions(fake_driver):
    out = run("""
        # Many threads ask at once: the driver is loaded by exactly one of them.
        barrier = threading.Barrier(8)
        answers = []
        def ask():
            barrier.wait()
            answers.append(core.cuda_available())
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        out["answers"] = answers
        out["init"] = count("init")
        out["status"] = core.cuda_status()
        out["lookups"] = fake().fake_lookups().decode()
    """, library=fake_driver["current"])
    assert out["answers"] == [True] * 8 and out["init"] == 1
    status = out["status"]
    assert status == {"available": True, "library": fake_driver["current"], "driver_version": 13000,
                      "device_count": 1, "proc_address": True, "reason": ""}
    lookups = [entry.split("@") for entry in out["lookups"].split(";") if entry]
    requested = {name: version_flags for name, version_flags in lookups}
    assert len(lookups) == len(PINNED_VERSIONS)  # each resolved once
    assert requested == {name: f"{version}/1" for name, version in PINNED_VERSIONS.items()}  # legacy-stream flag


def test_a_driver_before_11_3_is_served_by_its_exported_names(fake_driver):
    out = run("""
        out["status"] = core.cuda_status()
        pool = core.BufferPool(1 << 20, pin_device=0)
        block = pool.empty([100], 2, 32)  # a capsule: dropping it returns the block
        del block, pool
        s = core.CudaStream(0)
        s.record().synchronize()
        del s
        out["counts"] = {k: count(k) for k in ("host_alloc", "host_free", "stream_create", "stream_destroy",
                                                "event_create", "event_destroy", "bad_context", "bad_handle")}
    """, library=fake_driver["legacy"])
    assert out["status"]["available"] is True and out["status"]["proc_address"] is False
    c = out["counts"]
    assert c["host_alloc"] == c["host_free"] == 1
    assert c["stream_create"] == c["stream_destroy"] == 1 and c["event_create"] == c["event_destroy"] == 1
    assert c["bad_context"] == 0 and c["bad_handle"] == 0


def test_pinned_pool_page_locks_each_block_once_from_native_threads(fake_driver):
    out = run("""
        pool = _cuda.pinned_pool(0)
        out["same_pool"] = pool is _cuda.pinned_pool(0)
        out["pinned"] = [pool.pinned, core.BufferPool(1 << 20).pinned]
        data = np.arange(64 * 10, dtype=np.float32).reshape(64, 10)
        source = core.ArraySource([("x", data.ctypes.data, 64, 40, 40, 2, 32, [10])])
        out["equal"], out["allocs"] = [], []
        for epoch in range(3):
            stream = (64, 8, False, True, 7, epoch, 0, 1)
            pipe = core.ArrayPipeline(source, pool, stream, 0, 3, 4)
            order = core.IndexStream(64, 8, False, True, 7, epoch)
            b = 0
            while (caps := pipe.next()) is not None:
                batch = from_dlpack(caps[0])   # dropped at the next turn, from this thread
                out["equal"].append(bool(np.array_equal(batch.numpy(), data[order.batch(b)])))
                b += 1
            pipe.stop()
            del pipe, batch, caps
            out["allocs"].append(count("host_alloc"))
        # Collate from another thread; the tensor is freed on a third one.
        made = []
        t = threading.Thread(target=lambda: made.append(from_dlpack(core.stack_arrays([data[0], data[1]], pool))))
        t.start(); t.join()
        out["stacked"] = made[0].tolist() == data[:2].tolist()
        t = threading.Thread(target=made.clear)
        t.start(); t.join()
        out["stats"] = pool.stats()
        out["main_thread_context"] = core.cuda_current_context()
        out["bad_context"] = count("bad_context")
        _cuda._pinned = None
        del pool
        gc.collect()
        out["after"] = {k: count(k) for k in ("host_alloc", "host_free", "host_bytes", "retain", "release")}
    """, library=fake_driver["current"], package=True)
    assert out["same_pool"] is True and out["pinned"] == [True, False]
    assert len(out["equal"]) == 24 and all(out["equal"])
    # 24 batches, and never more blocks page-locked than batches in flight at once (3 threads, depth 4, the one
    # held): blocks are reused across batches and epochs, not page-locked per batch.
    assert 1 <= out["allocs"][0] <= out["allocs"][-1] <= 3 + 4 + 1
    assert out["stacked"] is True
    stats = out["stats"]
    assert stats["outstanding"] == 0 and stats["pinned_bytes"] == stats["cached_bytes"] > 0
    assert out["main_thread_context"] == 0  # contexts made current for a call are put back
    assert out["bad_context"] == 0  # every call had the primary context current, whichever thread made it
    after = out["after"]
    assert after["host_alloc"] == after["host_free"] and after["host_bytes"] == 0  # nothing leaked
    assert after["retain"] == 1 and after["release"] == 0  # the primary context is retained once per process


def test_pinned_blocks_come_in_size_classes(fake_driver):
    out = run("""
        pool = core.BufferPool(64 << 20, pin_device=0)
        sizes = [1, 4096, 4097, 65536, 65537, 1000000, 1048576, 1048577]
        out["bytes"], held = [], []
        for n in sizes:
            before = count("host_bytes")
            held.append(pool.empty([n], 1, 8))  # held: each request gets a block of its own
            out["bytes"].append(count("host_bytes") - before)
        del held
        # Batches of 8 lengths within one class share one block.
        before = count("host_alloc")
        for n in range(1_000_000, 1_008_000, 1000):
            pool.empty([n], 1, 8)  # dropped at once
        out["new_blocks"] = count("host_alloc") - before
    """, library=fake_driver["current"])
    assert out["bytes"] == [4096, 4096, 8192, 65536, 73728, 1048576, 1048576, 1179648]
    assert out["new_blocks"] == 0


def test_a_failed_page_lock_names_the_call_and_the_error(fake_driver):
    out = run("""
        pool = core.BufferPool(1 << 20, pin_device=0)
        out["error"] = error_of(pool.empty, [1000], 2, 32)
        out["stats"] = pool.stats()
        out["bad_device"] = error_of(core.BufferPool, 1 << 20, pin_device=1)
    """, library=fake_driver["current"], mode="oom")
    assert out["error"] == ["RuntimeError", "cuMemHostAlloc failed (4096 bytes): CUDA_ERROR_OUT_OF_MEMORY "
                                            "(out of memory (fake driver))"]
    assert out["stats"]["outstanding"] == 0 and out["stats"]["pinned_bytes"] == 0
    assert out["bad_device"] == ["ValueError", "CUDA device 1 does not exist: 1 device(s) are visible"]


def test_streams_and_events_copy_wait_and_are_released(fake_driver):
    out = run("""
        import numpy as np
        s = core.CudaStream(0)
        out["device"] = s.device
        src = np.arange(256, dtype=np.uint8)
        dst = np.zeros(256, dtype=np.uint8)
        s.copy_to_device(dst.ctypes.data, src.ctypes.data, 256)
        e = s.record()
        out["queries"] = [e.query(), e.query()]  # the fake's event completes after one NOT_READY
        e.synchronize()
        e.block_stream(0)   # the legacy default stream, e.g. torch's current stream
        s.wait(e)
        foreign = core.CudaEvent(0)
        foreign.record(0)   # on a stream stoker does not own: later copies on s wait for it
        s.wait(foreign)
        del foreign
        out["copied"] = dst.tolist() == src.tolist()
        out["handles"] = [s.handle != 0, e.handle != 0]
        del s, e
        gc.collect()
        out["counts"] = {k: count(k) for k in ("stream_create", "stream_destroy", "event_create", "event_destroy",
                                                "copy", "wait", "bad_context", "bad_handle")}
        out["main_thread_context"] = core.cuda_current_context()
        out["context"] = core.cuda_primary_context(0) != 0
    """, library=fake_driver["current"])
    assert out["device"] == 0 and out["queries"] == [False, True] and out["copied"] is True
    assert out["handles"] == [True, True]
    c = out["counts"]
    assert c["stream_create"] == c["stream_destroy"] == 1 and c["event_create"] == c["event_destroy"] == 2
    assert c["copy"] == 1 and c["wait"] == 3 and c["bad_context"] == 0 and c["bad_handle"] == 0
    assert out["main_thread_context"] == 0 and out["context"] is True


@pytest.fixture
def ring_file():
    """A sparse ring file of 3 x 1 MiB where worker rings live (tmpfs, /dev/shm, where there is one)."""
    from stoker import _workers

    path = os.path.join(_workers._ring_dir(), f"stoker-test-ring-{os.getpid()}")
    with open(path, "wb") as f:
        f.truncate(3 << 20)
    yield path
    os.unlink(path)


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_pinned_worker_ring_locks_each_slot_as_far_as_its_batches_reach(fake_driver, ring_file):
    out = run(f"""
        ring = core.SlotRing({ring_file!r}, 1 << 20, 3)
        out["before"] = ring.pinned
        ring.pin(0)
        ring.pin(0)
        out["after"] = ring.pinned
        out["at_pin"] = count("register")
        state = lambda: [count("register"), count("unregister"), count("registered_bytes"), ring.pinned_bytes]
        lease = ring.lease(ring.acquire(), 100_000)  # slot 0: 100000 bytes, locked in their size class
        out["first"] = state()
        del lease
        lease = ring.lease(ring.acquire(), 90_000)  # slot 0 again, within what it has locked: nothing new
        out["within"] = state()
        del lease
        lease = ring.lease(ring.acquire(), 300_000)  # slot 0 grows: its range is registered anew, larger
        out["grown"] = state()
        whole = ring.lease(ring.acquire(), 1 << 20)  # slot 1: the whole slot
        out["whole"] = state()
        out["empty"] = ring.lease(ring.acquire(), 0).slot, state()  # slot 2: an empty batch locks nothing
        out["too_big"] = error_of(ring.lease, 2, (1 << 20) + 1)
        out["pin_error"] = ring.pin_error
        del lease, whole, ring
        gc.collect()
        out["end"] = [count("register"), count("unregister"), count("registered_bytes")]
        out["bad_context"] = count("bad_context")
    """, library=fake_driver["current"])
    assert out["before"] is False and out["after"] is True and out["at_pin"] == 0
    assert out["first"] == [1, 0, 106496, 106496]  # 13 x 8 KiB: the class of 100000 bytes
    assert out["within"] == out["first"]
    assert out["grown"] == [2, 1, 327680, 327680]  # 10 x 32 KiB
    assert out["whole"] == [3, 1, 327680 + (1 << 20), 327680 + (1 << 20)]
    assert out["empty"] == [2, out["whole"]]
    assert out["too_big"] == ["ValueError", f"a batch of {(1 << 20) + 1} bytes does not fit a slot of 1048576 bytes"]
    assert out["pin_error"] == ""
    assert out["end"] == [3, 3, 0] and out["bad_context"] == 0
    # registering faults in every page of a range: they were reserved first, all at once (a file system without
    # the room fails there, instead of filling up page by page)
    assert _allocated(ring_file) >= 327680 + (1 << 20)


def test_a_retired_ring_unlocks_and_gives_back_each_slot_once_free(fake_driver, ring_file):
    # The pool is done with the ring while a batch is kept: the free slots are unlocked and their pages given back
    # at once; the kept slot stays locked and intact until it returns, then goes the same way. Nothing more is lent.
    out = run(f"""
        ring = core.SlotRing({ring_file!r}, 1 << 20, 3)
        ring.pin(0)
        a, b, c = (ring.lease(ring.acquire(), 1 << 20) for _ in range(3))
        t = from_dlpack(b.tensor(0, [1 << 20], 1, 8))
        t.fill_(7)
        del a, b
        out["lent"] = [count("unregister"), ring.pinned_bytes, ring.free_slots]
        ring.retire()
        ring.retire()
        out["retired"] = [count("unregister"), ring.pinned_bytes, ring.free_slots, ring.acquire()]
        out["kept"] = [int(t.min()), int(t.max())]
        del t
        gc.collect()
        out["one_left"] = [count("unregister"), ring.pinned_bytes]
        del c
        gc.collect()
        out["none_left"] = [count("unregister"), ring.pinned_bytes, ring.free_slots, ring.acquire()]
        out["bad_context"] = count("bad_context")
    """, library=fake_driver["current"], package=True)
    assert out["lent"] == [0, 3 << 20, 1]  # slot 0 returned; slot 1 is held by its tensor, slot 2 by its lease
    assert out["retired"] == [1, 2 << 20, 1, -1]
    assert out["kept"] == [7, 7]
    assert out["one_left"] == [2, 1 << 20]
    assert out["none_left"] == [3, 0, 3, -1] and out["bad_context"] == 0
    assert _allocated(ring_file) == 0  # every slot's pages given back


def test_a_ring_the_driver_refuses_to_lock_stops_locking_and_says_why(fake_driver, ring_file):
    out = run(f"""
        ring = core.SlotRing({ring_file!r}, 1 << 20, 3)
        ring.pin(0)
        lease = ring.lease(ring.acquire(), 5000)  # served all the same, not page-locked
        out["slot"] = lease.slot
        out["pinned"] = ring.pinned
        out["error"] = ring.pin_error
        ring.pin(0)  # no second try
        out["again"] = ring.pinned
        out["registered"] = count("register"), ring.pinned_bytes
    """, library=fake_driver["current"], mode="noregister")
    assert out["slot"] == 0 and out["pinned"] is False and out["again"] is False
    assert out["error"].startswith("cuMemHostRegister failed (8192 bytes at 0x") and \
        out["error"].endswith("CUDA_ERROR_OUT_OF_MEMORY (out of memory (fake driver))"), out["error"]
    assert out["registered"] == [0, 0]


def test_device_cuda_with_a_cpu_only_torch_says_so(fake_driver):
    out = run("""
        out["cuda_torch"] = torch.version.cuda is not None
        out["error"] = error_of(_cuda.resolve_device, "cuda")
    """, library=fake_driver["current"], package=True)
    if out["cuda_torch"]:
        pytest.skip("torch here is a CUDA build")
    kind, text = out["error"]
    assert kind == "RuntimeError"
    assert text.startswith("device='cuda': the CUDA driver sees 1 GPU(s), but this torch build has no CUDA support")


def test_a_forked_child_stays_off_cuda(fake_driver):
    out = run("""
        out["parent"] = stoker.cuda_available()
        pool = _cuda.pinned_pool(0)
        block = from_dlpack(pool.empty([10], 2, 32))  # alive across the fork
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            child = {
                "available": stoker.cuda_available(),
                "reason": _cuda.cuda_status()["reason"],
                "pool": _cuda.pinned_pool(0) is None,
                "stream": error_of(core.CudaStream, 0),
            }
            del block  # the parent's page-locked block: left alone here, not freed through the driver
            gc.collect()
            child["frees"] = count("host_free")
            os.write(w, json.dumps(child).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        out["child"] = json.loads(data)
        out["parent_after"] = [stoker.cuda_available(), _cuda.pinned_pool(0) is pool]
    """, library=fake_driver["current"], package=True)
    assert out["parent"] is True and out["parent_after"] == [True, True]
    child = out["child"]
    assert child["available"] is False and child["pool"] is True and child["frees"] == 0
    assert "was forked from it: a forked child cannot use CUDA" in child["reason"]
    assert child["stream"][0] == "RuntimeError" and "'spawn' or 'forkserver'" in child["stream"][1]


def test_normalize_kernel_is_launched_with_its_arguments(fake_driver):
    # The fake driver runs stoker's normalise kernels on the host (tests/fake_libcuda.c), so a build with the
    # kernels (STOKER_CUDA=ON) checks the launch: argument block, layout, grid, output types. Other builds
    # must say, and raise, that they have no kernels.
    out = run("""
        out["reason"] = core.cuda_kernels_reason()
        out["available"] = core.cuda_kernels_available()
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(4, 3, 5, 7), dtype=np.uint8)
        dst = np.zeros((4, 3, 5, 7), np.float32)
        out["error"] = error_of(core.normalize_u8, 0, 0, images.ctypes.data, dst.ctypes.data, 4, 3, 5, 7, False,
                                mean, std, 1 / 255, 0)
        results = {}
        if out["available"]:
            for channels_last in (False, True):
                src = np.ascontiguousarray(np.moveaxis(images, 1, -1)) if channels_last else images
                expected = stoker.normalize(torch.from_numpy(src), mean, std, channels_last=channels_last)
                for code, dtype, view in ((0, torch.float32, np.float32), (1, torch.float16, np.float16),
                                          (2, torch.bfloat16, np.uint16)):
                    dst = np.zeros((4, 3, 5, 7), view)
                    core.normalize_u8(0, 0, src.ctypes.data, dst.ctypes.data, 4, 3, 5, 7, channels_last, mean, std,
                                      1 / 255, code)
                    want = expected.to(dtype)
                    got = torch.from_numpy(dst).view(torch.bfloat16) if code == 2 else torch.from_numpy(dst)
                    results[f"{channels_last}-{code}"] = bool(torch.equal(got, want))
            out["one_mean"] = error_of(core.normalize_u8, 0, 0, images.ctypes.data, dst.ctypes.data, 4, 3, 5, 7,
                                       False, [0.5, 0.5], std, 1 / 255, 0)
            out["launches"] = count("launch")
        out["results"] = results
    """, library=fake_driver["current"], package=True)
    if not out["available"]:
        assert "this build of stoker has no CUDA kernels" in out["reason"]
        assert out["error"] == ["RuntimeError", "stoker's CUDA kernels are not available: " + out["reason"]]
        return
    assert out["reason"] == "" and out["error"] is None
    assert out["results"] == {f"{cl}-{code}": True for cl in (False, True) for code in (0, 1, 2)}
    assert out["launches"] == 7
    assert out["one_mean"][0] == "ValueError" and "2 per-channel values for 3 channels" in out["one_mean"][1]


def test_kernels_of_a_newer_toolkit_than_the_driver_say_so(fake_driver):
    # A driver loads code made by its own major version of the toolkit or older only: a CUDA 11 driver and
    # kernels from nvcc 12 or 13 must say so (and normalise fall back), not fail at their first launch.
    out = run("""
        out["available"] = stoker.cuda_available()
        out["reason"] = core.cuda_kernels_reason()
        out["kernels"] = core.cuda_kernels_available()
        images = np.zeros((1, 3, 2, 2), np.uint8)
        dst = np.zeros((1, 3, 2, 2), np.float32)
        out["error"] = error_of(core.normalize_u8, 0, 0, images.ctypes.data, dst.ctypes.data, 1, 3, 2, 2, False,
                                [0.5], [0.5], 1 / 255, 0)
    """, library=fake_driver["current"], package=True, STOKER_FAKE_CUDA_VERSION="11000")
    assert out["available"] is True and out["kernels"] is False
    if "this build of stoker has no CUDA kernels" in out["reason"]:
        return
    assert re.fullmatch(r"the kernels were built with CUDA 1[2-9]\.\d+, and this driver supports CUDA 11\.0 only: "
                        r"update the driver, or build with an older toolkit", out["reason"]), out["reason"]
    assert out["error"] == ["RuntimeError", "stoker's CUDA kernels are not available: " + out["reason"]]


def test_a_ring_without_room_to_lock_says_how_much_it_needs(fake_driver):
    # Page-locking commits every page of a slot's range in the ring's file: on a small /dev/shm the reservation
    # fails first, naming the room needed and free, and locks nothing (a later batch's pages are not squeezed
    # out); the batch is served from the slot as it is.
    from helpers import in_small_shm

    out = in_small_shm("""
import json, os
from stoker._native import core
from stoker import _workers

path = os.path.join(_workers._ring_dir(), "stoker-test-ring")
with open(path, "wb") as f:
    f.truncate(3 << 20)
ring = core.SlotRing(path, 3 << 20, 1)
ring.pin(0)
lease = ring.lease(ring.acquire(), 2_900_000)
st = os.statvfs(path)
print("RESULT " + json.dumps({"error": ring.pin_error, "pinned": ring.pinned, "slot": lease.slot,
                              "allocated": os.stat(path).st_blocks * 512, "free": st.f_bavail * st.f_frsize}))
""", 2, STOKER_LIBCUDA=fake_driver["current"], STOKER_FAKE_CUDA="one")
    assert out["pinned"] is False and out["slot"] == 0 and out["allocated"] == 0 and out["free"] == 2 << 20
    assert re.fullmatch(r"page-locking slot 0 of the worker ring \(/dev/shm/stoker-test-ring\) needs 3 MiB of it in "
                        r"memory, and its file system has 2 MiB free \(fallocate: No space left on device\)",
                        out["error"]), out


def test_the_pinned_pool_keeps_page_locked_blocks_for_the_batches_in_flight_past_its_base_bound(fake_driver):
    # Four 160 MiB batches in flight (640 MiB, more than the 512 MiB base bound): returned, every block stays
    # cached for the next four, instead of being unpinned and page-locked again each time.
    out = run("""
        pool = _cuda.pinned_pool(0)
        for _ in range(3):
            held = [pool.empty([160 << 20], 1, 8) for _ in range(4)]  # capsules: never written
            del held
        out["counts"] = {k: count(k) for k in ("host_alloc", "host_free")}
        out["stats"] = pool.stats()
    """, library=fake_driver["current"], package=True)
    assert out["counts"] == {"host_alloc": 4, "host_free": 0}
    stats = out["stats"]
    assert stats["cached_bytes"] == stats["pinned_bytes"] == stats["cache_bound"] == 640 << 20
    assert stats["reuses"] == 8


def test_driver_calls_work_while_a_cuda_graph_is_captured_in_the_global_mode(fake_driver, ring_file):
    # torch.cuda.graph captures in the global mode by default: page-locking or unlocking memory (perhaps also
    # querying an event) on any thread would fail and invalidate the user's capture. stoker's calls run with
    # their thread's mode relaxed (the fake refuses them otherwise) and the mode is put back after each.
    out = run(f"""
        import numpy as np
        lib = fake()
        pool = core.BufferPool(1 << 20, pin_device=0)
        data = np.arange(64 * 10, dtype=np.float32).reshape(64, 10)
        source = core.ArraySource([("x", data.ctypes.data, 64, 40, 40, 2, 32, [10])])
        pipe = core.ArrayPipeline(source, pool, (64, 8, False, True, 7, 0, 0, 1), 0, 3, 4)  # native threads
        batches = 0
        while (caps := pipe.next()) is not None:
            batches += 1
        pipe.stop()
        del pipe, caps
        block = pool.empty([3 << 20], 1, 8)  # larger than the cache: freed when dropped
        del block
        ring = core.SlotRing({ring_file!r}, 1 << 20, 3)
        ring.pin(0)
        lease = ring.lease(ring.acquire(), 5000)
        out["ring"] = [ring.pinned, ring.pin_error]
        stream = core.CudaStream(0)
        src, dst = np.arange(256, dtype=np.uint8), np.zeros(256, dtype=np.uint8)
        stream.copy_to_device(dst.ctypes.data, src.ctypes.data, 256)
        event = stream.record()
        event.query()
        event.synchronize()
        event.block_stream(0)
        out["copied"] = bool((dst == src).all())
        del lease, ring, pool, stream, event
        gc.collect()
        out["batches"] = batches
        out["counts"] = {{k: count(k) for k in ("host_alloc", "host_free", "register", "unregister",
                                                 "capture_refused")}}
        out["mode_after"] = lib.fake_thread_capture_mode()
    """, library=fake_driver["current"], mode="capture")
    assert out["batches"] == 8 and out["ring"] == [True, ""] and out["copied"] is True
    c = out["counts"]
    assert c["capture_refused"] == 0
    assert c["host_alloc"] == c["host_free"] >= 2 and c["register"] == c["unregister"] == 1
    assert out["mode_after"] == 0  # the thread's own (global) mode, back


@pytest.mark.parametrize("given", [None, "EAGER"])
def test_lazy_module_loading_is_asked_for_before_the_driver_starts_unless_set(given):
    # torch asks for it at its first CUDA call; stoker's driver layer may start the driver before that.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CUDA_MODULE_LOADING"}
    if given is not None:
        env["CUDA_MODULE_LOADING"] = given
    code = "import os, stoker; print(os.environ.get('CUDA_MODULE_LOADING'))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (given or "LAZY")
