"""`python -m stoker bench`: stoker beside torch's DataLoader (and torchdata, Grain and SPDL, when they are
installed) on built-in synthetic workloads.

Each section runs in a fresh Python process (`--section KEY`, the child mode), so that no section measures what
the one before it left behind; its table is streamed through and its records merged. Each throughput workload
builds its data once, then runs its loaders interleaved for several rounds after a warm-up and reports the
median samples/s and the ratio to torch's best configuration on that workload, measured in the same run. Other
sections time the first batch and the peak memory of worker processes, the cost of a resume, and sequence
packing. --only picks sections, --quick runs a smaller version of everything in a few minutes, --json and
--plot write the records and a bar chart of the ratios. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset, RandomSampler, TensorDataset, default_collate

import stoker
from stoker import _bench_gpu

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


def _crop_flip_size(scale: float) -> int:
    return max(512, int(100_000 * scale))


def _crop_flip(n: int) -> CropFlip:
    images = np.random.default_rng(0).integers(0, 256, size=(n, 3, 64, 64), dtype=np.uint8)
    return CropFlip(images, np.arange(n))


class PngFiles(Dataset):
    """PNG files decoded with PIL per sample, as an image folder would be: open, convert to RGB, random 56x56
    crop and horizontal flip; returns a CHW uint8 tensor and the label."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
        x, y = random.randint(0, im.width - 56), random.randint(0, im.height - 56)
        im = im.crop((x, y, x + 56, y + 56))
        if random.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()), self.labels[i]


def write_pngs(folder: str, n: int, size: int = 64, seed: int = 0) -> list[str]:
    """Writes `n` RGB PNGs of `size`x`size` (smooth colour fields plus noise, so that they compress about as
    little as photographs do) into `folder` and returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        field_ = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
        noise = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        path = os.path.join(folder, f"{i:06d}.png")
        Image.fromarray(np.clip(field_ + noise, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


class TokenSamples(Dataset):
    """Variable-length language-model samples, as a tokenizer hands them over: ``{"input_ids": list of ints,
    "labels": the same list, "index": i}``, 16 to 512 tokens (uniform), built per call."""

    def __init__(self, n: int) -> None:
        self.lengths = np.random.default_rng(0).integers(16, 513, n).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        start = (i * 7) % 30_000
        ids = list(range(start, start + self.lengths[i]))
        return {"input_ids": ids, "labels": ids, "index": i}


class _NumpyGather:
    """The plain numpy answer to an array workload: one shuffled fancy-index gather per batch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        perm = np.random.default_rng().permutation(len(self.x))
        for i in range(0, len(perm), self.batch_size):
            j = perm[i:i + self.batch_size]
            yield torch.from_numpy(self.x[j]), torch.from_numpy(self.y[j])


class _FetchCollate:
    """torchdata nodes' map function for a map-style dataset: a batch of indices in, the collated batch out."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, indices):
        return default_collate([self.dataset[i] for i in indices])


def _optional(module: str):
    """The module, or None when it (or something it needs) cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _import_error(module: str) -> str | None:
    """None when `module` imports, else why not (the ImportError's message: the module it misses)."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return str(error)
    return None


def _torchdata_nodes_loader(dataset, batch_size: int, workers: int, method: str):
    """torchdata's nodes for a map-style dataset: shuffled indices, batched, fetched and collated by a
    ParallelMapper (threads or processes), iterated by a Loader (which restarts the graph each epoch)."""
    from torchdata import nodes

    node = nodes.Batcher(nodes.SamplerWrapper(RandomSampler(dataset)), batch_size=batch_size, drop_last=False)
    node = nodes.ParallelMapper(node, map_fn=_FetchCollate(dataset), num_workers=workers, method=method)
    return nodes.Loader(node)


def _grain_map_dataset(dataset, batch_size: int, threads: int):
    """Grain's dataset API: MapDataset.source(dataset).shuffle().batch(), read by `threads` threads through
    to_iter_dataset (each element read is a batch, so the prefetch buffer holds batches: 2 per thread, as torch's
    prefetch_factor, instead of Grain's default of 500). Batches are numpy arrays stacked by Grain."""
    import grain.python as grain

    node = grain.MapDataset.source(dataset).shuffle(seed=0).batch(batch_size)
    return node.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))


def _grain_data_loader(dataset, batch_size: int, workers: int):
    """Grain's DataLoader: an IndexSampler shuffling one epoch, Batch, `workers` worker processes (spawned, and
    fed the pickled dataset, at every iter(): Grain has no persistent workers), each reading with Grain's default
    ReadOptions."""
    import grain.python as grain

    sampler = grain.IndexSampler(len(dataset), shuffle=True, num_epochs=1, seed=0)
    return grain.DataLoader(data_source=dataset, sampler=sampler, operations=[grain.Batch(batch_size)],
                            worker_count=workers)


def _spdl_loader(dataset, batch_size: int, threads: int):
    """SPDL's DataLoader (a spdl.pipeline Pipeline: source, concurrent stage, sink) over batches of shuffled
    indices, each batch fetched and collated by one call on `threads` threads. (Its per-sample form, a
    preprocessor per index and an aggregator per batch, ran about ten times slower on the crop workload.)"""
    from spdl.dataloader import DataLoader as SpdlDataLoader
    from torch.utils.data import BatchSampler

    indices = BatchSampler(RandomSampler(dataset), batch_size, drop_last=False)
    return SpdlDataLoader(indices, preprocessor=_FetchCollate(dataset), num_threads=threads)


class Skipped(Exception):
    """A section that cannot run here (a package is missing); the message says why."""


@dataclass
class Options:
    scale: float
    rounds: int
    budget: float
    quick: bool
    tmp: str
    out: TextIO = sys.stdout
    progress: Callable[[str], None] = lambda text: None
    notes: list = field(default_factory=list)  # printed under the next workload's title (a column skipped)


@dataclass
class Case:
    name: str
    make: Callable[[], object]  # returns an iterable of batches (a loader), made once and iterated each round
    baseline: bool = False  # a torch configuration: the ratio is taken to the best of these
    results: list = field(default_factory=list)
    first_batch: list = field(default_factory=list)


def _first_len(batch) -> int:
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return int(batch.shape[0])


def _run_once(loader, limit: int) -> tuple[int, float, float, float]:
    """One pass from iter() until `limit` samples: (samples, seconds to the first batch, seconds in all,
    samples/s after the first batch)."""
    start = time.perf_counter()
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter()
    seen = first_len = _first_len(batch)
    if seen < limit:
        for batch in it:
            seen += _first_len(batch)
            if seen >= limit:
                break
    end = time.perf_counter()
    steady = (seen - first_len) / (end - first) if seen > first_len and end > first else seen / (end - start)
    return seen, first - start, end - start, steady


def _throughput(title: str, samples: int, cases: list[Case], opts: Options, min_samples: int = 4096) -> list[dict]:
    """Warm-up, then `opts.rounds` interleaved rounds of every case, each round `opts.budget / opts.rounds`
    seconds long but at least `min_samples` and at most an epoch; one record per case."""
    print(f"\n{title} ({samples} samples)", file=opts.out, flush=True)
    for note in opts.notes:
        print(f"  ({note})", file=opts.out, flush=True)
    opts.notes.clear()
    loaders, limits = {}, {}
    try:
        # Warm-up: one short pass of each case (which starts persistent workers) sizes the rounds to the budget.
        for case in cases:
            loaders[case.name] = case.make()
            _, _, _, steady = _run_once(loaders[case.name], min(samples, min_samples))
            limits[case.name] = int(min(samples, max(min_samples, steady * opts.budget / opts.rounds)))
        for r in range(opts.rounds):
            opts.progress(f"round {r + 1}/{opts.rounds}")
            for case in cases:
                seen, first, total, _ = _run_once(loaders[case.name], limits[case.name])
                case.results.append(seen / total)
                case.first_batch.append(first)
    finally:
        loaders.clear()
        gc.collect()  # shuts persistent workers down before the next workload
    best_torch = max(statistics.median(c.results) for c in cases if c.baseline)
    records = []
    for case in cases:
        rate = statistics.median(case.results)
        rec = {"workload": title, "loader": case.name, "samples_per_s": rate,
               "ratio_to_torch_best": rate / best_torch, "first_batch_ms": 1e3 * statistics.median(case.first_batch)}
        records.append(rec)
        print(f"  {case.name:<44} {rate / 1e6:9.4f} M samples/s   x{rec['ratio_to_torch_best']:7.2f}"
              f"   first batch {rec['first_batch_ms']:8.2f} ms", file=opts.out, flush=True)
    return records


def _torch_dl(ds, bs: int, nw: int = 0):
    return lambda: TorchDataLoader(ds, batch_size=bs, shuffle=True, num_workers=nw, persistent_workers=nw > 0)


def _stoker_dl(ds, bs: int, nw: int = 0, **kw):
    return lambda: stoker.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=nw, persistent_workers=nw > 0,
                                     **kw)


def _torch_baselines(ds, bs: int) -> list[Case]:
    """torch's configurations for a Python dataset: in the main process, and 1 or 2 persistent workers."""
    return [Case("torch num_workers=0", _torch_dl(ds, bs), baseline=True),
            Case("torch num_workers=1 (persistent)", _torch_dl(ds, bs, 1), baseline=True),
            Case("torch num_workers=2 (persistent)", _torch_dl(ds, bs, 2), baseline=True)]


def _torchdata_cases(ds, bs: int, methods: tuple[str, ...], opts: Options) -> list[Case]:
    if _optional("torchdata.nodes") is None:
        opts.notes.append("torchdata is not installed: its nodes column is skipped")
        return []
    return [Case(f"torchdata nodes, 2 {m}{'es' if m == 'process' else 's'}",
                 lambda m=m: _torchdata_nodes_loader(ds, bs, 2, m)) for m in methods]


def _grain_cases(ds, bs: int, opts: Options, processes: bool = True) -> list[Case]:
    """Grain's columns, when grain.python imports: MapDataset read by 2 threads, and (for Python datasets) its
    DataLoader with 2 worker processes."""
    why = _import_error("grain.python")
    if why is not None:
        opts.notes.append(f"grain is not installed or does not import ({why}): its columns are skipped")
        return []
    cases = [Case("grain MapDataset, 2 threads", lambda: _grain_map_dataset(ds, bs, 2))]
    if processes:
        cases.append(Case("grain DataLoader, 2 processes (per epoch)",
                          lambda: _grain_data_loader(ds, bs, 2)))
    return cases


def _spdl_cases(ds, bs: int, opts: Options) -> list[Case]:
    why = _import_error("spdl.dataloader")
    if why is not None:
        opts.notes.append(f"spdl is not installed or does not import ({why}): its column is skipped")
        return []
    return [Case("spdl DataLoader, index batches, 2 threads", lambda: _spdl_loader(ds, bs, 2))]


def _dense(scale: float):
    g = torch.Generator().manual_seed(0)
    n = max(1024, int(200_000 * scale))
    return TensorDataset(torch.randn(n, 256, generator=g), torch.randint(0, 1000, (n,), generator=g))


def bench_arrays(opts: Options) -> list[dict]:
    dense = _dense(opts.scale)
    x, y = dense.tensors[0].numpy(), dense.tensors[1].numpy()
    return _throughput("arrays: TensorDataset float32[256]+label, batch 256", len(dense), [
        Case("torch num_workers=0", _torch_dl(dense, 256), baseline=True),
        Case("numpy fancy-index gather", lambda: _NumpyGather(x, y, 256)),
        Case("stoker num_workers=0", _stoker_dl(dense, 256)),
        Case("stoker num_workers=2", _stoker_dl(dense, 256, 2)),
        *_grain_cases(dense, 256, opts, processes=False),
        *_spdl_cases(dense, 256, opts),
    ], opts)


def bench_mmap(opts: Options) -> list[dict]:
    dense = _dense(opts.scale)
    path = os.path.join(opts.tmp, "features.npy")
    np.save(path, dense.tensors[0].numpy())
    mmap_ds = stoker.ArrayDataset(np.load(path, mmap_mode="r"), dense.tensors[1].numpy())
    del dense
    try:
        return _throughput("memory-mapped .npy float32[256]+label, batch 256", len(mmap_ds), [
            Case("torch num_workers=0", _torch_dl(mmap_ds, 256), baseline=True),
            Case("stoker num_workers=0", _stoker_dl(mmap_ds, 256)),
            Case("stoker num_workers=2", _stoker_dl(mmap_ds, 256, 2)),
        ], opts)
    finally:
        del mmap_ds
        gc.collect()
        os.remove(path)


def bench_tiny(opts: Options) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n = max(1024, int(200_000 * opts.scale))
    tiny = TensorDataset(torch.randn(n, generator=g), torch.randint(0, 10, (n,), generator=g))
    return _throughput("tiny: one float + label, batch 1024", n, [
        Case("torch num_workers=0", _torch_dl(tiny, 1024), baseline=True),
        Case("stoker num_workers=0", _stoker_dl(tiny, 1024)),
    ], opts)


def bench_large(opts: Options) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n = max(64, int(2_000 * opts.scale))
    large = TensorDataset(torch.randn(n, 65536, generator=g), torch.arange(n))
    return _throughput("large: 256 KiB samples, batch 16", n, [
        Case("torch num_workers=0", _torch_dl(large, 16), baseline=True),
        Case("stoker num_workers=0", _stoker_dl(large, 16)),
        Case("stoker num_workers=2", _stoker_dl(large, 16, 2)),
    ], opts)


def bench_big(opts: Options) -> list[dict]:
    # Batches of tens of MiB (ImageNet-sized float32 batches are 150), several in flight at once: more than a
    # fixed pool bound of 64 MiB caches, so each would be allocated and page-faulted afresh.
    g = torch.Generator().manual_seed(0)
    n = max(32, int(2_048 * opts.scale))
    bs = max(8, min(512, n // 4))
    big = TensorDataset(torch.randn(n, 3, 128, 128, generator=g), torch.arange(n))
    return _throughput(f"big batches: 192 KiB samples, batch {bs} ({bs * 3 * 128 * 128 * 4 >> 20} MiB)", n, [
        Case("torch num_workers=0", _torch_dl(big, bs), baseline=True),
        Case("stoker num_workers=0", _stoker_dl(big, bs)),
        Case("stoker num_workers=2", _stoker_dl(big, bs, 2)),
    ], opts, min_samples=4 * bs)


def bench_crop_flip(opts: Options) -> list[dict]:
    crop = _crop_flip(_crop_flip_size(opts.scale))
    return _throughput("Python dataset: crop 56 + flip of uint8 3x64x64, batch 256", len(crop), [
        *_torch_baselines(crop, 256),
        Case("stoker num_workers=0", _stoker_dl(crop, 256)),
        Case("stoker num_workers=2 (processes, persistent)", _stoker_dl(crop, 256, 2)),
        Case("stoker num_workers=2 worker_mode=thread", _stoker_dl(crop, 256, 2, worker_mode="thread")),
        *_torchdata_cases(crop, 256, ("process",), opts),
        *_grain_cases(crop, 256, opts),
        *_spdl_cases(crop, 256, opts),
    ], opts)


def bench_padding(opts: Options) -> list[dict]:
    """Token lists padded by PadCollate (int64 input_ids, labels and attention_mask [64, T]): the same collate_fn
    in every loader. In stoker's worker processes the padded batch is written into its slot of the ring."""
    ds = TokenSamples(max(2048, int(100_000 * opts.scale)))
    collate = stoker.PadCollate(pad_to_multiple_of=8)

    def torch_dl(nw: int):
        return lambda: TorchDataLoader(ds, batch_size=64, shuffle=True, num_workers=nw, persistent_workers=nw > 0,
                                       collate_fn=collate)

    return _throughput("padding: token lists of 16-512 + PadCollate, batch 64", len(ds), [
        Case("torch num_workers=0", torch_dl(0), baseline=True),
        Case("torch num_workers=1 (persistent)", torch_dl(1), baseline=True),
        Case("torch num_workers=2 (persistent)", torch_dl(2), baseline=True),
        Case("stoker num_workers=0", _stoker_dl(ds, 64, collate_fn=collate)),
        Case("stoker num_workers=2 (processes, persistent)", _stoker_dl(ds, 64, 2, collate_fn=collate)),
        Case("stoker num_workers=2 worker_mode=thread", _stoker_dl(ds, 64, 2, collate_fn=collate,
                                                                   worker_mode="thread")),
    ], opts)


def bench_png(opts: Options) -> list[dict]:
    if _optional("PIL.Image") is None:
        raise Skipped("Pillow is not installed (pip install 'stoker[bench]' or pillow)")
    n = max(256, int(5_000 * opts.scale))
    folder = tempfile.mkdtemp(prefix="png-", dir=opts.tmp)
    opts.progress(f"writing {n} PNG files")
    ds = PngFiles(write_pngs(folder, n), [i % 1000 for i in range(n)])
    return _throughput("PNG files decoded with PIL: RGB 64x64, crop 56 + flip, batch 64", n, [
        *_torch_baselines(ds, 64),
        Case("stoker num_workers=0", _stoker_dl(ds, 64)),
        Case("stoker num_workers=2 (processes, persistent)", _stoker_dl(ds, 64, 2)),
        Case("stoker num_workers=2 worker_mode=thread", _stoker_dl(ds, 64, 2, worker_mode="thread")),
        *_torchdata_cases(ds, 64, ("process", "thread"), opts),
        # Grain's DataLoader spawns its workers at every iter(): seconds per round, so --quick leaves it to the
        # crop workload.
        *_grain_cases(ds, 64, opts, processes=not opts.quick),
        *_spdl_cases(ds, 64, opts),
    ], opts, min_samples=512)  # decoding runs at about a thousand samples/s: a round of 4096 would take seconds


def bench_first_batch(opts: Options) -> list[dict]:
    """Time from iter() to the first batch of a fresh loader with two worker processes (median of several),
    the loaders interleaved."""
    crop = _crop_flip(_crop_flip_size(opts.scale))
    reps = 3 if opts.quick else 7
    print(f"\ntime from iter() to the first batch, fresh loaders, num_workers=2, crop + flip ({len(crop)} "
          f"samples), batch 256, median of {reps}", file=opts.out, flush=True)
    makers = {"torch num_workers=2": _torch_dl(crop, 256, 2), "stoker num_workers=2": _stoker_dl(crop, 256, 2)}
    # The other loaders' columns, as in the throughput sections (Grain's DataLoader spawns its workers, seconds
    # per loader, so --quick leaves it out).
    others = [*_torchdata_cases(crop, 256, ("process",), opts), *_grain_cases(crop, 256, opts, processes=not opts.quick),
              *_spdl_cases(crop, 256, opts)]
    makers.update((case.name, case.make) for case in others)
    for note in opts.notes:
        print(f"  ({note})", file=opts.out, flush=True)
    opts.notes.clear()
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(reps):
        for name, make in makers.items():
            loader = make()
            gc.collect()
            start = time.perf_counter()
            it = iter(loader)
            next(it)
            times[name].append(time.perf_counter() - start)
            del it, loader
            gc.collect()  # the workers are shut down before the next loader starts its own
    torch_ms = 1e3 * statistics.median(times["torch num_workers=2"])
    records = []
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        records.append({"workload": "first batch, num_workers=2", "loader": name, "first_batch_ms": ms,
                        "ratio_to_torch": ms / torch_ms})
        print(f"  {name:<44} {ms:9.1f} ms   x{ms / torch_ms:6.2f} of torch's   (min {1e3 * min(values):.1f}, "
              f"max {1e3 * max(values):.1f})", file=opts.out, flush=True)
    return records + _later_epoch_spawn(opts)


def _later_epoch_spawn(opts: Options) -> list[dict]:
    """Time from iter() to the first batch of each later epoch with spawned workers that are not persistent
    (torch starts two interpreters and sends them the dataset at every epoch; stoker forks them from the process
    that received it once)."""
    n = max(2_000, int(10_000 * opts.scale))
    crop = _crop_flip(n)
    epochs = 2 if opts.quick else 4
    print(f"\ntime from iter() to the first batch of epochs 2-{epochs + 1}, num_workers=2, multiprocessing_context="
          f"'spawn', not persistent, crop + flip ({n} samples, {crop.images.nbytes >> 20} MiB), batch 256",
          file=opts.out, flush=True)
    makers = {"torch num_workers=2": lambda: TorchDataLoader(crop, batch_size=256, shuffle=True, num_workers=2,
                                                             multiprocessing_context="spawn"),
              "stoker num_workers=2": lambda: stoker.DataLoader(crop, batch_size=256, shuffle=True, num_workers=2,
                                                                multiprocessing_context="spawn")}
    records, torch_ms = [], None
    for name, make in makers.items():
        loader = make()
        for _batch in loader:  # the first epoch starts what the later ones reuse, if anything
            pass
        times = []
        for _ in range(epochs):
            start = time.perf_counter()
            it = iter(loader)
            next(it)
            times.append(time.perf_counter() - start)
            for _batch in it:
                pass
            del it
        del loader
        gc.collect()
        ms = 1e3 * statistics.median(times)
        torch_ms = ms if torch_ms is None else torch_ms
        records.append({"workload": "first batch of a later epoch, spawn, num_workers=2", "loader": name,
                        "first_batch_ms": ms, "ratio_to_torch": ms / torch_ms})
        print(f"  {name:<44} {ms:9.1f} ms   x{ms / torch_ms:6.2f} of torch's   (min {1e3 * min(times):.1f}, "
              f"max {1e3 * max(times):.1f})", file=opts.out, flush=True)
    return records


def _pss_child(kind: str, n: int, epochs: int) -> None:
    """Run in a fresh interpreter by bench_pss: builds the crop + flip dataset, says "ready", waits for the
    parent to measure it idle, then iterates `epochs` epochs with two worker processes and says "done"."""
    crop = _crop_flip(n)
    if kind == "torch":
        loader = TorchDataLoader(crop, batch_size=256, shuffle=True, num_workers=2)
    elif kind == "stoker":
        loader = stoker.DataLoader(crop, batch_size=256, shuffle=True, num_workers=2)
    elif kind == "torch-spawn":
        loader = TorchDataLoader(crop, batch_size=256, shuffle=True, num_workers=2, multiprocessing_context="spawn")
    elif kind == "stoker-spawn":
        loader = stoker.DataLoader(crop, batch_size=256, shuffle=True, num_workers=2, multiprocessing_context="spawn")
    elif kind == "torchdata":
        loader = _torchdata_nodes_loader(crop, 256, 2, "process")
    elif kind == "grain":
        loader = _grain_data_loader(crop, 256, 2)
    else:
        loader = _spdl_loader(crop, 256, 2)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(epochs):
        for _batch in loader:
            pass
    print("done", flush=True)
    sys.stdin.readline()


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def _tree_pss_kib(root: int) -> tuple[int, int]:
    """(PSS in KiB summed over `root` and all its descendants, number of processes)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    total, count, stack = 0, 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        total += _pss_kib(pid)
        count += 1
    return total, count


def _child_env() -> dict:
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(stoker.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _measure_pss(kind: str, n: int, epochs: int, interval: float = 0.02) -> dict:
    code = f"from stoker._bench import _pss_child; _pss_child({kind!r}, {n}, {epochs})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_child_env())
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} memory probe exited early (code {proc.wait()})")
        idle = min(_tree_pss_kib(proc.pid)[0] for _ in range(3))
        peak, peak_procs, samples, stop = [idle], [1], [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                kib, procs = _tree_pss_kib(proc.pid)
                if kib > peak[0]:
                    peak[0], peak_procs[0] = kib, procs
                samples[0] += 1
                stop.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline().strip()
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        if line != "done":
            raise RuntimeError(f"the {kind} memory probe failed (code {proc.wait()})")
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"idle_pss_mib": idle / 1024, "peak_pss_mib": peak[0] / 1024, "processes_at_peak": peak_procs[0],
            "samples": samples[0], "seconds": seconds}


def bench_pss(opts: Options) -> list[dict]:
    """Peak PSS of the main process and its workers together, two epochs with num_workers=2, each loader in a
    fresh interpreter, sampled from outside (so the sampling takes no GIL from the loader)."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        raise Skipped("needs /proc/<pid>/smaps_rollup (Linux 4.14 or later)")
    n = _crop_flip_size(opts.scale)
    print(f"\npeak memory: PSS of the main process and its workers together, sampled every 20 ms over two "
          f"epochs, crop + flip ({n} samples, {n * 3 * 64 * 64 / 2**20:.0f} MiB of images), batch 256, "
          "num_workers=2, each loader in a fresh process", file=opts.out, flush=True)
    # The other loaders where they import, each through the API of its column in the crop section.
    names = {"torch": "torch num_workers=2", "stoker": "stoker num_workers=2",
             "torchdata": "torchdata nodes, 2 processes", "grain": "grain DataLoader, 2 processes (per epoch)",
             "spdl": "spdl DataLoader, index batches, 2 threads"}
    modules = {"torchdata": "torchdata.nodes", "grain": "grain.python", "spdl": "spdl.dataloader"}
    kinds = ["torch", "stoker"]
    for kind, module in modules.items():
        why = _import_error(module)
        if why is None:
            kinds.append(kind)
        else:
            print(f"  ({kind} is not installed or does not import ({why}): its column is skipped)", file=opts.out,
                  flush=True)
    records = _pss_rows(opts, "peak PSS, num_workers=2", names, kinds, n, "torch")
    # Spawned workers, which receive the dataset pickled (torch: each worker its own copy, every epoch).
    print("  spawned workers (multiprocessing_context='spawn', not persistent):", file=opts.out, flush=True)
    spawned = {"torch-spawn": "torch num_workers=2, spawn", "stoker-spawn": "stoker num_workers=2, spawn"}
    return records + _pss_rows(opts, "peak PSS, num_workers=2, spawn", spawned, list(spawned), n, "torch-spawn")


def _pss_rows(opts: Options, workload: str, names: dict, kinds: list, n: int, base_kind: str) -> list[dict]:
    measured = {}
    for kind in kinds:
        opts.progress(f"{kind} in a fresh process")
        measured[kind] = _measure_pss(kind, n, 2)
    base = measured[base_kind]
    records = []
    for kind, m in measured.items():
        growth = m["peak_pss_mib"] - m["idle_pss_mib"]
        base_growth = base["peak_pss_mib"] - base["idle_pss_mib"]
        rec = {"workload": workload, "loader": names[kind], **m, "loading_pss_mib": growth,
               "ratio_to_torch": m["peak_pss_mib"] / base["peak_pss_mib"],
               "loading_ratio_to_torch": growth / base_growth if base_growth > 0 else None}
        records.append(rec)
        print(f"  {names[kind]:<44} peak {m['peak_pss_mib']:8.1f} MiB   x{rec['ratio_to_torch']:5.2f} of torch's"
              f"   (idle before iter() {m['idle_pss_mib']:7.1f} MiB; loading added {growth:7.1f} MiB, "
              f"x{rec['loading_ratio_to_torch'] or float('nan'):5.2f}; {m['processes_at_peak']} processes)",
              file=opts.out, flush=True)
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
                              text=True, check=True, env=_child_env())
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

    def resume(make) -> Callable[[], None]:
        """A state saved `at` batches into an epoch of make()'s loader (through json), and a function that loads
        it into a fresh loader and takes the next batch."""
        saved = make()
        it = iter(saved)
        for _ in range(at):
            next(it)
        state = json.loads(json.dumps(saved.state_dict()))
        del it

        def run() -> None:
            loader = make()
            loader.load_state_dict(state)
            next(iter(loader))

        return run

    record("stoker", _median_time(resume(lambda: stoker.DataLoader(data, batch_size=bs, shuffle=True)), 5))
    # A sampler of the user's (RandomSampler here) keeps no position: its served batches are drawn again, from
    # the randomness its epoch began with, without loading their samples.
    user = resume(lambda: stoker.DataLoader(data, batch_size=bs, sampler=RandomSampler(data)))
    record("stoker sampler=RandomSampler", _median_time(user, 3), f"   (redraws {at} index batches)")

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

        def numpy_epoch():
            plan = _numpy_packing(lengths, seq_len)
            for _batch in _numpy_batches(tokens, offsets, plan, seq_len, batch):
                pass
            return plan

        def one_epoch(batches):
            for _batch in batches:
                pass

        loaders = {(window, helper): stoker.PackedLoader(ds, seq_len, batch, seed=0, window=window,
                                                         helper_thread=helper)
                   for window, helper in ((None, True), (1000, True), (None, False))}
        runs = {key: (lambda loader=loader: one_epoch(loader)) for key, loader in loaders.items()}
        runs["write"] = lambda: one_epoch(_numpy_write(tokens, seq_len, batch, total))
        times: dict = {key: [] for key in runs}
        times["numpy"] = []
        # Rounds interleave the cases (an epoch takes ~0.1 s, so each gets 7 rounds; the numpy packer, ~1.3 s,
        # three): this machine's speed drifts over seconds, and every case should see the same drift.
        epochs = max(rounds, 7)
        for r in range(epochs):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
            if r % 3 == 0 and (scale >= 0.5 or r == 0):
                start = time.perf_counter()
                plan = numpy_epoch()
                times["numpy"].append(time.perf_counter() - start)
        rate = {key: total / statistics.median(ts) for key, ts in times.items()}
        bound, numpy_rate = rate["write"], rate["numpy"]
        cases = [(f"stoker PackedLoader window={window}" + ("" if helper else ", 1 thread"), rate[(window, helper)],
                  loader.stats()) for (window, helper), loader in loaders.items()]
        cases.append(("numpy BFD packing (reference)", numpy_rate,
                      {"rows": len(plan), "efficiency": total / (len(plan) * seq_len)}))
        for name, rate, stats in [("numpy writing the outputs only", bound, None)] + cases:
            rec = {"workload": "packing", "loader": name, "tokens_per_s": rate,
                   "ratio_to_numpy_write": rate / bound, "ratio_to_numpy_packing": rate / numpy_rate}
            line = f"  {name:<42} {rate / 1e6:9.1f} M tokens/s   x{rate / bound:5.2f} of the write bound"
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


@dataclass
class Section:
    key: str  # what --only matches, beside the title
    title: str  # the progress line
    run: Callable[[Options], list[dict]]


SECTIONS = [
    Section("arrays", "arrays: TensorDataset float32[256]+label", bench_arrays),
    Section("mmap", "memory-mapped .npy", bench_mmap),
    Section("tiny", "tiny samples", bench_tiny),
    Section("large", "large samples", bench_large),
    Section("big", "big batches", bench_big),
    Section("crop", "Python dataset: crop + flip", bench_crop_flip),
    Section("png", "PNG files decoded with PIL", bench_png),
    Section("padding", "variable-length tokens + PadCollate", bench_padding),
    Section("first-batch", "worker processes: time to first batch", bench_first_batch),
    Section("pss", "worker processes: peak memory (PSS)", bench_pss),
    Section("rss", "peak RSS, num_workers=0", lambda o: peak_memory(o.scale, o.out)),
    Section("resume", "resume", lambda o: resume_cost(o.scale, o.out)),
    Section("packing", "packing", lambda o: packing_bench(o.scale, o.rounds, o.out)),
    Section("gpu", "GPU: host-to-device, training loop, normalise", lambda o: _bench_gpu.bench_gpu(o)),
]


def select(only: str | None) -> list[Section]:
    """The sections whose key or title contains one of the comma-separated words of `only` (all without)."""
    if not only:
        return list(SECTIONS)
    words = [w.strip().lower() for w in only.split(",") if w.strip()]
    return [s for s in SECTIONS if any(w in s.key or w in s.title.lower() for w in words)]


def _ratio(rec: dict):
    return rec.get("ratio_to_torch_best", rec.get("ratio_to_torch"))


def plot(records: list[dict], path: str) -> None:
    """A bar chart of every record's ratio to torch, one panel per workload: each bar runs from 1 (torch) to the
    ratio, on one log scale shared by all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    groups: dict[str, list[tuple[str, float]]] = {}
    for rec in records:
        if _ratio(rec) is not None:
            groups.setdefault(rec["workload"], []).append((rec["loader"], _ratio(rec)))
    if not groups:
        return
    ratios = [v for bars in groups.values() for _, v in bars]
    lo, hi = min(ratios + [1.0]) / 1.5, max(ratios + [1.0]) * 1.8
    ticks = [t * 10.0 ** e for e in range(-3, 5) for t in (1, 2, 5) if lo <= t * 10.0 ** e <= hi]
    heights = [len(bars) + 1 for bars in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.28 * sum(heights) + 0.45 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = {"torch": "#9e9e9e", "stoker": "#1f77b4"}
    for ax, (workload, bars) in zip(axes[:, 0], groups.items()):
        names = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        ax.barh(range(len(bars)), [v - 1.0 for v in values], left=1.0,
                color=[colours.get(n.split()[0], "#ff7f0e") for n in names])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=7)
        ax.set_yticks(range(len(bars)), names, fontsize=8)
        lower = workload.startswith(("first batch", "peak PSS"))
        ax.set_title(f"{workload}  ({'lower' if lower else 'higher'} is better)", fontsize=9, loc="left")
        for y, v in enumerate(values):
            ax.annotate(f"x{v:.2f}", (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                        va="center", ha="left" if v >= 1 else "right", fontsize=7)
    axes[-1, 0].set_xlabel("ratio to torch's DataLoader (its best configuration for throughput), log scale",
                           fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _distribution_version(name: str) -> str | None:
    """The installed version of a distribution, read from its metadata without importing it (Grain's import
    takes seconds and logs to stderr; the sections import what they measure in their own processes)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "stoker": stoker.__version__, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "pillow": getattr(_optional("PIL"), "__version__", None),
            "torchdata": getattr(_optional("torchdata"), "__version__", None),
            "grain": _distribution_version("grain"), "spdl": _distribution_version("spdl-core")}


def _run_section(section: Section, opts: Options) -> tuple[list[dict], list[dict]]:
    """Runs one section in this process: (its records, [the reason it was skipped] or [])."""
    # torch's collate warns once that a read-only memory map makes a read-only tensor: noise in a table.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    try:
        return section.run(opts), []
    except Skipped as why:
        print(f"\n{section.title}: skipped, {why}", file=opts.out, flush=True)
        return [], [{"section": section.key, "reason": str(why)}]


def _forward(stream: TextIO, to: TextIO) -> None:
    for line in stream:
        to.write(line)
        to.flush()


def _run_child(section: Section, settings: list[str], tag: str, tmp: str) -> tuple[list[dict], list[dict], int]:
    """Runs one section in a fresh interpreter (`--section KEY`), its stdout and stderr streamed through as they
    come: (its records, its skipped list, its exit code). A section run after another in the same process is
    distorted by what the previous one left behind (its heap, its threads, torch's state): a PNG section after
    the crop section measured differently than alone."""
    out = os.path.join(tmp, f"{section.key}.json")
    cmd = [sys.executable, "-m", "stoker", "bench", "--section", section.key, "--tag", tag, *settings, "--json", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    # stderr on a thread, stdout here: neither pipe can fill up while the other one is read.
    errors = threading.Thread(target=_forward, args=(proc.stderr, sys.stderr), daemon=True)
    errors.start()
    try:
        _forward(proc.stdout, sys.stdout)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the child's loaders go with it
            proc.kill()
            proc.wait()
        errors.join(timeout=10)
    if code != 0 or not os.path.exists(out):
        return [], [], code or 1
    with open(out) as f:
        report = json.load(f)
    return report["records"], report["skipped"], 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stoker bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="every section, smaller and shorter (scale 0.1, 2 rounds, budget 1 s): a few minutes")
    parser.add_argument("--scale", type=float, help="dataset size factor (default 1.0; 0.1 with --quick)")
    parser.add_argument("--rounds", type=int, help="measured rounds per loader (default 3; 2 with --quick)")
    parser.add_argument("--budget", type=float,
                        help="seconds of measurement per loader over all rounds (default 3; 1 with --quick)")
    parser.add_argument("--only", help="run only the sections whose name contains this text (comma-separated "
                        "for several): " + ", ".join(s.key for s in SECTIONS))
    parser.add_argument("--json", metavar="FILE", help="also write the machine and the records as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE", help="also draw the ratios as a bar chart into FILE (needs "
                        "matplotlib: pip install 'stoker[plot]')")
    # The child mode: one section by its exact key, in this process, its records (and skipped) to --json.
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 3.0)
    if scale <= 0 or rounds < 1 or budget <= 0:
        parser.error("--scale and --budget must be positive and --rounds at least 1")

    if args.section is not None:
        section = next((s for s in SECTIONS if s.key == args.section), None)
        if section is None:
            parser.error(f"--section {args.section!r} is no section key: " + ", ".join(s.key for s in SECTIONS))
        with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
            opts = Options(scale, rounds, budget, args.quick, tmp, out=sys.stdout,
                           progress=lambda text: print(f"{args.tag}   {text}", file=sys.stderr, flush=True))
            records, skipped = _run_section(section, opts)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"records": records, "skipped": skipped}, f, indent=2)
        return 0

    if args.plot and _optional("matplotlib.pyplot") is None:
        print("--plot needs matplotlib, which is not installed: pip install 'stoker[plot]' (or matplotlib)",
              file=sys.stderr)
        return 2
    sections = select(args.only)
    if not sections:
        print(f"--only {args.only!r} matches no section; the sections are: "
              + ", ".join(s.key for s in SECTIONS), file=sys.stderr)
        return 2

    machine = _machine()
    print(f"stoker {stoker.__version__}, torch {torch.__version__}, {machine['cpus']} CPUs ({machine['cpu']}), "
          f"{'a' if machine['cuda'] else 'no'} GPU; Pillow {machine['pillow'] or 'absent'}, torchdata "
          f"{machine['torchdata'] or 'absent'}, Grain {machine['grain'] or 'absent'}, SPDL "
          f"{machine['spdl'] or 'absent'}; scale {scale}, {rounds} rounds, {budget} s per loader, each section in "
          "a fresh process\n"
          "ratio = samples/s over torch's best configuration in the same run (for first batch and PSS: "
          "over torch's figure, lower is better)", flush=True)
    settings = ["--scale", repr(scale), "--rounds", str(rounds), "--budget", repr(budget)]
    settings += ["--quick"] if args.quick else []
    records, skipped, failed = [], [], []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        for i, section in enumerate(sections, 1):
            tag = f"[{i}/{len(sections)}]"
            print(f"{tag} {section.title} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            got, why, code = _run_child(section, settings, tag, tmp)
            records += got
            skipped += why
            if code != 0:
                failed.append({"section": section.key, "exit_code": code})
                print(f"\n{section.title}: failed (its process exited with code {code}; its error is on stderr)",
                      flush=True)
            print(f"{tag} {section.title}: {time.perf_counter() - start:.1f} s (all so far "
                  f"{time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": machine,
                       "settings": {"scale": scale, "rounds": rounds, "budget_s": budget, "quick": args.quick,
                                    "only": args.only},
                       "records": records, "skipped": skipped, "failed": failed}, f, indent=2)
    if args.plot:
        plot(records, args.plot)
        print(f"\nplot written to {args.plot}", flush=True)
    return 1 if failed else 0
