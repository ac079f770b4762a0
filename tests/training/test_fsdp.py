"""FSDP2 on CPU (gloo, 2 processes): the sharded frozen base trains the same adapter as one process with the same
global batch, each rank holds about half of the base, the checkpoint loader never builds the whole base, and
``fastadapter train --fsdp`` checkpoints, resumes and writes one adapter that loads into the unsharded model.

Tolerances: the losses agree to 1e-5 (relative) and the adapters to rtol 1e-4 / atol 1e-6 — fp32 everywhere, the
only difference being the order in which the two ranks' gradient sums and the sharded matmuls are added up."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastadapter.cli import main as cli_main
from fastadapter.adapters.adapter import load_adapter
from fastadapter.loaders.checkpoints import load_model
from fastadapter.training.checkpoint import list_checkpoints, load_checkpoint
from fastadapter.training.distributed import DistributedContext
from fastadapter.training.trainer import TrainConfig, train
from training_runs import stories_train_args, tiny_adapted_model, toy_examples

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out: str, grad_accum: int) -> TrainConfig:
    return TrainConfig(out=out, batch_tokens=64, grad_accum=grad_accum, max_steps=STEPS, lr=3e-2, warmup_steps=1,
                       eval_every=2, save_every=0, progress=False)


def _data():
    examples = toy_examples(31)
    return examples[:26], examples[26:]  # 5 eval examples: an odd number of packed eval rows for 2 ranks


def _join(rank: int, world_size: int, port: int) -> DistributedContext:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    return DistributedContext(rank=rank, world_size=world_size, device=torch.device("cpu"))


def _sharded_rank(rank: int, world_size: int, port: int, out: str, checkpoint: str) -> None:
    from torch.distributed.tensor import DTensor

    from fastadapter.training.load_sharded import load_sharded
    from fastadapter.training.fsdp import resident_base_bytes, shard_base

    context = _join(rank, world_size, port)
    try:
        # The checkpoint loader: meta device, then this rank's rows of each memory-mapped tensor.
        loaded = load_sharded(checkpoint, context, dtype=torch.bfloat16)
        local, total = resident_base_bytes(loaded)
        gathered = {name: p.full_tensor() for name, p in loaded.named_parameters()}
        if rank == 0:
            torch.save({"gathered": gathered, "local": local, "total": total,
                        "dtypes": sorted({str(p.dtype) for p in loaded.parameters()})},
                       os.path.join(out, "loaded.pt"))
        del loaded, gathered

        model = tiny_adapted_model()
        model.activation_checkpointing = True
        shard_base(model, context)
        local, total = resident_base_bytes(model)
        base = [p for p in model.parameters() if not p.requires_grad]
        facts = {"local": local, "total": total, "all_dtensor": all(isinstance(p, DTensor) for p in base),
                 "adapter_plain": all(not isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)}
        train_examples, eval_examples = _data()
        train(model, train_examples, eval_examples, _config(out, grad_accum=1), context=context)
        # No gradient was ever allocated for a frozen weight.
        facts["base_grads"] = sum(p.grad is not None for p in base)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(facts, f)
    finally:
        dist.destroy_process_group()


def _losses(out) -> list[tuple]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m.get("loss"), m.get("eval_loss"), m["tokens"]) for m in map(json.loads, f)]


def _final_adapter(out) -> dict:
    (_, path), = list_checkpoints(os.path.join(out, "checkpoints"))
    return load_checkpoint(path)["adapter"]


@pytest.mark.slow  # two processes that import torch and fastadapter: ~20 s each on a busy 2-core machine
def test_sharded_base_trains_like_one_process_and_holds_half_the_base_per_rank(tmp_path, shared_data):
    """shard_base on a tiny model: the losses and adapter of 2 ranks vs 1 process with --grad-accum 2, and half
    the base per rank; load_sharded of stories260K: every rank's rows gathered back equal load_model's."""
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    os.makedirs(sharded)
    checkpoint = str(shared_data / "stories260K.bin")
    mp.spawn(_sharded_rank, args=(2, _free_port(), sharded, checkpoint), nprocs=2, join=True)

    result = torch.load(os.path.join(sharded, "loaded.pt"))
    reference = load_model(checkpoint, dtype=torch.bfloat16)
    assert result["dtypes"] == ["torch.bfloat16"]
    for name, tensor in reference.named_parameters():
        assert torch.equal(result["gathered"][name], tensor.detach()), name
    whole = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert result["total"] == whole and abs(result["local"] / whole - 0.5) < 0.02, result["local"] / whole

    train_examples, eval_examples = _data()
    train(tiny_adapted_model(), train_examples, eval_examples, _config(single, grad_accum=2))

    one, two = _losses(single), _losses(sharded)
    assert [row[0] for row in one] == [row[0] for row in two] == list(range(STEPS + 1))
    for a, b in zip(one, two):
        assert a[3] == b[3]
        for x, y in zip(a[1:3], b[1:3]):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) < 1e-5 * max(1.0, abs(x)), (a, b)
    single_adapter, sharded_adapter = _final_adapter(single), _final_adapter(sharded)
    for name, tensor in single_adapter.items():
        torch.testing.assert_close(sharded_adapter[name], tensor, rtol=1e-4, atol=1e-6)
    assert any(t.abs().max() > 0 for n, t in single_adapter.items() if "gate" in n)  # it did learn

    whole = sum(p.numel() * p.element_size() for p in tiny_adapted_model().parameters() if not p.requires_grad)
    for rank in range(2):
        with open(os.path.join(sharded, f"rank{rank}.json")) as f:
            facts = json.load(f)
        assert facts["all_dtensor"] and facts["adapter_plain"] and facts["base_grads"] == 0
        assert facts["total"] == whole
        # Each rank's shards, measured from its local tensors: half of the base (rows split as torch.chunk does,
        # so a rank may hold a row more or less of an odd-sized tensor).
        assert abs(facts["local"] / whole - 0.5) < 0.02, facts


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone (FSDP's code paths without spawning processes)."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_one_rank_fsdp_loads_and_trains_like_the_plain_model(tmp_path, shared_data, one_rank_group):
    """The default run's FSDP check (one rank): load_sharded builds the model the plain loader does, and a
    training step with evaluation under FSDP reaches the plain model's adapter."""
    from fastadapter.adapters.adapter import AdapterConfig, add_adapter
    from fastadapter.training.load_sharded import load_sharded

    checkpoint = str(shared_data / "stories260K.bin")
    examples = toy_examples(15)
    config = dict(batch_tokens=64, max_steps=1, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0,
                  progress=False)
    adapters = []
    for sharded in (True, False):
        model = load_sharded(checkpoint, one_rank_group) if sharded else load_model(checkpoint)
        torch.manual_seed(0)
        add_adapter(model, AdapterConfig(prompt_len=4, layers=3))
        if sharded:
            assert all(type(p).__name__ == "DTensor" for p in model.parameters() if not p.requires_grad)
        out = str(tmp_path / ("sharded" if sharded else "plain"))
        train(model, examples[:12], examples[12:15], TrainConfig(out=out, **config),
              context=one_rank_group if sharded else None)
        adapters.append(_final_adapter(out))
    for name, tensor in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], tensor, rtol=1e-5, atol=1e-7)
    assert all(t.abs().max() > 0 for n, t in adapters[0].items() if "gate" in n)  # the step moved the gates


def test_shard_base_refuses_bad_input():
    from fastadapter.training.fsdp import shard_base, shard_rows

    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        shard_base(tiny_adapted_model(), DistributedContext())
    assert [shard_rows(97, 2, r) for r in range(2)] == [(0, 49), (49, 97)]
    assert [shard_rows(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]


def test_cli_fsdp_needs_torchrun_and_refuses_quantize(tmp_path, shared_data, capsys):
    data = shared_data / "alpaca_tiny.json"
    assert cli_main(stories_train_args(shared_data, data, tmp_path / "a", "--fsdp", "--max-steps", "1")) == 2
    assert "--fsdp shards the base over the ranks of a torchrun job" in capsys.readouterr().err
    assert cli_main(stories_train_args(shared_data, data, tmp_path / "b", "--fsdp", "--quantize", "int8")) == 2
    assert "--fsdp and --quantize int8 cannot be combined" in capsys.readouterr().err


def _cli_rank(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        code = cli_main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if code != 0:
        raise SystemExit(code)


@pytest.mark.slow
def test_cli_fsdp_checkpoints_resumes_and_writes_one_loadable_adapter(tmp_path, shared_data):
    """``--fsdp`` under 2 ranks (packing, activation checkpointing): 2 steps, then --resume to 4, equals one
    process with --grad-accum 2 run straight to 4 steps; the adapter loads into the unsharded base."""
    data = shared_data / "alpaca_tiny.json"
    common = ["--batch-tokens", "512", "--eval-every", "2", "--save-every", "2", "--warmup", "1", "--lr", "1e-2"]
    sharded = tmp_path / "sharded"
    first = stories_train_args(shared_data, data, sharded, "--fsdp", "--activation-checkpointing", "--max-steps",
                               "4", *common)
    # A run cut at step 2 (a run of 4 steps whose checkpoint of step 2 is resumed after deleting the rest).
    mp.spawn(_cli_rank, args=(2, _free_port(), first), nprocs=2, join=True)
    checkpoints = list_checkpoints(str(sharded / "checkpoints"))
    assert [step for step, _ in checkpoints] == [2, 4]
    final = load_checkpoint(checkpoints[-1][1])
    assert set(final) >= {"adapter", "optimizer"} and all("adapter" in n for n in final["adapter"])
    os.remove(checkpoints[-1][1])
    (sharded / "adapter.safetensors").unlink()
    mp.spawn(_cli_rank, args=(2, _free_port(), first + ["--resume"]), nprocs=2, join=True)
    resumed = load_checkpoint(list_checkpoints(str(sharded / "checkpoints"))[-1][1])["adapter"]
    for name, tensor in final["adapter"].items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7)

    single = tmp_path / "single"
    assert cli_main(stories_train_args(shared_data, data, single, "--grad-accum", "2", "--max-steps", "4",
                                       *common)) == 0
    plain = load_checkpoint(list_checkpoints(str(single / "checkpoints"))[-1][1])["adapter"]
    for name, tensor in plain.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6)
    one, two = _losses(single), _losses(sharded)
    assert [r[0] for r in one] == [r[0] for r in two]
    for a, b in zip(one, two):
        for x, y in zip(a[1:3], b[1:3]):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-5 * max(1.0, abs(x))), (a, b)
    # One adapter file, written by rank 0, whose base fingerprint is the unsharded model's.
    assert sorted(p.name for p in sharded.iterdir() if p.suffix == ".safetensors") == ["adapter.safetensors"]
    model = load_adapter(load_model(str(shared_data / "stories260K.bin")), sharded / "adapter.safetensors")
    assert model.adapter_config is not None
