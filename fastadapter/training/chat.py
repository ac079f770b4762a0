"""Chat data: conversations rendered with the tokenizer's own chat template, the loss on the assistant turns only.

A row is either ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (the OpenAI /
Hugging Face layout) or ShareGPT's ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``.

Rendering follows ``transformers``' ``apply_chat_template``: the Jinja template runs in a sandbox with
``trim_blocks`` and ``lstrip_blocks``, the loop-control extension, the ``tojson`` filter and the
``raise_exception`` / ``strftime_now`` globals, and receives ``messages``, ``add_generation_prompt``, ``tools``,
``documents`` and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...). The rendered text is then
tokenised with the special tokens it writes (``<|im_start|>``) and no BOS/EOS added (the template writes them).

Which tokens carry loss: for assistant message i, its span in the rendered text runs from the end of
``render(messages[:i], add_generation_prompt=True)`` (the prompt a model sees before it answers) to the end of
``render(messages[:i + 1])`` — the answer and the template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``,
``</s>``), so that the model learns to end its turn. Tokens that start inside an assistant span are trained on.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Optional, Sequence

from ..setting_error import SettingError
from .examples import IGNORE_INDEX, DataError, DataReport, Example, text_problem

#: ShareGPT's ``from`` values -> roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "tool": "tool",
                  "function": "tool", "observation": "tool"}
ROLES = ("system", "user", "assistant", "tool")


def is_chat_row(row) -> bool:
    """Whether ``row`` is a conversation (has ``messages`` or ``conversations``)."""
    return isinstance(row, dict) and ("messages" in row or "conversations" in row)


def row_messages(row) -> list[dict]:
    """The ``[{"role", "content"}]`` messages of a chat row (ShareGPT's converted).

    Raises:
        ValueError: naming what is wrong with the row (missing key, unknown role, non-string content, no
            assistant turn).
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with 'messages' or 'conversations', got {type(row).__name__}")
    if "messages" in row:
        turns, role_key, content_key, roles = row["messages"], "role", "content", {r: r for r in ROLES}
    elif "conversations" in row:
        turns, role_key, content_key, roles = row["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise ValueError("missing key 'messages' (or ShareGPT's 'conversations'): the chat template reads "
                         "conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'messages' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ValueError(f"turn {index} must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(turn[role_key])
        if role is None:
            raise ValueError(f"turn {index} has {role_key} {turn[role_key]!r}; expected one of {sorted(roles)}")
        if not isinstance(turn[content_key], str):
            raise ValueError(f"turn {index}: {content_key!r} must be a string, got "
                             f"{type(turn[content_key]).__name__}")
        problem = text_problem(turn[content_key])
        if problem is not None:
            raise ValueError(f"turn {index}: {content_key!r} {problem}")
        messages.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no assistant turn with content (nothing to learn)")
    return messages


class ChatTemplate:
    """A compiled Jinja chat template with the special tokens it is rendered with.

    Args:
        source: the template (``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``).
        special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", ...}``.
    """

    def __init__(self, source: str, special_tokens: Optional[dict] = None):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from exc
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (and, with ``add_generation_prompt``, the start of an assistant turn)."""
        import jinja2
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"the chat template refused the conversation: {exc}") from exc


def assistant_spans(template: ChatTemplate, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the rendered conversation and the ``[start, end)`` characters of each assistant turn.

    Raises:
        ValueError: the template renders a conversation's beginning differently from the whole (a template
            that looks ahead, e.g. one that writes the system prompt only when an assistant turn follows), so the
            turns cannot be located in the text.
    """
    text = template.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[:i + 1])
        if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
            raise ValueError(f"the chat template renders the conversation up to turn {i} differently from the whole "
                             f"conversation, so the assistant turns cannot be located for the loss mask")
        spans.append((len(prompt), len(through)))
    return text, spans


def tokenize_conversation(messages: Sequence[dict], tokenizer, template: ChatTemplate, max_seq_len: int,
                          row: Optional[int] = None) -> tuple[Optional[Example], bool]:
    """One :class:`Example` of a conversation: the rendered text's tokens, labels on the assistant spans.

    Args:
        tokenizer: an :class:`~fastadapter.tokenizers.tokenizer_hf.HFTokenizer` (``encode_with_offsets``).
        max_seq_len: the longest model input kept.

    Returns:
        ``(example, truncated)``; the example is None when truncation left no assistant token.
    """
    text, spans = assistant_spans(template, messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    truncated = len(ids) > max_seq_len + 1
    ids, trained = ids[:max_seq_len + 1], trained[:max_seq_len + 1]
    labels = tuple(t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:]))
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return Example(tuple(ids[:-1]), labels, truncated, row=row), truncated


def chat_template_of(tokenizer, template_file: Optional[str] = None) -> ChatTemplate:
    """The chat template of ``tokenizer`` (or the one in ``template_file``), with its special tokens.

    Raises:
        ValueError: the tokenizer has no template and no file is given, or it cannot give token offsets.
    """
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise SettingError("{template} chat needs a Hugging Face tokenizer.json (it renders the tokenizer's chat "
                           "template); got a {kind}", kind=type(tokenizer).__name__)
    if template_file is not None:
        with open(template_file, encoding="utf-8") as f:
            source = f.read()
    else:
        source = tokenizer.chat_template
        if source is None:
            raise SettingError("{path}: the tokenizer has no chat template (no chat_template in "
                               "tokenizer_config.json, no chat_template.jinja); pass {chat_template} FILE or use "
                               "{template} alpaca", path=tokenizer.path)
    return ChatTemplate(source, tokenizer.special_tokens)


def tokenize_chat_rows(rows: Sequence, tokenizer, template: ChatTemplate, max_seq_len: int, *,
                       report: DataReport, row_numbers: Sequence[int], on_bad_row: str, path: str
                       ) -> list[Example]:
    """Tokenise chat rows (see :func:`row_messages`); a malformed row is skipped into ``report`` or raises
    :class:`~fastadapter.training.data.DataError` (``on_bad_row="error"``)."""
    import warnings

    examples = []
    for row, number in zip(rows, row_numbers):
        try:
            messages = row_messages(row)
        except ValueError as exc:
            if on_bad_row == "error":
                raise DataError.naming("{path}: row {number} is malformed: {problem} (pass {on_bad_row} skip to "
                                       "skip it)", path=path, number=number, problem=str(exc)) from None
            report.bad_rows.append((number, str(exc)))
            warnings.warn(f"{path}: skipping malformed row {number}: {exc}", stacklevel=2)
            continue
        example, truncated = tokenize_conversation(messages, tokenizer, template, max_seq_len, row=number)
        report.truncated += truncated
        if example is None:
            report.no_response += 1
            continue
        examples.append(example)
    return examples
