"""Sample generations during training (``fastadapter train --eval-prompts FILE``): a few prompts generated greedily
at every evaluation and appended to ``OUT/samples.jsonl`` as ``{"step", "eval_loss", "prompt", "output"}``.

The prompts file holds one prompt per line, or JSON lines: a string, ``{"prompt": ...}``, an Alpaca
``{"instruction": ..., "input": ...}`` or a chat ``{"messages": [...]}`` (without the answer). Each prompt is
formatted with the run's template (the Alpaca prompt, or a user turn of the chat template), as ``fastadapter
generate --template`` formats it.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

from ..setting_error import SettingError

Prompt = Union[str, dict]


def read_prompts(path: str) -> list[Prompt]:
    """The prompts of ``path`` (see the module docstring).

    Raises:
        ValueError: an empty file, or a JSON line that is none of the accepted shapes (the line is named).
    """
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.lstrip()[:1] in ("{", '"'):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
                if isinstance(value, dict) and not ({"prompt", "instruction", "messages"} & set(value)):
                    raise ValueError(f"{path}: line {number} has none of 'prompt', 'instruction', 'messages'")
                prompts.append(value)
            else:
                prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts; expected one prompt per line")
    return prompts


class SampleWriter:
    """``writer(model, step, eval_loss)``: generate every prompt greedily and append the answers to ``path``.

    Lines of ``step`` or later already in the file (a resumed or restarted run) are dropped first, so the file
    holds each step once.
    """

    def __init__(self, path: str, prompts: list[Prompt], tokenizer, *, template: str = "alpaca",
                 chat_template=None, max_new_tokens: int = 64):
        self.path, self.prompts, self.tokenizer = path, prompts, tokenizer
        self.template, self.chat_template, self.max_new_tokens = template, chat_template, max_new_tokens
        self.encoded = [self._encode(p) for p in prompts]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict) and "messages" in prompt:
            messages = prompt["messages"]
        else:
            text = prompt if isinstance(prompt, str) else prompt.get("prompt", prompt.get("instruction"))
            if self.template == "alpaca":
                from .prompt import format_prompt
                extra = prompt.get("input", "") if isinstance(prompt, dict) else ""
                return self.tokenizer.encode(format_prompt(text, extra), bos=True)
            messages = [{"role": "user", "content": text}]
        if self.chat_template is None:
            raise SettingError("a chat prompt ('messages') needs {template} chat")
        return self.tokenizer.encode(self.chat_template.render(messages, add_generation_prompt=True), bos=False)

    def __call__(self, model, step: int, eval_loss: Optional[float]) -> None:
        import torch

        from ..model.generation import generate

        stops = getattr(self.tokenizer, "stop_ids", None) or [self.tokenizer.eos_id]
        with torch.no_grad():
            outputs = generate(model, self.encoded, max_new_tokens=self.max_new_tokens, eos_id=stops[0])
        kept = []
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", -1) < step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)
            for prompt, tokens in zip(self.prompts, outputs):
                for position, token in enumerate(tokens):
                    if token in stops:
                        tokens = tokens[:position]
                        break
                f.write(json.dumps({"step": step, "eval_loss": eval_loss, "prompt": prompt,
                                    "output": self.tokenizer.decode(tokens)}) + "\n")
