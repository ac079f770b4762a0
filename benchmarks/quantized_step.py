"""A training step on a bf16, an int8 and an int4 (NF4) frozen base of the same shape, side by side in one run
(CPU by default), and litgpt's published adapter figures for Llama-2-7B on an A100 beside ``fastadapter plan``'s
estimate of the same runs.

Every variant is the same random LLaMA (seeded; fastadapter's model, adapter on the top layers with open gates),
quantized with :func:`fastadapter.model.quantize.quantize_base`, on one packed batch of ``--batch-tokens``
tokens: forward with logits at half the tokens (the loss tokens), backward, AdamW on the adapter. Reported:

* ``tokens_per_s``: median over ``--steps`` timed steps after one warm-up step;
* ``base_mb``: the bytes of the base's projections, measured from the (quantized) tensors;
* ``step_peak_mb``: the peak of what one step allocates on top of the resident model
  (:func:`benchmarks.memory.peak_memory_bytes`), which includes the weights a quantized projection dequantizes
  on the fly; ``resident_plus_peak_mb`` adds the whole model's parameters.

On CPU the quantized projections dequantize in PyTorch code before each matmul (torchao has no fused int4 CPU
kernel with a backward), so they are slower than bf16 here: quantization buys memory, not speed, as litgpt's
NF4 figure shows on GPUs too (1.95x the time).

    python -m benchmarks.quantized_step            # dim 512, 4 layers, 512 tokens
    python -m benchmarks.quantized_step --quick    # a smaller shape, for a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

#: litgpt's resource table (tutorials/resource-tables.md, A100-SXM4-40GB, bf16-true, Alpaca): adapter
#: fine-tuning of Llama-2-7B, peak GPU memory and minutes per 1,000 iterations.
LITGPT_LLAMA2_7B_A100 = {"plain": {"memory_gb": 19.98, "min_per_1k_iterations": 1.50},
                         "nf4": {"memory_gb": 12.68, "min_per_1k_iterations": 2.93}}

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _model(config, scheme, device):
    from fastadapter.adapters.adapter import AdapterConfig, adapted_layers, add_adapter
    from fastadapter.model.llama import LlamaModel
    from fastadapter.model.quantize import quantize_base

    torch.manual_seed(0)
    model = add_adapter(LlamaModel(config).to(torch.bfloat16),
                        AdapterConfig(prompt_len=10, layers=config.n_layers - 1)).to(device)
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.fill_(0.1)
    if scheme != "bf16":
        quantize_base(model, scheme)
    return model


def measure(config, scheme: str, *, batch_tokens: int, steps: int, device: str) -> dict:
    """One variant's row (see the module docstring)."""
    import torch.nn.functional as F

    from benchmarks.memory import peak_memory_bytes
    from fastadapter.model.quantize import base_weight_bytes, tensor_bytes

    model = _model(config, scheme, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (1, batch_tokens), generator=g).to(device)
    lengths = [batch_tokens // 4] * 3 + [batch_tokens - 3 * (batch_tokens // 4)]
    cu_seqlens = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    positions = torch.arange(0, batch_tokens, 2, device=device)
    labels = torch.randint(0, config.vocab_size, (positions.numel(),), generator=g).to(device)

    def step():
        logits = model(tokens, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), logits_positions=positions)[0]
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up: optimizer state, first-call dispatch
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_bytes(step, device)
    resident = sum(tensor_bytes(p) for p in model.parameters())
    return {"base": scheme, "tokens_per_s": batch_tokens / statistics.median(times),
            "base_mb": base_weight_bytes(model) / 2**20, "step_peak_mb": peak / 2**20,
            "resident_plus_peak_mb": (resident + peak) / 2**20}


def litgpt_comparison(batch_tokens: int) -> list[dict]:
    """litgpt's two published Llama-2-7B adapter runs and ``fastadapter plan``'s memory estimate of the same run
    (one A100, top 30 of 32 layers adapted, prompt 10, ``batch_tokens`` tokens a micro-batch) and time per 1,000
    iterations (the FLOP model at 40% MFU, 312 TFLOP/s)."""
    from fastadapter.training.flops import NAMED_CONFIGS, sequence_flops, training_hours
    from fastadapter.training.memory_plan import GIB, estimate_memory

    config = NAMED_CONFIGS["llama2-7b"]
    flops = sequence_flops(config, batch_tokens, adapter_layers=30, prompt_len=10).total * 1000
    minutes = training_hours(flops, gpu="a100", gpus=1, mfu=0.4) * 60
    rows = []
    for name, quantize in (("plain", None), ("nf4", "int4")):
        estimate = estimate_memory(config, batch_tokens=batch_tokens, adapter_layers=30, prompt_len=10,
                                   quantize=quantize)
        rows.append({"run": name, "litgpt_memory_gb": LITGPT_LLAMA2_7B_A100[name]["memory_gb"],
                     "litgpt_min_per_1k": LITGPT_LLAMA2_7B_A100[name]["min_per_1k_iterations"],
                     "plan_memory_gib": estimate.total / GIB, "plan_base_gib": estimate.base / GIB,
                     "plan_min_per_1k_compute": minutes})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="dim 256, 2 layers, 256 tokens, 2 steps")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--litgpt-batch-tokens", type=int, default=512,
                        help="micro-batch tokens assumed for the plan's estimate of litgpt's runs (default 512)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized-step.json"))
    args = parser.parse_args(argv)
    from fastadapter.model.config import LlamaConfig

    if args.quick:
        args.dim, args.layers, args.batch_tokens, args.steps = 256, 2, 256, 2
    config = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=args.dim // 64,
                         vocab_size=4096, hidden_dim=int(args.dim * 8 / 3) // 64 * 64, max_seq_len=2048)
    rows = [measure(config, scheme, batch_tokens=args.batch_tokens, steps=args.steps, device=args.device)
            for scheme in ("bf16", "int8", "int4")]
    print(f"training step, {args.device}: dim {config.dim}, {config.n_layers} layers, hidden {config.hidden_dim}, "
          f"vocab {config.vocab_size}, {args.batch_tokens} packed tokens, torch {torch.__version__}")
    print(f"{'base':<6} {'tokens/s':>10} {'base MB':>9} {'vs bf16':>8} {'step peak MB':>13} {'resident+peak MB':>17}")
    for row in rows:
        print(f"{row['base']:<6} {row['tokens_per_s']:>10.1f} {row['base_mb']:>9.2f} "
              f"{row['base_mb'] / rows[0]['base_mb']:>8.3f} {row['step_peak_mb']:>13.1f} "
              f"{row['resident_plus_peak_mb']:>17.1f}")
    comparison = litgpt_comparison(args.litgpt_batch_tokens)
    print(f"\nLlama-2-7B adapter on one A100: litgpt's published figures beside fastadapter plan's estimate "
          f"({args.litgpt_batch_tokens}-token micro-batches, top 30 layers, prompt 10; time: FLOPs at 40% MFU)")
    print(f"{'run':<6} {'litgpt GB':>10} {'plan GiB':>9} {'plan base GiB':>14} {'litgpt min/1k it':>17} "
          f"{'plan min/1k it':>15}")
    for row in comparison:
        print(f"{row['run']:<6} {row['litgpt_memory_gb']:>10.2f} {row['plan_memory_gib']:>9.2f} "
              f"{row['plan_base_gib']:>14.2f} {row['litgpt_min_per_1k']:>17.2f} {row['plan_min_per_1k_compute']:>15.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": {"dim": config.dim, "layers": config.n_layers, "hidden": config.hidden_dim,
                              "vocab": config.vocab_size, "batch_tokens": args.batch_tokens,
                              "device": args.device, "torch": torch.__version__},
                   "steps": rows, "litgpt_llama2_7b_a100": comparison}, f, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
