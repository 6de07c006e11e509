"""The bench runner's GPU section (python -m stoker bench --only gpu): skipped without a CUDA GPU.

Three workloads, each side by side in one run:

* host-to-device: batches of 8 and 64 MiB through stoker.DataLoader(device="cuda") against the peak of a plain
  pinned cuMemcpyHtoDAsync of the same bytes in a loop (a stream of stoker's, one page-locked block), against
  stoker's device stage alone (batches collated into page-locked blocks already: the transfer without the
  gather) and against torch's DataLoader(pin_memory=True) + .to(device, non_blocking=True); only the copies
  made while the clock runs are counted;
* a training loop whose GPU step is longer than stoker's loading of a batch (set in the run: twice the loading
  time measured alone): GPU idle share of the step time (against the same steps on a batch already on the
  GPU) and end-to-end speed against torch's recipe;
* uint8 images normalised on the GPU (device_transform=stoker.Normalize) against normalising on the CPU in the
  collate function and copying float32.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import TensorDataset

import stoker
from stoker import _cuda, _device
from stoker import _normalize as _normalize_module
from stoker._native import core, from_dlpack

__all__ = ["bench_gpu"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _rate(fn: Callable[[], float], rounds: int) -> float:
    """Median of `rounds` calls of fn (a rate, or seconds per step), after one call unmeasured (workers started,
    pinned blocks allocated, kernels loaded)."""
    fn()
    return statistics.median(fn() for _ in range(rounds))


def _peak_copy(nbytes: int, device: torch.device, reps: int) -> float:
    """Bytes/s of back-to-back cuMemcpyHtoDAsync from one page-locked block on a stream of stoker's."""
    pool = _cuda.pinned_pool(device.index)
    src = from_dlpack(pool.empty([nbytes], 1, 8))  # uint8
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = _device.target_for(device).stream
    stream.copy_to_device(dst.data_ptr(), src.data_ptr(), nbytes)
    stream.record().synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        stream.copy_to_device(dst.data_ptr(), src.data_ptr(), nbytes)
    stream.record().synchronize()
    return reps * nbytes / (time.perf_counter() - start)


def _epoch_bytes_per_s(batches, staged: int, to_device: torch.device | None = None) -> float:
    """Bytes/s copied to the device over one epoch after its first batch. `staged`: the batches after the first
    whose copies were made before the clock started (a device stage copies that many ahead): not counted."""
    it = iter(batches)
    first = next(it)[0]
    if to_device is not None:
        first = first.to(to_device, non_blocking=True)
    nbytes_each = first.numel() * first.element_size()
    torch.cuda.synchronize()
    received = 0
    start = time.perf_counter()
    for batch in it:
        x = batch[0]
        if to_device is not None:
            x = x.to(to_device, non_blocking=True)
        received += 1
    torch.cuda.synchronize()
    return (received - staged) * nbytes_each / (time.perf_counter() - start)


def _h2d(opts, device: torch.device) -> list[dict]:
    out, records = opts.out, []
    row = 64 << 10
    threads = max(2, min(12, (os.cpu_count() or 4) - 2))
    print(f"\nhost-to-device: uint8 rows of 64 KiB, shuffled, batches of the size shown, {threads} workers (GB/s)",
          file=out, flush=True)
    for mib in (8, 64):
        rows = (mib << 20) // row
        batches = (8 if opts.quick else 40) if mib == 8 else (6 if opts.quick else 20)
        n = rows * batches
        data = TensorDataset(torch.full((n, row), 7, dtype=torch.uint8))  # every page written
        reps = max(8, (256 if mib == 8 else 32) // (4 if opts.quick else 1))
        peak = _rate(lambda: _peak_copy(mib << 20, device, reps), opts.rounds)
        # The device stage alone: batches already collated into page-locked blocks (eight, reused in turn).
        pool = _cuda.pinned_pool(device.index)
        blocks = [from_dlpack(pool.empty([rows, row], 1, 8)) for _ in range(8)]
        depth = 2

        def staged_only():
            inner = iter([[blocks[i % len(blocks)]] for i in range(batches)])
            return _epoch_bytes_per_s(_device.stage(inner, device, depth, None, None), depth)

        stage = _rate(staged_only, opts.rounds)
        stoker_dl = stoker.DataLoader(data, batch_size=rows, shuffle=True, num_workers=threads, device=device,
                                      device_prefetch=depth)
        torch_dl = TorchDataLoader(data, batch_size=rows, shuffle=True, num_workers=threads, pin_memory=True,
                                   persistent_workers=True)
        s = _rate(lambda: _epoch_bytes_per_s(stoker_dl, depth), opts.rounds)
        t = _rate(lambda: _epoch_bytes_per_s(torch_dl, 0, device), opts.rounds)
        del torch_dl, blocks
        for name, rate in (("pinned cuMemcpyHtoDAsync loop (peak)", peak),
                           ("stoker device stage, batches pinned already", stage),
                           ("stoker DataLoader(device='cuda')", s),
                           ("torch pin_memory + .to(non_blocking)", t)):
            rec = {"workload": f"host-to-device {mib} MiB batches", "loader": name, "bytes_per_s": rate,
                   "ratio_to_peak": rate / peak, "ratio_to_torch": rate / t}
            records.append(rec)
            print(f"  {mib:3d} MiB  {name:<44} {rate / 1e9:7.2f} GB/s   x{rate / peak:5.2f} of peak   "
                  f"x{rate / t:5.2f} torch", file=out, flush=True)
    return records


def _training(opts, device: torch.device) -> list[dict]:
    """A GPU step longer than stoker's loading of a batch: its length is set in the run, twice the time stoker
    takes to deliver a batch to the GPU (measured first, loading alone), in whole matrix products."""
    out = opts.out
    batch, features = 512, 4096
    n = batch * (20 if opts.quick else 60)
    data = TensorDataset(torch.randn(n, features), torch.randint(0, 10, (n,)))
    weight = torch.randn(features, features, device=device) / features ** 0.5
    workers = 4
    stoker_dl = stoker.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, device=device)
    torch_dl = TorchDataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=True,
                               persistent_workers=True)

    def run(batches, convert, products: int) -> float:
        torch.cuda.synchronize()
        start, steps = time.perf_counter(), 0
        for b in batches:
            x = convert(b)
            for _ in range(products):
                x = torch.tanh(x @ weight)
            steps += 1
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


    resident = data.tensors[0][:batch].to(device)
    steps = n // batch
    product = _rate(lambda: run([resident] * steps, lambda b: b, 1), opts.rounds)
    load_stoker = _rate(lambda: run(stoker_dl, lambda b: b[0], 0), opts.rounds)
    load_torch = _rate(lambda: run(torch_dl, lambda b: b[0].to(device, non_blocking=True), 0), opts.rounds)
    products = min(64, max(1, math.ceil(2 * load_stoker / product)))  # bounded: a slow loader is shown, not waited on
    ideal = _rate(lambda: run([resident] * steps, lambda b: b, products), opts.rounds)
    s = _rate(lambda: run(stoker_dl, lambda b: b[0], products), opts.rounds)
    t = _rate(lambda: run(torch_dl, lambda b: b[0].to(device, non_blocking=True), products), opts.rounds)
    del torch_dl
    print(f"\ntraining loop: float32 [{batch}, {features}] batches, {workers} workers; loading alone: stoker "
          f"{1e3 * load_stoker:.2f} ms, torch {1e3 * load_torch:.2f} ms a batch; a GPU step of {products} "
          f"matmuls ({1e3 * ideal:.2f} ms on a resident batch)", file=out, flush=True)
    records = []
    for name, per_step in (("batch already on the GPU (ideal)", ideal), ("stoker DataLoader(device='cuda')", s),
                           ("torch pin_memory + .to(non_blocking)", t)):
        idle = max(0.0, (per_step - ideal) / per_step)
        rec = {"workload": "training loop", "loader": name, "step_ms": 1e3 * per_step, "gpu_idle_share": idle,
               "ratio_to_torch": t / per_step, "products": products, "load_ms_stoker": 1e3 * load_stoker,
               "load_ms_torch": 1e3 * load_torch}
        records.append(rec)
        print(f"  {name:<40} {1e3 * per_step:8.3f} ms/step   GPU idle {100 * idle:5.1f}%   x{t / per_step:5.2f} torch",
              file=out, flush=True)
    return records


def _normalize(opts, device: torch.device) -> list[dict]:
    out = opts.out
    n = 1024 if opts.quick else 4096
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
    data = TensorDataset(images, torch.randint(0, 1000, (n,)))
    bs = 128
    gpu_norm = stoker.Normalize(MEAN, STD, key=0)
    cpu_norm = stoker.Normalize(MEAN, STD, key=0)

    def cpu_collate(samples):
        return cpu_norm(torch.utils.data.default_collate(samples))

    def images_per_s(loader, convert) -> float:
        torch.cuda.synchronize()
        start, seen = time.perf_counter(), 0
        for b in loader:
            x = convert(b)
            seen += x.shape[0]
        torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)

    on_gpu = stoker.DataLoader(data, batch_size=bs, shuffle=True, num_workers=8, device=device,
                               device_transform=gpu_norm)
    on_cpu = TorchDataLoader(data, batch_size=bs, shuffle=True, num_workers=8, pin_memory=True,
                             persistent_workers=True, collate_fn=cpu_collate)
    g = _rate(lambda: images_per_s(on_gpu, lambda b: b[0]), opts.rounds)  # each after a warm-up pass
    c = _rate(lambda: images_per_s(on_cpu, lambda b: b[0].to(device, non_blocking=True)), opts.rounds)
    print(f"\nuint8 images [3, 224, 224] normalised to float32, batch {bs} (images/s)", file=out, flush=True)
    records = []
    for name, rate in (("stoker: bytes to the GPU, Normalize there", g),
                       ("torch: normalised on the CPU, float32 copied", c)):
        rec = {"workload": "normalise on the GPU", "loader": name, "images_per_s": rate, "ratio_to_torch": rate / c}
        records.append(rec)
        print(f"  {name:<46} {rate:10.0f} images/s   x{rate / c:5.2f}", file=out, flush=True)
    # Asked after the runs: kernels that failed to load have switched normalise to torch ops by now.
    fused = _normalize_module.kernels_available()
    used = "yes" if fused else f"no, torch ops ({core.cuda_kernels_reason() or 'they failed to load'})"
    print(f"  (fused kernel: {used})", file=out, flush=True)
    for rec in records:
        rec["fused_kernel"] = fused
    return records


def bench_gpu(opts) -> list[dict]:
    from stoker._bench import Skipped

    if not torch.cuda.is_available():
        raise Skipped("no CUDA GPU here (or torch is a CPU build)")
    if not stoker.cuda_available():
        raise Skipped(f"stoker cannot use CUDA here: {_cuda.cuda_status()['reason']}")
    device = torch.device("cuda", torch.cuda.current_device())
    records = []
    for part in (_h2d, _training, _normalize):
        name = part.__name__.strip("_")
        opts.progress(name)
        try:
            records += part(opts, device)
        except Exception as exc:  # noqa: BLE001 - one workload failing (a small /dev/shm, say) keeps the others'
            print(f"\n{name}: failed: {type(exc).__name__}: {exc}", file=opts.out, flush=True)
            records.append({"workload": name, "error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.synchronize()
    return records
