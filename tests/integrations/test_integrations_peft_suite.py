"""PEFT's own adaption-prompt tests (``tests/test_adaption_prompt.py`` of the installed peft, with the helpers it
imports from ``tests/testing_utils.py``) with ``accelerate`` applied to every PEFT model they create.

The two files come from the sdist of the *installed* peft version on the package registry (``pip download
--no-binary :all: --no-deps peft==<version>``), kept in a cache folder (``$FASTADAPTER_CACHE``, default
``~/.cache/fastadapter``, under ``peft-sdist/``) so the registry is asked once per version; ``FASTADAPTER_PEFT_SDIST``
names a ``peft-<version>.tar.gz`` to use instead (a machine without the registry). They are copied into a package
folder under ``tmp_path`` (so their relative import ``from .testing_utils import …`` works, as in PEFT's checkout)
next to a ``conftest.py`` written here that

* builds the hub models they name locally (nothing is downloaded): ``AutoModelForCausalLM.from_pretrained(id)`` gives
  a tiny random GPT-2, Llama or Mistral (GQA), the same weights for the same id;
* wraps ``peft.get_peft_model`` and ``PeftModel.from_pretrained`` so that every model they return goes through
  :func:`fastadapter.integrations.peft.accelerate` (adapters its tests add later are fused by accelerate itself);
* counts the calls of PEFT's own ``AdaptedAttention.forward`` (an adapted Llama/Mistral attention left unfused) and
  of the fused forward, and writes the counts to ``calls.json`` at the end of the run.

Expected outcome, checked from the run's JUnit report: every GPT-2 test fails with accelerate's refusal of
``AdaptedAttentionGPT`` (PEFT adds GPT-2's prefix after ``c_proj``: see docs/integrations.md); every Llama and
Mistral test passes (or fails exactly as it fails with PEFT's own code: those are rerun without accelerate), with
no call of PEFT's unfused forward. ``testing_utils.py`` imports ``datasets`` (CI installs it beside the ``test``
extra). Slow: a pip download on the first run, one pytest run of the file in a subprocess.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

import peft
import pytest

#: The files of PEFT's tests/ folder that the run needs: the test file and the helpers it imports.
PEFT_TEST_FILES = ("test_adaption_prompt.py", "testing_utils.py")
PACKAGE = "peft_tests"

CONFTEST = '''
import json
import os

import pytest
import torch
import transformers
import peft
from peft.peft_model import PeftModel
from peft.tuners.adaption_prompt.layer import AdaptedAttention

from fastadapter.integrations.peft import FusedAdaptedAttention, accelerate

_SMALL = dict(vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _tiny(model_id, **kwargs):
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    torch.manual_seed(sum(map(ord, model_id)))
    if "gpt2" in model_id:
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_SMALL, **kwargs)
        model = transformers.GPT2LMHeadModel(config)
    else:
        family = "Mistral" if "Mistral" in model_id else "Llama"
        config = getattr(transformers, family + "Config")(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          max_position_embeddings=64, **_SMALL, **kwargs)
        model = getattr(transformers, family + "ForCausalLM")(config)
    return model.to(dtype) if dtype is not None else model


def _from_pretrained(model_id, *args, **kwargs):
    return _tiny(model_id, **kwargs).eval()


transformers.AutoModelForCausalLM.from_pretrained = _from_pretrained

_real_get_peft_model = peft.get_peft_model
_real_from_pretrained = PeftModel.from_pretrained.__func__
PLAIN = os.environ.get("FASTADAPTER_PEFT_SUITE_PLAIN") == "1"  # the baseline run: PEFT's own code


def _accelerated(model):
    if PLAIN:
        return model
    accelerate(model)
    assert any(isinstance(m, FusedAdaptedAttention) for m in model.modules()), "accelerate fused nothing"
    return model


def get_peft_model(*args, **kwargs):
    return _accelerated(_real_get_peft_model(*args, **kwargs))


def _peft_from_pretrained(cls, *args, **kwargs):
    return _accelerated(_real_from_pretrained(cls, *args, **kwargs))


peft.get_peft_model = get_peft_model
PeftModel.from_pretrained = classmethod(_peft_from_pretrained)

CALLS = {"unfused": 0, "fused": 0}
_peft_forward, _fused_forward = AdaptedAttention.forward, FusedAdaptedAttention.forward


def _counted_peft_forward(self, **kwargs):
    CALLS["unfused"] += 1
    return _peft_forward(self, **kwargs)


def _counted_fused_forward(self, **kwargs):
    CALLS["fused"] += 1
    return _fused_forward(self, **kwargs)


AdaptedAttention.forward = _counted_peft_forward
FusedAdaptedAttention.forward = _counted_fused_forward


def pytest_sessionfinish(session):
    with open(os.environ["FASTADAPTER_PEFT_SUITE_CALLS"], "w") as f:
        json.dump(CALLS, f)
'''


def _cache_folder() -> pathlib.Path:
    root = os.environ.get("FASTADAPTER_CACHE") or pathlib.Path.home() / ".cache" / "fastadapter"
    return pathlib.Path(root) / "peft-sdist"


def peft_sdist(version: str) -> pathlib.Path:
    """The sdist ``peft-<version>.tar.gz``: ``FASTADAPTER_PEFT_SDIST``, else the cached download, else downloaded
    from the package registry into the cache with pip."""
    given = os.environ.get("FASTADAPTER_PEFT_SDIST")
    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"FASTADAPTER_PEFT_SDIST={given} is not a file (expected peft-{version}.tar.gz)")
        return pathlib.Path(given)
    cache = _cache_folder()
    sdist = cache / f"peft-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    # Reading the sdist's metadata builds nothing; without isolation it needs no download of setuptools.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", *isolation,
                           "-q", "-d", str(cache), f"peft=={version}"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not sdist.is_file():
        raise RuntimeError(f"could not download the sdist of peft {version} (its tests/ folder holds the test file "
                           f"run here): pip said:\n{(done.stdout + done.stderr)[-3000:]}\nDownload "
                           f"peft-{version}.tar.gz elsewhere and point FASTADAPTER_PEFT_SDIST at it")
    return sdist


def write_peft_tests(sdist: pathlib.Path, folder: pathlib.Path) -> None:
    """Copy :data:`PEFT_TEST_FILES` from the sdist's ``tests/`` into the package ``folder`` (an ``__init__.py``
    added: the newer test files import their helpers relatively, ``from .testing_utils import …``)."""
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    with tarfile.open(sdist) as archive:
        members = {pathlib.PurePosixPath(m.name).relative_to(pathlib.PurePosixPath(m.name).parts[0]).as_posix(): m
                   for m in archive.getmembers() if m.isfile() and len(pathlib.PurePosixPath(m.name).parts) > 1}
        for name in PEFT_TEST_FILES:
            member = members.get(f"tests/{name}")
            if member is None:
                raise FileNotFoundError(f"{sdist} has no tests/{name}")
            (folder / name).write_bytes(archive.extractfile(member).read())


def _run_suite(root: pathlib.Path, selection: list[str], *, plain: bool) -> tuple[dict, dict, str]:
    """``({test id: "passed" | "skipped" | failure message}, {"unfused": n, "fused": n}, output)`` of one pytest
    run in ``root``."""
    name = "plain" if plain else "accelerated"
    report, calls = root / f"{name}.xml", root / f"{name}-calls.json"
    env = {**os.environ, "FASTADAPTER_PEFT_SUITE_PLAIN": "1" if plain else "0",
           "FASTADAPTER_PEFT_SUITE_CALLS": str(calls),
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider",
                          f"--junitxml={report}", "--rootdir", str(root), "-o", "addopts="],
                         capture_output=True, text=True, cwd=root, env=env, timeout=1200)
    output = run.stdout[-4000:] + run.stderr[-2000:]
    assert report.exists() and calls.exists(), output
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped") is not None
        outcomes[case.get("name")] = ("skipped" if skipped else "passed" if failure is None
                                      else failure.get("message", "").splitlines()[0])
    return outcomes, json.loads(calls.read_text()), output


@pytest.mark.slow
def test_peft_adaption_prompt_suite_passes_accelerated(tmp_path):
    assert importlib.util.find_spec("datasets") is not None, (
        "PEFT's tests/testing_utils.py imports datasets: pip install datasets (.ci/run installs it)")
    write_peft_tests(peft_sdist(peft.__version__), tmp_path / PACKAGE)
    (tmp_path / PACKAGE / "conftest.py").write_text(CONFTEST)
    test_file = f"{PACKAGE}/test_adaption_prompt.py"
    outcomes, calls, output = _run_suite(tmp_path, [test_file], plain=False)
    gpt2 = {name: outcome for name, outcome in outcomes.items() if "gpt2" in name}
    llama_mistral = {name: outcome for name, outcome in outcomes.items() if "gpt2" not in name}
    # Each test runs on GPT-2, Llama and Mistral: the same number of each.
    assert gpt2 and len(llama_mistral) == 2 * len(gpt2), output
    for name, outcome in gpt2.items():
        assert "AdaptedAttentionGPT cannot be accelerated" in outcome, (name, outcome)
    assert calls["unfused"] == 0 and calls["fused"] > 0, (calls, output)
    failed = [name for name, outcome in llama_mistral.items() if outcome not in ("passed", "skipped")]
    passed = sum(outcome == "passed" for outcome in llama_mistral.values())
    print(f"peft {peft.__version__}: {len(outcomes)} tests; Llama/Mistral {passed} passed accelerated, "
          f"{len(failed)} failed, {len(llama_mistral) - passed - len(failed)} skipped; GPT-2 {len(gpt2)} refused; "
          f"PEFT's unfused forward called {calls['unfused']} times, the fused one {calls['fused']}")
    assert passed >= len(llama_mistral) // 2, output
    if failed:
        plain, _, output = _run_suite(tmp_path, [f"{test_file}::TestAdaptionPrompt::{n}" for n in failed],
                                      plain=True)
        for name in failed:
            assert plain[name] == outcomes[name], (name, "fails accelerated but not (or otherwise) with PEFT alone",
                                                   outcomes[name], plain[name], output)
