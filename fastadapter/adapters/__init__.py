"""LLaMA-Adapter on the thin model: the adaption prompts and gates (V1 and V2), and their files in every format
fastadapter reads and writes (its own, the original v1, PEFT, litgpt)."""
from .adapter import AdapterConfig, adapted_layers, add_adapter, load_adapter, save_adapter
from .adapter_file import AdapterFileError, base_model_fingerprint, read_adapter_file, write_adapter_file
from .adapter_formats import FORMATS as ADAPTER_FORMATS

__all__ = ["AdapterConfig", "add_adapter", "adapted_layers", "save_adapter", "load_adapter", "ADAPTER_FORMATS",
           "AdapterFileError", "write_adapter_file", "read_adapter_file", "base_model_fingerprint"]
