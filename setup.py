"""Build and install fastadapter.

``kernels/`` (the Triton kernels) is installed as ``fastadapter.kernels``: a top-level package named ``kernels``
would collide with an existing PyPI package.

Install torch first (``pip install torch``), then ``pip install --no-build-isolation .`` so the build reuses it.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastadapter", "fastadapter.*"])
packages += ["fastadapter.kernels"] + [f"fastadapter.kernels.{p}" for p in find_packages("kernels")]

setup(
    name="fastadapter",
    version="0.1.0",
    description="Fused kernels for LLaMA-Adapter zero-init attention, with model, training and benchmarks",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastadapter.kernels": "kernels"},
    install_requires=["torch>=2.5", "numpy", "safetensors", "sentencepiece", "tqdm"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "triton>=3.2", "transformers==5.23.0", "peft==0.21.2"],
        "bench": ["matplotlib", "pytest-benchmark", "transformers==5.23.0", "peft==0.21.2"],
    },
    entry_points={"console_scripts": ["fastadapter=fastadapter.cli:main"]},
)
