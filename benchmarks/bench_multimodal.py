"""The multimodal LLaMA-Adapter training step, and what per-sample prompts cost in the fused op.

Two comparisons, side by side in one run:

* ``train_step`` — one training step (forward, backward, AdamW on prompts, gates and projection) of a random
  LLaMA with a frozen random CLIP vision tower, over the same examples (lengths drawn like instruction data, half
  of them with an image):

  - ``fastadapter-packed``: :class:`fastadapter.vision.MultimodalLlama` on rows packed to ``batch_tokens``
    (varlen, no padding), one prompt per sequence (``prefix_k/prefix_v [N, P, Hkv, D]``) through the fused op,
    logits at the response tokens only (fastadapter's training loop);
  - ``original-eager-padded``: the original LLaMA-Adapter's approach — micro-batches of ``batch_size`` examples
    padded to the longest, the image prompts broadcast to one prompt per sample, eager attention (prefix and word
    scores in one fp32 matrix, :func:`benchmarks.baselines.eager_v1`), logits at every position.

  ``tokens_per_s`` counts real tokens; ``peak_mem_mb`` is the step's peak allocation; the summed token loss of
  the two is compared first (``loss_rel_err``): they must compute the same thing.

* ``op_fwd_bwd`` — ``zero_init_attention`` forward + backward on packed sequences of the same lengths with one
  prompt per sequence (``per-sample-prompts``) against one shared prompt (``shared-prompt``), same shapes: the
  cost of multimodality in the kernel.

    python -m benchmarks.bench_multimodal --quick
"""
from __future__ import annotations

import argparse
import contextlib
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastadapter.training.data import IGNORE_INDEX, Example
from fastadapter.training.packing import collate_packed, pack_examples, pad_examples

from .baselines import eager_v1
from .memory import peak_memory_bytes
from .timing import measure, summarize

REQUIRES = ("transformers",)
#: The two providers of a step must agree on the summed token loss to this relative tolerance (fp32).
LOSS_RTOL = 1e-4


@dataclass(frozen=True)
class MultimodalConfig:
    """A LLaMA of ``n_layers`` × ``dim`` (all layers adapted, prompt ``prompt_len``), a CLIP tower of
    ``vision_layers`` × ``vision_dim`` on ``image_size`` images, a step over ``examples`` examples of
    ``min_len..max_len`` tokens (``batch_size`` per padded micro-batch, ``batch_tokens`` per packed row)."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    examples: int
    min_len: int
    max_len: int
    batch_size: int
    batch_tokens: int
    prompt_len: int = 10
    vision_dim: int = 64
    vision_layers: int = 4
    image_size: int = 32

    @property
    def label(self) -> str:
        return (f"dim{self.dim}-L{self.n_layers}-H{self.n_heads}-V{self.vocab_size}-P{self.prompt_len}-"
                f"{self.examples}ex-{self.min_len}to{self.max_len}tok-clip{self.vision_dim}x{self.vision_layers}")


def config_for(preset: str) -> MultimodalConfig:
    if preset == "smoke":
        return MultimodalConfig(dim=64, n_layers=2, n_heads=2, vocab_size=256, examples=4, min_len=8, max_len=48,
                                batch_size=2, batch_tokens=96, vision_dim=32, vision_layers=2, image_size=16)
    if preset == "quick":
        return MultimodalConfig(dim=256, n_layers=4, n_heads=4, vocab_size=4096, examples=8, min_len=32,
                                max_len=256, batch_size=4, batch_tokens=512)
    if preset == "full":
        return MultimodalConfig(dim=1024, n_layers=8, n_heads=16, vocab_size=32000, examples=32, min_len=64,
                                max_len=512, batch_size=8, batch_tokens=2048, vision_dim=256, vision_layers=8,
                                image_size=64)
    return MultimodalConfig(dim=512, n_layers=4, n_heads=8, vocab_size=32000, examples=16, min_len=64, max_len=512,
                            batch_size=4, batch_tokens=1024, vision_dim=128, vision_layers=4)


def make_examples(config: MultimodalConfig, seed: int = 0) -> tuple[list[Example], list[int]]:
    """Random examples (a prompt, then a response of half its length or less) and the image of each (-1: none;
    every other example has one)."""
    rng = random.Random(seed)
    examples, images = [], []
    for i in range(config.examples):
        n = rng.randint(config.min_len, config.max_len)
        prompt = rng.randint(n // 2, n - 1)
        tokens = [1] + [rng.randrange(3, config.vocab_size) for _ in range(n - 1)]
        labels = [IGNORE_INDEX] * (prompt - 1) + tokens[prompt:] + [2]
        examples.append(Example(tuple(tokens), tuple(labels)))
        images.append(i // 2 if i % 2 == 0 else -1)
    return examples, images


def build_model(config: MultimodalConfig, device):
    """The MultimodalLlama (random LLaMA, random frozen CLIP tower, gates non-zero) and the images' pixels."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fastadapter.adapters import AdapterConfig, add_adapter
    from fastadapter.model import LlamaConfig, LlamaModel
    from fastadapter.adapters.adapter import adapted_layers
    from fastadapter.vision import VisionTower, add_vision

    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads,
                                   n_kv_heads=config.n_heads, vocab_size=config.vocab_size,
                                   hidden_dim=4 * config.dim, max_seq_len=config.max_len))
    add_adapter(llama, AdapterConfig(prompt_len=config.prompt_len, layers=config.n_layers))
    with torch.no_grad():
        for adapter in adapted_layers(llama).values():
            adapter.gate.uniform_(0.1, 0.5)  # open gates: the prompts take part in the result and the gradient
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=config.vision_dim, intermediate_size=2 * config.vision_dim,
                                            num_hidden_layers=config.vision_layers, num_attention_heads=4,
                                            image_size=config.image_size, patch_size=config.image_size // 8))
    mm = add_vision(llama.to(device), VisionTower(clip, processor=None, source="random CLIP"))
    pixels = torch.randn((config.examples + 1) // 2, 3, config.image_size, config.image_size, device=device)
    return mm.to(device), pixels


@contextlib.contextmanager
def eager_attention():
    """The thin model's attention replaced by the original eager LLaMA-Adapter attention (batched calls)."""
    import fastadapter.model.llama as llama_module

    fused, fused_varlen = llama_module.zero_init_attention, llama_module.zero_init_attention_varlen

    def packed(*args, **kwargs):
        raise ValueError("the eager baseline runs padded batches, not packed rows")

    def eager(q, k, v, prefix_k, prefix_v, gate, *, causal=True, gate_activation="tanh", softmax_scale=None,
              seqused_k=None):
        if seqused_k is not None:
            raise ValueError("the eager baseline runs padded batches without a KV cache")
        if softmax_scale is not None:  # the thin model passes its config's scale: None for LLaMA, 1/sqrt(D)
            raise ValueError("the eager baseline computes LLaMA's softmax scale 1/sqrt(head_dim) only")
        if prefix_k.shape[1] == 0:
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
        # Prompts [1 or B, P, Hkv, D], broadcast to one per sample as the original code's expand.
        return eager_v1(q, k, v, prefix_k, prefix_v, gate, gate_activation == "tanh")

    llama_module.zero_init_attention, llama_module.zero_init_attention_varlen = eager, packed
    try:
        yield
    finally:
        llama_module.zero_init_attention, llama_module.zero_init_attention_varlen = fused, fused_varlen


def step_functions(mm, pixels, examples, images, config: MultimodalConfig) -> dict[str, Callable[[], float]]:
    """``{provider: step}``: each step runs forward + backward over all examples, then an AdamW step; returns
    the summed token loss."""
    params = [p for p in mm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    device = pixels.device
    packed_rows = pack_examples([len(e) for e in examples], config.batch_tokens)
    padded = [list(range(i, min(i + config.batch_size, len(examples))))
              for i in range(0, len(examples), config.batch_size)]

    def packed_step() -> float:
        total = 0.0
        for row in packed_rows:
            batch = collate_packed([examples[i] for i in row]).to(device)
            positions = (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
            index = torch.tensor([images[i] for i in row], device=device)
            logits = mm(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                        logits_positions=positions, pixel_values=pixels, image_index=index)[0]
            loss = F.cross_entropy(logits.float(), batch.labels[0, positions], reduction="sum")
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def padded_step() -> float:
        total = 0.0
        with eager_attention():
            for rows in padded:
                batch = pad_examples([examples[i] for i in rows])
                index = torch.tensor([images[i] for i in rows], device=device)
                # Every sample gets its own prompt (the image's, or the plain one broadcast).
                offsets = mm.prompt_offsets(pixels, index)
                logits = mm.llama(batch.tokens.to(device), prompt_offsets=offsets)
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.to(device).flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
                loss.backward()
                total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return {"fastadapter-packed": packed_step, "original-eager-padded": padded_step}


def op_functions(examples, config: MultimodalConfig, device) -> dict[str, Callable[[], None]]:
    """Forward + backward of the fused op on the packed lengths: one prompt per sequence vs one shared."""
    from fastadapter import zero_init_attention_varlen

    lengths = [len(e) for e in examples]
    total, heads, head_dim = sum(lengths), config.n_heads, config.dim // config.n_heads
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.to(device)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(device).requires_grad_() for _ in range(3))
    gate = torch.full((heads,), 0.3, device=device, requires_grad=True)
    per_sample = [torch.randn(len(lengths), config.prompt_len, heads, head_dim, generator=g).to(device)
                  .requires_grad_() for _ in range(2)]
    shared = [t[:1].detach().clone().requires_grad_() for t in per_sample]

    def run(prefix):
        def call():
            out = zero_init_attention_varlen(q, k, v, prefix[0], prefix[1], gate, cu, cu, max(lengths),
                                             max(lengths), causal=True)
            out.sum().backward()
        return call

    return {"per-sample-prompts": run(per_sample), "shared-prompt": run(shared)}


def interleaved(steps: dict[str, Callable], warmup: int, repeats: int, device) -> dict[str, list[float]]:
    for step in steps.values():
        measure(step, warmup=warmup, repeats=1, device=device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(measure(step, warmup=0, repeats=1, device=device)["median_ms"])
    return times


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="multimodal"``: mode ``train_step`` (``tokens_per_s``, ``peak_mem_mb``, ``padding_fraction``,
    ``loss_rel_err``) and mode ``op_fwd_bwd`` (per-sample against shared prompts)."""
    preset = preset or ("quick" if quick else "full" if full else "default")
    warmup, repeats = {"smoke": (0, 1), "quick": (1, 3)}.get(preset, (1, 5))
    config = config_for(preset)
    examples, images = make_examples(config)
    real = sum(len(e) for e in examples)
    mm, pixels = build_model(config, device)
    steps = step_functions(mm, pixels, examples, images, config)
    # Same loss first (AdamW at lr 1e-6 moves nothing measurable between the two calls).
    losses = {name: step() for name, step in steps.items()}
    reference = losses["fastadapter-packed"]
    errors = {name: abs(loss - reference) / abs(reference) for name, loss in losses.items()}
    log(f"  multimodal: {config.label}: {real} real tokens; summed token loss "
        + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()))
    padded_tokens = sum(max(len(examples[j]) for j in range(i, min(i + config.batch_size, len(examples))))
                        * len(range(i, min(i + config.batch_size, len(examples))))
                        for i in range(0, len(examples), config.batch_size))
    computed = {"fastadapter-packed": real, "original-eager-padded": padded_tokens}
    rows = []
    timed = {name: step for name, step in steps.items() if errors[name] <= LOSS_RTOL}
    times = interleaved(timed, warmup, repeats, device)
    for name in steps:
        row = {"suite": "multimodal", "provider": name, "mode": "train_step", "config": config.label}
        if name not in timed:
            reason = f"wrong result, not timed: loss relative error {errors[name]:.1e} > {LOSS_RTOL:.0e}"
            rows.append({**row, "median_ms": None, "skipped": reason, "loss_rel_err": errors[name]})
            continue
        timing = summarize(times[name])
        rows.append({**row, **timing, "tokens_per_s": real / (timing["median_ms"] / 1e3),
                     "peak_mem_mb": peak_memory_bytes(steps[name], device) / 2**20,
                     "padding_fraction": 1 - real / computed[name], "loss_rel_err": errors[name]})
    ops = op_functions(examples, config, device)
    op_times = interleaved(ops, warmup, repeats, device)
    for name, call in ops.items():
        timing = summarize(op_times[name])
        rows.append({"suite": "multimodal", "provider": name, "mode": "op_fwd_bwd", "config": config.label,
                     **timing, "tokens_per_s": real / (timing["median_ms"] / 1e3),
                     "peak_mem_mb": peak_memory_bytes(call, device) / 2**20})
    return rows


def summary(rows: list[dict]) -> str:
    """The ratios the suite is about, one line each."""
    by = {(r["mode"], r["provider"]): r for r in rows if not r.get("skipped")}
    lines = []
    fast, slow = by.get(("train_step", "fastadapter-packed")), by.get(("train_step", "original-eager-padded"))
    if fast and slow:
        lines.append(f"train step: fastadapter-packed {fast['tokens_per_s']:.0f} real tokens/s, "
                     f"{fast['peak_mem_mb']:.0f} MiB; original-eager-padded {slow['tokens_per_s']:.0f} tokens/s, "
                     f"{slow['peak_mem_mb']:.0f} MiB ({slow['padding_fraction']:.0%} padding): "
                     f"x{fast['tokens_per_s'] / slow['tokens_per_s']:.2f} tokens/s, "
                     f"x{fast['peak_mem_mb'] / slow['peak_mem_mb']:.2f} peak memory")
    per, shared = by.get(("op_fwd_bwd", "per-sample-prompts")), by.get(("op_fwd_bwd", "shared-prompt"))
    if per and shared:
        lines.append(f"fused op fwd+bwd: per-sample prompts {per['median_ms']:.2f} ms, shared prompt "
                     f"{shared['median_ms']:.2f} ms (x{per['median_ms'] / shared['median_ms']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    for name in ("smoke", "quick", "full"):
        group.add_argument(f"--{name}", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full" if args.full else "default"
    rows = run(preset == "quick", args.device, full=preset == "full", preset=preset)
    for row in rows:
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(shown)
    print(summary(rows))
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"preset": preset, "device": args.device, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
