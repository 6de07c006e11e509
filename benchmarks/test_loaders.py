"""Throughput of stoker beside torch's DataLoader (and a numpy gather), one group per workload.

Run: pytest benchmarks/ --benchmark-only --benchmark-group-by=group
pytest-benchmark prints each group's loaders side by side; compare their means within a group.
"""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader

import stoker


def epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += 1
    return n


LOADERS = {
    "torch": lambda ds, bs, nw: TorchDataLoader(ds, batch_size=bs, shuffle=True, num_workers=nw,
                                                persistent_workers=nw > 0),
    "stoker": lambda ds, bs, nw: stoker.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=nw),
}


@pytest.mark.benchmark(group="arrays: TensorDataset float32[256] + label, batch 256")
@pytest.mark.parametrize("kind", ["torch", "stoker"])
def test_dense(benchmark, dense, kind):
    loader = LOADERS[kind](dense, 256, 0)
    benchmark.pedantic(epoch, args=(loader,), rounds=3 if kind == "stoker" else 1, warmup_rounds=0)


@pytest.mark.benchmark(group="arrays: TensorDataset float32[256] + label, batch 256")
def test_dense_numpy_gather(benchmark, dense):
    x, y = dense.tensors[0].numpy(), dense.tensors[1].numpy()

    def gather():
        perm = np.random.default_rng().permutation(len(x))
        for i in range(0, len(x), 256):
            j = perm[i:i + 256]
            torch.from_numpy(x[j]), torch.from_numpy(y[j])

    benchmark.pedantic(gather, rounds=3)


@pytest.mark.benchmark(group="memory-mapped .npy float32[256] + label, batch 256")
@pytest.mark.parametrize("kind", ["torch", "stoker"])
def test_memmap(benchmark, memmap_npy, kind):
    loader = LOADERS[kind](stoker.ArrayDataset(*memmap_npy), 256, 0)
    benchmark.pedantic(epoch, args=(loader,), rounds=3 if kind == "stoker" else 1)


@pytest.mark.benchmark(group="tiny: one float + label, batch 1024")
@pytest.mark.parametrize("kind", ["torch", "stoker"])
def test_tiny(benchmark, tiny, kind):
    benchmark.pedantic(epoch, args=(LOADERS[kind](tiny, 1024, 0),), rounds=3 if kind == "stoker" else 1)


@pytest.mark.benchmark(group="large: 256 KiB samples, batch 16")
@pytest.mark.parametrize("kind", ["torch", "stoker"])
def test_large(benchmark, large, kind):
    benchmark.pedantic(epoch, args=(LOADERS[kind](large, 16, 0),), rounds=3)


@pytest.mark.benchmark(group="Python dataset: crop + flip of uint8 3x64x64, batch 256")
@pytest.mark.parametrize("kind,nw", [("torch", 0), ("torch", 2), ("stoker", 0), ("stoker", 2)])
def test_crop_flip(benchmark, crop_flip, kind, nw):
    benchmark.pedantic(epoch, args=(LOADERS[kind](crop_flip, 256, nw),), rounds=2)


@pytest.mark.benchmark(group="PNG files decoded with PIL: RGB 64x64, crop 56 + flip, batch 64")
@pytest.mark.parametrize("kind,nw", [("torch", 0), ("torch", 1), ("torch", 2), ("stoker", 0), ("stoker", 2)])
def test_png(benchmark, png_files, kind, nw):
    benchmark.pedantic(epoch, args=(LOADERS[kind](png_files, 64, nw),), rounds=2)


RESUME_N, RESUME_BS = 10_000_000, 1000
RESUME_AT = RESUME_N // RESUME_BS * 9 // 10


@pytest.fixture(scope="module")
def resume_data():
    return np.arange(RESUME_N)


@pytest.mark.benchmark(group="resume: load_state_dict + first batch at batch 9000 of 10M samples")
def test_resume_stoker(benchmark, resume_data):
    saved = stoker.DataLoader(resume_data, batch_size=RESUME_BS, shuffle=True)
    it = iter(saved)
    for _ in range(RESUME_AT):
        next(it)
    state = saved.state_dict()
    expected = next(it)

    def resume():
        loader = stoker.DataLoader(resume_data, batch_size=RESUME_BS, shuffle=True)
        loader.load_state_dict(state)
        return next(iter(loader))

    assert torch.equal(benchmark.pedantic(resume, rounds=20, warmup_rounds=1), expected)


@pytest.mark.benchmark(group="resume: load_state_dict + first batch at batch 9000 of 10M samples")
def test_resume_torchdata(benchmark):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    from stoker._bench import _IndexBatches

    data = _IndexBatches(RESUME_N)  # batches that cost nothing to load: only the resume machinery is timed
    saved = stateful.StatefulDataLoader(data, batch_size=RESUME_BS, shuffle=True, collate_fn=list)
    it = iter(saved)
    for _ in range(RESUME_AT):
        next(it)
    state = saved.state_dict()

    def resume():
        loader = stateful.StatefulDataLoader(data, batch_size=RESUME_BS, shuffle=True, collate_fn=list)
        loader.load_state_dict(state)
        return next(iter(loader))

    benchmark.pedantic(resume, rounds=1)


@pytest.fixture(scope="module")
def packed_docs(tmp_path_factory):
    rng = np.random.default_rng(1234)
    lengths = np.clip(np.round(rng.lognormal(np.log(600) - 0.5, 1.0, 50_000)), 16, 8192).astype(np.int64)
    docs = np.split(rng.integers(0, 50_000, int(lengths.sum()), dtype=np.uint16), np.cumsum(lengths)[:-1])
    prefix = tmp_path_factory.mktemp("tokens") / "docs"
    stoker.write_token_files(prefix, docs, dtype=np.uint16)
    return stoker.TokenDataset.open(prefix)


@pytest.mark.benchmark(group="packing: 50k lognormal documents, memory-mapped uint16, rows of 4096, batch 8")
@pytest.mark.parametrize("window", [None, 1000])
def test_packing_stoker(benchmark, packed_docs, window):
    loader = stoker.PackedLoader(packed_docs, 4096, 8, seed=0, window=window)
    benchmark.pedantic(epoch, args=(loader,), rounds=3)


@pytest.mark.benchmark(group="packing: 50k lognormal documents, memory-mapped uint16, rows of 4096, batch 8")
def test_packing_numpy_write_bound(benchmark, packed_docs):
    from stoker._bench import _numpy_write

    benchmark.pedantic(epoch, args=(_numpy_write(packed_docs.tokens, 4096, 8, packed_docs.num_tokens),), rounds=1)


@pytest.mark.benchmark(group="packing: 50k lognormal documents, memory-mapped uint16, rows of 4096, batch 8")
def test_packing_numpy_reference(benchmark, packed_docs):
    from stoker._bench import _numpy_batches, _numpy_packing

    def run():
        plan = _numpy_packing(packed_docs.lengths, 4096)
        return epoch(_numpy_batches(packed_docs.tokens, packed_docs.offsets, plan, 4096, 8))

    benchmark.pedantic(run, rounds=1)
