"""fastadapter: fused kernels for LLaMA-Adapter's zero-init attention, and the model, training loop,
integrations and benchmarks built on them."""
from ._inputs import AttentionInputs
from .attention import zero_init_attention
from .module import ZeroInitAttention
from .reference import zero_init_attention_reference
from .model import (AdapterConfig, LlamaConfig, LlamaModel, add_adapter, generate, load_adapter, load_model,
                    load_tokenizer, save_adapter)

__version__ = "0.1.0"

__all__ = ["zero_init_attention", "zero_init_attention_reference", "ZeroInitAttention", "AttentionInputs",
           "LlamaConfig", "LlamaModel", "load_model", "AdapterConfig", "add_adapter", "save_adapter", "load_adapter",
           "load_tokenizer", "generate",
           "__version__"]
