"""The training step of ``fastadapter train --model HF_FOLDER`` against PEFT's ``adaption_prompt``, on the same
Hugging Face model and the same rows, side by side in one run: real (non-padding) tokens per second and peak
memory.

One random Mistral (no weights downloaded; LLaMA's 32000-token vocabulary) is saved as a Hugging Face folder, and
the first Alpaca rows of ``../shared/data/alpaca_tiny.json`` are tokenised with LLaMA's tokenizer converted to
``tokenizer.json``. Three routes train the top ``L`` layers with a prompt of ``P`` tokens, fp32, AdamW:

* ``fastadapter`` — what the CLI runs: the folder loaded into the thin model (:mod:`fastadapter.loaders.load_hf`),
  the rows **packed** into one row of ``--batch-tokens`` (no padding), logits only at the loss tokens;
* ``hf+fastadapter`` — the transformers integration (``apply_adapter``) on the Hugging Face model, rows padded to
  the longest of the batch;
* ``peft`` — PEFT's ``adaption_prompt`` on the same Hugging Face model, the same padded batch.

Every route sees the same examples in a step; tokens/s counts the real tokens of the step.

    python -m benchmarks.hf_route --quick          # 2 layers of dim 256, 8 rows (about a minute on 2 cores)
    python -m benchmarks.hf_route --out results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from . import shared_data
from .memory import peak_memory_bytes
from .timing import measure



def _examples(tokenizer, rows: int, max_seq_len: int):
    from fastadapter.training.data import load_rows, tokenize_rows
    data = load_rows(shared_data.require("alpaca_tiny.json") / "alpaca_tiny.json")[:rows]
    return tokenize_rows(data, tokenizer, max_seq_len)


def _padded(examples):
    from fastadapter.training.data import IGNORE_INDEX
    longest = max(len(e) for e in examples)
    tokens = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, e in enumerate(examples):
        tokens[row, :len(e)] = torch.tensor(e.tokens)
        labels[row, :len(e)] = torch.tensor(e.labels)
        mask[row, :len(e)] = 1
    return tokens, labels, mask


def _hf_step(model, params, tokens, labels, mask):
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        logits = model(input_ids=tokens, attention_mask=mask).logits
        # The labels are already the next tokens (fastadapter's Example): no shift.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(dim: int, n_layers: int, rows: int, prompt_len: int, repeats: int) -> list[dict]:
    import transformers
    from peft import AdaptionPromptConfig, get_peft_model

    from fastadapter.integrations.transformers import apply_adapter
    from fastadapter.adapters.adapter import AdapterConfig, add_adapter
    from fastadapter.loaders.checkpoints import load_model
    from fastadapter.tokenizers.tokenizer_convert import write_tokenizer_folder
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.packing import collate_packed
    from fastadapter.training.loss import token_loss_sum

    folder = tempfile.mkdtemp(prefix="hf_route_")
    write_tokenizer_folder(shared_data.require("llama_tokenizer.model") / "llama_tokenizer.model", folder)
    torch.manual_seed(0)
    config = transformers.MistralConfig(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 8 * 8,
                                        num_hidden_layers=n_layers, num_attention_heads=dim // 64,
                                        num_key_value_heads=max(1, dim // 256), vocab_size=32000,
                                        max_position_embeddings=1024, sliding_window=None)
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    examples = _examples(load_tokenizer(folder), rows, 512)
    real_tokens = sum(len(e) for e in examples)
    tokens, labels, mask = _padded(examples)
    results = []

    # fastadapter: the CLI's route, packed.
    thin = load_model(folder)
    add_adapter(thin, AdapterConfig(prompt_len=prompt_len, layers=n_layers))
    thin.train()
    batch = collate_packed(examples)
    params = [p for p in thin.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def thin_step():
        loss = token_loss_sum(thin, batch) / batch.loss_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    results.append(("fastadapter (packed, thin model)", thin_step, batch.num_tokens))

    hf = transformers.MistralForCausalLM.from_pretrained(folder).train()
    apply_adapter(hf, prompt_len=prompt_len, layers=n_layers)
    params = [p for p in hf.parameters() if p.requires_grad]
    results.append(("hf+fastadapter (padded)", _hf_step(hf, params, tokens, labels, mask), tokens.numel()))

    base = transformers.MistralForCausalLM.from_pretrained(folder).train()
    peft_model = get_peft_model(base, AdaptionPromptConfig(adapter_len=prompt_len, adapter_layers=n_layers,
                                                           task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    results.append(("peft adaption_prompt (padded)", _hf_step(peft_model, params, tokens, labels, mask),
                    tokens.numel()))

    rows_out = []
    for name, step, computed_tokens in results:
        timing = measure(step, warmup=1, repeats=repeats)
        peak = peak_memory_bytes(step)
        seconds = timing["median_ms"] / 1000
        rows_out.append({"route": name, "real_tokens": real_tokens, "computed_tokens": computed_tokens,
                         "median_ms": timing["median_ms"], "tokens_per_s": real_tokens / seconds,
                         "peak_mib": peak / 2**20})
    return rows_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="dim 256, 2 layers, 8 rows, 3 repeats")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the rows and the settings to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.layers, args.rows, args.repeats = 256, 2, 8, 3
    started = time.time()
    rows = run(args.dim, args.layers, args.rows, args.prompt_len, args.repeats)
    print(f"training step, Mistral dim {args.dim}, {args.layers} layers (all adapted, P={args.prompt_len}), "
          f"{args.rows} Alpaca rows, fp32, {torch.get_num_threads()} threads")
    print(f"{'route':34} {'real tok':>8} {'computed':>8} {'ms/step':>9} {'tok/s':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['route']:34} {r['real_tokens']:8d} {r['computed_tokens']:8d} {r['median_ms']:9.1f} "
              f"{r['tokens_per_s']:9.0f} {r['peak_mib']:9.1f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "rows": rows, "seconds": time.time() - started}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
