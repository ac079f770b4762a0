"""Tiny random Hugging Face models for the integration tests (built in memory, seeded, fp32, eval mode): the
Llama, Mistral and Qwen2 models of :func:`tiny_model` (hidden 64) and PEFT's adaption prompt on them, every
family ``apply_adapter`` accepts in :func:`build` (hidden 80, random biases and norm weights), and token batches
for them."""
import torch
import transformers
from peft import AdaptionPromptConfig, get_peft_model
from peft.tuners.adaption_prompt import config as peft_adaption_config

VOCAB = 97
_CONFIGS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
_COMMON = dict(vocab_size=VOCAB, hidden_size=80, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=20, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
#: family -> (config class, model class, settings that exercise what the class does to attention)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),  # q/k norms
    # scaling from query_pre_attn_scalar (1/sqrt(256), not 1/sqrt(20)); soft-capping is refused (see
    # test_integrations_transformers.py), so these models are built without it
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"attn_logit_softcapping": None}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {}),  # q/k norms, local RoPE
    "olmo": (transformers.OlmoConfig, transformers.OlmoForCausalLM, {"clip_qkv": 0.08}),  # the clamp bites
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, {"no_rope_layers": [1, 0, 1]}),
}
#: transformers 5.23 builds Gemma2 with eager attention only (Gemma2ForCausalLM._supports_sdpa is False).
EAGER_ONLY = ("gemma2",)


def tiny_model(family: str = "llama", *, seed: int = 0, **overrides):
    """A random 3-layer model of ``family``: hidden 64, 4 query heads over 2 kv heads (GQA), head_dim 16, fp32,
    eval mode. Qwen2 brings q/k/v biases; biases are random (transformers initialises them to zero, which would
    hide how they are applied)."""
    config_class, model_class = _CONFIGS[family]
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                    eos_token_id=VOCAB - 1, bos_token_id=1, attn_implementation="sdpa")
    if family == "mistral":
        settings["sliding_window"] = None
    settings.update(overrides)
    attn_implementation = settings.pop("attn_implementation")
    torch.manual_seed(seed)
    config = config_class(**settings)
    config._attn_implementation = attn_implementation
    model = model_class(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return model


def peft_reference(model, *, prompt_len: int = 5, layers: int = 2, gate: float = 0.7, monkeypatch=None):
    """PEFT's adaption_prompt model on ``model`` with gates set to ``gate`` (so the prefix counts). Qwen2, which
    PEFT does not list, goes through PEFT's Llama code (same structure) when ``monkeypatch`` is given."""
    if model.config.model_type not in peft_adaption_config.TRANSFORMERS_MODEL_CONFIG:
        monkeypatch.setitem(peft_adaption_config.TRANSFORMERS_MODEL_CONFIG, model.config.model_type,
                            peft_adaption_config.TRANSFORMERS_MODEL_CONFIG["llama"])
    peft_model = get_peft_model(model, AdaptionPromptConfig(adapter_len=prompt_len, adapter_layers=layers,
                                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(gate)
    return peft_model


def random_tokens(batch=2, seqlen=13, seed=1):
    """``[batch, seqlen]`` seeded token ids of :func:`tiny_model`'s vocabulary, without its pad and EOS ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB - 1, (batch, seqlen), generator=generator)


def build(family: str, attn_implementation: str = None, seed: int = 0, **overrides):
    """A random 3-layer model of ``family`` (hidden 80, 4 query heads over 2 kv heads, head_dim 20), fp32, eval;
    biases, when the class has them, random. ``attn_implementation`` defaults to sdpa (eager for Gemma2)."""
    config_class, model_class, settings = MODELS[family]
    attn_implementation = attn_implementation or ("eager" if family in EAGER_ONLY else "sdpa")
    torch.manual_seed(seed)
    config = config_class(**{**_COMMON, **settings, **overrides})
    config._attn_implementation = attn_implementation
    model = model_class(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
            if "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.normal_(mean=0.3 if "Gemma" in type(module).__name__ else 1.0, std=0.2)
    return model


def padded_batch(padding: str, lengths=(11, 7, 4), seed: int = 5):
    """``(tokens, attention_mask, position_ids, labels)`` of rows of ``lengths`` padded on the ``padding`` side;
    labels are the tokens with -100 at padding (as a data collator makes them)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for b, n in enumerate(lengths):
        span = slice(width - n, width) if padding == "left" else slice(0, n)
        tokens[b, span] = torch.randint(3, VOCAB, (n,), generator=generator)
        mask[b, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return tokens, mask, positions, tokens.masked_fill(mask == 0, -100)
