"""Where the time from iter() to the first batch goes with worker processes (fork): a diagnostic, not a test.

Runs fresh loaders over the bench's crop + flip dataset (uint8 3x64x64, crop 56 + flip, batch 256, shuffle,
persistent workers), torch's and stoker's interleaved, and prints for each the median time since iter() of
these moments, in the main process and in each worker:

  start<k>_b / start<k>_e   the main process starts / returns from starting worker k (the fork)
  w<k>_loop                  worker k enters its loop (stoker's _worker_loop, torch's _worker_loop)
  w<k>_s1 / w<k>_s<B>        worker k begins its first sample / ends the last sample of its first batch
  w<k>_send                  worker k hands its first batch to the result queue (stoker)
  got                        the main process has the first batch's message (stoker)
  next_ret / next2           next() returned the first / the second batch

and, between a worker's successive moments, the CPU time it used and the minor page faults it took (at
w<k>_loop: since its fork). The clocks are CLOCK_MONOTONIC (perf_counter_ns), shared by all processes;
the moments are written into an anonymous shared mapping made before any fork.

It wraps private functions of stoker._workers and torch.utils.data._utils.worker: update it when they change.
Example (from the repository root, after a build):

    PYTHONPATH=python python tools/first_batch_probe.py --reps 15
    PYTHONPATH=python python tools/first_batch_probe.py --n 20000 --which stoker --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import resource
import statistics
import struct
import time

from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import get_worker_info
from torch.utils.data._utils import worker as torch_worker

import stoker
from stoker import _workers
from stoker._bench import CropFlip, _crop_flip

_RECORD = struct.Struct("qqq")  # perf_counter_ns, process_time_ns, minor faults
_MAX_WORKERS = 8


class Moments:
    """Named moments in a shared mapping: written by any process, read by the main one."""

    def __init__(self, batch_size: int) -> None:
        names = ["iter", "next_ret", "next2", "got"]
        for k in range(_MAX_WORKERS):
            names += [f"start{k}_b", f"start{k}_e"]
            names += [f"w{k}_{m}" for m in ("loop", "s1", f"s{batch_size}", "send")]
        self.index = {name: i for i, name in enumerate(names)}
        self.shm = mmap.mmap(-1, _RECORD.size * len(names))

    def mark(self, name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _RECORD.pack_into(self.shm, _RECORD.size * self.index[name], time.perf_counter_ns(), time.process_time_ns(),
                          usage.ru_minflt)

    def clear(self) -> None:
        self.shm[:] = bytes(len(self.shm))

    def read(self) -> dict:
        out = {}
        for name, i in self.index.items():
            record = _RECORD.unpack_from(self.shm, _RECORD.size * i)
            if record[0]:
                out[name] = record
        return out


class ProbedCropFlip(CropFlip):
    """The bench's dataset, marking the first and the batch_size-th sample a worker loads."""

    moments: Moments
    batch_size = 256
    count = 0

    def __getitem__(self, i):
        ProbedCropFlip.count += 1
        worker = get_worker_info()
        k = 0 if worker is None else worker.id
        if ProbedCropFlip.count == 1:
            self.moments.mark(f"w{k}_s1")
        out = super().__getitem__(i)
        if ProbedCropFlip.count == self.batch_size:
            self.moments.mark(f"w{k}_s{self.batch_size}")
        return out


def _wrap(moments: Moments) -> None:
    """Marks worker loop entries, stoker's first replies, receipts and worker starts."""
    stoker_loop, torch_loop, send = _workers._worker_loop, torch_worker._worker_loop, _workers._send

    def probed_stoker_loop(*args):
        moments.mark(f"w{args[8]}_loop")  # worker_id
        return stoker_loop(*args)

    def probed_torch_loop(*args, **kwargs):
        moments.mark(f"w{args[10]}_loop")  # worker_id
        return torch_loop(*args, **kwargs)

    def probed_send(result_queue, msg, worker_id):
        if msg[1] == worker_id and msg[3] in ("ring", "pickled"):  # batch k is worker k's first (map-style)
            moments.mark(f"w{worker_id}_send")
        return send(result_queue, msg, worker_id)

    _workers._worker_loop, _workers._send = probed_stoker_loop, probed_send
    torch_worker._worker_loop = probed_torch_loop
    get = _workers.WorkerPool.get

    def probed_get(self, timeout):
        msg = get(self, timeout)
        if msg[1] == 0:
            moments.mark("got")
        return msg

    _workers.WorkerPool.get = probed_get
    import multiprocessing.process

    start = multiprocessing.process.BaseProcess.start

    def probed_start(self):
        k = getattr(self, "_probe_worker", None)
        if k is None:
            return start(self)
        moments.mark(f"start{k}_b")
        start(self)
        moments.mark(f"start{k}_e")

    multiprocessing.process.BaseProcess.start = probed_start
    init = _workers.WorkerPool.__init__

    def probed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for k, w in enumerate(self.workers):
            w._probe_worker = k

    _workers.WorkerPool.__init__ = probed_init


def _one(kind: str, dataset, workers: int, batch_size: int, moments: Moments) -> dict:
    cls = TorchDataLoader if kind == "torch" else stoker.DataLoader
    loader = cls(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True)
    gc.collect()
    moments.clear()
    ProbedCropFlip.count = 0
    moments.mark("iter")
    it = iter(loader)
    next(it)
    moments.mark("next_ret")
    next(it)
    moments.mark("next2")
    out = moments.read()
    del it, loader
    gc.collect()
    return out


def _report(kind: str, runs: list[dict]) -> None:
    print(f"\n{kind}: ms since iter(), median of {len(runs)} (p25..p75)")
    names = sorted({n for r in runs for n in r if n != "iter"},
                   key=lambda n: (n.split("_")[0] if n.startswith("w") else "", statistics.median(
                       r[n][0] - r["iter"][0] for r in runs if n in r)))
    previous = {}
    for name in names:
        values = sorted((r[name][0] - r["iter"][0]) / 1e6 for r in runs if name in r)
        p25, p75 = values[len(values) // 4], values[3 * len(values) // 4]
        line = f"  {name:<12} {statistics.median(values):8.2f}   ({p25:.2f}..{p75:.2f})"
        if name.startswith("w"):
            worker = name.split("_")[0]
            before = previous.get(worker)
            pairs = [(r[name], r[before] if before else (0, 0, 0))
                     for r in runs if name in r and (not before or before in r)]
            cpu = statistics.median((a[1] - b[1]) / 1e6 for a, b in pairs)
            faults = statistics.median(a[2] - b[2] for a, b in pairs)
            line += f"   cpu {cpu:6.2f} ms, {faults:5.0f} faults since {before or 'fork'}"
            previous[worker] = name
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="samples (100000: the bench's size)")
    parser.add_argument("--reps", type=int, default=9, help="fresh loaders of each kind")
    parser.add_argument("--which", default="torch,stoker", help="comma-separated: torch, stoker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", help="also write every run's raw moments here")
    args = parser.parse_args()
    if not 1 <= args.workers <= _MAX_WORKERS:
        parser.error(f"--workers must be in [1, {_MAX_WORKERS}]")
    moments = Moments(args.batch_size)
    _wrap(moments)
    base = _crop_flip(args.n)
    dataset = ProbedCropFlip(base.images, base.labels)
    ProbedCropFlip.moments, ProbedCropFlip.batch_size = moments, args.batch_size
    kinds = args.which.split(",")
    runs: dict[str, list] = {k: [] for k in kinds}
    for _ in range(args.reps):
        for kind in kinds:
            runs[kind].append(_one(kind, dataset, args.workers, args.batch_size, moments))
    for kind in kinds:
        _report(kind, runs[kind])
    print()
    for kind in kinds:
        first = statistics.median((r["next_ret"][0] - r["iter"][0]) / 1e6 for r in runs[kind])
        second = statistics.median((r["next2"][0] - r["iter"][0]) / 1e6 for r in runs[kind])
        print(f"{kind:<8} first batch {first:7.1f} ms   second {second:7.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)


if __name__ == "__main__":
    main()
