"""LLaMA-Adapter fine-tuning: the Alpaca prompt, data loading, sequence packing, the LR schedule, checkpoints,
distributed data parallelism, the training loop, and the FLOP model behind ``fastadapter plan``."""
from .data import DataError, DataReport, Example, load_examples, load_rows, split_examples, tokenize_rows  # noqa
from .distributed import DistributedContext, init_from_environment  # noqa: F401
from .packing import PackedBatch, PaddedBatch, collate_packed, pack_examples, pad_examples, padding_report  # noqa
from .prompt import format_prompt  # noqa: F401
from .schedule import warmup_cosine  # noqa: F401
from .loss import token_loss_sum  # noqa: F401
from .trainer import TrainConfig, TrainResult, Trainer, train  # noqa: F401
