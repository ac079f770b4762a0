"""Stage 4, ``trainer``: fastadapter's trainer on LLaMA-7B with random bf16 weights and packed Alpaca rows:
tokens/s, MFU (the one FLOP model, :mod:`fastadapter.training.flops`), peak memory, and the paper's run
projected from them."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from .common import (ALPACA, PAPER_EPOCHS, PAPER_HOURS, PAPER_ROWS, Deadline, Settings, alpaca_examples,
                     device_peaks, log, percent)


def _random_model(config, dtype: torch.dtype, device: str):
    """A LLaMA of ``config`` with random weights in ``dtype``, built on the meta device and filled in place on
    ``device`` (no fp32 copy of 7B parameters)."""
    from fastadapter.model.llama import LlamaModel
    with torch.device("meta"):
        model = LlamaModel(config).to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # RMSNorm weights
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 1.0 if "tok_embeddings" in name else 0.02, generator=generator)
    return model


def stage_trainer(cfg: Settings, deadline: Deadline, out: dict) -> None:
    from fastadapter.adapters.adapter import AdapterConfig, add_adapter
    from fastadapter.model.config import LlamaConfig
    from fastadapter.training.flops import NAMED_CONFIGS, epoch_flops
    from fastadapter.training.trainer import Trainer, TrainConfig, epoch_rows

    if cfg.smoke:
        config, name = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=172,
                                   max_seq_len=512), "tiny (dim 64, 2 layers)"
        max_seq_len, batch_tokens, adapter_layers, steps, dtype = 48, 256, 2, 2, "fp32"
    else:
        config, name = NAMED_CONFIGS["llama-7b"], "llama-7b (random bf16 weights)"
        max_seq_len, batch_tokens, adapter_layers, steps, dtype = 512, 8192, 30, 8, "bf16"
    examples = alpaca_examples(max_seq_len)
    lengths = [len(e) for e in examples]
    out.update(model=name, adapter_layers=adapter_layers, prompt_len=10, batch_tokens=batch_tokens, dtype=dtype,
               data=f"{ALPACA}: {len(examples)} rows, mean {statistics.mean(lengths):.1f} tokens (LLaMA tokenizer, "
                    f"truncated to {max_seq_len})")
    log(f"  trainer: building {name}")
    model = _random_model(config, torch.bfloat16 if dtype == "bf16" else torch.float32, cfg.device)
    add_adapter(model, AdapterConfig(prompt_len=10, layers=adapter_layers))
    with torch.no_grad():  # non-zero gates: the prompt takes part as after some training
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("gate"):
                parameter.fill_(0.1)
    cuda = torch.device(cfg.device).type == "cuda"
    with tempfile.TemporaryDirectory() as run_folder:
        train_config = TrainConfig(out=run_folder, batch_tokens=batch_tokens, max_steps=1000, dtype=dtype,
                                   eval_every=0, save_every=0, progress=False)
        rows = epoch_rows(examples, batch_tokens, train_config.seed, 0)  # the rows the trainer's epoch 0 takes
        try:
            times, tokens, flops = _timed_steps(Trainer(model, examples, [], train_config), rows, examples, config,
                                                adapter_layers, steps, deadline, cuda)
            out["activation_checkpointing"] = False
        except torch.cuda.OutOfMemoryError:  # a GPU with less memory than an H200: recompute activations
            log("  trainer: out of memory; again with activation checkpointing")
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            model.activation_checkpointing = True
            times, tokens, flops = _timed_steps(Trainer(model, examples, [], train_config), rows, examples, config,
                                                adapter_layers, steps, deadline, cuda)
            out["activation_checkpointing"] = True
        out["steps_timed"] = len(times)
        out["step_s_median"] = statistics.median(times)
        out["tokens_per_s"] = sum(tokens) / sum(times)
        achieved = sum(flops) / sum(times)
        out["achieved_tflops"] = achieved / 1e12
        peak_flops, _ = device_peaks(cfg.device)
        out["mfu"] = None if peak_flops is None else achieved / peak_flops
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    # The paper's run: the data's length distribution scaled to Alpaca 52K, 5 epochs.
    scale = PAPER_ROWS / len(lengths) * PAPER_EPOCHS
    run_tokens = sum(lengths) * scale
    run_flops = epoch_flops(config, lengths, adapter_layers=adapter_layers, prompt_len=10).total * scale
    hours_1 = run_tokens / out["tokens_per_s"] / 3600
    out["paper_run"] = dict(rows=PAPER_ROWS, epochs=PAPER_EPOCHS, tokens=run_tokens, flops=run_flops,
                            hours_1_gpu=hours_1, hours_8_gpus=hours_1 / 8, paper_hours_8_a100=PAPER_HOURS,
                            assumption="8 GPUs: linear data-parallel scaling of the measured single-GPU rate; "
                                       "the paper pads every example to 512 tokens, this run packs them")
    log(f"  trainer: {out['tokens_per_s']:.0f} tokens/s, MFU {percent(out['mfu'])}, projected paper run "
        f"{hours_1:.2f} h on 1 GPU, {hours_1 / 8:.2f} h on 8 (paper: {PAPER_HOURS:g} h on 8 A100)")


def _timed_steps(trainer, rows: list[list[int]], examples, config, adapter_layers: int, steps: int,
                 deadline: Deadline, cuda: bool) -> tuple[list[float], list[int], list[float]]:
    """Seconds, real tokens and FLOPs of up to ``steps`` steps of ``trainer`` after an untimed first one (which
    compiles and autotunes the kernels); stops early, after two timed steps, when the budget runs short."""
    from fastadapter.training.flops import sequence_flops
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens, flops = [], [], []
    step_seconds = None
    for step in range(min(steps + 1, len(rows))):
        if deadline.left() <= 0 or (step_seconds and deadline.left() < 2 * step_seconds and len(times) >= 2):
            break
        started = time.perf_counter()
        loss, real_tokens = trainer.train_step()  # the real trainer's step (its float(loss) synchronises)
        step_seconds = seconds = time.perf_counter() - started
        step_lengths = [len(examples[i]) for i in rows[step]]
        if sum(step_lengths) != real_tokens:
            raise RuntimeError(f"step {step} trained {real_tokens} tokens, its packed row holds "
                               f"{sum(step_lengths)}: the FLOP count would be that of another row")
        log(f"  trainer: step {step}: loss {loss:.3f}, {real_tokens} tokens, {seconds:.2f} s")
        if step == 0:
            continue
        times.append(seconds)
        tokens.append(real_tokens)
        flops.append(sum(sequence_flops(config, n, adapter_layers=adapter_layers, prompt_len=10).total
                         for n in step_lengths))
    if not times:
        raise RuntimeError("no timed step fitted in the budget")
    return times, tokens, flops

