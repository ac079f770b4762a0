"""Build and install fastadapter.

``kernels/`` (the Triton kernels) is installed as ``fastadapter.kernels``: a top-level package named ``kernels``
would collide with an existing PyPI package.

Install torch first (``pip install torch``), then ``pip install --no-build-isolation .`` so the build reuses it.

The C++ CPU kernels in ``csrc/`` are compiled into ``fastadapter._C`` with ninja whenever torch and a C++
compiler are present. ``FASTADAPTER_SKIP_BUILD=1`` skips them (the ``cpu`` backend then reports itself
unavailable and the automatic choice falls back to ``sdpa``); ``MAX_JOBS`` limits the parallel compile jobs.
"""
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup


def _cpu_extension():
    """``(ext_modules, cmdclass)`` building ``fastadapter._C`` from csrc/, or empty when it cannot be built."""
    if os.environ.get("FASTADAPTER_SKIP_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable: building without the C++ CPU kernels (install torch first and use "
                      "pip install --no-build-isolation)")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        warnings.warn(f"no C++ compiler ({compiler}) found: building without the C++ CPU kernels")
        return [], {}
    # fastadapter is built from source on the machine that runs it, so -march=native is safe and lets the
    # compiler use that machine's widest vectors (AVX-512 here) for the softmax/conversion loops; at::vec
    # picks its matching implementation from the same macros (csrc/attention_cpu.h). Set
    # FASTADAPTER_PORTABLE_BUILD=1 to build a binary that runs on any x86-64 instead.
    arch = [] if os.environ.get("FASTADAPTER_PORTABLE_BUILD", "0") == "1" else ["-march=native"]
    # -fopenmp: at::parallel_for is an inline OpenMP loop in PyTorch's headers; without it the kernels run on
    # one thread. -ffp-contract=fast lets the row loops use FMA. No -ffast-math: -inf marks masked rows.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", *arch]
    macros = []
    # The tile GEMMs call MKL (linked into and exported by every x86 libtorch_cpu) directly; other builds of
    # PyTorch go through at::addmm_.
    if torch.backends.mkl.is_available():
        macros.append(("FASTADAPTER_WITH_MKL", None))
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    ext = CppExtension("fastadapter._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=["-fopenmp"], depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpu_extension() if "egg_info" not in sys.argv else ([], {})

# kernels/ and benchmarks/ stay top-level folders of the checkout but install as fastadapter.kernels and
# fastadapter.benchmarks (so `fastadapter bench` runs from any install, and the checkout root never needs to be
# on sys.path).
packages = find_packages(include=["fastadapter", "fastadapter.*"])
packages += ["fastadapter.kernels"] + [f"fastadapter.kernels.{p}" for p in find_packages("kernels")]
packages += ["fastadapter.benchmarks"] + [f"fastadapter.benchmarks.{p}" for p in find_packages("benchmarks")]

setup(
    name="fastadapter",
    version="0.1.0",
    description="Fused kernels for LLaMA-Adapter zero-init attention, with model, training and benchmarks",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastadapter.kernels": "kernels", "fastadapter.benchmarks": "benchmarks"},
    install_requires=["torch>=2.5", "numpy", "safetensors", "sentencepiece", "tqdm"],
    extras_require={
        "triton": ["triton>=3.2"],
        # The tests also run the benchmark machinery (plots, the pytest-benchmark plugin) on tiny shapes.
        "test": ["pytest>=8", "triton>=3.2", "transformers==5.23.0", "peft==0.21.2", "matplotlib",
                 "pytest-benchmark"],
        # The integrations support transformers 5.17-5.23 and peft 0.18-0.21 (fastadapter/integrations/_versions.py;
        # the test extra pins the newest, .ci/integration-versions.sh tests the oldest).
        "bench": ["matplotlib", "pytest-benchmark", "transformers>=5.17,<5.24", "peft>=0.18,<0.22"],
    },
    entry_points={"console_scripts": ["fastadapter=fastadapter.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
