"""The fake CUDA driver (tests/fake_libcuda.c) and the harness that runs code against it: each snippet runs in a
fresh interpreter (the driver is loaded once per process) whose STOKER_LIBCUDA points at the fake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FAKE_SOURCE = HERE / "fake_libcuda.c"

# Opening of every snippet: the fake's counters through ctypes (the same library the core loaded).
COMMON = """
import ctypes, gc, json, os, sys, threading

def fake():
    lib = ctypes.CDLL(os.environ["STOKER_LIBCUDA"])
    lib.fake_counter.restype = ctypes.c_long
    lib.fake_lookups.restype = ctypes.c_char_p
    return lib

def count(name):
    return fake().fake_counter(name.encode())

def error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None

out = {}
"""
# The whole package (it imports torch: seconds per interpreter).
PACKAGE = """
import numpy as np
import torch
import stoker
from stoker import _core as core, _cuda
from stoker._native import from_dlpack
"""
# The extension alone, loaded by path without running stoker/__init__ (no torch: a fraction of a second).
CORE_ONLY = """
import importlib.machinery, importlib.util
_pkg = importlib.util.find_spec("stoker").submodule_search_locations[0]
_path = next(os.path.join(_pkg, f) for f in sorted(os.listdir(_pkg)) if f.startswith("_core.") and f.endswith(".so"))
_loader = importlib.machinery.ExtensionFileLoader("stoker._core", _path)
core = importlib.util.module_from_spec(importlib.util.spec_from_loader("stoker._core", _loader))
_loader.exec_module(core)
"""


def run(code: str, *, library: str, mode: str = "one", package: bool = False, **env) -> dict:
    """Runs `code` in a fresh interpreter whose CUDA driver is `library` and returns its `out` dict. The
    snippet has `core` (the extension) and, with package=True, stoker, torch, numpy and `_cuda`."""
    full_env = {**os.environ, "STOKER_LIBCUDA": library, "STOKER_FAKE_CUDA": mode, **env}
    script = (COMMON + (PACKAGE if package else CORE_ONLY) + textwrap.dedent(code)
              + "\nprint('RESULT ' + json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, (
        f"the snippet failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name.split()[0]
    return None


def build_fake_driver(tmp_path_factory) -> dict:
    """Paths of the fake driver: "current" (cuGetProcAddress) and "legacy" (a driver before 11.3); skips the
    test when no C compiler can build it."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler to build the fake CUDA driver")
    out = tmp_path_factory.mktemp("fake_cuda")
    paths = {}
    for kind, flags in (("current", []), ("legacy", ["-DFAKE_NO_PROC_ADDRESS"])):
        path = out / kind / "libcuda.so.1"
        path.parent.mkdir()
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", *flags, "-o", str(path), str(FAKE_SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.skip(f"the C compiler ({cc}) could not build the fake CUDA driver: {proc.stderr[-2000:]}")
        paths[kind] = str(path)
    return paths
