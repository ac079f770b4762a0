"""The kernels sit below the package (issue 11, "Also"): ``fastadapter.kernels`` never imports ``fastadapter``'s
other modules (``fastadapter._inputs`` was imported by five of its files: a package cycle). The backend hands the
kernels an :class:`~fastadapter.kernels.problem.AttentionProblem` of their own.

Checked twice: statically (no module of kernels/ names a ``fastadapter`` module outside ``fastadapter.kernels``,
nor climbs out of its package with a relative import), and by running (a child process where every other
``fastadapter`` module is unimportable imports each kernel module and runs the forward and backward kernels)."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastadapter.kernels.problem import AttentionProblem

from attention_cases import Case, backend_inputs

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """``(imported module, relative level)`` of every import statement of ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_no_kernel_module_imports_the_package_above():
    assert {"forward", "backward", "decode", "layout", "aot_compile", "problem"} <= set(MODULES)
    offenders = []
    for path in sorted(KERNELS.glob("*.py")):
        for module, level in _imports(path):
            outside = module == "fastadapter" or (module.startswith("fastadapter.")
                                                  and not module.startswith("fastadapter.kernels"))
            if (level == 0 and outside) or level > 1:
                offenders.append(f"{path.name}: {'.' * level}{module}")
    assert not offenders, f"kernels/ imports the package above it: {offenders}"


_STANDALONE = r"""
import importlib, importlib.abc, os, sys, types

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("fastadapter.") and not name.startswith("fastadapter.kernels"):
            raise ImportError(f"{name} is unimportable in this test")
        return None

sys.meta_path.insert(0, Blocked())
parent = types.ModuleType("fastadapter")  # the package, without its __init__ (which imports the op)
parent.__path__ = [os.path.join(sys.argv[1], "fastadapter")]
sys.modules["fastadapter"] = parent
for name in sys.argv[2:]:
    importlib.import_module("fastadapter.kernels." + name)
import torch
from fastadapter.kernels import attention_backward, attention_forward
from fastadapter.kernels.problem import AttentionProblem
q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
prefix = torch.randn(1, 3, 2, 16)
problem = AttentionProblem(q=q, k=k, v=v, prefix_k=prefix, prefix_v=prefix, gate=torch.full((1, 2), 0.5),
                           causal=True, softmax_scale=0.25, gate_tanh=True,
                           seqused_k=torch.tensor([4], dtype=torch.int32))
out, lse_w, lse_p = attention_forward(problem)
grads = attention_backward(problem, out, lse_w, lse_p, torch.ones_like(out))
assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
assert not [m for m in sys.modules if m.startswith("fastadapter.") and not m.startswith("fastadapter.kernels")]
print("standalone kernels ok")
"""


@pytest.mark.slow  # a child process importing torch and triton, then interpreting two kernels (~10 s)
def test_kernels_import_and_run_with_the_rest_of_the_package_unimportable():
    root = str(KERNELS.parent)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _STANDALONE, root, *MODULES], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "standalone kernels ok" in done.stdout


def test_the_op_hands_every_backend_its_one_validated_problem(monkeypatch):
    """One bundle from the op to the kernels: the backend gets the AttentionProblem the op validated (the caller's
    tensors, not copies), and a fused backend's custom op rebuilds the same facts from its flat arguments."""
    from fastadapter import backends, zero_init_attention_varlen

    seen = []
    sdpa = backends.get_backend("sdpa")

    class _Spy(type(sdpa)):
        def attention(self, inp):
            seen.append(inp)
            return super().attention(inp)

    monkeypatch.setitem(backends.registry._REGISTRY, "sdpa", _Spy())
    kw = Case(seqlens=[3, 5], heads_q=2, heads_kv=1, head_dim=16).make(requires_grad=False)
    zero_init_attention_varlen(kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"], kw["gate"],
                               kw["cu_seqlens_q"], kw["cu_seqlens_q"], 5, 5, backend="sdpa")
    (problem,) = seen
    assert isinstance(problem, AttentionProblem)
    for name in ("q", "k", "v", "prefix_k", "prefix_v", "cu_seqlens_q", "cu_seqlens_k"):
        assert getattr(problem, name) is kw[name], name
    assert (problem.varlen, problem.shares_offsets, problem.batch, problem.seqlen_q, problem.lse_shape()) == (
        True, True, 2, 5, (2, 8))
    rebuilt = AttentionProblem.from_op_arguments(*problem.op_arguments())
    assert rebuilt == problem  # the same tensors and facts, aliasing included
    separate = AttentionProblem.from_varlen(kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"], kw["gate"],
                                            kw["cu_seqlens_q"], kw["cu_seqlens_q"].clone(), 5, 5)
    assert not separate.shares_offsets
    assert AttentionProblem.from_op_arguments(*separate.op_arguments()).shares_offsets is False
    dense = backend_inputs(Case(batch=2, seqlen_q=1, seqlen_k=9, heads_q=2, heads_kv=1))
    assert (dense.varlen, dense.batch, dense.seqlen_q, dense.seqlen_k, dense.seqused_k) == (False, 2, 1, 9, None)
    assert torch.is_tensor(dense.gate) and dense.gate.dtype == torch.float32
