"""What every stage of the GPU acceptance run shares: the stages and their budgets, the shapes of a GPU or smoke
run (:class:`Settings`), deadlines, progress lines, the device's peaks and the Alpaca data."""
from __future__ import annotations

import os
import pathlib
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .. import shared_data

#: The op test grid (its triton cases), and the case of it ``--smoke`` runs.
OP_TEST_FILE = "tests/ops/test_fused_backends.py"
SMOKE_TEST_SELECTION = "test_matches_reference and triton and B2-Sq1-Sk1-"


def _repo_root() -> pathlib.Path:
    """The checkout holding the tests: the first folder above this file with :data:`OP_TEST_FILE` (this module
    may live in ``benchmarks/`` or be installed as ``fastadapter.benchmarks``), else the working directory."""
    for folder in pathlib.Path(__file__).resolve().parents:
        if (folder / OP_TEST_FILE).is_file():
            return folder
    return pathlib.Path.cwd()



REPO = _repo_root()
ALPACA = "alpaca_en_demo.json"
TOKENIZER = "llama_tokenizer.model"
JSON_NAME, MARKDOWN_NAME, TEST_LOG_NAME = "gpu-acceptance.json", "gpu-acceptance.md", "op-tests.log"


@dataclass(frozen=True)
class Stage:
    """A stage: its expected and budgeted seconds on one H200, and its budget in ``--smoke`` mode (CPU)."""

    name: str
    expected_s: float
    budget_s: float
    smoke_budget_s: float


#: ``--smoke`` budgets are wide (a 2-core CPU shared with other jobs runs the interpreted kernels several times
#: slower than an idle one): the smoke run checks the code path, not the time; the budgets' handling is tested
#: on its own.
STAGES = (Stage("environment", 3, 20, 60), Stage("op_tests", 80, 120, 150), Stage("op_bench", 100, 120, 120),
          Stage("decode_bench", 15, 30, 60), Stage("trainer", 70, 90, 60))
#: Seconds past its budget after which a stage is interrupted (SIGALRM) rather than asked to stop.
HARD_STOP_GRACE_S = 20
#: The whole run's budget (the 8 minutes less ~1.5 min for the editable install).
TOTAL_BUDGET_S = 390
#: The ``--smoke`` run's budget (the sum of its stages' budgets).
SMOKE_TOTAL_BUDGET_S = 450


#: The paper's run: LLaMA-7B, Alpaca 52K (52,002 rows), 5 epochs, "1 hour on 8 A100" (padded to 512).
PAPER_ROWS, PAPER_EPOCHS, PAPER_GPUS, PAPER_HOURS = 52_002, 5, 8, 1.0


class NotRun(Exception):
    """A benchmark row that is not measured, for a reason (too large for this device)."""


class StageTimeout(Exception):
    """Raised by SIGALRM inside a stage that overran its budget by :data:`HARD_STOP_GRACE_S`."""


class Deadline:
    """The end of a stage's budget; long loops ask :meth:`left` before each measurement."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Settings:
    """Shapes and run lengths of one mode (GPU or smoke)."""

    smoke: bool
    device: str
    dtype: torch.dtype
    heads_q: int
    heads_kv: tuple[int, ...]
    head_dim: int
    prefix_len: int
    seqlens: tuple[int, ...]
    batch_tokens: int
    decode_cache: tuple[int, ...]
    decode_batches: tuple[int, ...]
    ragged_rows: int
    warmup: int
    repeats: int
    max_seconds: float
    test_shards: int


def settings(smoke: bool) -> Settings:
    if smoke:  # CPU; Triton under its interpreter: every shape tiny
        return Settings(True, "cpu", torch.float32, 2, (1,), 32, 10, (16,), 32, (64,), (1,), 2, 0, 1, 1.0, 1)
    # 16 test shards: compiling (autotuned configurations of four kernels per case) is single-threaded per process.
    return Settings(False, "cuda", torch.bfloat16, 32, (32, 8), 128, 10, (512, 2048, 8192), 16384, (2048, 8192),
                    (1, 16), 8, 2, 10, 1.0, min(16, os.cpu_count() or 1))



def device_peaks(device: str) -> tuple[Optional[float], Optional[float]]:
    """``(bf16 FLOP/s, HBM bytes/s)`` of the device (:data:`fastadapter.training.flops.GPU_PEAKS`), None when
    unknown (CPU, other GPUs)."""
    from fastadapter.training.flops import gpu_peak
    if torch.device(device).type != "cuda":
        return None, None
    peak = gpu_peak(torch.cuda.get_device_name(device))
    return (None, None) if peak is None else (peak.bf16_flops, peak.hbm_bytes_per_s)


def alpaca_examples(max_seq_len: int):
    """The Alpaca rows of :data:`ALPACA` tokenised with LLaMA's tokenizer (the shared data folder; a stage that
    needs them and cannot find them fails with a one-line reason and the others run)."""
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.data import load_examples
    folder = shared_data.require(ALPACA, TOKENIZER)
    examples, _ = load_examples(folder / ALPACA, load_tokenizer(folder / TOKENIZER), max_seq_len)
    return examples


def percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
