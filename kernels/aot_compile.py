"""Ahead-of-time compilation of every kernel for real GPUs, without one: registers, spills, shared memory.

:func:`compile_report` compiles each kernel in each configuration its autotuner may pick (after pruning) at
LLaMA-7B shapes (``Hq = Hkv = 32``, ``D = 128``, ``P = 10``, ``S = 512`` and ``2048``, bf16) for each requested
architecture with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, then reads the cubin
with the tools inside the triton wheel: ``cuobjdump --dump-resource-usage`` (registers, stack, local and
static shared memory) and ``cuobjdump -sass`` (tensor-core ``HMMA``/``HGMMA`` instructions, local-memory
``LDL``/``STL`` traffic that spilling would cause).

The launch arguments are built by the same host code as a real launch, on ``meta`` tensors, so the compiled
specialisation (pointer alignment, integers equal to 1 or divisible by 16) is the one a GPU run would get.

:func:`compile_code_paths` compiles the branches those shapes do not take (varlen, fp16, padded head dims, no
prefix, non-causal...) so that a kernel change the interpreter accepts but the compiler rejects is caught.

Compilation needs ``@triton.jit`` functions; under ``TRITON_INTERPRET=1`` (the tests) the kernels are
interpreted Python functions instead, so the report is then produced by a child process with the interpreter
off (``python -m fastadapter.kernels.report --json``). Results are cached in-process.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable

import torch
import triton

from fastadapter._inputs import AttentionInputs

from . import configs as _configs
from ._interpreter import interpreting
from .layout import Layout

#: LLaMA-7B attention: 32 heads of 128, the paper's prompt of 10 tokens, bf16.
LLAMA_7B = dict(batch=4, heads=32, head_dim=128, prefix_len=10, dtype=torch.bfloat16)
SEQLENS = (512, 2048)
TENSOR_CORE_MNEMONICS = ("HGMMA", "HMMA")

_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                    torch.int64: "i64"}


def _nvidia_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in the triton wheel (expected {path})")
    return path


def parse_arch(arch: str) -> int:
    """``"sm_80"`` -> 80."""
    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if not match:
        raise ValueError(f"architecture must look like 'sm_80' or 'sm_90', got {arch!r}")
    return int(match.group(1))


def _llama7b_inputs(seqlen: int) -> AttentionInputs:
    """LLaMA-7B shaped inputs on the ``meta`` device (no memory, no GPU)."""
    b, h, d, p, dtype = (LLAMA_7B[k] for k in ("batch", "heads", "head_dim", "prefix_len", "dtype"))
    meta = dict(device="meta", dtype=dtype)
    return AttentionInputs(q=torch.empty(b, seqlen, h, d, **meta), k=torch.empty(b, seqlen, h, d, **meta),
                           v=torch.empty(b, seqlen, h, d, **meta), prefix_k=torch.empty(1, p, h, d, **meta),
                           prefix_v=torch.empty(1, p, h, d, **meta),
                           gate=torch.empty(1, h, device="meta", dtype=torch.float32), causal=True,
                           softmax_scale=d ** -0.5, gate_tanh=True)


def _code_path_inputs(name: str) -> AttentionInputs:
    """Inputs that take the branches the LLaMA-7B report does not (see :data:`CODE_PATHS`)."""
    if name == "varlen-fp16-D72-P0-full-GQA":  # padded head dim, no prefix, no causal mask, 2 heads per kv head
        meta = dict(device="meta", dtype=torch.float16)
        q, kv, prefix = torch.empty(300, 8, 72, **meta), torch.empty(300, 4, 72, **meta), torch.empty(1, 0, 4, 72, **meta)
        return AttentionInputs(q=q, k=kv, v=kv, prefix_k=prefix, prefix_v=prefix,
                               gate=torch.empty(1, 8, device="meta"), causal=False, softmax_scale=0.1,
                               gate_tanh=True, cu_seqlens=torch.empty(4, device="meta", dtype=torch.int32),
                               max_seqlen=150)
    if name == "strided-bf16-D64-P64-Sq<Sk-per-sample-prompt-raw-gate":  # largest prefix tile, bhsd views
        meta = dict(device="meta", dtype=torch.bfloat16)
        q = torch.empty(2, 4, 97, 64, **meta).transpose(1, 2)
        kv = torch.empty(2, 2, 200, 64, **meta).transpose(1, 2)
        prefix = torch.empty(2, 64, 2, 64, **meta)
        return AttentionInputs(q=q, k=kv, v=kv, prefix_k=prefix, prefix_v=prefix,
                               gate=torch.empty(2, 4, device="meta"), causal=True, softmax_scale=0.125,
                               gate_tanh=False)
    raise ValueError(f"unknown code path {name!r}; known: {CODE_PATHS}")


#: Input families compiled by :func:`compile_code_paths`, beyond the LLaMA-7B shapes.
CODE_PATHS = ("varlen-fp16-D72-P0-full-GQA", "strided-bf16-D64-P64-Sq<Sk-per-sample-prompt-raw-gate")


def _inputs(shape: str) -> AttentionInputs:
    """The inputs named ``shape``: ``"llama7b-S<seqlen>"`` or one of :data:`CODE_PATHS`."""
    if shape.startswith("llama7b-S"):
        return _llama7b_inputs(int(shape[len("llama7b-S"):]))
    return _code_path_inputs(shape)


def _launch_arguments(kernel: str, inp: AttentionInputs) -> dict:
    """The arguments a real launch of ``kernel`` would get for ``inp`` (built by the launchers' own code)."""
    from .backward import BackwardBuffers, dkdv_arguments, dq_arguments, preprocess_arguments
    from .forward import forward_arguments
    layout = Layout.of(inp)
    lse = torch.empty(inp.lse_shape(), device="meta", dtype=torch.float32)
    out = torch.empty(inp.q.shape, device="meta", dtype=inp.dtype)
    if kernel == "forward":
        return forward_arguments(inp, layout, out, lse, torch.empty_like(lse))
    buf = BackwardBuffers(inp, layout, out, lse, torch.empty_like(lse), torch.empty_like(out))
    build = {"backward_preprocess": preprocess_arguments, "backward_dkdv": dkdv_arguments,
             "backward_dq": dq_arguments}[kernel]
    return build(inp, layout, buf)


def _jit_function(kernel: str):
    from . import backward_dkdv, backward_dq, backward_preprocess, forward
    autotuned = {"forward": forward.zero_init_attention_forward_kernel,
                 "backward_preprocess": backward_preprocess.zero_init_attention_backward_preprocess_kernel,
                 "backward_dkdv": backward_dkdv.zero_init_attention_backward_dkdv_kernel,
                 "backward_dq": backward_dq.zero_init_attention_backward_dq_kernel}[kernel]
    return autotuned.fn


def _signature(fn, args: dict, config: triton.Config):
    """``(signature, constexprs, attrs)`` for ``ASTSource``, specialised as Triton's launcher would."""
    signature, constexprs, attrs = {}, {}, {}
    values = {**args, **config.kwargs}
    for index, param in enumerate(fn.params):
        name = param.name
        value = values[name]
        if param.is_constexpr or value is None or (isinstance(value, int) and not isinstance(value, bool)
                                                   and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {fn.__name__} has unexpected type {type(value).__name__}")
    return signature, constexprs, attrs


def _config_name(config: triton.Config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local and static shared bytes, and the SASS facts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", handle.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
    fields = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    mnemonics = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.M)
    return dict(registers=fields["REG"], stack=fields.get("STACK", 0), local=fields.get("LOCAL", 0),
                static_shared=fields.get("SHARED", 0),
                tensor_cores=sorted({m for m in mnemonics if m in TENSOR_CORE_MNEMONICS}),
                local_memory_instructions=sum(m in ("LDL", "STL") for m in mnemonics))


@functools.lru_cache(maxsize=None)
def _compile(kernel: str, config_index: int, cc: int, shape: str) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit_function(kernel)
    config = _configs.configs(kernel, interpreter=False)[config_index]
    signature, constexprs, attrs = _signature(fn, _launch_arguments(kernel, _inputs(shape)), config)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                       "enable_fp_fusion": True})
    cubin = compiled.asm["cubin"]
    usage = _resource_usage(cubin)
    return dict(kernel=kernel, config=_config_name(config), arch=f"sm_{cc}", registers=usage["registers"],
                # ptxas places spilled registers in the thread's stack frame, in local memory.
                spill_bytes=usage["stack"] + usage["local"],
                shared_bytes=compiled.metadata.shared + usage["static_shared"],
                cubin=cubin, tensor_cores=usage["tensor_cores"],
                local_memory_instructions=usage["local_memory_instructions"])


def _candidate_configs(kernel: str, cc: int, seqlen: int) -> list[int]:
    """Indices of the configurations of ``kernel`` that survive pruning at LLaMA-7B shapes on ``cc``."""
    candidates = _configs.configs(kernel, interpreter=False)
    layout = Layout.of(_llama7b_inputs(seqlen))
    kept = _configs.prune(kernel, candidates, block_d=layout.block_d, block_p=layout.block_p,
                          element_bytes=LLAMA_7B["dtype"].itemsize,
                          shared_memory_limit=_configs.SHARED_MEMORY_PER_BLOCK[cc],
                          seqlen_bucket=layout.seqlen_bucket())
    return [candidates.index(c) for c in kept]


def _compile_in_process(archs: Iterable[str]) -> list[dict]:
    rows = []
    for arch in archs:
        cc = parse_arch(arch)
        for kernel in _configs.KERNELS:
            seqlens_of = {}
            for seqlen in SEQLENS:
                for index in _candidate_configs(kernel, cc, seqlen):
                    seqlens_of.setdefault(index, []).append(seqlen)
            for index, seqlens in seqlens_of.items():
                # The sequence length is a runtime argument: one binary serves every S with the same
                # specialisation (512 and 2048 are both divisible by 16), so compile it once.
                row = dict(_compile(kernel, index, cc, f"llama7b-S{seqlens[0]}"))
                row["seqlens"] = tuple(seqlens)
                rows.append(row)
    return rows


def _compile_code_paths_in_process(archs: Iterable[str]) -> list[dict]:
    rows = []
    for arch in archs:
        for name in CODE_PATHS:
            for kernel in _configs.KERNELS:
                row = dict(_compile(kernel, 0, parse_arch(arch), name))
                row["code_path"] = name
                rows.append(row)
    return rows


def _compile_in_child(archs: Iterable[str], code_paths: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastadapter.kernels.report", "--json", "--archs", *archs]
    result = subprocess.run(command + (["--code-paths"] if code_paths else []), capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the compile report child process failed:\n{result.stderr[-4000:]}")
    rows = json.loads(result.stdout)
    for row in rows:
        row["cubin"] = base64.b64decode(row["cubin"])
        if "seqlens" in row:
            row["seqlens"] = tuple(row["seqlens"])
    return rows


@functools.lru_cache(maxsize=None)
def _report(archs: tuple[str, ...], code_paths: bool = False) -> tuple[dict, ...]:
    if interpreting():
        return tuple(_compile_in_child(archs, code_paths))
    return tuple(_compile_code_paths_in_process(archs) if code_paths else _compile_in_process(archs))


def _check_archs(archs: tuple[str, ...]) -> None:
    for arch in archs:
        cc = parse_arch(arch)
        if cc not in _configs.SHARED_MEMORY_PER_BLOCK:
            raise ValueError(f"no shared-memory budget known for {arch}; known: "
                             f"{sorted(f'sm_{c}' for c in _configs.SHARED_MEMORY_PER_BLOCK)}")


def compile_report(archs: Iterable[str] = ("sm_80", "sm_90")) -> list[dict]:
    """Compile every kernel × every configuration the autotuner may pick at LLaMA-7B shapes, for each arch.

    Returns:
        One dict per (kernel, configuration, arch) with ``kernel``, ``config``, ``arch``, ``registers`` (per
        thread), ``spill_bytes`` (stack + local memory per thread: 0 means no spills), ``shared_bytes`` (per
        block), ``cubin`` (the binary), ``tensor_cores`` (the tensor-core instruction families in the SASS),
        ``local_memory_instructions`` (``LDL``/``STL`` count) and ``seqlens`` (the S values at which the
        autotuner may pick this configuration).
    """
    archs = tuple(archs)
    _check_archs(archs)
    return [dict(row) for row in _report(archs)]


def compile_code_paths(archs: Iterable[str] = ("sm_80",)) -> list[dict]:
    """Compile every kernel, in its first configuration, for the inputs of :data:`CODE_PATHS`.

    The LLaMA-7B report takes one branch of each compile-time switch (bf16, D = 128, causal, batched, a shared
    prompt, tanh gate); these inputs take the others (varlen, fp16, a padded head dim, no prefix, no mask, the
    64-slot prefix, per-sample prompt and gate rows, raw gate, strided inputs), so a kernel change that only
    the interpreter accepts is caught without a GPU. Returns rows as :func:`compile_report` with
    ``code_path`` (the input family) instead of ``seqlens``.
    """
    archs = tuple(archs)
    _check_archs(archs)
    return [dict(row) for row in _report(archs, code_paths=True)]
