"""The thin LLaMA built on ``zero_init_attention``: config, model, adapters, loaders, tokenizers, generation."""
from .adapter import AdapterConfig, adapted_layers, add_adapter, load_adapter, save_adapter
from .adapter_file import AdapterFileError, base_model_fingerprint, read_adapter_file, write_adapter_file
from .adapter_formats import FORMATS as ADAPTER_FORMATS
from .checkpoints import CheckpointError, load_model
from .config import LLAMA_7B, LinearRopeScaling, Llama3RopeScaling, LlamaConfig, YarnRopeScaling
from .generation import generate, sample_next_token
from .kv_cache import KVCache
from .llama import LlamaModel
from .tokenizer import load_tokenizer

__all__ = ["LlamaConfig", "Llama3RopeScaling", "LinearRopeScaling", "YarnRopeScaling", "LLAMA_7B", "LlamaModel",
           "KVCache", "load_model", "CheckpointError",
           "AdapterConfig", "add_adapter", "adapted_layers", "save_adapter", "load_adapter", "ADAPTER_FORMATS",
           "AdapterFileError", "write_adapter_file", "read_adapter_file", "base_model_fingerprint",
           "load_tokenizer", "generate", "sample_next_token"]
