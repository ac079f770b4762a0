"""The original Alpaca prompt template (DESIGN.md §1), as used by LLaMA-Adapter's fine-tuning code.

The template ends with ``### Response:``; the response starts on the next line, so the line break belongs to
the prompt (it is not trained on). ``prompt + output`` reproduces the ``text`` field of the Stanford Alpaca data.
"""
from __future__ import annotations

_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_WITHOUT_INPUT = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for ``instruction`` (and ``input`` when it is not empty), ending where the response
    begins: ``format_prompt(i, x) + output`` is the full training text."""
    template = _WITH_INPUT if input else _WITHOUT_INPUT
    return template.format(instruction=instruction, input=input)
