"""Test configuration shared by every test module."""

from __future__ import annotations

import gc

import pytest
import torch


def pytest_addoption(parser):
    # pyproject's addopts pass --timeout/--timeout-method (pytest-timeout). Where that plugin is not installed,
    # accept (and ignore) them so `python -m pytest tests` still runs; hang-prone tests use their own deadline
    # (helpers.run_with_deadline) and do not depend on the plugin.
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        group = parser.getgroup("stoker-timeout-shim")
        group.addoption("--timeout", action="store", default=None, help="ignored: pytest-timeout is absent")
        group.addoption("--timeout-method", action="store", default=None, help="ignored: pytest-timeout is absent")


def pytest_configure(config):
    # torch's constructor warns about "worker processes" when num_workers exceeds the CPU count; stoker's
    # workers are threads, and several tests use 3 of them on 2-CPU machines.
    config.addinivalue_line("filterwarnings", "ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="session")
def fake_driver(tmp_path_factory):
    """Paths of the fake CUDA driver (tests/fake_libcuda.c): "current" and "legacy" (see fake_cuda)."""
    from fake_cuda import build_fake_driver

    return build_fake_driver(tmp_path_factory)


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Tests seed torch's global RNG freely; restore it so test order never matters."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(autouse=True, scope="module")
def _collect_between_modules():
    yield
    gc.collect()
