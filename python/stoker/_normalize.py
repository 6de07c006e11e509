"""Normalize: uint8 images to normalised floating point, meant to run on the GPU after the copy, so that images
cross PCIe as bytes (a quarter of float32's traffic).

For each channel c: ``out = (x * scale - mean[c]) / std[c]``, computed in float32 in that order (each step
rounded to nearest, no fused multiply-add) and then rounded to the output dtype; with ``channels_last=True``
the input is [..., H, W, C] and the output [..., C, H, W]. The computation is torch ops on the tensor's device,
so CPU and GPU batches give the same values. On a CUDA tensor, a build with stoker's kernels (the STOKER_CUDA
build option) runs the whole of it as one fused kernel on the current stream instead, with the same values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import functools
import math
import warnings

import torch

from stoker._native import core

__all__ = ["Normalize", "normalize"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MAX_KERNEL_CHANNELS = 8
_kernels: bool | None = None


def kernels_available() -> bool:
    """Whether stoker's fused CUDA kernels can run here (a STOKER_CUDA build, a driver, a GPU)."""
    global _kernels
    if _kernels is None:
        _kernels = bool(core.cuda_kernels_available())
    return _kernels


def _normalize_kernel(images, mean, std, dtype, channels_last, scale) -> torch.Tensor:
    x = images.contiguous()
    lead = tuple(x.shape[:-3])
    if channels_last:
        height, width, channels = x.shape[-3:]
    else:
        channels, height, width = x.shape[-3:]
    out = torch.empty((*lead, channels, height, width), dtype=dtype, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    core.normalize_u8(x.device.index, stream, x.data_ptr(), out.data_ptr(), math.prod(lead), channels, height,
                      width, channels_last, list(mean), list(std), scale, _KERNEL_TYPES[dtype])
    return out


def _channel_params(values, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} should be a number or a sequence of numbers, but got {values!r}") from None
    if not out:
        raise ValueError(f"{name} should name at least one channel")
    return out


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, mean: tuple, std: tuple, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel constants as [C, 1, 1] float32 tensors on `device`, made once: building them per batch
    would be a blocking host-to-device copy each time. They are only read, from any stream."""
    shape = (channels, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    s = torch.tensor(std, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # once: later readers may be on other streams
    return m, s


def normalize(images: torch.Tensor, mean, std, *, dtype: torch.dtype = torch.float32, channels_last: bool = False,
              scale: float = 1 / 255) -> torch.Tensor:
    """``(images * scale - mean[c]) / std[c]`` per channel ``c``, as ``dtype``, on the images' device.

    images: uint8, [..., C, H, W] (or [..., H, W, C] with ``channels_last=True``, returned as [..., C, H, W]).
    mean, std: one value per channel, or one for all. The default scale maps bytes to [0, 1], so the usual
    ImageNet constants (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) apply as they are.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"normalize expects a tensor, but got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, but got dtype {images.dtype}")
    if dtype not in _FLOATS:
        raise ValueError(f"normalize produces float32, float16 or bfloat16, not {dtype}")
    if images.dim() < 3:
        raise ValueError(f"normalize expects images of at least 3 dimensions ([..., C, H, W]), but got shape "
                         f"{tuple(images.shape)}")
    mean_t, std_t = _channel_params(mean, "mean"), _channel_params(std, "std")
    if any(s == 0 for s in std_t):
        raise ValueError(f"std must not contain 0, but got {std_t}")
    channels = images.shape[-1] if channels_last else images.shape[-3]
    for name, values in (("mean", mean_t), ("std", std_t)):
        if len(values) not in (1, channels):
            raise ValueError(f"{name} has {len(values)} values, but the images have {channels} channels "
                             f"(shape {tuple(images.shape)}, channels_last={channels_last})")
    if images.is_cuda and channels <= _MAX_KERNEL_CHANNELS and kernels_available():
        try:
            return _normalize_kernel(images, mean_t, std_t, dtype, channels_last, float(scale))
        except RuntimeError as exc:
            if "cuModuleLoadData" not in str(exc) and "cuModuleGetFunction" not in str(exc):
                raise
            # The embedded kernels do not load on this GPU or driver (e.g. built for other architectures):
            # torch ops from now on, with the same results.
            global _kernels
            _kernels = False
            warnings.warn(f"stoker's CUDA kernels could not be loaded ({exc}); normalising with torch ops",
                          RuntimeWarning, stacklevel=2)
    if channels_last:
        images = images.movedim(-1, -3)
    m, s = _constants(images.device, mean_t, std_t, channels)
    if images.is_cuda:  # read on this stream: should the cache drop them, their memory waits for this work
        current = torch.cuda.current_stream(images.device)
        m.record_stream(current)
        s.record_stream(current)
    x = images.to(torch.float32)
    x = x.mul_(torch.tensor(scale, dtype=torch.float32))
    x = x.sub_(m).div_(s)
    return x.to(dtype).contiguous()


class Normalize:
    """A batch transform applying :func:`normalize` to the images of a batch; use it as a loader's
    ``device_transform`` so images travel to the GPU as bytes and become floats there::

        loader = stoker.DataLoader(dataset, batch_size=256, device="cuda",
                                   device_transform=stoker.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                                                     dtype=torch.bfloat16, key=0))

    key: which member of the batch holds the images: an int for a tuple/list batch, a key for a dict batch;
    None (the default) normalises every uint8 tensor of 4 dimensions in the batch. Other members pass as
    they are.
    """

    def __init__(self, mean, std, *, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 scale: float = 1 / 255, key=None) -> None:
        if dtype not in _FLOATS:
            raise ValueError(f"Normalize produces float32, float16 or bfloat16, not {dtype}")
        self.mean = _channel_params(mean, "mean")
        self.std = _channel_params(std, "std")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not contain 0, but got {self.std}")
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.scale = float(scale)
        self.key = key

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std, dtype=self.dtype, channels_last=self.channels_last,
                         scale=self.scale)

    def _all(self, batch):
        if isinstance(batch, torch.Tensor):
            return self._apply(batch) if batch.dtype == torch.uint8 and batch.dim() == 4 else batch
        if isinstance(batch, Mapping):
            return type(batch)({k: self._all(v) for k, v in batch.items()})
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*(self._all(v) for v in batch))
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._all(v) for v in batch)
        return batch

    def __call__(self, batch):
        if self.key is None:
            return self._all(batch)
        if isinstance(batch, Mapping):
            if self.key not in batch:
                raise KeyError(f"Normalize(key={self.key!r}): the batch has no such key (keys: {list(batch)})")
            out = dict(batch) if type(batch) is not dict else batch.copy()
            out[self.key] = self._apply(batch[self.key])
            return type(batch)(out) if type(batch) is not dict else out
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            items = list(batch)
            try:
                items[self.key] = self._apply(items[self.key])
            except (IndexError, TypeError):
                raise KeyError(f"Normalize(key={self.key!r}): a batch of {len(items)} members has no member "
                               f"{self.key!r}") from None
            if isinstance(batch, tuple) and hasattr(batch, "_fields"):
                return type(batch)(*items)
            return type(batch)(items)
        raise TypeError(f"Normalize(key={self.key!r}) needs a tuple, list or dict batch, but got "
                        f"{type(batch).__name__}")

    def __repr__(self) -> str:
        return (f"Normalize(mean={self.mean}, std={self.std}, dtype={self.dtype}, "
                f"channels_last={self.channels_last}, key={self.key!r})")
