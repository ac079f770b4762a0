"""What is particular to the ``triton`` backend: its dispatch answers (CPU tensors only under the interpreter, and
only when asked for by name; the prefix and head-dim limits of one tile) and the autotuner's pruning.

Its correctness against the reference, forward and every gradient, is in test_fused_backends.py, shared with the
``cpu`` backend."""
import pytest
import torch

from fastadapter import zero_init_attention
from fastadapter.backends import get_backend, select_backend
from fastadapter.kernels import configs as kernel_configs

from attention_cases import BF16, Case, backend_inputs


def test_dispatch_answers():
    backend = get_backend("triton")
    assert backend.fused and backend.unavailable_reason() is None
    inp = backend_inputs(Case(seqlen_q=8, seqlen_k=8))
    assert backend.not_supported_reasons(inp) == []
    reasons = backend.automatic_choice_reasons(inp)
    assert any("interpreter only when asked for by name" in r for r in reasons)
    assert select_backend(inp).name != "triton"  # CPU tensors: the automatic choice passes over triton
    assert select_backend(inp, "triton") is backend

    too_long = backend_inputs(Case(seqlen_q=8, seqlen_k=8, prefix_len=65))
    assert any("prefix length 65 > 64" in r for r in backend.not_supported_reasons(too_long))
    with pytest.raises(ValueError, match="prefix length 65"):
        zero_init_attention(**Case(seqlen_q=8, seqlen_k=8, prefix_len=65).make(), backend="triton")
    too_wide = backend_inputs(Case(batch=1, seqlen_q=2, seqlen_k=2, heads_q=1, heads_kv=1, head_dim=264))
    assert any("head_dim 264 > 256" in r for r in backend.not_supported_reasons(too_wide))


def test_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = get_backend("triton").unavailable_reason()
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_pruning_keeps_what_fits():
    candidates = kernel_configs.configs("forward", interpreter=False)
    fits_h100 = kernel_configs.prune("forward", candidates, block_d=128, block_p=16, element_bytes=2,
                                     shared_memory_limit=232448, seqlen_bucket=2048)
    fits_a100 = kernel_configs.prune("forward", candidates, block_d=128, block_p=16, element_bytes=2,
                                     shared_memory_limit=166912, seqlen_bucket=2048)
    assert len(fits_a100) < len(fits_h100) == len(candidates)  # 128×128 tiles need Hopper's shared memory
    tiny = kernel_configs.prune("forward", candidates, block_d=256, block_p=64, element_bytes=4,
                                shared_memory_limit=48 * 1024, seqlen_bucket=16)
    assert len(tiny) == 1  # nothing fits: the smallest footprint is kept rather than nothing
    assert len(kernel_configs.configs("backward_dq", interpreter=True)) == 1
    # The autotuner hook reads the launch's keyword arguments (no BLOCK_P for kernels without the prefix).
    pruner = kernel_configs.autotune_pruner("backward_dkdv")
    kept = pruner(kernel_configs.configs("backward_dkdv", interpreter=False), {},
                  Q=torch.empty(1, dtype=BF16), BLOCK_D=128, seqlen_bucket=64)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(32, 64)]  # 128-key tiles > 64
