"""stoker.normalize / stoker.Normalize on the CPU: values equal a float32 reference computed step by step (each
operation rounded, as the GPU kernel computes them), layouts, dtypes, batch members chosen by key, and errors.
tests/cuda/test_device_gpu.py compares the GPU against the same reference."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import stoker

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reference(images: np.ndarray, mean, std, channels_last=False, scale=1 / 255) -> np.ndarray:
    """float32, each step rounded: (x * scale - mean[c]) / std[c]."""
    x = np.moveaxis(images, -1, -3) if channels_last else images
    c = x.shape[-3]
    m = np.broadcast_to(np.asarray(mean, np.float32), (c,)).reshape(c, 1, 1)
    s = np.broadcast_to(np.asarray(std, np.float32), (c,)).reshape(c, 1, 1)
    y = x.astype(np.float32) * np.float32(scale)
    y = (y - m).astype(np.float32)
    return (y / s).astype(np.float32)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 3, 7, 9), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_equal_the_stepwise_float32_reference(images, dtype):
    out = stoker.normalize(torch.from_numpy(images), MEAN, STD, dtype=dtype)
    expected = torch.from_numpy(reference(images, MEAN, STD)).to(dtype)
    assert out.dtype == dtype and out.shape == (5, 3, 7, 9) and out.is_contiguous()
    assert torch.equal(out, expected)


def test_channels_last_input_gives_channels_first_output(images):
    hwc = np.ascontiguousarray(np.moveaxis(images, 1, -1))  # [5, 7, 9, 3]
    out = stoker.normalize(torch.from_numpy(hwc), MEAN, STD, channels_last=True)
    assert out.shape == (5, 3, 7, 9) and out.is_contiguous()
    assert torch.equal(out, torch.from_numpy(reference(hwc, MEAN, STD, channels_last=True)))
    assert torch.equal(out, stoker.normalize(torch.from_numpy(images), MEAN, STD))


def test_one_value_for_every_channel_and_a_custom_scale(images):
    out = stoker.normalize(torch.from_numpy(images), 0.5, 0.25, scale=1.0)
    assert torch.equal(out, torch.from_numpy(reference(images, 0.5, 0.25, scale=1.0)))
    single = torch.from_numpy(images[:, :1])  # one channel
    assert stoker.normalize(single, [0.5], [2.0]).shape == (5, 1, 7, 9)


def test_errors_name_what_is_wrong(images):
    x = torch.from_numpy(images)
    with pytest.raises(TypeError, match=r"expects uint8 images, but got dtype torch.float32"):
        stoker.normalize(x.float(), MEAN, STD)
    with pytest.raises(ValueError, match=r"mean has 2 values, but the images have 3 channels \(shape \(5, 3, 7, 9\)"):
        stoker.normalize(x, (0.1, 0.2), STD)
    with pytest.raises(ValueError, match=r"std must not contain 0"):
        stoker.normalize(x, MEAN, (1, 0, 1))
    with pytest.raises(ValueError, match=r"float32, float16 or bfloat16, not torch.int32"):
        stoker.normalize(x, MEAN, STD, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"at least 3 dimensions"):
        stoker.normalize(x[0, 0], MEAN, STD)
    with pytest.raises(TypeError, match=r"mean should be a number or a sequence of numbers"):
        stoker.Normalize(None, STD)


def test_the_transform_picks_batch_members(images):
    x = torch.from_numpy(images)
    labels = torch.arange(5)
    expected = stoker.normalize(x, MEAN, STD, dtype=torch.bfloat16)
    by_index = stoker.Normalize(MEAN, STD, dtype=torch.bfloat16, key=0)([x, labels])
    assert type(by_index) is list and torch.equal(by_index[0], expected) and by_index[1] is labels
    by_key = stoker.Normalize(MEAN, STD, dtype=torch.bfloat16, key="image")({"image": x, "label": labels})
    assert torch.equal(by_key["image"], expected) and by_key["label"] is labels
    Pair = collections.namedtuple("Pair", "image label")
    every = stoker.Normalize(MEAN, STD, dtype=torch.bfloat16)(Pair(x, labels))
    assert type(every) is Pair and torch.equal(every.image, expected) and every.label is labels
    with pytest.raises(KeyError, match=r"Normalize\(key='img'\): the batch has no such key"):
        stoker.Normalize(MEAN, STD, key="img")({"image": x})
    with pytest.raises(KeyError, match=r"a batch of 2 members has no member 5"):
        stoker.Normalize(MEAN, STD, key=5)((x, labels))


def test_as_a_collate_step_on_the_cpu_it_equals_normalising_each_sample(images):
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(images), torch.arange(5))
    transform = stoker.Normalize(MEAN, STD, key=0)
    loader = stoker.DataLoader(dataset, batch_size=2, collate_fn=lambda b: transform(stoker.default_collate(b)))
    got = torch.cat([b[0] for b in loader])
    assert torch.equal(got, torch.from_numpy(reference(images, MEAN, STD)))
