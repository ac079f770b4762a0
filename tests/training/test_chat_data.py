"""Chat data: conversations rendered as transformers' apply_chat_template renders them, loss on the assistant
turns only (their text and the end-of-turn marker), ShareGPT rows, malformed rows."""
import json

import pytest

from fastadapter.tokenizers.tokenizer import load_tokenizer
from fastadapter.training.chat import ChatTemplate, assistant_spans, row_messages, tokenize_conversation
from fastadapter.training.data import IGNORE_INDEX, DataError, load_examples

from hf_folders import CHAT_ROWS, CHATML_TEMPLATE, LLAMA2_TEMPLATE, write_chat_tokenizer


@pytest.fixture(scope="module")
def chat_folder(shared_data, tmp_path_factory):
    return write_chat_tokenizer(shared_data, tmp_path_factory.mktemp("chat_tokenizer"))


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA2_TEMPLATE], ids=["chatml", "llama2"])
def test_rendering_and_ids_match_transformers_apply_chat_template(chat_folder, template):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(chat_folder / "tokenizer.json"), bos_token="<s>",
                                 eos_token="</s>")
    hf.chat_template = template
    tokenizer = load_tokenizer(chat_folder)
    ours = ChatTemplate(template, {"bos_token": "<s>", "eos_token": "</s>"})
    for row in CHAT_ROWS:
        messages = row_messages(row)
        for prompt in (False, True):
            assert ours.render(messages, prompt) == hf.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=prompt)
        example, _ = tokenize_conversation(messages, tokenizer, ours, max_seq_len=512)
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        expected = expected["input_ids"] if isinstance(expected, dict) else list(expected)
        assert list(example.tokens) + [example.labels[-1]] == expected


def test_loss_covers_the_assistant_turns_and_their_end_marker(chat_folder):
    tokenizer = load_tokenizer(chat_folder)
    template = ChatTemplate(CHATML_TEMPLATE, tokenizer.special_tokens)
    messages = row_messages(CHAT_ROWS[1])
    example, truncated = tokenize_conversation(messages, tokenizer, template, max_seq_len=512)
    assert not truncated
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    # Both answers with their <|im_end|> and line break; nothing of the system or user turns.
    # (LLaMA's SentencePiece vocabulary puts a dummy-prefix space after each special token.)
    assert tokenizer.decode(trained).split() == ["4", "6,", "of", "course."]
    im_end = tokenizer.encode("<|im_end|>", bos=False)
    assert trained.count(im_end[0]) == 2
    text, spans = assistant_spans(template, messages)
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>\n", "6, of course.<|im_end|>\n"]
    # Labels are the next tokens: wherever a label is set, it is the following input token.
    for j in range(len(example) - 1):
        if example.labels[j] != IGNORE_INDEX:
            assert example.labels[j] == example.tokens[j + 1]


def test_sharegpt_rows_and_errors():
    assert row_messages(CHAT_ROWS[2]) == [{"role": "user", "content": "Say hi."},
                                          {"role": "assistant", "content": "Hi there!"}]
    with pytest.raises(ValueError, match="turn 0 has from 'robot'; expected one of"):
        row_messages({"conversations": [{"from": "robot", "value": "x"}]})
    with pytest.raises(ValueError, match="no assistant turn with content"):
        row_messages({"messages": [{"role": "user", "content": "hello"}]})
    with pytest.raises(ValueError, match="missing key 'messages'"):
        row_messages({"instruction": "x", "output": "y"})


def test_template_that_looks_ahead_is_refused(chat_folder):
    tokenizer = load_tokenizer(chat_folder)
    # Writes the number of turns first: the rendering of a prefix is not the start of the whole.
    odd = ChatTemplate("{{ messages|length }}:{% for m in messages %}{{ m.content }}|{% endfor %}", {})
    with pytest.raises(ValueError, match="renders the conversation up to turn 1 differently from the whole"):
        tokenize_conversation(row_messages(CHAT_ROWS[0]), tokenizer, odd, max_seq_len=64)


def test_load_examples_chat_file(chat_folder, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = CHAT_ROWS + [{"messages": [{"role": "user", "content": "no answer"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = load_tokenizer(chat_folder)
    with pytest.warns(UserWarning, match="skipping malformed row 3"):
        examples, report = load_examples(data, tokenizer, 512, template="chat")
    assert (len(examples), report.rows, [i for i, _ in report.bad_rows]) == (3, 4, [3])
    with pytest.raises(DataError, match="row 3 is malformed: no assistant turn"):
        load_examples(data, tokenizer, 512, template="chat", on_bad_row="error")
    # The Alpaca reader points chat rows to the chat template (named as the library's setting; the CLI's flag in
    # test_cli_errors.py).
    with pytest.raises(DataError, match="this is a conversation row; pass template chat") as caught:
        load_examples(data, tokenizer, 512, on_bad_row="error")
    assert caught.value.settings == ("on_bad_row",)  # and template, inside the row's problem
    assert "pass --template chat" in caught.value.render({"template": "--template", "on_bad_row": "--on-bad-row"}.get)
    # A SentencePiece tokenizer has no chat template.
    with pytest.raises(ValueError, match="^template chat needs a Hugging Face tokenizer.json"):
        from fastadapter.training.chat import chat_template_of
        chat_template_of(object())
