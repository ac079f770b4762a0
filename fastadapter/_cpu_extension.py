"""Loader of ``fastadapter._C``, the compiled CPU kernels built from ``csrc/``, and their build settings.

Importing ``fastadapter._C`` registers the ``torch.ops.fastadapter_cpu`` operators; this module then registers
their fake (meta) implementations so that ``torch.compile`` can trace them. When the library is missing (the
install had no torch or compiler, or ran with ``FASTADAPTER_SKIP_BUILD=1``), the first use builds it from the
checkout's ``csrc/`` with ``torch.utils.cpp_extension.load`` into the torch extensions cache (about a minute,
once, with a message), unless ``FASTADAPTER_SKIP_BUILD=1``. When that is not possible it warns once, and
:func:`unavailable_reason` says why, so the ``cpu`` backend declines and the automatic choice falls back.

:func:`build_settings` is what ``setup.py`` compiles with too (it loads this file on its own), so both routes
build the same library.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch

#: The library's translation units, in link order: the baseline input checks first (dispatch.h: the linker keeps
#: the first copy of an inline function, so the baseline one), then the kernel variants from narrow to wide.
SOURCES = ("registration.cpp", "kernels_generic.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp")


@dataclasses.dataclass
class BuildSettings:
    """How ``fastadapter._C`` is compiled: sources (absolute), flags, and why it cannot be built (if so)."""

    sources: list[str]
    headers: list[str]
    cflags: list[str]
    ldflags: list[str]
    macros: list[tuple[str, Optional[str]]]
    max_jobs: int
    notes: list[str]
    skip_reason: Optional[str] = None


def _compiler_accepts(compiler: str, flags: list[str]) -> bool:
    """Whether ``compiler`` builds and links a tiny OpenMP program with ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([*compiler.split(), *flags, src, "-o", os.path.join(tmp, "probe")],
                                    capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0


def build_settings(root: str) -> BuildSettings:
    """The build of ``fastadapter._C`` from ``root/csrc``: the same for ``setup.py`` and the build on first use.

    No ``-march``: the kernel variants carry their own targets and registration.cpp picks one at run time, so one
    binary runs on every x86-64 CPU. No ``-g`` (Python's CFLAGS add it; it tripled the compile time).
    """
    csrc = os.path.join(root, "csrc")
    sources = [os.path.join(csrc, name) for name in SOURCES]
    headers = sorted(glob.glob(os.path.join(csrc, "*.h")))
    notes: list[str] = []
    missing = [s for s in sources if not os.path.exists(s)]
    compiler = os.environ.get("CXX", "c++")
    skip = None
    if missing:
        skip = f"the C++ sources are not there ({', '.join(missing)})"
    elif shutil.which(compiler.split()[0]) is None:
        skip = f"no C++ compiler ({compiler}) found"
    # -ffp-contract=fast lets the row loops use FMA. No -ffast-math: -inf marks masked rows.
    cflags = ["-O3", "-g0", "-std=c++17", "-ffp-contract=fast"]
    ldflags: list[str] = []
    # -fopenmp: at::parallel_for is an inline OpenMP loop in PyTorch's headers; a compiler without OpenMP (Apple
    # clang) builds the same kernels on one thread.
    if skip is None:
        if _compiler_accepts(compiler, ["-fopenmp"]):
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        else:
            notes.append(f"{compiler} has no OpenMP (-fopenmp): the CPU kernels are built single-threaded")
    # The library finds torch's own libraries (libc10, libtorch_cpu) through its run path, so `import fastadapter._C`
    # works before `import torch` too; once torch is loaded the same libraries are shared, whatever the path.
    ldflags.append(f"-Wl,-rpath,{os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), 'lib')}")
    macros: list[tuple[str, Optional[str]]] = []
    # The tile GEMMs call MKL (linked into and exported by every x86 libtorch_cpu) directly; other builds of
    # PyTorch go through at::addmm_.
    if torch.backends.mkl.is_available():
        macros.append(("FASTADAPTER_WITH_MKL", None))
    # Four translation units: more jobs than that only cost memory.
    max_jobs = max(1, min(len(SOURCES), os.cpu_count() or 1))
    return BuildSettings(sources, headers, cflags, ldflags, macros, max_jobs, notes, skip)


def _register_fakes() -> None:
    """Shapes of the C++ ops' results, for ``torch.compile`` (mirrors csrc/registration.cpp)."""

    @torch.library.register_fake("fastadapter_cpu::forward")
    def _forward(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                 max_seqlen_k, causal, softmax_scale, gate_tanh):
        from .kernels.problem import lse_shape
        shape = lse_shape(q.shape, varlen=cu_seqlens_q is not None)
        return (q.new_empty(q.shape), q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.float32))

    @torch.library.register_fake("fastadapter_cpu::backward")
    def _backward(grad_out, q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p, cu_seqlens_q, cu_seqlens_k,
                  seqused_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, gate_tanh):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
                prefix_v.new_empty(prefix_v.shape), gate.new_empty(gate.shape, dtype=torch.float32))

    @torch.library.register_fake("fastadapter_cpu::decode_linear")
    def _decode_linear(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


def _checkout_root() -> str:
    """The folder above the package: a checkout (editable install) has csrc/ there."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_on_first_use() -> None:
    """Builds ``fastadapter._C`` from the checkout's csrc/ into the torch extensions cache and loads it.

    Raises ImportError saying why when it cannot (FASTADAPTER_SKIP_BUILD=1, no sources, no compiler, no ninja,
    a failed compile: the compiler's last lines).
    """
    if os.environ.get("FASTADAPTER_SKIP_BUILD", "0") == "1":
        raise ImportError("not built on first use either, as FASTADAPTER_SKIP_BUILD=1")
    settings = build_settings(_checkout_root())
    if settings.skip_reason:
        raise ImportError(f"cannot build it on first use: {settings.skip_reason}")
    from torch.utils import cpp_extension
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise ImportError("cannot build it on first use: ninja is missing (pip install ninja)") from None
    # One cache entry per torch version: a library built against another torch does not load.
    name = "fastadapter_C_torch_" + re.sub(r"\W", "_", torch.__version__)
    os.environ.setdefault("MAX_JOBS", str(settings.max_jobs))
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    # A library already in the cache loads at once (load() rebuilds it only when csrc/ or the flags changed).
    cached = os.path.exists(os.path.join(build_dir, f"{name}.so"))
    if not cached:
        print(f"fastadapter: building the C++ CPU kernels (fastadapter._C was not installed) into {build_dir} "
              f"with {os.environ['MAX_JOBS']} jobs; this takes about a minute, once (FASTADAPTER_SKIP_BUILD=1 "
              f"skips it) ...", file=sys.stderr, flush=True)
        for note in settings.notes:
            print(f"fastadapter: {note}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(name=name, sources=settings.sources, extra_cflags=settings.cflags +
                           [f"-D{m}" if v is None else f"-D{m}={v}" for m, v in settings.macros],
                           extra_ldflags=settings.ldflags, is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        tail = " ".join(str(error).strip().splitlines()[-3:])
        raise ImportError(f"building it on first use failed: {tail}") from None
    elapsed = time.perf_counter() - start
    if not cached or elapsed > 5:
        print(f"fastadapter: {'re' if cached else ''}built the C++ CPU kernels in {elapsed:.0f} s into {build_dir}",
              file=sys.stderr, flush=True)


def _import_or_build() -> None:
    """Imports the installed ``fastadapter._C``, else builds it on first use."""
    try:
        importlib.import_module("fastadapter._C")
    except ImportError as missing:
        try:
            build_on_first_use()
        except ImportError as error:
            raise ImportError(f"{missing}; {error}") from None


class ExtensionLoader:
    """Imports (or builds) the compiled library at most once; remembers why it failed and warns about it once.

    No lock: ``torch.compile`` traces through the backend choice, and Dynamo cannot enter a lock. Two threads
    racing on the very first call both import (Python's import is thread-safe) and at worst both warn.
    """

    def __init__(self, importer: Callable[[], object] = _import_or_build):
        self._importer = importer
        self._tried = False
        self._error: Optional[str] = None

    def unavailable_reason(self) -> Optional[str]:
        """None when the kernels are loaded, else why they are not (the first call imports them)."""
        if not self._tried:
            self._tried = True
            try:
                self._importer()
                _register_fakes_once()
            except (ImportError, OSError) as error:
                self._error = (f"the compiled CPU kernels fastadapter._C are not available ({error}); "
                               f"reinstall with a C++ compiler and without FASTADAPTER_SKIP_BUILD: "
                               f"pip install --no-build-isolation -e .")
                warnings.warn(self._error + "; falling back to the sdpa backend on CPU", RuntimeWarning,
                              stacklevel=3)
        return self._error


_fakes_registered = False


def _register_fakes_once() -> None:
    global _fakes_registered
    if not _fakes_registered:
        _register_fakes()
        _fakes_registered = True


#: The process-wide loader (tests replace it to simulate a missing library).
LOADER = ExtensionLoader()


def unavailable_reason() -> Optional[str]:
    """None when ``torch.ops.fastadapter_cpu`` is usable, else why not (loads or builds the library on first call)."""
    return LOADER.unavailable_reason()


#: The values of ``FASTADAPTER_CPU_ISA`` (unset or empty is ``auto``: the widest variant this CPU runs).
ISA_CHOICES = ("auto", "avx512", "avx2", "generic")
_isa_checked: Optional[str] = None


def check_isa_setting() -> None:
    """Raises ValueError when ``FASTADAPTER_CPU_ISA`` names no kernel variant, or one this CPU or build cannot run.

    The C++ side refuses such a value too, but as a RuntimeError from inside an operator; this says what was given
    and what is accepted before any kernel runs. Checks each new value once (the kernels read it on every call).
    """
    global _isa_checked
    value = os.environ.get("FASTADAPTER_CPU_ISA", "")
    if value == _isa_checked:
        return
    if value not in ("", *ISA_CHOICES):
        raise ValueError(f"FASTADAPTER_CPU_ISA={value!r} names no CPU kernel variant: set it to one of "
                         f"{', '.join(ISA_CHOICES)}, or unset it (auto: the widest variant this CPU runs)")
    if value not in ("", "auto") and unavailable_reason() is None:
        try:
            torch.ops.fastadapter_cpu.cpu_path()
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0].removeprefix("fastadapter_cpu: ")
            raise ValueError(f"{first}; use FASTADAPTER_CPU_ISA=auto (or unset it) for the widest variant this "
                             f"CPU runs") from None
    _isa_checked = value


def cpu_path() -> Optional[tuple[str, str]]:
    """``(variant, what it runs and why)`` of the kernels' next call (``avx512``, ``avx2`` or ``generic``; it follows
    ``FASTADAPTER_CPU_ISA`` and ``FASTADAPTER_CPU_GEMM``), or None when the library is unavailable."""
    if unavailable_reason() is not None:
        return None
    check_isa_setting()
    variant, detail = torch.ops.fastadapter_cpu.cpu_path()
    return str(variant), str(detail)
