"""``return_freed_memory_to_os``: with glibc's thresholds pinned, every large block is a mapping of its own (given
back when freed); with glibc's defaults, after one large free, such blocks come from the heap."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fastadapter.training import trainer as trainer_module

#: A fresh process (the setting is process-wide): malloc and free a 4 MiB block (which raises glibc's dynamic mmap
#: threshold above it), then count whether a 1 MiB block gets a mapping of its own (mallinfo2's ``hblks``): only a
#: mapped block goes back to the system when freed.
_MAPPED = r"""
import ctypes, sys
from fastadapter.training.host_memory import return_freed_memory_to_os
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
if sys.argv[1] == "pinned":
    assert return_freed_memory_to_os()
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _mapped(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _MAPPED, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_pinned_thresholds_map_every_large_block():
    assert _mapped("default") == 0  # glibc's own rule: the block lands in the heap, where freeing keeps it
    assert _mapped("pinned") == 1


def test_the_trainer_pins_them_only_when_asked(monkeypatch, tmp_path, tiny_config):
    from fastadapter import AdapterConfig, add_adapter
    from fastadapter.model.llama import LlamaModel
    from fastadapter.training.data import Example
    from fastadapter.training.trainer import TrainConfig, Trainer

    calls = []
    monkeypatch.setattr(trainer_module, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    model = LlamaModel(tiny_config)
    add_adapter(model, AdapterConfig(prompt_len=2, layers=1))
    examples = [Example(tokens=(1, 2, 3, 4), labels=(2, 3, 4, -100))]
    Trainer(model, examples, [], TrainConfig(out=str(tmp_path / "a"), batch_tokens=16, progress=False))
    assert calls == []  # off by default: it trades step time for memory
    Trainer(model, examples, [], TrainConfig(out=str(tmp_path / "b"), batch_tokens=16, progress=False,
                                             return_memory_to_os=True))
    assert calls == [1]
