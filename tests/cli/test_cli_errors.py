"""Every bad input of ``fastadapter train``, ``generate`` and ``plan`` gets ``fastadapter COMMAND: error: ...``
and exit status 2 (no traceback), and nothing of a run is lost: one run per ``--out``, a lock against two
processes writing one folder, ``metrics.jsonl`` restarted atomically and readable after a torn line, a full disk
or a kill while writing a checkpoint leaving the last good checkpoint loadable and resumable. The CLI answers
``--help`` and argument errors without importing torch.

Each case names what it did before the fix (a traceback, exit 1, silent success).
"""
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from fastadapter.cli import main as cli_main
from fastadapter.training.checkpoint import list_checkpoints, load_checkpoint
from fastadapter.training.run_folder import RunFolder, RunFolderError


SMALL_DATA = None


@pytest.fixture(scope="module", autouse=True)
def _small_data(tmp_path_factory, shared_data):
    """The first 24 rows of alpaca_tiny.json: runs of a few steps that take a second."""
    global SMALL_DATA
    rows = json.loads((shared_data / "alpaca_tiny.json").read_text())[:24]
    SMALL_DATA = tmp_path_factory.mktemp("data") / "small.json"
    SMALL_DATA.write_text(json.dumps(rows))


def train_args(shared_data, out, *extra, data=None):
    return ["train", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--data", str(data or SMALL_DATA), "--out", str(out), "--no-progress", "--device", "cpu",
            "--batch-tokens", "256", "--max-seq-len", "128", "--eval-fraction", "0.05", *extra]


def generate_args(shared_data, *extra):
    return ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
            str(shared_data / "tok512.bin"), "--prompt", "Once upon a time", "--max-new-tokens", "4", *extra]


def plan_args(shared_data, *extra):
    return ["plan", "--model", "llama-7b", "--data", str(shared_data / "alpaca_tiny.json"), "--gpu", "a100", *extra]


def error_of(capsys, argv) -> str:
    """Run the CLI; assert exit status 2 and a single ``error:`` line; return the message after ``error: ``."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = f"fastadapter {argv[0]}: error: "
    assert lines and lines[-1].startswith(prefix) and "Traceback" not in err, err
    return lines[-1][len(prefix):]


def metrics_steps(out) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# -- fast answers -------------------------------------------------------------------------------------------


def test_the_cli_answers_help_and_argument_errors_without_importing_torch(shared_data, tmp_path):
    """``import fastadapter.cli`` imported torch through fastadapter/__init__.py: every command, ``--help``
    included, took 7-16 s. One subprocess checks the parser, ``--help``, argument errors and a bad flag value
    (refused before torch loads), then that the public names still import on first use."""
    bad_value = train_args(shared_data, tmp_path / "run", "--lr", "nan")
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        import fastadapter.cli as cli
        cli.build_parser()
        for name in cli.COMMANDS:
            cli.build_parser(name)
        for argv in (["--help"], ["train", "--help"], ["train"], ["plan", "--gpu", "tpu"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    cli.main(argv)
                except SystemExit:
                    pass
        assert cli.main({bad_value!r}) == 2
        heavy = sorted(m for m in ("torch", "numpy", "triton", "safetensors", "sentencepiece") if m in sys.modules)
        print(heavy)
        import fastadapter
        fastadapter.zero_init_attention  # the public names still work, imported on first use
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]
    assert "fastadapter train: error: --lr must be a finite number, got nan" in result.stderr


# -- settings out of range ------------------------------------------------------------------------------------

TRAIN_SETTINGS = [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),  # finished "done" with an all-NaN adapter
    (["--lr", "nan"], "--lr must be a finite number, got nan"),  # a traceback
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--min-lr-ratio", "-5"], r"--min-lr-ratio must lie in [0, 1]"),  # a negative learning rate
    (["--min-lr-ratio", "5"], r"--min-lr-ratio must lie in [0, 1]"),  # five times the peak
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--eval-fraction", "nan"], "--eval-fraction must be a finite number, got nan"),
    (["--max-steps", "0"], "--max-steps must be positive, got 0"),
    (["--epochs", "-1"], "--epochs must be positive, got -1"),
    (["--grad-accum", "0"], "--grad-accum must be positive, got 0"),
    (["--prompt-len", "0"], "--prompt-len must be positive, got 0"),
    (["--adapter-layers", "-3"], "--adapter-layers must be positive, got -3"),
    (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    (["--max-seq-len", "1"], "--max-seq-len must be at least 2"),
    (["--batch-tokens", "100"], "--batch-tokens (100) must be >= --max-seq-len (128)"),
    (["--seed", str(2**70)], f"--seed must lie in [0, 2**63 - 1], got {2**70}"),  # an overflow traceback
    (["--seed", "-1"], "--seed must lie in [0, 2**63 - 1], got -1"),
    (["--device", "tpu"], "--device 'tpu' is not a device; expected cpu, cuda or cuda:N"),  # a traceback
    (["--device", "meta"], "--device 'meta': fastadapter runs on cpu or cuda[:N], not meta"),
    (["--overwrite", "--resume"], "--overwrite starts a new run; it cannot be combined with --resume"),
    (["--chat-template", "t.jinja"], "--chat-template is the template of --template chat; add --template chat"),
    (["--template", "chat", "--chat-template", "missing.jinja"], "--chat-template file not found: missing.jinja"),
    (["--eval-prompts", "missing.txt"], "--eval-prompts file not found: missing.txt"),
    (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens must be positive, got 0"),
]


@pytest.mark.parametrize("extra, message", TRAIN_SETTINGS, ids=[" ".join(e) for e, _ in TRAIN_SETTINGS])
def test_train_refuses_settings_out_of_range(shared_data, tmp_path, capsys, extra, message):
    assert message in error_of(capsys, train_args(shared_data, tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_train_refuses_cuda_without_a_gpu(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = error_of(capsys, train_args(shared_data, tmp_path / "run", "--device", "cuda"))
    assert message.startswith("--device cuda: no CUDA GPU is available here") and message.endswith("--device cpu")


GENERATE_SETTINGS = [
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be positive, got -3"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),  # traceback
    (["--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must lie in (0, 1], got nan"),
    (["--seed", str(2**64)], "--seed must lie in [0, 2**63 - 1]"),  # an overflow traceback
]


@pytest.mark.parametrize("extra, message", GENERATE_SETTINGS, ids=[" ".join(e) for e, _ in GENERATE_SETTINGS])
def test_generate_refuses_settings_out_of_range(shared_data, capsys, extra, message):
    assert message in error_of(capsys, generate_args(shared_data, *extra))


def test_generate_refuses_a_prompt_that_is_not_text(shared_data, capsys):
    """Bytes that are not UTF-8 reach Python as surrogate escapes; encoding them raised UnicodeEncodeError."""
    argv = generate_args(shared_data)
    argv[argv.index("--prompt") + 1] = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    message = error_of(capsys, argv)
    assert message.startswith("--prompt is not valid text in this terminal's encoding (byte b'\\xe9' at 3)")


def test_generate_refuses_a_prompt_of_non_utf8_bytes_from_the_shell(shared_data):
    """The same through a real argv (the bytes of a Latin-1 terminal), in a subprocess."""
    argv = [sys.executable, "-m", "fastadapter.cli", *generate_args(shared_data)]
    argv[argv.index("--prompt") + 1] = b"na\xefve"  # subprocess passes bytes as they are
    result = subprocess.run(argv, capture_output=True, timeout=300)
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert b"fastadapter generate: error: --prompt is not valid text" in result.stderr


PLAN_SETTINGS = [
    (["--rows", "0"], "--rows must be positive, got 0"),  # ZeroDivisionError
    (["--max-seq-len", "0"], "--max-seq-len must be positive, got 0"),  # ZeroDivisionError
    (["--epochs", "-1"], "--epochs must be positive, got -1"),  # printed negative times
    (["--gpus", "0"], "--gpus must be positive, got 0"),
    (["--mfu", "0"], "--mfu must lie in (0, 1]"),
    (["--mfu", "nan"], "--mfu must lie in (0, 1]"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
]


@pytest.mark.parametrize("extra, message", PLAN_SETTINGS, ids=[" ".join(e) for e, _ in PLAN_SETTINGS])
def test_plan_refuses_settings_out_of_range(shared_data, capsys, extra, message):
    assert message in error_of(capsys, plan_args(shared_data, *extra))


def test_plan_with_an_unknown_model_exits_2(shared_data, capsys):
    """It raised SystemExit with a message: exit status 1, no ``error:`` prefix."""
    argv = plan_args(shared_data)
    argv[argv.index("--model") + 1] = "llama-9b"
    assert error_of(capsys, argv).startswith("--model 'llama-9b' is neither a named config (llama-7b, ")


# -- paths ------------------------------------------------------------------------------------------------------


def test_out_naming_a_file(shared_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    message = error_of(capsys, train_args(shared_data, tmp_path / "file"))
    assert message == (f"--out {tmp_path / 'file'} is a file; expected a folder for the run (metrics.jsonl, "
                       f"checkpoints/, adapter.safetensors)")


def test_data_naming_a_folder(shared_data, tmp_path, capsys):
    """IsADirectoryError traceback before."""
    for argv in (train_args(shared_data, tmp_path / "run", data=tmp_path), plan_args(shared_data)):
        argv[argv.index("--data") + 1] = str(tmp_path)
        assert error_of(capsys, argv) == (f"{tmp_path} is a folder; expected an Alpaca-format .json (array) or "
                                          f".jsonl data file")


@pytest.mark.parametrize("code, text", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
                         ids=["read-only", "forbidden"])
def test_out_that_cannot_be_created(shared_data, tmp_path, capsys, monkeypatch, code, text):
    """A read-only or forbidden --out (injected: the tests run as root, for whom chmod forbids nothing)."""
    out = tmp_path / "ro" / "run"
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        if os.fspath(path).startswith(str(tmp_path / "ro")):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    assert error_of(capsys, train_args(shared_data, out)) == f"{text}: {out}"


def test_tokenizer_of_another_model(shared_data, tmp_path, capsys):
    """LLaMA's 32,000-token tokenizer with stories260K's 512 embeddings: an index error deep in the model."""
    tokenizer = str(shared_data / "llama_tokenizer.model")
    expected = (f"{tokenizer} has 32,000 tokens but {shared_data / 'stories260K.bin'} only 512 embeddings: this "
                f"tokenizer belongs to another model")
    argv = train_args(shared_data, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--tokenizer") + 1] = tokenizer
    assert error_of(capsys, argv).startswith(expected)
    # The refused run wrote no metrics: the same --out takes the corrected command.
    argv[argv.index("--tokenizer") + 1] = str(shared_data / "tok512.bin")
    assert cli_main(argv) == 0
    argv = generate_args(shared_data)
    argv[argv.index("--tokenizer") + 1] = tokenizer
    assert error_of(capsys, argv).startswith(expected)


def test_truncated_and_foreign_checkpoints_to_resume(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(train_args(shared_data, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    (step, path), = list_checkpoints(out / "checkpoints")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    message = error_of(capsys, train_args(shared_data, tmp_path / "other", "--resume", str(truncated)))
    assert message.startswith(f"{truncated}: not a readable training checkpoint")
    # The newest checkpoint of a run damaged (a disk error, a copy cut short): --resume names the older one.
    assert cli_main(train_args(shared_data, out, "--max-steps", "2", "--save-every", "1", "--resume")) == 0
    capsys.readouterr()
    newest = out / "checkpoints" / "step_000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    message = error_of(capsys, train_args(shared_data, out, "--max-steps", "3", "--resume"))
    assert message.startswith(f"{newest}: not a readable training checkpoint")
    assert message.endswith(f"; resume from an older checkpoint instead: --resume {path}")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert error_of(capsys, train_args(shared_data, tmp_path / "other", "--resume", str(foreign))) == (
        f"{foreign}: not a fastadapter training checkpoint")


def test_truncated_adapter_and_an_adapter_of_another_model(shared_data, tmp_path, capsys, make_config):
    out = tmp_path / "run"
    assert cli_main(train_args(shared_data, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    adapter = out / "adapter.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter.read_bytes()[:300])
    message = error_of(capsys, generate_args(shared_data, "--adapter", str(truncated)))
    assert message.startswith(f"{truncated}: not a readable safetensors file")
    # stories260K's adapter on a random model of another shape.
    from fastadapter.model import LlamaModel
    from tiny_llama import write_llama2c
    other = LlamaModel(make_config(n_layers=2, vocab_size=512, max_seq_len=64))
    write_llama2c(tmp_path / "other.bin", other)
    argv = generate_args(shared_data, "--adapter", str(adapter))
    argv[argv.index("--model") + 1] = str(tmp_path / "other.bin")
    message = error_of(capsys, argv)
    assert message.startswith(f"{adapter}: this adapter was made for a base model with ")


# -- one run per --out ---------------------------------------------------------------------------------------


def test_a_new_run_refuses_a_used_out_and_resume_keeps_its_own_checkpoints(shared_data, tmp_path, capsys):
    """Before: the new run pruned its own checkpoints (the old run's steps were higher) and --resume then picked
    the old run's."""
    out = tmp_path / "run"
    assert cli_main(train_args(shared_data, out, "--max-steps", "4", "--save-every", "1")) == 0
    capsys.readouterr()
    old = {step: load_checkpoint(path)["adapter"] for step, path in list_checkpoints(out / "checkpoints")}
    assert sorted(old) == [2, 3, 4]
    message = error_of(capsys, train_args(shared_data, out, "--max-steps", "2", "--save-every", "1", "--seed", "1"))
    assert message.startswith(f"--out {out} already holds a run (metrics.jsonl, adapter.safetensors, "
                              f"checkpoints/ (3 checkpoints, the newest step_000004.pt)); continue it with --resume")
    for step, path in list_checkpoints(out / "checkpoints"):  # untouched
        for name, value in load_checkpoint(path)["adapter"].items():
            assert torch.equal(value, old[step][name])
    # --overwrite replaces the old run, and the new run's checkpoints are its own.
    assert cli_main(train_args(shared_data, out, "--max-steps", "2", "--save-every", "1", "--seed", "1",
                               "--overwrite")) == 0
    capsys.readouterr()
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [1, 2]
    assert metrics_steps(out) == [0, 1, 2]


def test_resume_refuses_a_folder_of_another_run(shared_data, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for out, seed in ((first, "0"), (second, "1")):
        assert cli_main(train_args(shared_data, out, "--max-steps", "1", "--seed", seed)) == 0
    capsys.readouterr()
    checkpoint = list_checkpoints(first / "checkpoints")[-1][1]
    message = error_of(capsys, train_args(shared_data, second, "--max-steps", "2", "--resume", checkpoint))
    assert message.startswith(f"--out {second} holds another run than the checkpoint {checkpoint}")
    assert [step for step, _ in list_checkpoints(second / "checkpoints")] == [1]
    # Into an empty folder: the run continues there, with its metrics from step 0 on.
    moved = tmp_path / "moved"
    assert cli_main(train_args(shared_data, moved, "--max-steps", "2", "--resume", checkpoint)) == 0
    printed = capsys.readouterr().out
    assert metrics_steps(moved) == [0, 1, 2]
    assert "eval loss n/a" not in printed  # the step-0 eval loss came along with the metrics
    assert load_checkpoint(list_checkpoints(moved / "checkpoints")[-1][1])["run_id"] == json.loads(
        (first / "run.json").read_text())["run_id"]


def test_two_runs_into_one_out_at_once(shared_data, tmp_path, capsys):
    """Both used to succeed, mixing checkpoints and metrics. The folder is locked while a run writes it."""
    out = tmp_path / "run"
    holder = RunFolder.open(str(out))  # another run, in the middle of its training
    try:
        message = error_of(capsys, train_args(shared_data, out, "--max-steps", "1"))
        assert message == (f"--out {out} is in use by another fastadapter train (pid {os.getpid()}); wait for it "
                           f"to finish, or choose another --out folder")
        # The library's own words name the setting, not the flag.
        with pytest.raises(RunFolderError, match=f"^out {out} is in use by another fastadapter train .* choose "
                                                 f"another out folder$"):
            RunFolder.open(str(out), resume_state={"run_id": holder.run_id})
    finally:
        holder.release()
    # Released (or its process gone): the folder is usable again, by a resume of that run only.
    assert RunFolder.open(str(out), resume_state={"run_id": holder.run_id}).run_id == holder.run_id


def test_a_second_process_is_refused_while_a_run_holds_the_lock(tmp_path):
    """The lock between two processes (flock), not only two opens in one process."""
    out = tmp_path / "run"
    code = (f"import sys, time\nfrom fastadapter.training.run_folder import RunFolder\n"
            f"f = RunFolder.open({str(out)!r})\nprint('locked', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another fastadapter train \\(pid {holder.pid}\\)"):
            RunFolder.open(str(out), overwrite=True)
    finally:
        holder.communicate("", timeout=60)
    RunFolder.open(str(out), overwrite=True).release()  # the process ended: the lock went with it


# -- metrics.jsonl -----------------------------------------------------------------------------------------------


def test_resume_survives_a_torn_last_metrics_line(shared_data, tmp_path, capsys):
    """A kill in the middle of a metrics write left half a line; --resume crashed on it (JSONDecodeError)."""
    out = tmp_path / "run"
    assert cli_main(train_args(shared_data, out, "--max-steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')  # torn: no end, no newline
    with pytest.warns(UserWarning, match="line 4 is not a metrics record"):
        assert cli_main(train_args(shared_data, out, "--max-steps", "3", "--save-every", "1", "--resume")) == 0
    assert metrics_steps(out) == [0, 1, 2, 3]


def test_metrics_restart_replaces_the_file_atomically(tmp_path, monkeypatch):
    """--resume rewrote metrics.jsonl in place: a kill during the rewrite left it empty. Now a new file is
    written and renamed: a failure (here: injected into the write) leaves the old file whole."""
    folder = RunFolder.open(str(tmp_path))
    records = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)]
    for record in records:
        folder.log(record)
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left on device"):
        folder.restart_metrics(2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    assert folder.restart_metrics(2) == records[:3]
    assert [r["step"] for r in folder.read_metrics()] == [0, 1, 2]
    folder.release()


# -- full disk, kills --------------------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(shared_data, tmp_path, capsys,
                                                                       monkeypatch):
    """ENOSPC (injected: half the checkpoint written, then the error) was a traceback. Now: an error line naming
    the last good checkpoint, no temporary file left, and --resume continues from it."""
    import fastadapter.training.checkpoint as checkpoint_module

    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def full_disk_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the checkpoint of step 3
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_save)
    message = error_of(capsys, train_args(shared_data, out, "--max-steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    last_good = out / "checkpoints" / "step_000002.pt"
    assert message == (f"No space left on device while writing the checkpoint of step 3 (the last good checkpoint "
                       f"is {last_good}; fix this, then continue with --resume): {out / 'checkpoints' / 'step_000003.pt'}")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001.pt", "step_000002.pt"]
    assert load_checkpoint(str(last_good))["step"] == 2
    assert not (out / "adapter.safetensors").exists()
    assert cli_main(train_args(shared_data, out, "--max-steps", "4", "--save-every", "1", "--resume")) == 0
    assert "resuming from " + str(last_good) in capsys.readouterr().out
    assert metrics_steps(out) == [0, 1, 2, 3, 4]


def test_a_full_disk_while_writing_metrics(shared_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_log = RunFolder.log

    def log(self, record):
        if record["step"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.out, "metrics.jsonl"))
        return real_log(self, record)

    monkeypatch.setattr(RunFolder, "log", log)
    message = error_of(capsys, train_args(shared_data, out, "--max-steps", "3", "--save-every", "1"))
    assert message == f"No space left on device: {out / 'metrics.jsonl'}"
    monkeypatch.undo()
    assert cli_main(train_args(shared_data, out, "--max-steps", "3", "--save-every", "1", "--resume")) == 0
    assert metrics_steps(out) == [0, 1, 2, 3]


KILL_DURING_SAVE = """
import os, signal, sys, torch
import fastadapter.training.checkpoint as checkpoint_module
from fastadapter.cli import main
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # half of the checkpoint of step 3 is on disk when the process dies
        f.write(b"partial" * 100)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
checkpoint_module.torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_good_one(shared_data, tmp_path, capsys):
    """SIGKILL in the middle of a checkpoint write (a real process): the half-written temporary file is never
    taken for a checkpoint, the newest complete one loads, and --resume removes the stale temporary and finishes
    the run."""
    out = tmp_path / "run"
    argv = train_args(shared_data, out, "--max-steps", "4", "--save-every", "1")
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *argv], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -9, result.stderr
    leftovers = sorted(os.listdir(out / "checkpoints"))
    assert leftovers == [".step_000003.pt.tmp-" + leftovers[0].rsplit("-", 1)[1], "step_000001.pt",
                         "step_000002.pt"]
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [1, 2]
    assert load_checkpoint(str(out / "checkpoints" / "step_000002.pt"))["step"] == 2
    assert cli_main(argv + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "done: 4 steps" in printed and "eval loss n/a" not in printed
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002.pt", "step_000003.pt", "step_000004.pt"]
    assert metrics_steps(out) == [0, 1, 2, 3, 4]


def test_the_final_adapter_has_the_mode_of_the_checkpoints(shared_data, tmp_path, capsys):
    """adapter.safetensors was written 0600 (tempfile.mkstemp), the checkpoints 0644 (0666 less the umask)."""
    out = tmp_path / "run"
    assert cli_main(train_args(shared_data, out, "--max-steps", "1")) == 0
    mode = lambda path: stat.S_IMODE(os.stat(path).st_mode)  # noqa: E731
    umask = os.umask(0)
    os.umask(umask)
    checkpoint = list_checkpoints(out / "checkpoints")[-1][1]
    assert mode(out / "adapter.safetensors") == mode(checkpoint) == 0o666 & ~umask
    printed = capsys.readouterr().out
    # The closing suggestion works with this model: it names the tokenizer too.
    assert (f"try it: fastadapter generate --model {shared_data / 'stories260K.bin'} --tokenizer "
            f"{shared_data / 'tok512.bin'} --adapter {out / 'adapter.safetensors'} --template alpaca") in printed


def test_a_malformed_hf_shard_index(shared_data, tmp_path, capsys):
    """A JSONDecodeError traceback before (and a ``../`` shard was read from outside the folder)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 512}))
    index = folder / "model.safetensors.index.json"
    argv = generate_args(shared_data)
    argv[argv.index("--model") + 1] = str(folder)
    index.write_text('{"weight_map": {"lm_head.weight": "model-00001')  # cut short
    assert error_of(capsys, argv).startswith(f"{index}: not valid JSON (")
    index.write_text('{"weight_map": {"lm_head.weight": "../model.safetensors"}}')
    assert error_of(capsys, argv).startswith(f"{index}: shard '../model.safetensors' is not a file of the model "
                                             f"folder {folder}")


def test_a_diverging_run_is_an_error_and_writes_no_adapter(shared_data, tmp_path, capsys):
    """``--lr 1e30`` (finite, so the flag check passes) finished "done" with an all-NaN adapter."""
    out = tmp_path / "run"
    message = error_of(capsys, train_args(shared_data, out, "--lr", "1e30", "--warmup", "0", "--max-steps", "4",
                                          "--save-every", "1"))
    assert message.startswith("training diverged: ") and message.endswith("lower --lr or raise --warmup")
    assert not (out / "adapter.safetensors").exists()
    for _, path in list_checkpoints(out / "checkpoints"):  # whatever was saved before is finite
        assert all(bool(t.isfinite().all()) for t in load_checkpoint(path)["adapter"].values())


def test_chat_template_with_a_sentencepiece_tokenizer(shared_data, tmp_path, capsys):
    data = tmp_path / "chat.json"
    data.write_text('[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]')
    command = ["train", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
               "--data", str(data), "--out", str(tmp_path / "run"), "--template", "chat", "--no-progress"]
    assert "--template chat needs a Hugging Face tokenizer.json" in error_of(capsys, command)


# -- issue 24: no command writes over its own input ------------------------------------------------------------


@pytest.fixture(scope="module")
def story_adapter(shared_data, tmp_path_factory):
    """A fastadapter adapter file of stories260K (top 2 layers, scalar raw gates: every export format takes it)."""
    from fastadapter import AdapterConfig, add_adapter, load_model, save_adapter
    model = load_model(shared_data / "stories260K.bin")
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, gate_activation="none", gate_per_head=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter.gate" in name:
                p.fill_(0.25)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(model, path)
    return path


def eval_args(shared_data, tmp_path, out, *extra, adapter=None):
    """``fastadapter eval`` of stories260K on a one-problem ScienceQA folder (text only): a run that reaches the
    report (the old code then wrote it over --out whatever that was)."""
    data = tmp_path / "scienceqa"
    if not data.exists():
        data.mkdir()
        problem = {"question": "Which is a solid?", "choices": ["milk", "rock"], "answer": 1, "hint": "",
                   "image": None, "task": "closed choice", "grade": "grade2", "subject": "natural science",
                   "topic": "physics", "category": "States of matter", "skill": "Solids and liquids", "lecture": "",
                   "solution": "", "split": "test"}
        (data / "problems.json").write_text(json.dumps({"1": problem}))
        (data / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": ["1"]}))
    return ["eval", "--task", "scienceqa", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
            str(shared_data / "tok512.bin"), "--data", str(data), "--out", str(out), "--device", "cpu",
            *(["--adapter", str(adapter)] if adapter else []), *extra]


def test_eval_out_never_replaces_an_input(shared_data, tmp_path, capsys, story_adapter):
    """`eval --out X`, X the adapter or the model, replaced it with the JSON report (the model 1056540 -> 829
    bytes). Every input is refused as --out, through a symbolic link too, with --overwrite too. (The inputs are
    copies: a regression must not destroy the shared files.)"""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copyfile(shared_data / name, inputs / name)
    adapter = inputs / "adapter.safetensors"
    shutil.copyfile(story_adapter, adapter)
    before = {path: path.read_bytes() for path in inputs.iterdir()}
    link = tmp_path / "link.bin"
    link.symlink_to(inputs / "stories260K.bin")
    for out, flag in ((adapter, "--adapter"), (inputs / "stories260K.bin", "--model"), (link, "--model"),
                      (inputs / "tok512.bin", "--tokenizer")):
        for extra in ((), ("--overwrite",)):
            message = error_of(capsys, eval_args(inputs, tmp_path, out, *extra, adapter=adapter))
            assert message.startswith(f"--out {out} is the {flag} input ") and "would destroy the input" in message
    assert {path: path.read_bytes() for path in inputs.iterdir()} == before


def test_eval_out_replaces_an_existing_file_only_with_overwrite(shared_data, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("earlier report")
    message = error_of(capsys, eval_args(shared_data, tmp_path, report))
    assert message == f"--out {report} already exists; pass --overwrite to replace it, or choose another path"
    assert report.read_text() == "earlier report"
    # A file inside an input folder is part of that input: refused with --overwrite too.
    inside = tmp_path / "scienceqa" / "problems.json"
    problems = inside.read_text()
    message = error_of(capsys, eval_args(shared_data, tmp_path, inside, "--overwrite"))
    assert message.startswith(f"--out {inside} lies inside the --data folder")
    assert inside.read_text() == problems
    # With --overwrite, another report is replaced (atomically: no temporary file is left beside it).
    assert cli_main(eval_args(shared_data, tmp_path, report, "--overwrite")) == 0
    assert json.loads(report.read_text())["problems"] == 1
    assert sorted(os.listdir(tmp_path)) == ["report.json", "scienceqa"]


def test_export_never_writes_over_its_adapter(shared_data, tmp_path, capsys, story_adapter):
    """`export --to v1 X X` overwrote the source adapter with the .pth."""
    copy = tmp_path / "adapter.safetensors"
    copy.write_bytes(story_adapter.read_bytes())
    link = tmp_path / "link.pth"
    link.symlink_to(copy)
    hard = tmp_path / "hard.pth"
    os.link(copy, hard)
    for to, out in (("v1", copy), ("litgpt", copy), ("v1", link), ("litgpt", hard), ("peft", copy)):
        for extra in ((), ("--overwrite",)):
            message = error_of(capsys, ["export", "--to", to, str(copy), str(out), *extra])
            assert message.startswith(f"OUT {out} is the ADAPTER input {copy}"), message
    assert copy.read_bytes() == story_adapter.read_bytes()


def test_export_replaces_an_existing_file_only_with_overwrite_and_atomically(tmp_path, capsys, story_adapter,
                                                                           monkeypatch):
    out = tmp_path / "v1.pth"
    out.write_bytes(b"earlier")
    message = error_of(capsys, ["export", "--to", "v1", str(story_adapter), str(out)])
    assert message == f"OUT {out} already exists; pass --overwrite to replace it, or choose another path"
    assert out.read_bytes() == b"earlier"
    # --overwrite: a failure in the middle of the write (a full disk) leaves the old file whole, and no temporary.
    import fastadapter.adapters.adapter_export as adapter_export

    def full_disk_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapter_export.torch, "save", full_disk_save)
    assert error_of(capsys, ["export", "--to", "v1", str(story_adapter), str(out), "--overwrite"]) == \
        "No space left on device"
    monkeypatch.undo()
    assert out.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["v1.pth"]
    assert cli_main(["export", "--to", "v1", str(story_adapter), str(out), "--overwrite"]) == 0
    assert set(torch.load(out)) == {"adapter_query.weight", "layers.3.attention.gate", "layers.4.attention.gate"}
    assert os.listdir(tmp_path) == ["v1.pth"]


def test_export_into_a_read_only_folder(tmp_path, capsys, story_adapter, monkeypatch):
    """A read-only folder was a traceback (torch.save's RuntimeError). Permissions do not bind root, so the
    refusal the operating system gives is injected when the test runs as root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        real_mkdir = os.mkdir

        def in_folder(path):
            return os.path.dirname(os.path.abspath(path)) == str(folder)

        def read_only_open(path, flags, *args, **kwargs):
            if in_folder(path) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real_open(path, flags, *args, **kwargs)

        def read_only_mkdir(path, *args, **kwargs):
            if in_folder(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
        monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    try:
        for to, out in (("v1", folder / "a.pth"), ("litgpt", folder / "a.pth"), ("peft", folder / "peft")):
            message = error_of(capsys, ["export", "--to", to, str(story_adapter), str(out)])
            assert message.startswith("Permission denied: " + str(folder)), message
    finally:
        folder.chmod(0o755)
    monkeypatch.undo()
    assert os.listdir(folder) == []


def test_train_never_writes_over_its_inputs(shared_data, tmp_path, capsys):
    """The run folder's files are checked against the inputs: --eval-prompts OUT/samples.jsonl was overwritten by
    the samples, --out the --data folder of a ScienceQA run mixed the run into it."""
    out = tmp_path / "run"
    out.mkdir()
    prompts = out / "samples.jsonl"
    prompts.write_text("Tell me a story.\n")
    message = error_of(capsys, train_args(shared_data, out, "--eval-prompts", str(prompts), "--max-steps", "1"))
    assert message.startswith(f"--out/samples.jsonl {prompts} is the --eval-prompts input")
    assert prompts.read_text() == "Tell me a story.\n" and os.listdir(out) == ["samples.jsonl"]
    data_folder = tmp_path / "scienceqa"
    data_folder.mkdir()
    message = error_of(capsys, train_args(shared_data, data_folder, "--max-steps", "1", data=data_folder))
    assert message.startswith(f"--out {data_folder} is the --data input")


def test_bench_refuses_to_replace_earlier_results_without_overwrite(tmp_path, capsys):
    """A bench run replaced the result files of an earlier run of the same name in --out."""
    earlier = tmp_path / "mine.json"
    earlier.write_text("{}")
    assert cli_main(["bench", "--smoke", "--suites", "ops", "--device", "cpu", "--out", str(tmp_path), "--name",
                     "mine", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"fastadapter bench: error: --out/mine.json {earlier} already exists; pass --overwrite to "
                           f"replace it, or choose another path")
    assert earlier.read_text() == "{}"


# -- issue 24: clear errors instead of tracebacks --------------------------------------------------------------


def test_quantize_with_adapter_v2_is_refused_before_loading(shared_data, tmp_path, capsys):
    """--quantize int8 --adapter v2 was a TypeError traceback after the model loaded."""
    message = error_of(capsys, train_args(shared_data, tmp_path / "run", "--adapter", "v2", "--quantize", "int8"))
    assert message.startswith("--quantize int8 is not combined with --adapter v2")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_writing_the_final_adapter_says_how_to_finish(shared_data, tmp_path, capsys,
                                                                      monkeypatch):
    """ENOSPC while adapter.safetensors was written said only "No space left on device". The checkpoint of the
    last step is intact: the message names it and the --resume that writes the adapter, which then works."""
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    message = error_of(capsys, train_args(shared_data, out, "--max-steps", "2"))
    monkeypatch.undo()
    last = out / "checkpoints" / "step_000002.pt"
    assert message == (f"No space left on device while writing the final adapter; the run's last checkpoint {last} "
                       f"is intact: free some space, then rerun the same command with --resume {last} to write the "
                       f"adapter: {out / 'adapter.safetensors'}")
    assert not (out / "adapter.safetensors").exists() and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert cli_main(train_args(shared_data, out, "--max-steps", "2", "--resume", str(last))) == 0
    assert (out / "adapter.safetensors").is_file()


def test_a_vision_folder_of_pickle_weights_is_refused_with_the_reason(shared_data, tmp_path, capsys):
    """A vision folder holding only pytorch_model.bin was refused as transformers' raw UnpicklingError."""
    folder = tmp_path / "tower"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 32,
                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                    "intermediate_size": 64, "image_size": 32, "patch_size": 16}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(32)}, folder / "pytorch_model.bin")
    message = error_of(capsys, train_args(shared_data, tmp_path / "run", "--vision-model", str(folder)))
    assert message == (f"{folder}: only pytorch_model.bin, PyTorch pickle weights; fastadapter loads vision towers "
                       f"from safetensors weights only (unpickling a file can run any code it holds): save the model "
                       f"with save_pretrained(folder, safe_serialization=True)")


def test_an_adapter_with_a_nan_gate_is_refused_at_load(shared_data, tmp_path, capsys, story_adapter):
    """A NaN gate generated an empty continuation without a word (training already refuses NaN)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(story_adapter), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(story_adapter)
    tensors["layers.4.adapter_gate"] = torch.tensor([float("nan")])
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad, metadata=metadata)
    message = error_of(capsys, generate_args(shared_data, "--adapter", str(bad)))
    assert message == (f"{bad}: tensor 'layers.4.adapter_gate' holds NaN or infinite values; the adapter is corrupt "
                       f"(or was saved after training diverged): use an earlier checkpoint's adapter")


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),  # RecursionError
    ('[{"instruction": "a\\ud800", "output": "b"}]', "row 0 is malformed: 'instruction' holds a lone UTF-16 "
                                                     "surrogate (U+D800 at character 1)"),  # UnicodeEncodeError
    ('{"instruction": "a", "output": "b"}', "holds one JSON object; the rows must be a JSON array of objects"),
], ids=["deeply-nested", "lone-surrogate", "one-object"])
def test_bad_data_files_get_one_line(shared_data, tmp_path, capsys, text, message):
    data = tmp_path / "data.json"
    data.write_text(text)
    assert message in error_of(capsys, train_args(shared_data, tmp_path / "run", "--on-bad-row", "error",
                                                  data=data))
