"""Every attention class ``apply_adapter`` accepts, against an independent reference, with padded batches.

The reference is the **unpatched** Hugging Face model (its own attention, eager or sdpa, computes the words, the
padding rows included) plus the adapter math written out here: a forward hook on each adapted layer's ``o_proj``
adds ``γ · softmax(scale · q prefix_kᵀ) prefix_v``, with q recomputed from the layer's input by hand (projection,
the qkv clamp, q norm, RoPE by ``rotate_half``) and the prompt through ``k_proj``/``v_proj`` (clamp, k norm, no RoPE).
Nothing of fastadapter runs in it. Checked: zero gates give the base model's logits; non-zero gates give the
reference's logits (every position), loss and every adapter gradient, on left- and right-padded training batches.

transformers' loss includes the last padding position of a left-padded batch (its logits predict the first real
token), so a padding row computed differently from the unpatched model changes loss and gradients: with
``attn_implementation="eager"`` those rows are the uniform mean of the values (HF's additive mask blocks every key
equally), with sdpa they are 0.
"""
import copy

import pytest
import torch

from fastadapter.integrations.transformers import adapted_layers, apply_adapter

from hf_models import MODELS, build, padded_batch

FAMILIES = tuple(MODELS)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Reference:
    """The unpatched ``model`` plus the adapter math written out (module docstring): prompts ``[P, hidden]`` and
    gates (``[Hq]`` or ``[1]``) are leaf tensors of its own, so their gradients can be compared."""

    def __init__(self, model, prompts: dict, gates: dict, gate_activation: str):
        self.model = model
        self.prompts = {i: p.detach().clone().requires_grad_() for i, p in prompts.items()}
        self.gates = {i: g.detach().clone().requires_grad_() for i, g in gates.items()}
        self.gate_activation = gate_activation
        self.inputs = {}
        for i in self.prompts:
            attn = model.model.layers[i].self_attn
            attn.register_forward_pre_hook(self._keep_inputs(i), with_kwargs=True)
            attn.o_proj.register_forward_pre_hook(self._add_prefix(i, attn))

    def _keep_inputs(self, i):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[i] = (hidden, kwargs["position_embeddings"])
        return hook

    def _add_prefix(self, i, attn):
        def hook(module, args):
            return (args[0] + self.prefix_part(i, attn),)
        return hook

    def prefix_part(self, i, attn):
        hidden, (cos, sin) = self.inputs[i]
        config = attn.config
        batch, seqlen, _ = hidden.shape
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        clip = getattr(config, "clip_qkv", None)

        def clamp(x):
            return x.clamp(-clip, clip) if clip is not None else x

        q = clamp(attn.q_proj(hidden)).view(batch, seqlen, heads, dim)
        prompt = self.prompts[i]
        pk = clamp(attn.k_proj(prompt)).view(-1, kv_heads, dim)
        pv = clamp(attn.v_proj(prompt)).view(-1, kv_heads, dim)
        if hasattr(attn, "q_norm"):
            q, pk = attn.q_norm(q), attn.k_norm(pk)
        if getattr(attn, "use_rope", True):
            q = q * cos[:, :, None] + _rotate_half(q) * sin[:, :, None]
        pk = pk.repeat_interleave(heads // kv_heads, dim=1)
        pv = pv.repeat_interleave(heads // kv_heads, dim=1)
        probs = torch.softmax(torch.einsum("bshd,phd->bhsp", q.double(), pk.double()) * attn.scaling, dim=-1)
        out = torch.einsum("bhsp,phd->bshd", probs, pv.double())
        gate = self.gates[i].double()
        gamma = torch.tanh(gate) if self.gate_activation == "tanh" else gate
        return (gamma.reshape(1, 1, -1, 1) * out).reshape(batch, seqlen, heads * dim).to(hidden.dtype)


def adapted_pair(family: str, attn_implementation: str = None, *, gate_activation: str = "tanh",
                 gate_per_head: bool = True, **overrides):
    """``(ours, reference)``: apply_adapter (top 2 layers, P = 6) with random prompts and non-zero gates, and the
    independent reference with the same values."""
    base = build(family, attn_implementation, **overrides)
    reference_model = copy.deepcopy(base)
    ours = apply_adapter(base, prompt_len=6, layers=2, gate_activation=gate_activation, gate_per_head=gate_per_head)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for attn in adapted_layers(ours).values():
            attn.adapter.gate.copy_(torch.rand(attn.adapter.gate.shape, generator=generator) + 0.3)
    layers = adapted_layers(ours)
    reference = Reference(reference_model, {i: a.adapter.prompt for i, a in layers.items()},
                          {i: a.adapter.gate for i, a in layers.items()}, gate_activation)
    return ours, reference


def check_against_reference(ours, reference, padding: str, *, atol=2e-5):
    tokens, mask, positions, labels = padded_batch(padding)
    ours.train()
    reference.model.train()
    out = ours(tokens, attention_mask=mask, position_ids=positions, labels=labels)
    expected = reference.model(tokens, attention_mask=mask, position_ids=positions, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, atol=atol, rtol=1e-4)  # padding rows included
    torch.testing.assert_close(out.loss, expected.loss, atol=atol, rtol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for i, attn in adapted_layers(ours).items():
        torch.testing.assert_close(attn.adapter.prompt.grad, reference.prompts[i].grad, atol=atol, rtol=1e-4)
        torch.testing.assert_close(attn.adapter.gate.grad, reference.gates[i].grad, atol=atol, rtol=1e-4)
        assert attn.adapter.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_equal_the_base_model(family):
    model = build(family)
    tokens, mask, positions, _ = padded_batch("left")
    expected = model(tokens, attention_mask=mask, position_ids=positions).logits
    plain = model(tokens[:1]).logits
    apply_adapter(model, prompt_len=6, layers=2)
    torch.testing.assert_close(model(tokens, attention_mask=mask, position_ids=positions).logits, expected,
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model(tokens[:1]).logits, plain, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "gemma2")])  # those two: below
def test_nonzero_gates_equal_the_reference_on_a_left_padded_batch(family):
    check_against_reference(*adapted_pair(family), "left")


@pytest.mark.parametrize("family, attn_implementation", [("llama", "eager"), ("llama", "sdpa"), ("gemma2", "eager")])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_loss_and_gradients_equal_the_reference_for_eager_and_sdpa(family, attn_implementation, padding):
    """The issue's case: eager + left padding gave gradients 45% off (padding rows differed). Gemma2 has no sdpa
    in transformers 5.23 (EAGER_ONLY)."""
    check_against_reference(*adapted_pair(family, attn_implementation), padding)


@pytest.mark.parametrize("family, attn_implementation", [("gemma2", "eager"), ("qwen3", "sdpa")])
def test_sliding_window_that_cuts_with_padding_equals_the_reference(family, attn_implementation):
    """Sliding layers with a window shorter than the rows: the masked fallback, padding rows included."""
    overrides = {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention",
                                                             "sliding_attention"]} if family == "qwen3" else {}
    ours, reference = adapted_pair(family, attn_implementation, sliding_window=3, gate_activation="none",
                                   gate_per_head=False, **overrides)
    check_against_reference(ours, reference, "left")


def test_clipping_and_no_rope_layers_change_what_is_computed():
    """The reference would not tell Olmo's clamp or SmolLM3's skipped RoPE apart if they did nothing here."""
    tokens = padded_batch("left")[0][:1]
    for family, overrides in (("olmo", {"clip_qkv": None}), ("smollm3", {"no_rope_layers": [1, 1, 1]})):
        assert not torch.allclose(build(family)(tokens).logits, build(family, **overrides)(tokens).logits,
                                  atol=1e-3)
