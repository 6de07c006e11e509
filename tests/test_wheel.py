"""Packaging: the extension's stub matches its bindings, the sdist carries what a build needs, and an installed
wheel is complete and its extension links neither libtorch nor the CUDA runtime.

`.ci/run` runs this suite against a wheel installed into a fresh virtual environment (it sets
STOKER_EXPECT_INSTALLED=1, as does cibuildwheel's test step); with `PYTHONPATH=python` the checks that only an
installed wheel can answer are skipped.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import stoker
from stoker import _core

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGE = ROOT / "python" / "stoker"
INSTALLED_PACKAGE = Path(stoker.__file__).resolve().parent
FROM_SOURCE_TREE = INSTALLED_PACKAGE == SOURCE_PACKAGE.resolve()
FORBIDDEN_LIBRARIES = ("libtorch", "libc10", "libcudart", "libcuda")

needs_installed_wheel = pytest.mark.skipif(
    FROM_SOURCE_TREE, reason=f"stoker is imported from the source tree ({SOURCE_PACKAGE}), not an installed wheel"
)


def _stubgen():
    """tools/stubgen.py, imported by path (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("stoker_tools_stubgen", ROOT / "tools" / "stubgen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stub_matches_the_bindings():
    checked_in = (SOURCE_PACKAGE / "_core.pyi").read_text()
    generated = _stubgen().render(_core)
    if checked_in != generated:
        diff = "".join(difflib.unified_diff(
            checked_in.splitlines(keepends=True), generated.splitlines(keepends=True),
            "python/stoker/_core.pyi (checked in)", f"generated from {_core.__file__}"))
        pytest.fail(
            "python/stoker/_core.pyi does not match the bindings: rebuild the extension, run "
            f"`python tools/stubgen.py` and commit the stub.\n{diff[:6000]}", pytrace=False)


def test_stub_is_valid_python_and_names_every_public_binding():
    tree = ast.parse((SOURCE_PACKAGE / "_core.pyi").read_text())
    defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    public = {name for name in vars(_core) if not name.startswith("_")}
    assert public <= defined, f"bindings missing from the stub: {sorted(public - defined)}"


def test_package_ships_typing_files():
    assert (INSTALLED_PACKAGE / "py.typed").is_file(), f"no py.typed in {INSTALLED_PACKAGE}"
    stub = INSTALLED_PACKAGE / "_core.pyi"
    assert stub.is_file(), f"no _core.pyi in {INSTALLED_PACKAGE}"
    assert stub.read_text() == (SOURCE_PACKAGE / "_core.pyi").read_text(), "the installed stub is not the checkout's"


def test_ci_tests_the_installed_wheel():
    if os.environ.get("STOKER_EXPECT_INSTALLED") != "1":
        pytest.skip("STOKER_EXPECT_INSTALLED is not set (it is in .ci/run and cibuildwheel's test step)")
    assert not FROM_SOURCE_TREE and ROOT.resolve() not in Path(stoker.__file__).resolve().parents, (
        f"stoker was imported from the checkout ({stoker.__file__}), not from the installed wheel")


@needs_installed_wheel
def test_installed_wheel_has_every_file_of_the_package():
    shipped = {p.relative_to(SOURCE_PACKAGE).as_posix() for p in SOURCE_PACKAGE.rglob("*")
               if p.is_file() and p.suffix in (".py", ".pyi", ".typed") and "__pycache__" not in p.parts}
    missing = sorted(f for f in shipped if not (INSTALLED_PACKAGE / f).is_file())
    assert missing == [], f"the installed package {INSTALLED_PACKAGE} lacks {missing}"


@needs_installed_wheel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ELF dynamic sections")
def test_installed_extension_needs_no_torch_and_no_cuda_runtime():
    from test_build import needed_libraries

    needed = needed_libraries(_core.__file__)
    assert any(lib.startswith("libc.so") for lib in needed), needed
    forbidden = [lib for lib in needed if lib.startswith(FORBIDDEN_LIBRARIES)]
    assert forbidden == [], f"the installed {_core.__file__} needs {forbidden}; needed: {needed}"
    # Whatever auditwheel grafted into the wheel (stoker.libs/) must not be torch's or CUDA's either.
    grafted = sorted(INSTALLED_PACKAGE.parent.glob("stoker.libs/*.so*"))
    bad = [p.name for p in grafted
           if p.name.startswith(FORBIDDEN_LIBRARIES)
           or any(lib.startswith(FORBIDDEN_LIBRARIES) for lib in needed_libraries(str(p)))]
    assert bad == [], f"the wheel bundles {bad}"


def _sdist_command(outdir: Path) -> list[str]:
    """A command that writes the sdist into outdir: `python -m build --sdist`, else scikit-build-core's hook
    (run in the checkout)."""
    if importlib.util.find_spec("build.__main__") is not None:  # not the checkout's build/ folder
        return [sys.executable, "-m", "build", "--sdist", "--outdir", str(outdir), str(ROOT)]
    if importlib.util.find_spec("scikit_build_core") is not None:
        hook = "import sys; from scikit_build_core.build import build_sdist; build_sdist(sys.argv[1])"
        return [sys.executable, "-c", hook, str(outdir)]
    pytest.skip("no sdist builder: neither `build` nor scikit-build-core is installed (pip install build)")


@pytest.mark.slow
def test_sdist_builds_with_the_sources_and_without_build_outputs(tmp_path):
    proc = subprocess.run(_sdist_command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"sdist build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    sdists = list(tmp_path.glob("stoker-*.tar.gz"))
    assert len(sdists) == 1, sorted(p.name for p in tmp_path.iterdir())
    with tarfile.open(sdists[0]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    cmake_sources = re.findall(r"^\s*(csrc/\S+\.cc)\s*$", (ROOT / "CMakeLists.txt").read_text(), re.MULTILINE)
    assert cmake_sources, "no sources found in CMakeLists.txt"
    required = {"CMakeLists.txt", "pyproject.toml", "README.md", "PKG-INFO", "python/stoker/__init__.py",
                "python/stoker/_core.pyi", "python/stoker/py.typed", *cmake_sources}
    required |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.h")}
    assert sorted(required - names) == [], "the sdist lacks files a build needs"
    outputs = sorted(n for n in names if n.startswith("build/") or n.endswith((".so", ".pyc", ".o"))
                     or "__pycache__" in n or ".egg-info" in n)
    assert outputs == [], f"the sdist carries build outputs: {outputs[:20]}"
