"""The training loop: LR schedule, backward stopping at the lowest adapted layer, metrics, gradient accumulation,
clipping and weight decay, mixed precision, activation checkpointing, exact resume and its refusal of other data
or settings, a checkpoint on SIGTERM/SIGINT (a real ``fastadapter train`` process, and in-process during the
step-0 evaluation), the CLI's user errors, and the real pipeline end to end (train, then generate)."""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastadapter.cli import flag_of, is_user_error
from fastadapter.cli import main as cli_main
from fastadapter.setting_error import SettingError
from fastadapter.training.checkpoint import (CheckpointNotFound, list_checkpoints, load_checkpoint, resolve_resume,
                                            save_checkpoint)
from fastadapter.training.data import IGNORE_INDEX, Example
from fastadapter.training.packing import collate_packed, pack_examples
from fastadapter.training.schedule import warmup_cosine
from fastadapter.training.trainer import TrainConfig, Trainer, token_loss_sum, train

from training_runs import read_metrics, stories_train_args, tiny_adapted_model, toy_examples


def adapter_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[14] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_backward_stops_at_the_lowest_adapted_layer():
    model = tiny_adapted_model(layers=2)  # layers 2 and 3 adapted
    with torch.no_grad():  # open the gates: with γ = 0 the prompts get no gradient yet (zero-init)
        for block in model.layers[2:]:
            block.attention.adapter.gate.fill_(0.5)
    outputs = []
    for block in model.layers:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    batch = collate_packed(toy_examples(3))
    token_loss_sum(model, batch).backward()
    # Below the lowest adapted layer nothing needs a gradient, so autograd records no graph there at all.
    assert [o.grad_fn is None for o in outputs] == [True, True, False, False]
    assert all(p.grad is None for name, p in model.named_parameters() if "adapter" not in name)
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == [f"layers.{i}.attention.adapter.{n}" for i in (2, 3) for n in ("gate", "prompt")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_run_writes_metrics_checkpoints_and_learns(tmp_path):
    examples = toy_examples(36)
    model = tiny_adapted_model()
    saved = []
    config = TrainConfig(out=str(tmp_path), batch_tokens=64, max_steps=8, lr=5e-2, warmup_steps=2, eval_every=4,
                         save_every=3, keep_checkpoints=2, progress=False)
    result = train(model, examples[:32], examples[32:], config, save_adapter_fn=lambda m, p: saved.append(p))
    metrics = read_metrics(tmp_path)
    assert metrics[0]["step"] == 0 and metrics[0]["eval_loss"] == pytest.approx(result.initial_eval_loss)
    assert [m["step"] for m in metrics] == list(range(9))
    assert all({"loss", "lr", "tokens", "tokens_per_s"} <= set(m) for m in metrics[1:])
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 4, 8]
    assert metrics[1]["lr"] == pytest.approx(2.5e-2) and metrics[2]["lr"] == pytest.approx(5e-2)
    assert result.eval_loss < result.initial_eval_loss - 0.1
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [6, 8]  # 3 pruned
    assert saved == [str(tmp_path / "adapter.safetensors")]


def test_resume_reaches_the_same_weights(tmp_path):
    examples = toy_examples(13)

    def run(out, resume=None):
        model = tiny_adapted_model()
        config = TrainConfig(out=str(out), batch_tokens=96, grad_accum=2, max_steps=5, warmup_steps=2,
                             eval_every=0, save_every=2, keep_checkpoints=0, progress=False)
        train(model, examples[:11], examples[11:], config, resume=resume)
        return adapter_state(model)

    uninterrupted = run(tmp_path / "a")
    # 11 examples pack into 3 or 4 rows of 96 tokens: 1 or 2 steps of 2 rows per epoch, so the run crosses epoch
    # boundaries and the data position and each epoch's reshuffle are part of what resume must restore.
    checkpoint = str(tmp_path / "a" / "checkpoints" / "step_000002.pt")
    state = load_checkpoint(checkpoint)
    assert state["step"] == 2 and (state["epoch"], state["step_in_epoch"]) == (0, 2)
    resumed = run(tmp_path / "a", resume=checkpoint)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    # The resumed run replaced the stopped run's lines past step 2 instead of appending duplicates.
    assert [m["step"] for m in read_metrics(tmp_path / "a")] == list(range(6))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_adapter(tmp_path, dtype):
    examples = toy_examples(12)
    model = tiny_adapted_model(dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    assert model.layers[0].attention.wq.weight.dtype != torch.float32
    before = adapter_state(model)
    config = TrainConfig(out=str(tmp_path), batch_tokens=64, max_steps=2, dtype=dtype, save_every=0,
                         progress=False)
    result = train(model, examples[:10], examples[10:], config)
    after = adapter_state(model)
    assert all(p.dtype == torch.float32 for p in after.values())
    assert math.isfinite(result.loss) and any(not torch.equal(before[n], after[n]) for n in before)


def test_activation_checkpointing_gives_the_same_gradients():
    batch = collate_packed(toy_examples(4))
    grads = []
    for checkpointing in (False, True):
        model = tiny_adapted_model()
        model.activation_checkpointing = checkpointing
        token_loss_sum(model, batch).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_before_exiting(tmp_path, shared_data, signum):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastadapter.cli", "train", "--model", str(shared_data / "stories260K.bin"),
               "--tokenizer", str(shared_data / "tok512.bin"), "--data", str(shared_data / "alpaca_tiny.json"),
               "--out", str(out), "--max-steps", "1000", "--batch-tokens", "300", "--max-seq-len", "256",
               "--save-every", "0", "--eval-fraction", "0", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 600  # a loaded machine may take minutes to start; the loop ends at step 1
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # step 0 and a training step
                break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[0]
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, output
    assert "interrupted by signal" in output
    assert "top 5 layers" in output  # the default --adapter-layers 30 clamped to stories260K's 5 layers
    (step, path), = list_checkpoints(out / "checkpoints")
    assert 1 <= step < 1000 and load_checkpoint(path)["step"] == step
    assert read_metrics(out)[-1]["step"] == step
    assert not (out / "adapter.safetensors").exists()


def test_loss_with_logits_only_at_response_tokens_equals_the_full_loss():
    """token_loss_sum runs the output head only where there is a label; loss and gradients are unchanged."""
    batch = collate_packed(toy_examples(5))
    model = tiny_adapted_model()
    with torch.no_grad():
        for block in model.layers[2:]:
            block.attention.adapter.gate.fill_(0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    fast = token_loss_sum(model, batch)
    fast_grads = torch.autograd.grad(fast, params)
    logits = model(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    full = torch.nn.functional.cross_entropy(logits[0], batch.labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    full_grads = torch.autograd.grad(full, params)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not model.norm._forward_hooks  # the hook is gone after the call


def test_checkpoint_files_and_resume_paths(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    for step in (3, 12):
        save_checkpoint(str(folder / f"step_{step:06d}.pt"), {"step": step})
    assert sorted(os.listdir(folder)) == ["step_000003.pt", "step_000012.pt"]  # no temporary file left behind
    newest = str(folder / "step_000012.pt")
    assert resolve_resume(str(tmp_path / "run"), "out") == newest == resolve_resume(str(folder), "out")
    assert resolve_resume(str(folder / "step_000003.pt"), "out").endswith("step_000003.pt")
    with pytest.raises(CheckpointNotFound, match="no checkpoint there"):
        resolve_resume(str(tmp_path / "empty"), "out")
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))


def open_gates(model, value: float = 0.5):
    """Open the zero-init gates, without which the prompts get no gradient yet."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter.gate"):
                p.fill_(value)
    return model


def one_step(tmp_path, rows, **config):
    """One optimizer step of a fresh trainer on the global batch ``rows`` (lists of examples): the loss, the
    gradients the optimizer saw (after accumulation and clipping) and the adapter after the step."""
    model = open_gates(tiny_adapted_model())
    settings = dict(out=str(tmp_path), batch_tokens=64, warmup_steps=0, grad_clip=0.0, progress=False)
    trainer = Trainer(model, toy_examples(24), [], TrainConfig(**{**settings, **config}))
    trainer._global_batch = lambda: rows
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append({name: p.grad.clone() for name, p in trainer.params}))
    loss, _ = trainer.train_step()
    (grads,) = seen
    return loss, grads, adapter_state(model)


def test_grad_accumulation_equals_one_combined_micro_batch(tmp_path):
    examples = toy_examples(6)
    first, second = examples[:3], examples[3:]
    accumulated = one_step(tmp_path, [first, second], grad_accum=2)
    combined = one_step(tmp_path, [first + second], grad_accum=1)
    assert accumulated[0] == pytest.approx(combined[0], abs=1e-6)
    for name, grad in combined[1].items():
        assert grad.abs().max() > 1e-4, name  # the gates are open: every parameter learns
        torch.testing.assert_close(accumulated[1][name], grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(accumulated[2][name], combined[2][name], rtol=0, atol=1e-6)


def test_grad_clip_caps_the_global_norm(tmp_path):
    rows = [toy_examples(4)]
    _, free, _ = one_step(tmp_path, rows)
    norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in free.values()])))
    assert norm > 1e-3
    _, clipped, _ = one_step(tmp_path, rows, grad_clip=norm / 4)
    clipped_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in clipped.values()])))
    assert clipped_norm == pytest.approx(norm / 4, rel=1e-5)
    for name, grad in free.items():  # scaled as a whole: the direction is kept
        torch.testing.assert_close(clipped[name], grad * (clipped_norm / norm), rtol=1e-5, atol=1e-8)
    _, loose, _ = one_step(tmp_path, rows, grad_clip=norm * 4)
    for name, grad in free.items():  # under the threshold nothing changes
        torch.testing.assert_close(loose[name], grad, rtol=1e-6, atol=0)


def test_weight_decay_only_on_the_prompts(tmp_path):
    model = open_gates(tiny_adapted_model())
    config = TrainConfig(out=str(tmp_path), batch_tokens=64, lr=0.1, weight_decay=0.5, warmup_steps=0,
                         progress=False)
    trainer = Trainer(model, toy_examples(24), [], config)
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, optimized)) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(optimized) == 4  # prompts and gates of two layers; no frozen base weight
    before = adapter_state(model)
    for _, p in trainer.params:  # zero gradients: AdamW's only change is the decoupled decay
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    after = adapter_state(model)
    for name in before:
        if name.endswith("prompt"):
            torch.testing.assert_close(after[name], before[name] * (1 - 0.1 * 0.5))
        else:
            assert name.endswith("gate") and torch.equal(after[name], before[name]), name


#: The data file and settings the resumed run records in its checkpoint (``TrainConfig.fingerprint``).
RESUMED_DATA = {"path": "/data/a.json", "size": 100, "sha256_head": "ab" * 32}
RESUMED_FINGERPRINT = {"data": RESUMED_DATA, "max_seq_len": 64, "eval_fraction": 0.1, "prompt_len": 3,
                       "adapter_layers": [2, 3]}
EXAMPLES_DIFFER = ("the {} examples differ (tokens or labels: other data, tokenizer, max_seq_len, eval_fraction, "
                   "on_bad_row or seed)")


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """``(config, checkpoint)``: a 2-step run of the tiny model on ``toy_examples(20)`` (the last 2 held out)
    that records :data:`RESUMED_FINGERPRINT`, and its checkpoint of step 2 (read only by the tests)."""
    out = tmp_path_factory.mktemp("resumable")
    config = TrainConfig(out=str(out), batch_tokens=96, max_steps=2, save_every=2, keep_checkpoints=0,
                         progress=False, fingerprint=RESUMED_FINGERPRINT)
    examples = toy_examples(20)
    train(tiny_adapted_model(), examples[:18], examples[18:], config)
    return config, str(out / "checkpoints" / "step_000002.pt")


def _resume(resumable, out, examples=None, fingerprint=None, **settings):
    """Resume ``resumable``'s checkpoint into ``out`` to step 3, on ``examples`` (default: the same), with
    ``settings`` and the ``fingerprint`` keys changed."""
    config, checkpoint = resumable
    examples = toy_examples(20) if examples is None else examples
    other = TrainConfig(**{**config.__dict__, "out": str(out), "max_steps": 3, **settings,
                           "fingerprint": {**RESUMED_FINGERPRINT, **(fingerprint or {})}})
    return train(tiny_adapted_model(), examples[:18], examples[18:], other, resume=checkpoint)


def _swapped_examples():
    examples = toy_examples(20)
    return [examples[1], examples[0], *examples[2:]]


@pytest.mark.parametrize("change, differences", [
    # TrainConfig settings (the README says changed settings are refused). The last four were accepted before (the
    # scheduler's state silently kept the old warmup and floor).
    (dict(lr=1e-2), ["lr=0.02, this run has lr=0.01"]),
    (dict(batch_tokens=128), ["batch_tokens=96, this run has batch_tokens=128"]),
    (dict(seed=1), ["seed=0, this run has seed=1"]),
    (dict(weight_decay=0.5), ["weight_decay=0.02, this run has weight_decay=0.5"]),
    (dict(grad_accum=2), ["1 rows per step (grad_accum × world size), this run takes 2"]),
    (dict(warmup_steps=3), ["warmup_steps=10, this run has warmup_steps=3"]),
    (dict(min_lr_ratio=0.5), ["min_lr_ratio=0.1, this run has min_lr_ratio=0.5"]),
    (dict(grad_clip=0.5), ["grad_clip=1.0, this run has grad_clip=0.5"]),
    (dict(dtype="bf16"), ["dtype=fp32, this run has dtype=bf16"]),
    # The caller's fingerprint: a file is described, other values are shown.
    (dict(fingerprint={"adapter_layers": [3]}), ["adapter_layers=[2, 3], this run has adapter_layers=[3]"]),
    (dict(fingerprint={"max_seq_len": 48}), ["max_seq_len=64, this run has max_seq_len=48"]),
    (dict(fingerprint={"eval_fraction": 0.2}), ["eval_fraction=0.1, this run has eval_fraction=0.2"]),
    (dict(fingerprint={"data": {**RESUMED_DATA, "size": 120, "sha256_head": "cd" * 32}}),
     ["data file /data/a.json (100 bytes, sha256 of its head abababababab…), this run's is /data/a.json "
      "(120 bytes, sha256 of its head cdcdcdcdcdcd…)"]),
    # The examples alone (another tokenizer, say) are caught without any fingerprint.
    (dict(examples=_swapped_examples()), [EXAMPLES_DIFFER.format("training")]),
    (dict(examples=toy_examples(20, seed=1)), [EXAMPLES_DIFFER.format("training and the eval")]),
    # Every difference at once, one line each: the settings, the fingerprint's keys in order, the examples.
    (dict(examples=toy_examples(20, seed=1), lr=1e-2,
          fingerprint={"data": {**RESUMED_DATA, "size": 120, "sha256_head": "cd" * 32}, "max_seq_len": 48,
                       "eval_fraction": 0.2, "adapter_layers": [3]}),
     ["lr=0.02, this run has lr=0.01",
      "adapter_layers=[2, 3], this run has adapter_layers=[3]",
      "data file /data/a.json (100 bytes, sha256 of its head abababababab…), this run's is /data/a.json "
      "(120 bytes, sha256 of its head cdcdcdcdcdcd…)",
      "eval_fraction=0.1, this run has eval_fraction=0.2",
      "max_seq_len=64, this run has max_seq_len=48",
      EXAMPLES_DIFFER.format("training and the eval")]),
], ids=["lr", "batch_tokens", "seed", "weight_decay", "grad_accum", "warmup_steps", "min_lr_ratio", "grad_clip",
        "dtype", "adapter_layers", "max_seq_len", "eval_fraction", "data", "training-examples", "all-examples",
        "everything"])
def test_resume_refuses_a_checkpoint_of_other_data_or_settings(resumable, tmp_path, change, differences):
    """The refusal lists every difference in the library's words (the CLI's rendering as flags:
    test_cli_resume_refuses_other_data_and_lists_the_differences), and nothing of the run folder is touched."""
    _, checkpoint = resumable
    with pytest.raises(ValueError) as refused:
        _resume(resumable, tmp_path / "run", **change)
    assert str(refused.value).splitlines() == [
        f"{checkpoint} was made with other data or settings, so resuming it would not continue the same run:",
        *(f"  {line}" for line in differences),
        "resume with the checkpoint's data and settings, or start a new run in another out folder"]
    assert refused.value.settings == ("out",)
    assert not (tmp_path / "run").exists()


def test_resume_continues_a_checkpoint_of_the_same_data_moved_or_fingerprinted_more(resumable, tmp_path):
    """The checkpoint records the fingerprint; the same file moved elsewhere is the same data, and keys an older
    checkpoint did not record are not compared."""
    config, checkpoint = resumable
    assert load_checkpoint(checkpoint)["config"]["fingerprint"] == RESUMED_FINGERPRINT
    assert _resume(resumable, tmp_path / "run", fingerprint={"data": {**RESUMED_DATA, "path": "/elsewhere/a.json"},
                                                             "tokenizer": "new"}).steps == 3


@contextlib.contextmanager
def signals_fail_the_test():
    """While active, SIGINT/SIGTERM that reach the default handlers fail the test instead of ending pytest."""
    def fail(signum, frame):
        raise AssertionError(f"signal {signum} was not caught by the training loop")
    previous = {signum: signal.signal(signum, fail) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_the_step0_eval_saves_a_step0_checkpoint(tmp_path, signum):
    examples = toy_examples(24)
    train_examples, eval_examples = examples[:16], examples[16:]
    assert len(pack_examples([len(e) for e in eval_examples], 64)) > 1
    settings = dict(batch_tokens=64, max_steps=4, warmup_steps=1, eval_every=0, save_every=0, keep_checkpoints=0,
                    progress=False)
    model = tiny_adapted_model()
    evaluated = []

    def signal_in_eval(module, args, out):
        if not module.training:
            evaluated.append(len(evaluated))
            if len(evaluated) == 1:
                os.kill(os.getpid(), signum)

    handle = model.register_forward_hook(signal_in_eval)
    saved = []
    with signals_fail_the_test():
        result = train(model, train_examples, eval_examples, TrainConfig(out=str(tmp_path / "run"), **settings),
                       save_adapter_fn=lambda m, p: saved.append(p))
    handle.remove()
    assert (result.interrupted_by, result.steps, result.initial_eval_loss) == (signum, 0, None)
    assert evaluated == [0]  # the evaluation stopped at its next packed row
    (step, path), = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert step == 0 and load_checkpoint(path)["step"] == 0
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not saved  # no step-0 line, no adapter
    # Resuming from the step-0 checkpoint evaluates step 0 again and ends where an uninterrupted run ends.
    resumed = tiny_adapted_model()
    result = train(resumed, train_examples, eval_examples, TrainConfig(out=str(tmp_path / "run"), **settings),
                   resume=path)
    assert result.steps == 4 and result.initial_eval_loss is not None
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(5))
    plain = tiny_adapted_model()
    train(plain, train_examples, eval_examples, TrainConfig(out=str(tmp_path / "plain"), **settings))
    assert read_metrics(tmp_path / "plain")[0] == read_metrics(tmp_path / "run")[0]
    for name, value in adapter_state(plain).items():
        assert torch.equal(adapter_state(resumed)[name], value), name


def test_cli_user_errors_print_a_message_and_exit_2(tmp_path, shared_data, capsys, monkeypatch):
    missing = tmp_path / "nope.json"
    assert cli_main(stories_train_args(shared_data, missing, tmp_path / "run")) == 2
    assert capsys.readouterr().err == f"fastadapter train: error: data file not found: {missing}\n"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    assert cli_main(stories_train_args(shared_data, broken, tmp_path / "run", "--on-bad-row", "error")) == 2
    assert "error: " in capsys.readouterr().err.splitlines()[-1]
    data = shared_data / "alpaca_tiny.json"
    assert cli_main(stories_train_args(shared_data, data, tmp_path / "run", "--eval-fraction", "1.5")) == 2
    assert capsys.readouterr().err == "fastadapter train: error: --eval-fraction must lie in [0, 1), got 1.5\n"
    assert cli_main(stories_train_args(shared_data, data, tmp_path / "fresh", "--resume")) == 2
    assert "error: --resume " in capsys.readouterr().err and not (tmp_path / "fresh").exists()
    # A ValueError that no check of fastadapter raised is a bug: it keeps its traceback.
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="invalid literal for int"):
        cli_main(stories_train_args(shared_data, data, tmp_path / "run"))


def test_user_errors_are_fastadapter_checks_or_missing_files(tmp_path):
    from fastadapter.training.data import split_examples

    def caught(function, *args):
        try:
            function(*args)
        except Exception as exc:  # noqa: BLE001 - the test classifies whatever it gets
            return exc
        raise AssertionError("no exception")

    assert is_user_error(caught(split_examples, [], 2.0, 0))  # raised by a check of fastadapter
    assert is_user_error(caught(open, tmp_path / "nope"))  # the OS names the missing file
    assert not is_user_error(caught(int, "x"))  # not raised by fastadapter
    assert not is_user_error(caught(lambda: [][1]))  # not a ValueError


def test_cli_resume_refuses_other_data_and_lists_the_differences(tmp_path, shared_data, capsys):
    """The CLI's fingerprint of a real data file and its flags, and the refusal rendered as one error with the
    settings named by their flags (each difference line: test_resume_refuses_a_checkpoint_of_other_data_or_settings);
    the same data copied elsewhere resumes."""
    rows = json.loads((shared_data / "alpaca_tiny.json").read_text())
    first, other = tmp_path / "first.json", tmp_path / "other.json"
    first.write_text(json.dumps(rows[:40]))
    other.write_text(json.dumps(rows[40:80]))
    settings = ["--max-steps", "1", "--batch-tokens", "1024", "--max-seq-len", "256", "--eval-fraction", "0.05"]
    assert cli_main(stories_train_args(shared_data, first, tmp_path / "run", *settings)) == 0
    capsys.readouterr()
    changed = ["--max-steps", "2", "--batch-tokens", "1024", "--max-seq-len", "200", "--eval-fraction", "0.1"]
    assert cli_main(stories_train_args(shared_data, other, tmp_path / "run", *changed, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastadapter train: error: ") and "was made with other data or settings" in err
    assert f"data file {first} (" in err and f"this run's is {other} (" in err
    assert "max_seq_len=256, this run has max_seq_len=200" in err
    assert "eval_fraction=0.05, this run has eval_fraction=0.1" in err
    assert err.splitlines()[-2:] == [
        "  the training and the eval examples differ (tokens or labels: other data, tokenizer, --max-seq-len, "
        "--eval-fraction, --on-bad-row or --seed)",
        "resume with the checkpoint's data and settings, or start a new run in another --out folder"]
    # The same data copied elsewhere, with the same settings: resumed.
    moved = tmp_path / "moved.json"
    shutil.copy(first, moved)
    assert cli_main(stories_train_args(shared_data, moved, tmp_path / "run", *settings[:1], "2", *settings[2:],
                                       "--resume")) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_acceptance_train_on_alpaca_then_generate(tmp_path, shared_data, capsys):
    """The real pipeline, short: stories260K on alpaca_en_demo.json learns (eval loss below step 0's), writes its
    adapter and metrics, and `fastadapter generate` prompts the adapter through the Alpaca template."""
    out = tmp_path / "run"
    assert cli_main(stories_train_args(shared_data, shared_data / "alpaca_en_demo.json", out, "--max-steps", "12",
                                       "--warmup", "3", "--batch-tokens", "2048", "--max-seq-len", "256",
                                       "--eval-fraction", "0.02", "--eval-every", "6", "--save-every", "0")) == 0
    printed = capsys.readouterr().out
    assert "999 rows" in printed and "done: 12 steps" in printed
    assert (out / "adapter.safetensors").is_file()
    metrics = read_metrics(out)
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    assert [step for step, _ in evals] == [0, 6, 12]
    assert evals[-1][1] < evals[0][1] - 0.05, evals
    generate = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
                str(shared_data / "tok512.bin"), "--prompt", "Give three tips for staying healthy.",
                "--template", "alpaca", "--max-new-tokens", "24"]
    assert cli_main(generate + ["--adapter", str(out / "adapter.safetensors")]) == 0
    adapted = capsys.readouterr().out
    assert cli_main(generate) == 0
    assert adapted.strip() and adapted != capsys.readouterr().out


def test_an_over_long_example_is_reported_by_its_row_in_the_file(tmp_path):
    """pack_examples said "example 5" — its index after the epoch's shuffle, which no user can find."""
    examples = [Example(e.tokens, e.labels, row=10 + i) for i, e in enumerate(toy_examples(12))]
    long = max(examples, key=len)
    config = TrainConfig(out=str(tmp_path), batch_tokens=len(long) - 1, max_steps=1, progress=False)
    with pytest.raises(SettingError, match=f"data row {long.row} has {len(long)} tokens, more than a packed row "
                                           f"holds \\(batch_tokens {len(long) - 1}\\)") as caught:
        Trainer(tiny_adapted_model(), examples, [], config)
    # The library names its settings; the CLI renders them as flags.
    assert caught.value.settings == ("batch_tokens", "max_seq_len")
    assert caught.value.render(flag_of).endswith("raise --batch-tokens to at least --max-seq-len")


def test_a_diverging_run_stops_without_saving_a_nan_adapter(tmp_path):
    """lr 1e30: AdamW's first step moves every value by ~1e30 (still finite), the second makes the adapter
    inf/NaN. The run used to go on and finish "done" with an all-NaN adapter.safetensors; now it raises naming the
    step and the last good checkpoint, saves nothing of the diverged state, and writes no adapter."""
    from fastadapter.training.trainer import TrainingDiverged

    examples = toy_examples(16)
    saved = []
    good = TrainConfig(out=str(tmp_path), batch_tokens=64, max_steps=4, warmup_steps=0, save_every=1,
                       progress=False)
    huge = TrainConfig(**{**good.__dict__, "lr": 1e30})
    with pytest.raises(TrainingDiverged, match="training diverged: step 2 made .* NaN or infinite .*the last "
                                               "checkpoint, .*step_000001.pt, holds the adapter of step 1"):
        train(open_gates(tiny_adapted_model()), examples, [], huge,
              save_adapter_fn=lambda model, path: saved.append(path))
    assert saved == [] and [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert read_metrics(tmp_path)[-1]["step"] == 1
    # A NaN loss (the model, not the adapter, broken) is caught before the step touches the adapter.
    model = open_gates(tiny_adapted_model())
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    trainer = Trainer(model, examples, [], good)
    before = adapter_state(model)
    with pytest.raises(TrainingDiverged, match="the training loss of step 1 is nan"):
        trainer.train_step()
    assert all(torch.equal(before[n], p) for n, p in adapter_state(model).items())


@pytest.mark.parametrize("settings, message", [
    ({"lr": float("inf")}, "lr must be a finite number"), ({"lr": float("nan")}, "lr must be a finite number"),
    ({"min_lr_ratio": -5}, r"min_lr_ratio must lie in \[0, 1\]"), ({"min_lr_ratio": 5}, r"min_lr_ratio must lie"),
    ({"grad_clip": float("nan")}, "grad_clip must be a finite number"), ({"warmup_steps": -1}, "warmup_steps >= 0"),
    ({"save_every": -1}, "save_every must be >= 0"), ({"keep_checkpoints": -2}, "keep_checkpoints must be >= 0"),
])
def test_train_config_refuses_bad_optimiser_settings(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out=str(tmp_path), **settings)
