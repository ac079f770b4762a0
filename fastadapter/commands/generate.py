"""``fastadapter generate``: continue a prompt with a LLaMA checkpoint, optionally adapted."""
from __future__ import annotations

import os

HELP = "continue a prompt with a LLaMA checkpoint (llama2.c .bin, Meta or Hugging Face folder), optionally adapted"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="llama2.c .bin, Meta folder or Hugging Face folder")
    parser.add_argument("--tokenizer", help="SentencePiece .model or llama2.c tokenizer.bin (default: "
                                            "tokenizer.model in the model's folder)")
    parser.add_argument("--adapter", help="adapter file or PEFT folder (fastadapter, LLaMA-Adapter v1, PEFT, litgpt)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def _default_tokenizer(model_path: str) -> str:
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    for name in ("tokenizer.model", "tokenizer.bin"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise SystemExit(f"fastadapter generate: no --tokenizer given and no tokenizer.model or tokenizer.bin in "
                     f"{folder}")


def run(args) -> int:
    import torch

    from ..model.adapter import load_adapter
    from ..model.checkpoints import load_model
    from ..model.generation import generate
    from ..model.tokenizer import load_tokenizer

    model = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    tokenizer = load_tokenizer(args.tokenizer or _default_tokenizer(args.model))
    prompt = tokenizer.encode(args.prompt, bos=True)
    generator = torch.Generator().manual_seed(args.seed)
    new_tokens = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, eos_id=tokenizer.eos_id, generator=generator)[0]
    # Decode prompt and continuation together (a word may span both), then print what follows the prompt.
    prompt_text = tokenizer.decode(prompt)
    full_text = tokenizer.decode(prompt + new_tokens)
    print(full_text[len(prompt_text):] if full_text.startswith(prompt_text) else tokenizer.decode(new_tokens))
    return 0
