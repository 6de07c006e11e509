"""Shared helpers for stoker's test suite: strict recursive batch comparison and loader-vs-torch runners.

Import as ``from helpers import ...`` (tests/ has no __init__.py, so pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import collections.abc
import gc
import math
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset

import stoker

__all__ = [
    "MapDataset",
    "TorchDataLoader",
    "assert_same",
    "assert_batches_equal",
    "assert_loaders_match",
    "flat_labels",
    "in_small_shm",
    "isolated",
    "native_thread_count",
    "settled_thread_count",
    "raises_same",
    "run_with_deadline",
]


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor's values (C order): a bit-exact, NaN-safe, dtype-agnostic comparison key."""
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8)


def assert_same(actual: Any, expected: Any, path: str = "batch") -> None:
    """Recursively asserts that ``actual`` is what ``expected`` is: same Python type at every level, same
    container type (list vs tuple, dict vs OrderedDict, namedtuple class), same keys in the same order, and
    for tensors the same dtype, shape, device, strides, requires_grad and bit-identical values."""
    assert type(actual) is type(expected), f"{path}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device == expected.device, f"{path}: device {actual.device} != {expected.device}"
        assert actual.requires_grad == expected.requires_grad, f"{path}: requires_grad differs"
        if actual.numel() > 1:
            assert actual.stride() == expected.stride(), f"{path}: stride {actual.stride()} != {expected.stride()}"
        if expected.device.type == "meta":
            return  # no values to compare
        assert torch.equal(_tensor_bytes(actual), _tensor_bytes(expected)), (
            f"{path}: values differ\n  actual:   {actual!r}\n  expected: {expected!r}"
        )
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert np.array_equal(actual, expected, equal_nan=actual.dtype.kind in "fc"), f"{path}: values differ"
    elif isinstance(expected, collections.abc.Mapping):
        assert list(actual.keys()) == list(expected.keys()), f"{path}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), f"{path}: {actual!r} != nan"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_batches_equal(actual: list, expected: list) -> None:
    assert len(actual) == len(expected), f"{len(actual)} batches, torch gives {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_same(a, e, f"batch {i}")


def assert_loaders_match(
    dataset: Any,
    *,
    num_workers: int = 0,
    kwargs_factory: Callable[[], dict] | None = None,
    **kwargs: Any,
) -> list:
    """Iterates torch's DataLoader (always num_workers=0: for map-style datasets its batches do not depend on
    the worker count) and stoker's (with ``num_workers``) over the same dataset and arguments, and asserts
    the batches are identical. ``kwargs_factory`` builds fresh stateful arguments (samplers with generators)
    for each loader. Returns stoker's batches."""
    extra_t = kwargs_factory() if kwargs_factory else {}
    extra_s = kwargs_factory() if kwargs_factory else {}
    stoker_only = {k: kwargs.pop(k) for k in ("worker_mode", "seed") if k in kwargs}
    expected = list(TorchDataLoader(dataset, num_workers=0, **kwargs, **extra_t))
    actual = list(stoker.DataLoader(dataset, num_workers=num_workers, **kwargs, **extra_s, **stoker_only))
    assert_batches_equal(actual, expected)
    return actual


def raises_same(fn_torch: Callable[[], Any], fn_stoker: Callable[[], Any]) -> BaseException:
    """Runs both callables, asserts both raise, with the same exception type and message; returns stoker's."""
    try:
        fn_torch()
    except BaseException as exc:  # noqa: BLE001 - any exception is what we compare
        expected = exc
    else:
        raise AssertionError("torch did not raise")
    try:
        fn_stoker()
    except BaseException as exc:  # noqa: BLE001
        actual = exc
    else:
        raise AssertionError(f"stoker did not raise; torch raised {type(expected).__name__}: {expected}")
    assert type(actual) is type(expected), f"stoker raised {type(actual).__name__}: {actual}; torch {expected!r}"
    assert str(actual) == str(expected), f"messages differ:\n  stoker: {actual}\n  torch:  {expected}"
    return actual


class MapDataset(Dataset):
    """A plain map-style dataset: sample i is ``fn(i)``."""

    def __init__(self, fn: Callable[[int], Any], n: int) -> None:
        self.fn = fn
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        return self.fn(index)

    def __repr__(self) -> str:
        return f"MapDataset({getattr(self.fn, '__name__', self.fn)}, {self.n})"


def flat_labels(batches, column=-1) -> list[int]:
    """The sample indices an epoch served, in order, from batches whose ``column`` holds the index."""
    out: list[int] = []
    for b in batches:
        t = b[column] if isinstance(b, (list, tuple)) else b
        out.extend(int(v) for v in t.reshape(-1).tolist())
    return out


def run_with_deadline(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Runs fn in a daemon thread and fails the test (instead of hanging the suite) if it does not finish."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True, name="deadline-runner")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise AssertionError(f"did not finish within {seconds} s (deadlock or hang)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def native_thread_count() -> int | None:
    """OS threads of this process (Python and native), or None where /proc is not available."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def settled_thread_count(quiet: float = 0.1, limit: float = 5.0) -> int | None:
    """native_thread_count() once it has not changed for `quiet` seconds (a thread just joined can linger in
    /proc/self/task for a moment), or after `limit` seconds, whichever comes first. Collects garbage first: an
    iterator left in a reference cycle by an earlier test would stop its threads at some later moment."""
    gc.collect()
    count = native_thread_count()
    if count is None:
        return None
    deadline = time.monotonic() + limit
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < quiet:
        time.sleep(0.01)
        now = native_thread_count()
        if now != count:
            count, stable_since = now, time.monotonic()
    return count


def in_small_shm(script: str, megabytes: int, **env: str) -> dict:
    """Runs `script` (which prints "RESULT " and a JSON dict) in a mount namespace of its own whose /dev/shm is
    a tmpfs of `megabytes`, with `env` added to its environment; returns the dict. Skips where that cannot be
    made (not root, no unshare, mounts refused)."""
    import json
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to give a process a small /dev/shm")
    shell = f"mount -t tmpfs -o size={megabytes}m tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    try:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, script], capture_output=True, text=True,
                              timeout=240, env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        raise AssertionError("the script hung with a small /dev/shm") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines and ("unshare" in proc.stderr or "mount" in proc.stderr):
        pytest.skip(f"cannot make a small /dev/shm here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def isolated(fn: Callable[[], Any]) -> tuple[Any, str | None, list[str]]:
    """Runs fn and collects whatever its failure leaves behind here, inside the test, recording unraisable
    exceptions (errors raised in __del__) instead of letting them surface during a later test.
    Returns (result, "Type: message" of the error fn raised or None, unraisable exceptions seen)."""
    unraisable: list[str] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    result = error = None
    try:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        gc.collect()
    finally:
        sys.unraisablehook = previous
    return result, error, unraisable


def roundtrip(state):
    """A loader state as it comes back from json and then from torch.save/torch.load(weights_only=True)."""
    import io
    import json

    via_json = json.loads(json.dumps(state))
    assert via_json == state
    buffer = io.BytesIO()
    torch.save(via_json, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded == state
    return loaded


class YieldCounting(torch.utils.data.Sampler):
    """A sampler with its own state (torchdata's StatefulDistributedSampler protocol) over ``order()``:
    ``state_dict()`` says how many indices of the pass it has yielded, ``load_state_dict()`` makes its next pass
    start there. ``produced`` counts the indices yielded in this process, so a test sees nothing was replayed."""

    def __init__(self, order=None):
        self._order = order
        self.yielded = 0
        self.resume_at = None
        self.produced = 0

    def order(self) -> list:
        return self._order

    def __len__(self):
        return len(self.order())

    def __iter__(self):
        start, self.resume_at = self.resume_at or 0, None
        self.yielded = start
        for i in self.order()[start:]:
            self.yielded += 1
            self.produced += 1
            yield i

    def state_dict(self):
        return {"yielded": self.yielded}

    def load_state_dict(self, state):
        self.resume_at = state["yielded"]


def ring_pin_refused(device: int) -> str:
    """Why the driver refuses to page-lock a worker ring here (cuMemHostRegister on a shared-memory file
    mapping: some GPU sandboxes refuse it), or "" where it page-locks one. stoker then loads from ordinary
    memory and says so; tests that assert ring memory pinned skip instead."""
    from stoker import _workers
    from stoker._native import core

    path = os.path.join(_workers._ring_dir(), f"stoker-test-probe-{os.getpid()}")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    try:
        ring = core.SlotRing(path, 1 << 20, 1)
        ring.pin(device)
        ring.lease(ring.acquire(), 4096)
        error = ring.pin_error
        return error if "fallocate" not in error else ""  # (room in /dev/shm is another matter: a failure)
    finally:
        os.unlink(path)
