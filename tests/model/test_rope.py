"""``apply_rope`` (one complex product) against ``apply_rope_reference`` (real arithmetic): values and the gradient
of ``x``, fp32 and bf16, odd sizes and head dim 80, strided inputs."""
from __future__ import annotations

import pytest
import torch

from fastadapter.model.rope import apply_rope, apply_rope_reference, rope_angles, rope_inverse_frequencies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 97, 3, 80), (2, 33, 5, 64), (1, 1, 1, 2)], ids=str)
def test_rotation_and_its_gradient_equal_the_reference(shape, dtype):
    batch, seqlen, heads, head_dim = shape
    cos, sin = rope_angles(torch.arange(seqlen)[None].expand(batch, -1), rope_inverse_frequencies(head_dim, 1e4))
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out, expected = apply_rope(x, cos, sin), apply_rope_reference(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0],
                               torch.autograd.grad(expected, x, grad)[0], **tolerance)


def test_a_strided_input_rotates_as_its_contiguous_copy():
    """q as the model makes it: a view of a wider projection (``[B, S, H, D]`` out of ``[B, H, S, D]``)."""
    cos, sin = rope_angles(torch.arange(97)[None], rope_inverse_frequencies(80, 1e4))
    x = torch.randn(1, 3, 97, 80).transpose(1, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(apply_rope(x, cos, sin), apply_rope_reference(x.contiguous(), cos, sin),
                               rtol=1e-6, atol=1e-6)
