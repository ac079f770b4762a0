"""fastadapter: fused kernels for LLaMA-Adapter's zero-init attention, and the model, training loop,
integrations and benchmarks built on them."""
from ._inputs import AttentionInputs
from .attention import zero_init_attention
from .module import ZeroInitAttention
from .reference import zero_init_attention_reference

__version__ = "0.1.0"

__all__ = ["zero_init_attention", "zero_init_attention_reference", "ZeroInitAttention", "AttentionInputs",
           "__version__"]
