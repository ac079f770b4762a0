"""The thin LLaMA built on ``zero_init_attention``: its config, the model, its KV cache and generation.

Adapters live in :mod:`fastadapter.adapters`, checkpoint loaders in :mod:`fastadapter.loaders` and tokenizers in
:mod:`fastadapter.tokenizers`.
"""
from .config import LLAMA_7B, LinearRopeScaling, Llama3RopeScaling, LlamaConfig, YarnRopeScaling
from .generation import generate, sample_next_token
from .kv_cache import KVCache
from .llama import LlamaModel

__all__ = ["LlamaConfig", "Llama3RopeScaling", "LinearRopeScaling", "YarnRopeScaling", "LLAMA_7B", "LlamaModel",
           "KVCache", "generate", "sample_next_token"]
