"""What an sm_90 cubin that Triton built says about its kernel, read without a GPU.

Two readers of the same facts: ``elf_resources`` parses the ELF's ``.nv.info`` attributes in Python (well
under a millisecond, so the stand-in driver can answer ``load_binary`` with the real register and spill
figures), and ``cuobjdump_resources`` runs the ``cuobjdump`` that Triton's wheel ships (authoritative,
a subprocess per cubin, for the static tables). What the CUDA driver would report: registers are
``CU_FUNC_ATTRIBUTE_NUM_REGS``, the frame (spill stack) is ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES``.

>>> res = elf_resources(kernel.asm["cubin"], kernel.name)   # doctest: +SKIP
>>> res.registers, res.stack_bytes
(255, 96)
"""
from __future__ import annotations

import dataclasses
import re
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

# .nv.info attribute codes (cuobjdump -elf names them) and formats.
_EIATTR_REGCOUNT = 0x2F
_EIATTR_FRAME_SIZE = 0x11
_EIATTR_REQNTID = 0x10
_EIFMT_SVAL = 4  # a u16 size and that many bytes follow; the other formats carry one u16 value
_MAX_THREADS_PER_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Resources:
    """Per-thread registers, per-thread spill stack in bytes, and the most threads a block may have."""

    registers: int
    stack_bytes: int
    max_threads: int


def _sections(cubin: bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of a little-endian ELF64 file."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("cubin must be a 64-bit ELF file (what ptxas writes for sm_90)")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(offset: int) -> str:
        start = names_at + offset
        return cubin[start:cubin.index(b"\0", start)].decode()

    return {name(h[0]): (h[4], h[5]) for h in headers}


def _symbol_index(cubin: bytes, sections: dict[str, tuple[int, int]], kernel: str) -> int:
    symtab_at, symtab_size = sections[".symtab"]
    strtab_at, _ = sections[".strtab"]  # the symbols' names (ptxas links .symtab to .strtab)
    for i in range(symtab_size // 24):  # Elf64_Sym is 24 bytes, its name offset first
        name_at, = struct.unpack_from("<I", cubin, symtab_at + 24 * i)
        start = strtab_at + name_at
        if cubin[start:cubin.index(b"\0", start)].decode() == kernel:
            return i
    raise ValueError(f"kernel {kernel!r} is not a symbol of this cubin")


def _attributes(cubin: bytes, offset: int, size: int) -> Iterator[tuple[int, bytes]]:
    """(attribute, payload bytes) of each entry of an .nv.info section."""
    end, at = offset + size, offset
    while at < end:
        fmt, attr = cubin[at], cubin[at + 1]
        if fmt == _EIFMT_SVAL:
            length, = struct.unpack_from("<H", cubin, at + 2)
            yield attr, cubin[at + 4:at + 4 + length]
            at += 4 + length
        else:
            yield attr, cubin[at + 2:at + 4]
            at += 4


def elf_resources(cubin: bytes, kernel: str) -> Resources:
    """Registers and spill stack of ``kernel`` from the cubin's ``.nv.info`` (what ``cuobjdump
    --dump-resource-usage`` prints as REG and STACK), and its block-size limit from ``.reqntid``."""
    sections = _sections(cubin)
    symbol = _symbol_index(cubin, sections, kernel)
    per_symbol: dict[int, int] = {}
    offset, size = sections[".nv.info"]
    for attr, payload in _attributes(cubin, offset, size):
        if attr in (_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE):
            sym, value = struct.unpack_from("<II", payload)
            if sym == symbol:
                per_symbol[attr] = value
    max_threads = _MAX_THREADS_PER_BLOCK
    if f".nv.info.{kernel}" in sections:
        offset, size = sections[f".nv.info.{kernel}"]
        for attr, payload in _attributes(cubin, offset, size):
            if attr == _EIATTR_REQNTID:
                x, y, z = struct.unpack_from("<III", payload)
                max_threads = x * y * z
    if _EIATTR_REGCOUNT not in per_symbol:
        raise ValueError(f"the cubin has no register count for {kernel!r}")
    return Resources(per_symbol[_EIATTR_REGCOUNT], per_symbol.get(_EIATTR_FRAME_SIZE, 0), max_threads)


def cuobjdump_path() -> Path:
    """The ``cuobjdump`` of the installed Triton wheel."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"Triton's wheel ships no cuobjdump at {path}")
    return path


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump_resources(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per function of the cubin: REG, STACK (spill bytes per thread), SHARED (static shared memory,
    bytes; Triton's dynamic shared memory is the kernel's ``metadata.shared``) and LOCAL, as
    ``cuobjdump --dump-resource-usage`` prints them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found: dict[str, dict[str, int]] = {}
    function = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function is not None and (m := _USAGE.search(line)):
            found[function] = dict(zip(("registers", "stack_bytes", "static_shared_bytes", "local_bytes"),
                                       map(int, m.groups())))
            function = None
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return found
