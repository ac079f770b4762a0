"""Tiny Hugging Face folders for the tests: a chat tokenizer (LLaMA's real SentencePiece vocabulary converted to
tokenizer.json, plus ChatML's turn markers) and small random models of every family the loader reads (Mistral,
Qwen2, and Qwen3 / Gemma2 / Gemma3 / Olmo / SmolLM3 with the features that set them apart switched on) saved
beside it, and a tiny CLIP vision tower."""
import json

import torch

#: Qwen2.5's ChatML layout, trimmed of tool calls (a default system prompt when none is given).
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

#: Llama-2 chat's layout ([INST] ... [/INST] answer </s>), with BOS written by the template.
LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def write_chat_tokenizer(shared_data, folder, template=CHATML_TEMPLATE):
    """tokenizer.json + tokenizer_config.json in ``folder``: 32000 LLaMA pieces, ids 32000-32001 ChatML's."""
    from tokenizers import AddedToken

    from fastadapter.tokenizers.tokenizer_convert import sentencepiece_to_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_to_tokenizer(shared_data / "llama_tokenizer.model")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<unk>", "unk_token": "<unk>",
         "chat_template": template}))
    return folder


#: transformers' config and causal-LM classes of the families LLaMA's relatives bring.
FAMILY_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                  "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "olmo": ("OlmoConfig", "OlmoForCausalLM"),
                  "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM")}

#: Settings of a 3-layer model that switch on what sets each family apart: a head width other than hidden / heads
#: (24, not 16), Gemma's softmax scale, final logit soft-capping, sliding layers (the window caps max_seq_len),
#: Gemma3's linear-scaled global RoPE beside a local base, Olmo's clamp, a SmolLM3 layer without RoPE.
FAMILY_FEATURES = {
    "qwen3": dict(head_dim=24),
    "gemma2": dict(head_dim=24, query_pre_attn_scalar=20, attn_logit_softcapping=None, final_logit_softcapping=30.0,
                   sliding_window=64),
    "gemma3_text": dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=64,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "olmo": dict(clip_qkv=0.5),
    "smollm3": dict(no_rope_layers=[1, 0, 1]),
}


def tiny_family_model(family, *, vocab_size=97, seed=0, **overrides):
    """A random 3-layer ``family`` model (one of :data:`FAMILY_CLASSES`; hidden 64, 4 query / 2 kv heads) with
    :data:`FAMILY_FEATURES` on, in eval mode. Every weight is drawn at a scale where it matters (transformers'
    initialisation leaves norms at 1 or 0 and logits near 0, where a misplaced norm or cap would not show)."""
    import transformers
    config_class, model_class = FAMILY_CLASSES[family]
    torch.manual_seed(seed)
    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, **FAMILY_FEATURES[family])
    config = getattr(transformers, config_class)(**{**settings, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # norm weights
                parameter.normal_(0, 0.5)
            elif "embed_tokens" in name:
                parameter.normal_(0, 1)
            else:
                parameter.normal_(0, parameter.shape[1] ** -0.5)
    return model


def save_tiny_model(folder, family="mistral", vocab_size=32064, seed=0):
    """A random ``family`` model saved in ``folder``: 2 layers (hidden 64, 4 query / 2 kv heads) for llama,
    mistral and qwen2, :func:`tiny_family_model` (windows of 128 tokens) for the others."""
    import transformers
    if family in FAMILY_CLASSES:
        window = {"sliding_window": 128} if "sliding_window" in FAMILY_FEATURES[family] else {}
        model = tiny_family_model(family, vocab_size=vocab_size, seed=seed, bos_token_id=1, eos_token_id=32001,
                                  **window)
        model.save_pretrained(folder)
        return model
    names = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "llama": ("LlamaConfig", "LlamaForCausalLM")}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, names[0])(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                             max_position_embeddings=256, bos_token_id=1, eos_token_id=32001)
    model = getattr(transformers, names[1])(config).eval()
    model.save_pretrained(folder)
    return model


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
                  {"role": "assistant", "content": "6, of course."}]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there!"}]},
]


def write_tower(folder, *, seed=0, hidden=36, layers=3):
    """A tiny CLIP vision tower with random weights and its image processor, as save_pretrained writes them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=40, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=16, patch_size=4, projection_dim=8)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
