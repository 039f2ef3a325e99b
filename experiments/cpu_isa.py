"""Run a benchmark worker as if the CPU had a smaller instruction set (``--isa``).

Three libraries pick their x86 kernels independently, so restricting one is
not enough to make an AVX-512 machine behave like an AVX2 one:

* XLA's own code generation (elementwise fusions, transposes, reductions):
  ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``;
* PyTorch's ATen kernels: ``ATEN_CPU_CAPABILITY=avx2``; its GEMMs go to MKL
  (``MKL_ENABLE_INSTRUCTIONS=AVX2``) and oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``);
* YNNPACK, which runs XLA CPU's matmuls (the ``ynn_fusion`` ops) and chooses
  its kernels from ``cpuid`` alone: no flag or variable reaches it. Measured
  here: a 1024^2 ``jnp.dot`` runs at the same GFLOP/s with and without
  ``--xla_cpu_max_isa=AVX2``. ``restrict_ynnpack`` therefore lowers YNNPACK's
  cached CPU-feature word (``ynn::get_supported_arch_flags``'s static) to the
  AVX2 + FMA3 subset, in the worker process, before its first kernel runs.

All of this happens in a fresh worker process (``bench_common.run_worker``):
the variables must be set before the libraries are loaded, and the YNNPACK
change lasts for the process.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.abc
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

ISAS = ("native", "avx2")
ISA_CHOICES = (*ISAS, "both")

# Environment of a worker per ISA (merged into bench_common.worker_env).
_AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
AVX2_XLA_FLAG = "--xla_cpu_max_isa=AVX2"
_OFFSETS_VAR = "BENCH_YNN_SYMBOL_OFFSETS"
# Set per ISA by ``env``; a worker starts without the parent's values of these.
WORKER_VARS = ("BENCH_ISA", _OFFSETS_VAR, *_AVX2_ENV)

# ynnpack/base/arch.h (x86): sse2 .. fma3 are bits 0..6; bit 7 (avx512f) and
# up are AVX-512 / AMX features, in every version of the enum so far.
_YNN_AVX2_MASK = (1 << 7) - 1
_YNN_FLAGS_FN = "_ZN3ynn24get_supported_arch_flagsEv"
_YNN_FLAGS_STATIC = "_ZZN3ynn24get_supported_arch_flagsEvE5flags"


def expand(isa: str) -> tuple[str, ...]:
    """``--isa`` value -> the ISAs to measure, in order."""
    if isa not in ISA_CHOICES:
        raise ValueError(f"--isa must be one of {ISA_CHOICES}, got {isa!r}")
    return ISAS if isa == "both" else (isa,)


def env(isa: str) -> tuple[dict[str, str], list[str]]:
    """(environment variables, XLA flags) that restrict a worker to ``isa``."""
    if isa == "native":
        return {"BENCH_ISA": "native"}, []
    if isa == "avx2":
        return ({"BENCH_ISA": "avx2", _OFFSETS_VAR: _ynn_symbol_offsets(), **_AVX2_ENV},
                [AVX2_XLA_FLAG])
    raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")


def cpu_flags() -> list[str]:
    """The SIMD flags /proc/cpuinfo reports (what the hardware has)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def _jax_common_lib() -> str:
    import importlib.util
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("--isa avx2: jaxlib is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "libjax_common.so")


def _elf_symbols(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """Values (offsets from the load base) of ``names`` in an ELF64 ``.symtab``."""
    found: dict[str, int] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"\x7fELF" or m[4] != 2:
            return found
        shoff, = struct.unpack_from("<Q", m, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize)
                    for i in range(shnum)]
        for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
            if sh_type != 2 or not entsize:  # SHT_SYMTAB
                continue
            str_off, str_size = sections[link][4], sections[link][5]
            wanted = {}  # string-table index -> name
            for name in names:
                at = m.find(b"\0" + name.encode() + b"\0", str_off, str_off + str_size)
                if at >= 0:
                    wanted[at + 1 - str_off] = name
            for pos in range(off, off + size, entsize):
                st_name, = struct.unpack_from("<I", m, pos)
                if st_name in wanted:
                    found[wanted[st_name]], = struct.unpack_from("<Q", m, pos + 8)
    return found


@functools.cache
def _ynn_symbol_offsets() -> str:
    """Offsets ("<fn>,<static>") for ``restrict_ynnpack``, read by the parent process.

    (Reading the 100 MB symbol table in the worker would inflate the peak RSS
    the benchmarks measure.)
    """
    lib = _jax_common_lib()
    syms = _elf_symbols(lib, (_YNN_FLAGS_FN, _YNN_FLAGS_STATIC))
    if len(syms) != 2:
        raise RuntimeError(f"--isa avx2: {lib} has no YNNPACK CPU-feature symbols; this jaxlib's "
                           "matmul kernels can not be restricted (use --isa native)")
    return f"{syms[_YNN_FLAGS_FN]},{syms[_YNN_FLAGS_STATIC]}"


def _load_base(path: str) -> int | None:
    real = os.path.realpath(path)
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and os.path.realpath(parts[5]) == real and int(parts[2], 16) == 0:
            return int(parts[0].split("-")[0], 16)
    return None


def restrict_ynnpack(offsets: str) -> dict[str, Any]:
    """Lowers YNNPACK's CPU features to AVX2 + FMA3 in this process.

    Loads jaxlib's ``libjax_common.so`` (the same handle ``import jax`` gets),
    calls ``ynn::get_supported_arch_flags()`` so its one-time detection has
    run, then overwrites the cached word with its AVX2 subset; YNNPACK reads
    that word whenever it picks a kernel. ``offsets`` comes from
    ``_ynn_symbol_offsets``. Returns the flags before / after.
    """
    lib = _jax_common_lib()
    fn_off, static_off = (int(x) for x in offsets.split(","))
    ctypes.CDLL(lib)
    base = _load_base(lib)
    if base is None:
        raise RuntimeError(f"--isa avx2: {lib} is not mapped in this process")
    detect = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + fn_off)
    before = int(detect())
    cached = ctypes.c_uint64.from_address(base + static_off)
    if cached.value != before:  # a mismatch means the offsets are not this library's
        raise RuntimeError("--isa avx2: YNNPACK's cached CPU-feature word is not where the "
                           "symbol table says (jaxlib changed since the offsets were read)")
    cached.value = before & _YNN_AVX2_MASK
    return {"ynn_arch_flags_detected": before, "ynn_arch_flags_used": int(detect())}


class _RestrictOnJaxImport(importlib.abc.MetaPathFinder):
    """Runs ``restrict_ynnpack`` just before ``jax`` is first imported.

    Lazy so that workers that only run PyTorch never load jaxlib (their peak
    RSS stays theirs).
    """

    def __init__(self, offsets: str, record: dict[str, Any]):
        self.offsets, self.record = offsets, record

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "jax":
            sys.meta_path.remove(self)
            self.record.update(restrict_ynnpack(self.offsets))
        return None  # the normal finders import it


def apply_in_worker() -> dict[str, Any]:
    """Called first thing in a worker: applies ``BENCH_ISA`` where no variable can.

    Returns the record ``describe_worker`` reports (filled in once jax loads).
    """
    isa = os.environ.get("BENCH_ISA", "native")
    record: dict[str, Any] = {"isa": isa}
    if isa == "avx2":
        sys.meta_path.insert(0, _RestrictOnJaxImport(os.environ[_OFFSETS_VAR], record))
    return record


def describe_worker(applied: dict[str, Any]) -> dict[str, Any]:
    """What a worker actually ran with (recorded next to its numbers)."""
    out = {**applied, "cpu_flags": cpu_flags(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           **{k: os.environ.get(k) for k in _AVX2_ENV}}
    if "torch" in sys.modules:  # only workers that measured PyTorch load it
        out["torch_cpu_capability"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    return out


def note(isas: tuple[str, ...]) -> str:
    """One markdown sentence saying what each measured ISA means."""
    parts = []
    for isa in isas:
        if isa == "native":
            parts.append(f"`native` = every kernel library on the CPU's own SIMD "
                         f"({', '.join(cpu_flags()) or 'flags unknown'})")
        else:
            variables = ", ".join(f"{k}={v}" for k, v in _AVX2_ENV.items())
            parts.append(f"`avx2` = XLA_FLAGS={AVX2_XLA_FLAG}, YNNPACK (XLA's matmuls) "
                         f"restricted to AVX2+FMA3, {variables} (`experiments/cpu_isa.py`)")
    return "ISA: " + "; ".join(parts) + "; each worker's record is in the JSON (`isa_used`)."


def main(argv: list[str]) -> None:
    """``python -m experiments.cpu_isa MODULE ARGS...``: runs ``python -m MODULE ARGS...``
    under the ISA its environment names (``env(isa)`` set by the caller), with
    YNNPACK restricted as in a benchmark worker."""
    import runpy
    if not argv:
        sys.exit("usage: BENCH_ISA=avx2 ... python -m experiments.cpu_isa MODULE [ARGS...]")
    apply_in_worker()
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
