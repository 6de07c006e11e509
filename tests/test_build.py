"""The boundary rule: the extension links neither libtorch nor the CUDA runtime; and the bench runner runs."""

import json
import struct
import subprocess
import sys

import pytest

import stoker
from stoker import _core


def needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object, read from its dynamic section."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected an ELF64 little-endian file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        sh_type, = struct.unpack_from("<I", data, off + 4)
        sh_offset, sh_size, sh_link = struct.unpack_from("<QQI", data, off + 0x18)
        sections.append((sh_type, sh_offset, sh_size, sh_link))
    needed = []
    for sh_type, offset, size, link in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab_offset = sections[link][1]
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab_offset + value)
                needed.append(data[strtab_offset + value:end].decode())
    return needed


def test_extension_links_no_torch_and_no_cuda_runtime():
    needed = needed_libraries(_core.__file__)
    assert needed, "the extension should at least need libc"
    forbidden = [lib for lib in needed if lib.startswith(("libtorch", "libc10", "libcudart", "libcuda"))]
    assert forbidden == [], f"stoker._core links {forbidden}; needed: {needed}"


def test_needed_libraries_reader_sees_libc():
    assert any(lib.startswith("libc.so") for lib in needed_libraries(_core.__file__))


def test_bench_runner_prints_every_workload_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stoker", "bench", "--scale", "0.005", "--rounds", "1", "--budget", "0.05",
         "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    workloads = {r["workload"] for r in records}
    assert len(workloads) == 8  # five throughput workloads, peak RSS, the resume cost and packing
    memory = [r for r in records if r["workload"] == "peak RSS"]
    assert [r["loader"].split()[0] for r in memory] == ["torch", "stoker"]
    assert all(r["peak_rss_mib"] > 0 for r in memory)
    resume = {r["loader"].split()[0]: r["resume_ms"] for r in records if r["workload"] == "resume"}
    assert {"stoker", "torch"} <= set(resume) and all(v > 0 for v in resume.values())
    packing = {r["loader"]: r for r in records if r["workload"] == "packing"}
    assert any(name.startswith("stoker PackedLoader") for name in packing)
    assert all(r["tokens_per_s"] > 0 for r in packing.values())
    assert all(0.99 < r["efficiency"] <= 1 for r in packing.values() if "efficiency" in r)
    for w in workloads - {"peak RSS", "resume", "packing"}:
        rows = [r for r in records if r["workload"] == w]
        assert any(r["loader"].startswith("torch") for r in rows)
        assert any(r["loader"].startswith("stoker") for r in rows)
        assert max(r["ratio_to_torch_best"] for r in rows if r["loader"].startswith("torch")) == pytest.approx(1.0)
        assert all(r["samples_per_s"] > 0 for r in rows)
    assert "M samples/s" in proc.stdout


def test_bench_usage_error():
    proc = subprocess.run([sys.executable, "-m", "stoker"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_version():
    assert stoker.__version__ == "0.1.0"
