"""CUDA through stoker's own driver layer. The native core loads libcuda.so.1 at run time (it never links it),
so everything here answers on any machine, with or without a GPU, and a missing driver is an answer, not a crash.

STOKER_LIBCUDA=/path/to/libcuda.so.1 makes the core load that library instead of the system's libcuda.so.1. It
is read once, at the process's first CUDA query. It exists for unusual driver installs and for tests, which
point it at a fake driver (tests/fake_libcuda.c) to run the CUDA code paths without a GPU.
"""

from __future__ import annotations

import os
import threading

import torch

from stoker._native import core

__all__ = ["cuda_available", "cuda_status", "current_target", "pin_device", "pinned_pool", "pinned_pool_for",
           "resolve_device"]

# Page-locked blocks stay cached up to this many bytes, raised to the most bytes out at once (the batches in
# flight: depth x batch size, and those the user holds) up to PINNED_GROW_TO. A block that does not fit is
# freed (cuMemFreeHost, which may wait for the device), and the next batch of that size page-locks a new one.
PINNED_CACHE_BYTES = 512 << 20
PINNED_GROW_TO = 4 << 30

_pinned = None
_pinned_lock = threading.Lock()

# The driver reads CUDA_MODULE_LOADING when it initialises, and torch sets it to LAZY (unless it is set) only at
# its own first CUDA call: stoker's driver layer may initialise the driver first (cuda_available(), a loader
# with pin_memory or device=), which would leave a driver that loads modules eagerly by default loading every
# kernel of torch's at once (seconds, and hundreds of MiB per GPU). So it is set here as torch would set it.
os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")


def cuda_available() -> bool:
    """True when stoker can use CUDA: the driver (libcuda.so.1) loads, initialises and sees at least one GPU.

    Never raises: a machine without a driver, or with a driver and no GPU, answers False. The first call loads
    the driver (milliseconds where one is installed); later calls are cheap. A process forked from one that had
    loaded the driver answers False, since CUDA does not survive fork().
    """
    return bool(core.cuda_available())


def cuda_status() -> dict:
    """What the driver layer found: available, library, driver_version (e.g. 12040), device_count, and reason
    (why CUDA is not available, for error messages; empty when it is). Never raises."""
    return dict(core.cuda_status())


def resolve_device(device) -> torch.device | None:
    """Checks a loader's `device=` argument and says where batches go.

    Returns None when batches stay on the CPU (device=None or "cpu"), else ``torch.device("cuda", index)``
    with the index filled in (torch's current device when none was given).

    Raises ValueError for something that is not a device, a device type other than "cpu" and "cuda", or an
    index past the visible GPUs; RuntimeError, saying why, when CUDA cannot be used here (no driver, no GPU, a
    torch build without CUDA). For example, on a machine without a driver::

        resolve_device("cuda")  # RuntimeError: device='cuda' needs a CUDA GPU, but CUDA is not available:
                                # the CUDA driver library could not be loaded (libcuda.so.1: cannot open ...)
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device={device!r} is not a device: {exc}") from None
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: stoker delivers batches to the CPU or to a CUDA GPU, not to "
                         f"'{dev.type}'; leave device unset and move batches yourself")
    status = core.cuda_status()
    if not status["available"]:
        hint = " (this torch is a ROCm build: stoker's device stage needs NVIDIA's CUDA driver)" \
            if getattr(torch.version, "hip", None) else ""
        raise RuntimeError(f"device={device!r} needs a CUDA GPU, but CUDA is not available: {status['reason']}"
                           f"{hint}. Leave device unset to receive batches on the CPU.")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None \
            else "torch.cuda.is_available() is False"
        raise RuntimeError(f"device={device!r}: the CUDA driver sees {status['device_count']} GPU(s), but {why} "
                           f"(torch {torch.__version__}), and batches on the GPU are torch CUDA tensors. Install a "
                           "CUDA build of torch, or leave device unset.")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise ValueError(f"device={device!r}: there is no CUDA device {index}; {count} "
                         f"{'is' if count == 1 else 'are'} visible")
    return torch.device("cuda", index)


def current_target(resolved: torch.device | None, given) -> torch.device | None:
    """Where an iterator starting now sends batches: `resolved` (resolve_device's answer when the loader was
    built), except that a CUDA device given without an index follows torch's current device at each iterator,
    as torch's own pin_memory and .cuda() do: a script that calls torch.cuda.set_device(local_rank) after
    building its loaders gets its batches on that GPU."""
    if resolved is None or torch.device(given).index is not None:
        return resolved
    return torch.device("cuda", torch.cuda.current_device())


def pinned_pool(device: int = 0):
    """The process's page-locked buffer pool, or None when CUDA is not available here.

    Its blocks are page-locked once, when first allocated (cuMemHostAlloc), and reused for later batches: no
    page-lock call per batch, no second copy. They are portable (pinned for every GPU), allocated in the
    primary context of `device` as the first caller gives it. Tensors over them report is_pinned() in torch.
    """
    global _pinned
    with _pinned_lock:
        if _pinned is None:
            if not core.cuda_available():
                return None
            _pinned = core.BufferPool(PINNED_CACHE_BYTES, pin_device=device, grow_to=PINNED_GROW_TO)
        return _pinned


def pin_device(device: torch.device | None, pin: bool) -> int | None:
    """The GPU whose context page-locks a loader's host memory: `device`'s when batches go to a CUDA device,
    torch's current one when they are pinned (pin=True, pin_memory where torch sees a GPU); None when they are
    neither, or the driver layer cannot reach CUDA (batches then go to the ordinary pool)."""
    if device is None and not (pin and torch.cuda.is_available()):
        return None
    if not core.cuda_available():
        return None
    return device.index if device is not None else torch.cuda.current_device()


def pinned_pool_for(device: torch.device | None, pin: bool):
    """The page-locked pool a loader collates into (see pin_device), or None for the ordinary pool. Batches
    collated there are pinned where they are made: no pin-memory thread, no second copy."""
    index = pin_device(device, pin)
    return None if index is None else pinned_pool(index)


def _forget_pinned_pool() -> None:
    # A forked child does not own its parent's page-locked memory, nor can it use CUDA.
    global _pinned, _pinned_lock
    _pinned = None
    _pinned_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pinned_pool)
