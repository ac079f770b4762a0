"""The Alpaca template, data loading (JSON, JSONL, malformed rows, missing files), response-only loss masks,
truncation, the train/eval split, and the data fingerprints that training checkpoints record."""
import json
import shutil

import pytest

from fastadapter.tokenizers.tokenizer import load_tokenizer
from fastadapter.training.data import (IGNORE_INDEX, DataError, DataReport, examples_digest, file_fingerprint,
                                       load_examples, load_rows, split_examples, tokenize_rows)
from fastadapter.training.prompt import format_prompt


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return load_tokenizer(shared_data / "tok512.bin")


def test_template_reproduces_every_alpaca_text(shared_data):
    rows = json.loads((shared_data / "alpaca_tiny.json").read_text())
    assert len(rows) == 100
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    for index, row in enumerate(rows):
        assert format_prompt(row["instruction"], row["input"]) + row["output"] == row["text"], index


def test_loss_only_on_response_and_eos(tokenizer):
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    (example,) = tokenize_rows([row], tokenizer, max_seq_len=512)
    prompt = format_prompt(row["instruction"])
    full = tokenizer.encode(prompt + row["output"], bos=True, eos=True)
    prompt_len = len(tokenizer.encode(prompt, bos=True, eos=False))
    assert list(example.tokens) == full[:-1] and example.tokens[0] == tokenizer.bos_id
    # labels are the next tokens, masked while the next token is still the prompt's; EOS is learned.
    assert list(example.labels[prompt_len - 1:]) == full[prompt_len:]
    assert all(label == IGNORE_INDEX for label in example.labels[:prompt_len - 1])
    assert example.labels[-1] == tokenizer.eos_id
    assert example.loss_tokens == len(full) - prompt_len and not example.truncated


def test_truncation_is_counted_and_rows_without_response_dropped(tokenizer):
    rows = [{"instruction": "Say yes.", "output": "Yes. " * 40},
            {"instruction": "Be brief.", "input": "", "output": "Ok."},
            {"instruction": "word " * 200, "output": "Too late."}]
    # Room for the first row's prompt and 20 response tokens: its long response is cut, the second row fits.
    max_seq_len = len(tokenizer.encode(format_prompt("Say yes."), bos=True, eos=False)) + 20
    report = DataReport()
    examples = tokenize_rows(rows, tokenizer, max_seq_len=max_seq_len, report=report)
    assert report.truncated == 2 and report.no_response == 1
    assert len(examples[0]) == max_seq_len and examples[0].truncated and examples[0].loss_tokens == 21
    assert examples[0].labels[-1] != tokenizer.eos_id  # the EOS was cut off with the tail
    assert not examples[1].truncated


def test_malformed_rows_skipped_with_their_index(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, ["not", "a", "row"],
            {"instruction": "a", "input": 3, "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    report = DataReport()
    with pytest.warns(UserWarning) as warned:
        good = load_rows(path, report=report)
    assert [str(w.message).split(": ")[1] for w in warned] == [f"skipping malformed row {i}" for i in (1, 2, 3)]
    assert [r["instruction"] for r in good] == ["a", "c"]
    assert [index for index, _ in report.bad_rows] == [1, 2, 3]
    assert "missing key 'output'" in report.bad_rows[0][1] and "'input' must be a string" in report.bad_rows[2][1]
    with pytest.raises(DataError, match="row 1 is malformed: missing key 'output'"):
        load_rows(path, on_bad_row="error")


def test_jsonl_with_an_undecodable_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n{oops\n\n{"instruction": "c", "output": "d"}\n')
    report = DataReport()
    with pytest.warns(UserWarning, match="line 2 is not valid JSON"):
        good = load_rows(path, report=report)
    assert len(good) == 2 and report.rows == 3 and report.bad_rows[0][0] == 1


def test_missing_or_unreadable_file_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.json"):
        load_examples(tmp_path / "nope.json", tokenizer, 64)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": ')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_rows(broken)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_rows(binary)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="none of the 0 rows"):
        load_rows(empty)


def test_split_is_deterministic_disjoint_and_complete(shared_data, tokenizer):
    examples, report = load_examples(shared_data / "alpaca_tiny.json", tokenizer, 512)
    assert report.rows == 100 and not report.bad_rows
    train, held_out = split_examples(examples, 0.1, seed=3)
    assert len(held_out) == 10 and len(train) == len(examples) - 10
    again_train, again_held_out = split_examples(examples, 0.1, seed=3)
    assert again_held_out == held_out and again_train == train
    assert sorted(map(id, train + held_out)) == sorted(map(id, examples))
    assert split_examples(examples, 0.1, seed=4)[1] != held_out
    with pytest.raises(ValueError, match="eval_fraction"):
        split_examples(examples, 1.0, seed=0)


def test_file_fingerprint_follows_the_contents_not_the_place(tmp_path, shared_data):
    original = shared_data / "alpaca_tiny.json"
    fingerprint = file_fingerprint(original)
    assert fingerprint["path"] == str(original) and fingerprint["size"] == original.stat().st_size
    copy = tmp_path / "copy.json"
    shutil.copy(original, copy)
    moved = file_fingerprint(copy)
    assert moved["path"] == str(copy) and {**moved, "path": str(original)} == fingerprint
    data = bytearray(copy.read_bytes())
    data[10] ^= 1
    copy.write_bytes(bytes(data))
    assert file_fingerprint(copy)["sha256_head"] != fingerprint["sha256_head"]
    copy.write_bytes(original.read_bytes() + b"\n")  # past the hashed head: the size still tells
    assert file_fingerprint(copy, head_bytes=100)["sha256_head"] == file_fingerprint(original, 100)["sha256_head"]
    assert file_fingerprint(copy)["size"] == fingerprint["size"] + 1
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.json"):
        file_fingerprint(tmp_path / "nope.json")


def test_examples_digest_changes_with_the_tokenised_examples(shared_data, tokenizer):
    examples, _ = load_examples(shared_data / "alpaca_tiny.json", tokenizer, 512)
    again, _ = load_examples(shared_data / "alpaca_tiny.json", tokenizer, 512)
    assert examples_digest(examples) == examples_digest(again)
    shorter, _ = load_examples(shared_data / "alpaca_tiny.json", tokenizer, 256)
    assert examples_digest(shorter) != examples_digest(examples)
    assert examples_digest(examples[::-1]) != examples_digest(examples)
    assert examples_digest([]) != examples_digest(examples[:1])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, tokenizer, suffix):
    """Editors on Windows save UTF-8 with a BOM; json.loads refused the file ("Unexpected UTF-8 BOM")."""
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Say no.", "output": "No."}]
    text = json.dumps(rows) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    report = DataReport()
    assert load_rows(path, report=report, on_bad_row="error") == [{**rows[0]}, rows[1]]
    assert report.rows == 2 and not report.bad_rows


def test_a_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} is a folder; expected an Alpaca-format .json"):
        load_rows(tmp_path)
    with pytest.raises(DataError, match="is a folder"):
        file_fingerprint(tmp_path)


def test_examples_remember_their_row_in_the_file(tmp_path, tokenizer):
    """Rows 1 and 3 are malformed and skipped: the examples still know rows 0, 2 and 4, so a message about one
    of them (an over-long example, after shuffling) names the row a user can find in the file."""
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "d", "output": "e " * 300},
            7, {"instruction": "f", "output": "g"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="skipping malformed row"):
        examples, report = load_examples(path, tokenizer, max_seq_len=1000)
    assert [e.row for e in examples] == [0, 2, 4] == report.kept_rows
    assert examples[0] == tokenize_rows([rows[0]], tokenizer, 1000)[0]  # the row does not take part in equality


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ('{"instruction": "Say hi.", "output": "Hi."}', "holds one JSON object; the rows must be a JSON array of objects"),
], ids=["deeply-nested", "one-object"])
def test_a_json_file_that_is_not_an_array_of_rows(tmp_path, text, message):
    """A deeply nested file raised RecursionError; a .json holding one object was read as one row."""
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_rows(path)


def test_a_single_row_of_json_lines_still_reads(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    assert load_rows(path) == [{"instruction": "Say hi.", "output": "Hi."}]
    deep = tmp_path / "deep.jsonl"  # a JSON line nested too deeply is one malformed row, not a traceback
    deep.write_text('{"instruction": "Say hi.", "output": "Hi."}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.warns(UserWarning, match="skipping malformed row 1: line 2 is JSON nested too deeply to read"):
        assert len(load_rows(deep)) == 1


def test_lone_surrogates_are_malformed_rows(tmp_path, shared_data):
    """JSON may hold a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode: UnicodeEncodeError.
    Such a row is skipped (or refused) with the reason, in Alpaca and chat rows."""
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "x\\udc80", "output": "y"}]')
    with pytest.warns(UserWarning, match=r"row 1: 'instruction' holds a lone UTF-16 surrogate \(U\+DC80 at "
                                         r"character 1\)"):
        assert len(load_rows(path)) == 1
    from fastadapter.training.chat import row_messages
    with pytest.raises(ValueError, match="turn 0: 'content' holds a lone UTF-16 surrogate"):
        row_messages({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "ok"}]})
