"""The boundary rule: the extension links neither libtorch nor the CUDA runtime."""

import struct

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


def test_version():
    assert stoker.__version__ == "0.1.0"
