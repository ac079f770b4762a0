"""The chunked head + cross-entropy (fastadapter.training.linear_cross_entropy) against the plain reference, and
the trainer's loss on a thin model with and without it."""
import pytest
import torch

from fastadapter.training.data import IGNORE_INDEX
from fastadapter.training.linear_cross_entropy import (chunk_tokens_for, linear_cross_entropy,
                                                       linear_cross_entropy_reference)


def _case(tokens=97, dim=80, vocab=1025, dtype=torch.float32, ignored=(3, 50)):
    hidden = torch.randn(tokens, dim, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, dtype=torch.float64) / dim ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    labels[list(ignored)] = IGNORE_INDEX
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, **kwargs):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels, **kwargs)
    (loss * 0.37).backward()  # an upstream gradient other than one
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk_tokens", [1, 16, 97, 500])
def test_equals_reference_loss_and_gradients(softcap, chunk_tokens):
    hidden, weight, labels = _case()
    if softcap is not None:
        hidden.data *= 8  # logits beyond the cap, where tanh bends
    want = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, softcap=softcap)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, softcap=softcap, chunk_tokens=chunk_tokens)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert bool(hidden.grad[3].eq(0).all()) and bool(hidden.grad[50].eq(0).all())  # ignored rows


def test_float64_gradcheck():
    hidden, weight, labels = _case(tokens=9, dim=5, vocab=13, dtype=torch.float64, ignored=(2,))
    torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, labels, softcap=2.0, chunk_tokens=4),
                             (hidden, weight))


def test_frozen_head_gets_no_gradient_and_no_grad_mode_records_nothing():
    hidden, weight, labels = _case()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=10)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, labels, chunk_tokens=10)
    assert not value.requires_grad
    torch.testing.assert_close(value, linear_cross_entropy_reference(hidden, weight, labels).detach())


def test_bf16_inputs_match_the_reference_in_bf16():
    hidden, weight, labels = _case(dtype=torch.bfloat16)
    want = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=16)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-3)


def test_chunk_size_follows_the_vocabulary():
    assert chunk_tokens_for(49152) == 170  # SmolLM2: 170 tokens' fp32 logits are 32 MiB
    assert chunk_tokens_for(262144) == 128  # Gemma-3: 32 MiB holds 32 tokens, fewer than the floor of 128
    assert chunk_tokens_for(10**12) == 128


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must be int64"),
    (dict(weight=torch.zeros(7, 3)), "same dim"),
    (dict(softcap=0.0), "softcap"),
    (dict(chunk_tokens=0), "chunk_tokens"),
])
def test_bad_input_is_refused(bad, match):
    hidden, weight, labels = _case(tokens=4, dim=6, vocab=7, ignored=(1,))
    args = dict(hidden=hidden, weight=weight, labels=labels) | bad
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**args)


@pytest.mark.parametrize("softcap", [None, 7.0])
def test_trainer_loss_fused_equals_full_logits(softcap, make_config):
    """The trainer's token loss on an adapted thin model (Gemma-style soft-capping too): the fused path and the
    full-logits reference give the same loss and adapter gradients."""
    from fastadapter import AdapterConfig, add_adapter
    from fastadapter import LlamaModel
    from fastadapter.training.data import Example
    from fastadapter.training.packing import collate_packed
    from fastadapter.training import trainer
    from fastadapter.training.loss import fuses_head_and_loss, token_loss_sum

    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1025, max_seq_len=128,
                         final_logit_softcap=softcap)
    model = LlamaModel(config)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)  # non-zero gates, so the prompts get a gradient
    assert fuses_head_and_loss(model)
    # The names callers imported from the trainer before the loss had its own module.
    assert trainer.token_loss_sum is token_loss_sum and trainer.fuses_head_and_loss is fuses_head_and_loss
    examples = []
    for length, prompt in ((40, 11), (57, 20)):
        tokens = torch.randint(0, 1025, (length,)).tolist()
        labels = [IGNORE_INDEX] * prompt + tokens[prompt:]
        examples.append(Example(tokens=tuple(tokens), labels=tuple(labels)))
    batch = collate_packed(examples)
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, batch, fused=fused)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (want_loss, want), (got_loss, got) = grads
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
