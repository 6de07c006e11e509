"""Shared data for the benchmark suites: built once per session, small enough for a 2-core machine."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from stoker._bench import CropFlip, PngFiles, write_pngs


@pytest.fixture(scope="session")
def dense():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(200_000, 256, generator=g), torch.randint(0, 1000, (200_000,), generator=g))


@pytest.fixture(scope="session")
def memmap_npy(tmp_path_factory, dense):
    path = tmp_path_factory.mktemp("data") / "features.npy"
    np.save(path, dense.tensors[0].numpy())
    return np.load(path, mmap_mode="r"), dense.tensors[1].numpy()


@pytest.fixture(scope="session")
def tiny():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(200_000, generator=g), torch.randint(0, 10, (200_000,), generator=g))


@pytest.fixture(scope="session")
def large():
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(1_000, 65536, generator=g), torch.arange(1_000))


@pytest.fixture(scope="session")
def crop_flip():
    images = np.random.default_rng(0).integers(0, 256, size=(10_000, 3, 64, 64), dtype=np.uint8)
    return CropFlip(images, np.arange(10_000))


@pytest.fixture(scope="session")
def png_files(tmp_path_factory):
    pytest.importorskip("PIL.Image", reason="the PNG workload needs Pillow: pip install 'stoker[bench]'")
    folder = tmp_path_factory.mktemp("png")
    return PngFiles(write_pngs(str(folder), 2_000), [i % 1000 for i in range(2_000)])
