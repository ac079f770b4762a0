"""PEFT's own adaption-prompt tests (``tests/test_adaption_prompt.py`` of the pinned peft) with ``accelerate``
applied to every PEFT model they create.

The file is read at test time from a clone of huggingface/peft (``FASTADAPTER_PEFT_REPO``, default the session's
mirror; ``git show <ref>:tests/test_adaption_prompt.py`` with ``<ref>`` the tag of the installed peft, or
``FASTADAPTER_PEFT_REF``) and copied into ``tmp_path`` next to a ``conftest.py`` written here that

* builds the hub models it names locally (nothing is downloaded): ``AutoModelForCausalLM.from_pretrained(id)`` gives
  a tiny random GPT-2, Llama or Mistral (GQA), the same weights for the same id;
* wraps ``peft.get_peft_model`` and ``PeftModel.from_pretrained`` so that every model they return goes through
  :func:`fastadapter.integrations.peft.accelerate` (adapters its tests add later are fused by accelerate itself).

Expected outcome, checked from the run's JUnit report: every GPT-2 test fails with accelerate's refusal of
``AdaptedAttentionGPT`` (PEFT adds GPT-2's prefix after ``c_proj``: see the README); every Llama and Mistral test
passes, or fails exactly as it fails with PEFT's own code (rerun without accelerate). The stored peft mirror has no
v0.21.2 tag (its newest is 0.20.1.dev0, where the file last changed in October 2025); there
``test_sequence_adapter_ops`` and ``test_add_and_set_while_disabled`` expect ``add_adapter`` to activate the new
adapter, which peft 0.21 no longer does ("adding an adapter must not change which adapter is active"), so they
fail with PEFT alone too. Slow: one pytest run of 36 tests in a subprocess, and the rerun of those that failed.
"""
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import peft
import pytest

PEFT_REPO = os.environ.get("FASTADAPTER_PEFT_REPO", "/work/.mirror/huggingface+peft/repo")
PEFT_FILE = "tests/test_adaption_prompt.py"

CONFTEST = '''
import os

import torch
import transformers
import peft
from peft.peft_model import PeftModel

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


def _accelerated(model):
    if PLAIN:
        return model
    accelerate(model)
    assert any(isinstance(m, FusedAdaptedAttention) for m in model.modules()), "accelerate fused nothing"
    return model


PLAIN = os.environ.get("FASTADAPTER_PEFT_SUITE_PLAIN") == "1"  # the baseline run: PEFT's own code


def get_peft_model(*args, **kwargs):
    return _accelerated(_real_get_peft_model(*args, **kwargs))


def _peft_from_pretrained(cls, *args, **kwargs):
    return _accelerated(_real_from_pretrained(cls, *args, **kwargs))


peft.get_peft_model = get_peft_model
PeftModel.from_pretrained = classmethod(_peft_from_pretrained)
'''


def _peft_test_file() -> str:
    ref = os.environ.get("FASTADAPTER_PEFT_REF")
    candidates = [ref] if ref else [f"v{peft.__version__}", "HEAD"]
    if not os.path.isdir(PEFT_REPO):
        raise FileNotFoundError(f"no clone of huggingface/peft at {PEFT_REPO}: clone it there or set "
                                f"FASTADAPTER_PEFT_REPO (the test reads {PEFT_FILE} from it)")
    # A working clone (a .git inside) or a bare repository such as the mirror.
    where = ["-C", PEFT_REPO] if os.path.exists(os.path.join(PEFT_REPO, ".git")) else [f"--git-dir={PEFT_REPO}"]
    errors = []
    for candidate in candidates:
        shown = subprocess.run(["git", *where, "show", f"{candidate}:{PEFT_FILE}"], capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
        errors.append(f"{candidate}: {shown.stderr.strip()}")
    raise FileNotFoundError(f"cannot read {PEFT_FILE} from {PEFT_REPO}: {'; '.join(errors)}")


def _run_suite(folder: pathlib.Path, selection: list[str], *, plain: bool) -> tuple[dict, str]:
    """``({test name: "passed" | "skipped" | failure message}, output)`` of one pytest run in ``folder``."""
    report = folder / ("plain.xml" if plain else "accelerated.xml")
    env = {**os.environ, "FASTADAPTER_PEFT_SUITE_PLAIN": "1" if plain else "0",
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider",
                          f"--junitxml={report}", "--rootdir", str(folder)],
                         capture_output=True, text=True, cwd=folder, env=env, timeout=900)
    output = run.stdout[-4000:] + run.stderr[-2000:]
    assert report.exists(), output
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped") is not None
        outcomes[case.get("name")] = ("skipped" if skipped else "passed" if failure is None
                                      else failure.get("message", "").splitlines()[0])
    return outcomes, output


@pytest.mark.slow
def test_peft_adaption_prompt_suite_passes_accelerated(tmp_path):
    (tmp_path / "test_adaption_prompt.py").write_text(_peft_test_file())
    (tmp_path / "conftest.py").write_text(CONFTEST)
    outcomes, output = _run_suite(tmp_path, ["test_adaption_prompt.py"], plain=False)
    assert len(outcomes) >= 30, output
    failed = []
    for name, outcome in outcomes.items():
        if "gpt2" in name:
            assert "AdaptedAttentionGPT cannot be accelerated" in outcome, (name, outcome)
        elif outcome not in ("passed", "skipped"):
            failed.append(name)
    assert sum(outcome == "passed" for outcome in outcomes.values()) >= 15, output
    if failed:
        plain, output = _run_suite(tmp_path, [f"test_adaption_prompt.py::TestAdaptionPrompt::{n}" for n in failed],
                                   plain=True)
        for name in failed:
            assert plain[name] == outcomes[name], (name, "fails accelerated but not (or otherwise) with PEFT alone",
                                                   outcomes[name], plain[name], output)
