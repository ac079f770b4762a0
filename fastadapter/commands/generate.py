"""``fastadapter generate``: continue a prompt with a LLaMA checkpoint, optionally adapted.

``--template alpaca`` wraps the prompt (and ``--input``) in the Alpaca template that ``fastadapter train``
trains on (:mod:`fastadapter.training.prompt`), so the model continues with the response; ``--template none``
(the default) feeds the text as it is, for base models and plain continuation.
"""
from __future__ import annotations

import math
import os
import sys

from ._paths import default_tokenizer

HELP = ("continue a prompt with a LLaMA checkpoint (llama2.c .bin, Meta or Hugging Face folder, GGUF file), "
        "optionally adapted")

TEMPLATES = ("alpaca", "chat", "none")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="llama2.c .bin, Meta folder, Hugging Face folder or GGUF file")
    parser.add_argument("--tokenizer", help="tokenizer.json (Hugging Face), SentencePiece .model or llama2.c "
                         "tokenizer.bin (default: a GGUF model's own, else the first of these in the model's folder)")
    parser.add_argument("--adapter", help="adapter file or PEFT folder (fastadapter, LLaMA-Adapter v1, PEFT, litgpt)")
    parser.add_argument("--gate-activation", choices=("tanh", "none"), default=None,
                        help="how the gates of an adapter of another project are applied (default: its format's: "
                             "tanh(gate) for LLaMA-Adapter v1, as its training code; 'none', the raw gate, "
                             "reproduces the v1 inference code; PEFT and litgpt use the raw gate); a fastadapter "
                             "file keeps the activation it was trained with")
    parser.add_argument("--prompt", required=True,
                        help="the text to continue (\"\": sample from BOS alone, unconditionally); with --template "
                             "alpaca, the instruction")
    parser.add_argument("--template", choices=TEMPLATES, default=None,
                        help="alpaca: wrap --prompt (and --input) in the Alpaca template that `fastadapter train` "
                             "trains on and print the response — use it with adapters made by `fastadapter train`; "
                             "chat: --prompt as a user turn in the tokenizer's chat template (train --template chat); "
                             "none (default): the prompt as it is, as a base model continues text (a note on "
                             "stderr recalls this option when --adapter is given without --template)")
    parser.add_argument("--input", default="",
                        help="the Alpaca input field (context for the instruction); needs --template alpaca")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    from ._device import add_device_arguments
    add_device_arguments(parser)
    parser.add_argument("--image", help="an image file to condition on (needs a multimodal --adapter, trained with "
                                        "`fastadapter train --vision-model`, and --vision-model)")
    parser.add_argument("--vision-model", metavar="DIR", help="the vision tower the --adapter was trained with")



def prompt_text(prompt: str, template: str | None, input: str = "") -> str:
    """The text the model is given: ``prompt`` as it is (template ``none`` or None), or the Alpaca prompt of
    instruction ``prompt`` and ``input`` (template ``alpaca``)."""
    if template not in (None, *TEMPLATES):
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "alpaca":
        from ..training.prompt import format_prompt
        return format_prompt(prompt, input)
    if input:
        raise ValueError("--input is the Alpaca input field: it needs --template alpaca")
    return prompt


#: The largest --seed: torch's generators take 64-bit seeds.
MAX_SEED = 2**63 - 1


def check_settings(args) -> None:
    """Raise ``ValueError`` naming the first flag whose value is out of range (before anything loads)."""
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must lie in [0, 2**63 - 1], got {args.seed}")
    for flag, value in (("--prompt", args.prompt), ("--input", args.input)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes the terminal's encoding could not decode (surrogateescape)
            raise ValueError(f"{flag} is not valid text in this terminal's encoding (byte "
                             f"{value[exc.start:exc.end].encode('utf-8', 'surrogateescape')!r} at {exc.start}); "
                             f"pass UTF-8 text") from None
    if getattr(args, "gate_activation", None) and not args.adapter:
        raise ValueError("--gate-activation says how an --adapter's gates are applied; no --adapter was given")
    if not args.prompt.strip() and args.template not in (None, "none"):
        raise ValueError(f"--prompt is empty; with --template {args.template} it is the instruction (an empty prompt "
                         f"without a template samples from BOS alone)")
    image, vision_model = getattr(args, "image", None), getattr(args, "vision_model", None)
    if image is not None:
        if not os.path.isfile(image):
            raise FileNotFoundError(f"--image file not found: {image}")
        if not args.adapter or vision_model is None:
            raise ValueError("--image needs a multimodal --adapter (trained with --vision-model) and the "
                             "--vision-model it was trained with")
    if vision_model is not None and not os.path.isdir(vision_model):
        raise FileNotFoundError(f"--vision-model folder not found: {vision_model}")


def run(args) -> int:
    check_settings(args)

    import torch

    from ..adapters.adapter import load_adapter
    from ..loaders.checkpoints import load_model
    from ..model.generation import generate
    from ..tokenizers.tokenizer import check_vocabulary, load_tokenizer

    from ._device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.template == "chat":
        text = None
        if args.input:
            raise ValueError("--input is the Alpaca input field: it needs --template alpaca")
    else:
        text = prompt_text(args.prompt, args.template, args.input)
    if args.adapter and args.template is None:
        print("note: the prompt is fed as it is; an adapter trained by `fastadapter train` expects "
              "--template alpaca (or chat)", file=sys.stderr)
    model = load_model(args.model, dtype=dtype)
    mm = None
    if getattr(args, "image", None) is not None:
        from ..training.image_data import open_image
        from ..vision import load_multimodal_adapter
        image = open_image(args.image)
        mm = load_multimodal_adapter(model, args.adapter, args.vision_model)
    elif args.adapter:
        if getattr(args, "vision_model", None) is not None:
            raise ValueError("--vision-model is given without --image: pass the image to condition on")
        from ..adapters.adapter_file import adapter_file_kind
        from ..adapters.adapter_v2 import load_adapter_v2
        if adapter_file_kind(args.adapter) == "v2":
            if args.gate_activation is not None:
                raise ValueError("--gate-activation applies to adapters of other projects; a LLaMA-Adapter V2 file "
                                 "of fastadapter keeps the activation it was trained with")
            load_adapter_v2(model, args.adapter)
        else:
            load_adapter(model, args.adapter, gate_activation=args.gate_activation)
            source = model.adapter_source
            if source["format"] != "fastadapter":
                print(f"note: {source['format']} adapter {source['path']}: gates applied as "
                      f"{source['gate_activation_reason']}", file=sys.stderr)
    (mm or model).to(device)
    tokenizer_path = args.tokenizer or default_tokenizer(args.model)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocabulary(tokenizer, model.config.vocab_size, tokenizer_path, args.model)
    if text is None:
        from ..training.chat import chat_template_of
        text = chat_template_of(tokenizer).render([{"role": "user", "content": args.prompt}],
                                                  add_generation_prompt=True)
        prompt = tokenizer.encode(text, bos=False)  # the template writes BOS when the model wants one
    else:
        prompt = tokenizer.encode(text, bos=True)  # an empty prompt: [BOS], unconditional sampling (llama2.c's run)
        if not prompt:
            raise ValueError(f"--prompt is empty and the tokenizer {tokenizer_path} has no BOS token to start from; "
                             f"give a prompt")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stops = getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    eos_id=stops[0], generator=generator)
    if mm is not None:
        from ..vision import generate_with_images
        new_tokens = generate_with_images(mm, [prompt], [image], **sampling)[0]
    else:
        new_tokens = generate(model, [prompt], **sampling)[0]
    for position, token in enumerate(new_tokens):  # every stop id ends the answer (Qwen: <|im_end|>, <|endoftext|>)
        if token in stops:
            new_tokens = new_tokens[:position]
            break
    # Decode prompt and continuation together (a word may span both), then print what follows the prompt.
    prompt_decoded = tokenizer.decode(prompt)
    full_text = tokenizer.decode(prompt + new_tokens)
    print(full_text[len(prompt_decoded):] if full_text.startswith(prompt_decoded) else tokenizer.decode(new_tokens))
    return 0
