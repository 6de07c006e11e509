"""`python -m stoker bench`: stoker against torch's DataLoader on built-in synthetic workloads.

Each workload builds its data once, then runs its loaders interleaved for several rounds after a warm-up
and reports the median samples/s, the ratio to torch's best configuration on that workload, and the time
from iter() to the first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset, TensorDataset

import stoker

__all__ = ["main"]


class CropFlip(Dataset):
    """A Python dataset doing numpy work per sample: random 56x56 crop and horizontal flip of uint8 3x64x64."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        rng = np.random.default_rng(0)  # the "random" choices, drawn once so they cost nothing per sample
        self.offsets = rng.integers(0, 9, size=(len(images), 2)).tolist()
        self.flips = (rng.random(len(images)) < 0.5).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        y, x = self.offsets[i]
        crop = self.images[i, :, y:y + 56, x:x + 56]
        if self.flips[i]:
            crop = crop[:, :, ::-1]
        return np.ascontiguousarray(crop), int(self.labels[i])


@dataclass
class Case:
    name: str
    make: Callable[[], object]  # returns an iterable of batches (a loader)
    baseline: bool = False  # a torch configuration: the ratio is taken to the best of these
    results: list = field(default_factory=list)
    first_batch: list = field(default_factory=list)


@dataclass
class Workload:
    name: str
    samples: int
    cases: list


def _first_len(batch) -> int:
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return int(batch.shape[0])


def _run_once(case: Case, limit: int) -> None:
    start = time.perf_counter()
    it = iter(case.make())
    batch = next(it)
    case.first_batch.append(time.perf_counter() - start)
    seen = _first_len(batch)
    for batch in it:
        seen += _first_len(batch)
        if seen >= limit:
            break
    case.results.append(seen / (time.perf_counter() - start))


def _workloads(scale: float, tmp: str) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    n = max(1024, int(200_000 * scale))
    x = torch.randn(n, 256, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    dense = TensorDataset(x, y)
    xn, yn = x.numpy(), y.numpy()

    def numpy_gather(bs: int = 256):
        perm = np.random.default_rng().permutation(n)
        for i in range(0, n, bs):
            j = perm[i:i + bs]
            yield torch.from_numpy(xn[j]), torch.from_numpy(yn[j])

    path = os.path.join(tmp, "features.npy")
    np.save(path, xn)
    mm = np.load(path, mmap_mode="r")
    mmap_ds = stoker.ArrayDataset(mm, yn)

    tiny = TensorDataset(torch.randn(n, generator=g), torch.randint(0, 10, (n,), generator=g))
    n_large = max(64, int(2_000 * scale))
    large = TensorDataset(torch.randn(n_large, 65536, generator=g), torch.arange(n_large))
    n_img = max(512, int(20_000 * scale))
    images = np.random.default_rng(0).integers(0, 256, size=(n_img, 3, 64, 64), dtype=np.uint8)
    crop = CropFlip(images, np.arange(n_img))

    def torch_dl(ds, bs, nw=0, **kw):
        return lambda: TorchDataLoader(ds, batch_size=bs, shuffle=True, num_workers=nw,
                                       persistent_workers=nw > 0, **kw)

    def stoker_dl(ds, bs, nw=0):
        return lambda: stoker.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=nw)

    return [
        Workload("arrays: TensorDataset float32[256]+label, batch 256", n, [
            Case("torch num_workers=0", torch_dl(dense, 256), baseline=True),
            Case("numpy fancy-index gather", numpy_gather),
            Case("stoker num_workers=0", stoker_dl(dense, 256)),
            Case("stoker num_workers=2", stoker_dl(dense, 256, 2)),
        ]),
        Workload("memory-mapped .npy float32[256]+label, batch 256", n, [
            Case("torch num_workers=0", torch_dl(mmap_ds, 256), baseline=True),
            Case("stoker num_workers=0", stoker_dl(mmap_ds, 256)),
            Case("stoker num_workers=2", stoker_dl(mmap_ds, 256, 2)),
        ]),
        Workload("tiny: one float + label, batch 1024", n, [
            Case("torch num_workers=0", torch_dl(tiny, 1024), baseline=True),
            Case("stoker num_workers=0", stoker_dl(tiny, 1024)),
        ]),
        Workload("large: 256 KiB samples, batch 16", n_large, [
            Case("torch num_workers=0", torch_dl(large, 16), baseline=True),
            Case("stoker num_workers=0", stoker_dl(large, 16)),
            Case("stoker num_workers=2", stoker_dl(large, 16, 2)),
        ]),
        Workload("Python dataset: crop 56 + flip of uint8 3x64x64, batch 256", n_img, [
            Case("torch num_workers=0", torch_dl(crop, 256), baseline=True),
            Case("torch num_workers=2", torch_dl(crop, 256, 2), baseline=True),
            Case("stoker num_workers=0", stoker_dl(crop, 256)),
            Case("stoker num_workers=2", stoker_dl(crop, 256, 2)),
        ]),
    ]


def run(scale: float = 1.0, rounds: int = 3, budget_s: float = 4.0, only: str | None = None,
        out=sys.stdout) -> list[dict]:
    """Runs every workload and returns one record per (workload, loader)."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in _workloads(scale, tmp):
            if only and only.lower() not in w.name.lower():
                continue
            print(f"\n{w.name} ({w.samples} samples)", file=out, flush=True)
            # Warm-up: one short pass of each case, which also sizes the rounds to the time budget.
            limits = {}
            for case in w.cases:
                t = time.perf_counter()
                _run_once(case, min(w.samples, 4096))
                rate = case.results.pop()
                case.first_batch.pop()
                limits[case.name] = int(min(w.samples, max(4096, rate * budget_s / rounds)))
                del t
            for _ in range(rounds):
                for case in w.cases:
                    _run_once(case, limits[case.name])
            best_torch = max(statistics.median(c.results) for c in w.cases if c.baseline)
            for case in w.cases:
                rate = statistics.median(case.results)
                rec = {
                    "workload": w.name, "loader": case.name, "samples_per_s": rate,
                    "ratio_to_torch_best": rate / best_torch,
                    "first_batch_ms": 1e3 * statistics.median(case.first_batch),
                }
                records.append(rec)
                print(f"  {case.name:<28} {rate / 1e6:9.3f} M samples/s   x{rec['ratio_to_torch_best']:7.2f}"
                      f"   first batch {rec['first_batch_ms']:8.2f} ms", file=out, flush=True)
    return records


_MEMORY_SCRIPT = """
import resource, sys, torch
from torch.utils.data import DataLoader, TensorDataset
import stoker

def peak_kib():
    # VmHWM belongs to this process image; ru_maxrss would also count the parent's pages at fork time.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

n = int(sys.argv[2])
g = torch.Generator().manual_seed(0)
ds = TensorDataset(torch.randn(n, 256, generator=g), torch.randint(0, 1000, (n,), generator=g))
before = peak_kib()
cls = DataLoader if sys.argv[1] == "torch" else stoker.DataLoader
for _ in range(2):
    for batch in cls(ds, batch_size=256, shuffle=True):
        pass
after = peak_kib()
print(before, after)
"""


def peak_memory(scale: float = 1.0, out=sys.stdout) -> list[dict]:
    """Peak RSS of two epochs over the dense workload, each loader in a fresh process."""
    n = max(1024, int(200_000 * scale))
    print(f"\npeak RSS, two epochs of TensorDataset float32[256]+label ({n} samples), batch 256, "
          "each in a fresh process", file=out, flush=True)
    records = []
    for kind in ("torch", "stoker"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, kind, str(n)], capture_output=True,
                              text=True, check=True)
        before, after = (int(v) / 1024 for v in proc.stdout.split())
        records.append({"workload": "peak RSS", "loader": f"{kind} num_workers=0", "peak_rss_mib": after,
                        "growth_while_loading_mib": after - before})
        print(f"  {kind + ' num_workers=0':<28} peak {after:8.1f} MiB   (+{after - before:6.1f} MiB while "
              "loading)", file=out, flush=True)
    return records


class _IndexBatches(Dataset):
    """A dataset whose batches cost nothing to load, for timing a loader's own resume machinery."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return i

    def __getitems__(self, indices):
        return indices


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resume_cost(scale: float = 1.0, out=sys.stdout) -> list[dict]:
    """Time from load_state_dict() to the first batch, resuming deep in an epoch of 10 million samples."""
    n = max(100_000, int(10_000_000 * scale))
    bs = 1000
    at = (n // bs) * 9 // 10
    print(f"\nresume: load_state_dict() + iter() + first batch at batch {at} of {n // bs} "
          f"({n} samples, batch {bs}, shuffle)", file=out, flush=True)
    data = np.arange(n)
    records = []

    def record(name: str, seconds: float, note: str = "") -> None:
        records.append({"workload": "resume", "loader": name, "resume_ms": 1e3 * seconds})
        print(f"  {name:<28} {1e3 * seconds:10.2f} ms{note}", file=out, flush=True)

    def stoker_loader():
        return stoker.DataLoader(data, batch_size=bs, shuffle=True)

    saved = stoker_loader()
    it = iter(saved)
    for _ in range(at):
        next(it)
    state = json.loads(json.dumps(saved.state_dict()))
    del it

    def stoker_resume():
        loader = stoker_loader()
        loader.load_state_dict(state)
        next(iter(loader))

    record("stoker", _median_time(stoker_resume, 5))

    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        StatefulDataLoader = None
    if StatefulDataLoader is not None:
        warnings.filterwarnings("ignore", message=".*set_vital", category=UserWarning)
        # Reaching the position costs torchdata seconds even with batches that cost nothing to load.
        fast = _IndexBatches(n)
        saved = StatefulDataLoader(fast, batch_size=bs, shuffle=True, collate_fn=list)
        it = iter(saved)
        for _ in range(at):
            next(it)
        td_state = saved.state_dict()
        del it

        def torchdata_resume():
            loader = StatefulDataLoader(fast, batch_size=bs, shuffle=True, collate_fn=list)
            loader.load_state_dict(td_state)
            next(iter(loader))

        record("torchdata StatefulDataLoader", _median_time(torchdata_resume, 1), "   (replays the sampler)")

    # torch's DataLoader has no state: resuming means iterating the batches already served.
    probe = 200
    loader = TorchDataLoader(data, batch_size=bs, shuffle=True)
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        if i + 1 == probe:
            break
    per_batch = (time.perf_counter() - start) / probe
    record("torch DataLoader", per_batch * (at + 1),
           f"   (no state_dict: replaying {at} batches, estimated from {probe})")
    return records


def _numpy_packing(lengths: np.ndarray, seq_len: int):
    """Best-fit decreasing written plainly in Python and numpy: the plan as lists of (doc, offset, length)."""
    import bisect

    pieces = []
    for doc, n in enumerate(lengths.tolist()):
        for off in range(0, n, seq_len):
            pieces.append((doc, off, min(seq_len, n - off)))
    pieces.sort(key=lambda p: -p[2])
    rows: list[list] = []
    rooms: list[tuple[int, int]] = []  # (room, row), sorted
    for piece in pieces:
        i = bisect.bisect_left(rooms, (piece[2], -1))
        if i == len(rooms):
            rows.append([piece])
            room, row = seq_len - piece[2], len(rows) - 1
        else:
            room, row = rooms.pop(i)
            rows[row].append(piece)
            room -= piece[2]
        if room > 0:
            bisect.insort(rooms, (room, row))
    return rows


def _numpy_batches(tokens, offsets, rows, seq_len: int, batch: int):
    """The packed batches built with numpy, one segment at a time."""
    for b in range(0, len(rows), batch):
        chunk = rows[b:b + batch]
        ids = np.zeros((len(chunk), seq_len), np.int64)
        pos = np.zeros((len(chunk), seq_len), np.int64)
        seq_idx = np.zeros((len(chunk), seq_len), np.int32)
        labels = np.full((len(chunk), seq_len), -100, np.int64)
        lens = []
        for r, row in enumerate(chunk):
            at = 0
            for doc, off, n in row:
                start = offsets[doc] + off
                ids[r, at:at + n] = tokens[start:start + n]
                labels[r, at + 1:at + n] = ids[r, at + 1:at + n]
                pos[r, at:at + n] = np.arange(n)
                seq_idx[r, at:at + n] = len(lens)
                lens.append(n)
                at += n
            if at < seq_len:
                pos[r, at:] = np.arange(seq_len - at)
                seq_idx[r, at:] = len(lens)
                lens.append(seq_len - at)
        cu = np.zeros(len(lens) + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        yield {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
               "position_ids": torch.from_numpy(pos), "seq_idx": torch.from_numpy(seq_idx),
               "cu_seqlens": torch.from_numpy(cu), "max_length_q": int(max(lens))}


def _numpy_write(tokens: np.ndarray, seq_len: int, batch: int, total: int):
    """The memcpy-class bound: numpy only writing arrays of the output's size from consecutive tokens."""
    cells = seq_len * batch
    pos = np.tile(np.arange(seq_len, dtype=np.int64), batch)
    for start in range(0, total - cells + 1, cells):
        ids = tokens[start:start + cells].astype(np.int64)
        labels = ids.copy()
        positions = pos.copy()
        seq_idx = np.zeros(cells, np.int32)
        yield ids, labels, positions, seq_idx


def packing_bench(scale: float = 1.0, rounds: int = 3, out=sys.stdout) -> list[dict]:
    """Packing lognormal documents from a memory-mapped token file into rows of 4096, batches of 8."""
    n = max(2_000, int(200_000 * scale))
    seq_len, batch = 4096, 8
    rng = np.random.default_rng(1234)
    lengths = np.clip(np.round(rng.lognormal(np.log(600) - 0.5, 1.0, n)), 16, 8192).astype(np.int64)
    total = int(lengths.sum())
    print(f"\npacking: {n} documents, {total} tokens (lognormal lengths, mean {lengths.mean():.0f}), "
          f"memory-mapped uint16, rows of {seq_len}, batch {batch}; tokens/s of input", file=out, flush=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        docs = np.split(rng.integers(0, 50_000, total, dtype=np.uint16), np.cumsum(lengths)[:-1])
        stoker.write_token_files(os.path.join(tmp, "docs"), docs, dtype=np.uint16)
        del docs
        ds = stoker.TokenDataset.open(os.path.join(tmp, "docs"))
        tokens, offsets = ds.tokens, ds.offsets

        def timed(make_iter) -> float:
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                for _batch in make_iter():
                    pass
                times.append(time.perf_counter() - start)
            return total / statistics.median(times)

        bound = timed(lambda: _numpy_write(tokens, seq_len, batch, total))
        cases = []
        for window in (None, 1000):
            loader = stoker.PackedLoader(ds, seq_len, batch, seed=0, window=window)
            rate = timed(lambda loader=loader: loader)
            cases.append((f"stoker PackedLoader window={window}", rate, loader.stats()))
        start = time.perf_counter()
        plan = _numpy_packing(lengths, seq_len)
        for _batch in _numpy_batches(tokens, offsets, plan, seq_len, batch):
            pass
        numpy_rate = total / (time.perf_counter() - start)
        cases.append(("numpy BFD packing (reference)", numpy_rate,
                      {"rows": len(plan), "efficiency": total / (len(plan) * seq_len)}))
        for name, rate, stats in [("numpy writing the outputs only", bound, None)] + cases:
            rec = {"workload": "packing", "loader": name, "tokens_per_s": rate,
                   "ratio_to_numpy_write": rate / bound, "ratio_to_numpy_packing": rate / numpy_rate}
            line = f"  {name:<36} {rate / 1e6:9.1f} M tokens/s   x{rate / bound:5.2f} of the write bound"
            if stats is not None:
                rec["rows"], rec["efficiency"] = stats["rows"], stats["efficiency"]
                line += f"   x{rate / numpy_rate:6.1f} numpy packing   {stats['rows']} rows, " \
                        f"efficiency {100 * stats['efficiency']:.3f}%"
                if "max_delay_rows" in stats and name.startswith("stoker") and "1000" in name:
                    rec["max_delay_rows"] = stats["max_delay_rows"]
                    line += f", max delay {stats['max_delay_rows']} rows"
            records.append(rec)
            print(line, file=out, flush=True)
        print(f"  lower bound: {-(-total // seq_len)} rows", file=out, flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stoker bench", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size factor (default 1.0)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per loader (default 3)")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of measurement per loader over all rounds (default 3)")
    parser.add_argument("--only", help="run only workloads whose name contains this text")
    parser.add_argument("--json", metavar="FILE", help="also write the records as JSON to FILE")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"stoker {stoker.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          "ratio = samples/s over torch's best configuration in the same run")
    records = run(args.scale, args.rounds, args.budget, args.only)
    if not args.only:
        records += peak_memory(args.scale)
    if not args.only or args.only.lower() in "resume":
        records += resume_cost(args.scale)
    if not args.only or args.only.lower() in "packing":
        records += packing_bench(args.scale, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0
