"""The training loop: LR schedule, backward stopping at the lowest adapted layer, metrics, mixed precision,
activation checkpointing, exact resume, and a checkpoint on SIGTERM/SIGINT (a real ``fastadapter train``
process)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastadapter.model import AdapterConfig, LlamaConfig, LlamaModel, add_adapter
from fastadapter.training.checkpoint import (CheckpointNotFound, list_checkpoints, load_checkpoint, resolve_resume,
                                            save_checkpoint)
from fastadapter.training.data import IGNORE_INDEX, Example
from fastadapter.training.packing import collate_packed
from fastadapter.training.schedule import warmup_cosine
from fastadapter.training.trainer import TrainConfig, token_loss_sum, train

TINY = LlamaConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=48, hidden_dim=64, max_seq_len=64)


def tiny_adapted_model(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A random 4-layer LLaMA in ``dtype`` with an fp32 adapter on its top ``layers`` layers (same weights for
    the same seed)."""
    torch.manual_seed(seed)
    return add_adapter(LlamaModel(TINY).to(dtype), AdapterConfig(prompt_len=3, layers=layers))


def toy_examples(count: int, seed: int = 0) -> list[Example]:
    """``count`` examples of 6..40 tokens: a random prompt, then a response of token 7s (learnable by a prompt
    on a random model: it only has to shift every response position's logits towards one token)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(6, 41, (1,), generator=g))
        prompt = int(torch.randint(2, n - 1, (1,), generator=g))
        tokens = [1] + torch.randint(3, TINY.vocab_size, (n - 1,), generator=g).tolist()
        tokens[prompt:] = [7] * (n - prompt)
        labels = [IGNORE_INDEX] * (prompt - 1) + tokens[prompt:] + [2]
        examples.append(Example(tuple(tokens), tuple(labels)))
    return examples


def adapter_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def read_metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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


def test_resume_refuses_other_data_settings(tmp_path):
    examples = toy_examples(20)
    config = TrainConfig(out=str(tmp_path), batch_tokens=96, max_steps=2, save_every=2, progress=False)
    train(tiny_adapted_model(), examples, [], config)
    other = TrainConfig(out=str(tmp_path), batch_tokens=128, max_steps=4, progress=False)
    with pytest.raises(ValueError, match="batch_tokens=96, this run has batch_tokens=128"):
        train(tiny_adapted_model(), examples, [], other, resume=str(tmp_path / "checkpoints" / "step_000002.pt"))


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
        deadline = time.monotonic() + 120
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
