"""Sequence packing: rows within capacity, examples isolated from each other, RoPE restarting per example, and
the same loss and gradients packed as padded."""
import pytest
import torch
import torch.nn.functional as F

from fastadapter.adapters import AdapterConfig, add_adapter
from fastadapter.model import LlamaModel
from fastadapter.training.data import IGNORE_INDEX, Example
from fastadapter.training.packing import collate_packed, pack_examples, pad_examples, padding_report


def _examples(lengths, vocab=64, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * min(prompt, n - 1) + torch.randint(1, vocab, (n - min(prompt, n - 1),),
                                                                     generator=g).tolist()
        out.append(Example(tuple(tokens), tuple(labels)))
    return out


@pytest.fixture
def adapted_model(make_config):
    """A random 3-layer LLaMA of width 40 (4 query heads over 2 kv heads, vocabulary 64, FFN 72) with an adapter
    on its top 2 layers, their gates non-zero so that the prefix path contributes to the outputs and gradients."""
    torch.manual_seed(0)
    config = make_config(dim=40, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=72, max_seq_len=128)
    model = add_adapter(LlamaModel(config), AdapterConfig(prompt_len=3, layers=2))
    with torch.no_grad():
        for block in model.layers[1:]:
            block.attention.adapter.gate.normal_()
    return model


def test_pack_respects_capacity_and_order():
    lengths = [5, 7, 3, 9, 1, 10, 2]
    rows = pack_examples(lengths, 10)
    assert rows == [[0], [1, 2], [3, 4], [5], [6]]
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert [i for row in rows for i in row] == list(range(len(lengths)))
    with pytest.raises(ValueError, match="example 1 has 11 tokens, more than batch_tokens=10"):
        pack_examples([3, 11], 10)


def test_collate_builds_varlen_inputs():
    examples = _examples([5, 97, 2])
    batch = collate_packed(examples)
    assert batch.tokens.shape == batch.labels.shape == (1, 104)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 5, 102, 104]
    assert batch.max_seqlen == 97 and batch.loss_tokens == sum(e.loss_tokens for e in examples)
    assert batch.tokens[0, 5:102].tolist() == list(examples[1].tokens)


def test_packed_and_padded_give_the_same_loss_and_gradients(adapted_model):
    examples = _examples([13, 31, 1, 22])
    model = adapted_model
    params = [p for p in model.parameters() if p.requires_grad]

    packed = collate_packed(examples)
    logits = model(packed.tokens, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
    packed_loss = F.cross_entropy(logits[0], packed.labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    packed_grads = torch.autograd.grad(packed_loss, params)

    padded = pad_examples(examples, pad_to=37)
    logits = model(padded.tokens)
    padded_loss = F.cross_entropy(logits.flatten(0, 1), padded.labels.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
    padded_grads = torch.autograd.grad(padded_loss, params)

    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, padded_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in packed_grads)


def test_packed_examples_do_not_see_each_other(adapted_model):
    examples = _examples([11, 17, 6])
    model = adapted_model
    batch = collate_packed(examples)
    with torch.no_grad():
        before = model(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        changed = batch.tokens.clone()
        changed[0, 11:28] = (changed[0, 11:28] + 1) % 64  # rewrite the middle example only
        after = model(changed, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        alone = model(torch.tensor([examples[2].tokens]))
    torch.testing.assert_close(after[0, :11], before[0, :11], rtol=0, atol=0)
    torch.testing.assert_close(after[0, 28:], before[0, 28:], rtol=0, atol=0)
    assert not torch.allclose(after[0, 11:28], before[0, 11:28])
    # The last example, alone from position 0, computes what it computes packed: RoPE restarts per example.
    torch.testing.assert_close(before[0, 28:], alone[0], rtol=1e-5, atol=1e-5)


def test_padding_report():
    lengths = [100, 300, 50, 512]
    report = padding_report(lengths, max_seq_len=512, batch_size=2, batch_tokens=1024)
    assert report["real_tokens"] == 962
    assert report["pad_to_max_len"]["tokens"] == 2048
    assert report["pad_to_longest"]["tokens"] == 2 * 300 + 2 * 512
    assert report["packed"]["padding_fraction"] == 0.0 and report["packed_rows"] == 1
    assert report["packed_fill"] == pytest.approx(962 / 1024)
    assert report["pad_to_max_len"]["padding_fraction"] == pytest.approx(1 - 962 / 2048)


def test_every_batch_says_what_the_model_takes_besides_its_tokens():
    """The trainer and the ScienceQA scorer pass ``batch.extra_inputs()`` to the model, whatever the batch."""
    from fastadapter.training.image_data import ImagePackedBatch
    from fastadapter.training.packing import PaddedBatch

    examples = [Example((1, 2, 3), (2, 3, IGNORE_INDEX)), Example((1, 4), (4, 5))]
    assert collate_packed(examples).extra_inputs() == {}
    assert PaddedBatch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), [3, 2]
                       ).extra_inputs() == {}
    packed = collate_packed(examples)
    pixels, index = torch.zeros(1, 3, 4, 4), torch.tensor([0, -1])
    with_images = ImagePackedBatch(packed.tokens, packed.labels, packed.cu_seqlens, packed.max_seqlen, pixels, index)
    extra = with_images.extra_inputs()
    assert set(extra) == {"pixel_values", "image_index"} and extra["pixel_values"] is pixels
