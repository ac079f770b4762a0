"""Data parallelism: two gloo processes on loopback follow the same loss curve, and reach the same adapter, as
one process accumulating the same global batch."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastadapter.training.checkpoint import list_checkpoints, load_checkpoint
from fastadapter.training.distributed import DistributedContext
from fastadapter.training.trainer import TrainConfig, train
from training_runs import tiny_adapted_model, toy_examples

STEPS = 4


def _config(out: str, grad_accum: int) -> TrainConfig:
    return TrainConfig(out=out, batch_tokens=64, grad_accum=grad_accum, max_steps=STEPS, lr=3e-2, warmup_steps=1,
                       eval_every=2, save_every=0, progress=False)


def _data():
    examples = toy_examples(30)
    return examples[:26], examples[26:]


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        train_examples, eval_examples = _data()
        context = DistributedContext(rank=rank, world_size=world_size, device=torch.device("cpu"))
        train(tiny_adapted_model(), train_examples, eval_examples, _config(out, grad_accum=1), context=context)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out) -> list[tuple]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m.get("loss"), m.get("eval_loss"), m["tokens"]) for m in map(json.loads, f)]


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    mp.spawn(_rank_main, args=(2, _free_port(), double), nprocs=2, join=True)
    train_examples, eval_examples = _data()
    train(tiny_adapted_model(), train_examples, eval_examples, _config(single, grad_accum=2))

    one, two = _losses(single), _losses(double)
    assert [row[0] for row in one] == [row[0] for row in two] == list(range(STEPS + 1))
    for a, b in zip(one, two):
        assert a[3] == b[3]  # the same real tokens per step: the ranks split the global batch, no row twice
        for x, y in zip(a[1:3], b[1:3]):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) < 1e-5 * max(1.0, abs(x)), (a, b)
    (_, single_path), = list_checkpoints(os.path.join(single, "checkpoints"))
    (_, double_path), = list_checkpoints(os.path.join(double, "checkpoints"))
    single_state, double_state = load_checkpoint(single_path), load_checkpoint(double_path)
    assert double_state["world_size"] == 2 and single_state["world_size"] == 1
    for name, tensor in single_state["adapter"].items():
        torch.testing.assert_close(double_state["adapter"][name], tensor, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in single_state["adapter"].items() if "gate" in n)
