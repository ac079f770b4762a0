"""Tiny Hugging Face folders for the tests: a chat tokenizer (LLaMA's real SentencePiece vocabulary converted to
tokenizer.json, plus ChatML's turn markers) and small random Mistral / Qwen2 models saved beside it."""
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

    from fastadapter.model.tokenizer_convert import sentencepiece_to_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_to_tokenizer(shared_data / "llama_tokenizer.model")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<unk>", "unk_token": "<unk>",
         "chat_template": template}))
    return folder


def save_tiny_model(folder, family="mistral", vocab_size=32064, seed=0):
    """A random 2-layer ``family`` model (hidden 64, 4 query / 2 kv heads) saved in ``folder``."""
    import transformers
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
