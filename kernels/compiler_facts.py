"""Reading what the compiler makes of one kernel configuration: registers, spills, shared memory.

Two ways to measure one (kernel, configuration, :class:`~.configs.KernelFacts`), both compiling the
``@triton.jit`` function they are handed (this module imports no kernel; the launch plan of :mod:`.autotune`
and the compile matrix of :mod:`.aot_compile` hand it over):

* :func:`resources_on_device` (run time, a CUDA device): ``triton.compile`` for the device's target, then the
  compiled kernel object's ``n_regs``, ``n_spills`` and ``metadata.shared`` once loaded on the device, against
  the device's opt-in shared memory per block;
* :func:`resources_ahead_of_time` (no GPU): ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
  and the cubin read with the tools inside the triton wheel: ``cuobjdump --dump-resource-usage`` (registers,
  stack, local and static shared memory) and ``cuobjdump -sass`` (tensor-core ``HMMA``/``HGMMA``, ``LDL``/``STL``
  local-memory traffic), against :data:`~.configs.SHARED_MEMORY_PER_BLOCK`.

The launch arguments are built by the launchers' own host code (:mod:`.arguments`) on ``meta`` tensors of
representative inputs (:func:`representative_inputs`: LLaMA-like sizes, so the specialisation of pointers and
integers, aligned or divisible by 16, is the one a real launch gets).

Compilation needs ``@triton.jit`` functions; under ``TRITON_INTERPRET=1`` (the tests) the kernels are
interpreted Python functions instead, and :func:`compile_kernel` refuses.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile

import torch
import triton

from .arguments import BackwardBuffers, dkdv_arguments, dq_arguments, forward_arguments, preprocess_arguments
from ._interpreter import interpreting
from .configs import SHARED_MEMORY_PER_BLOCK, KernelFacts, Resources, config_name
from .layout import Layout
from .problem import AttentionProblem

TENSOR_CORE_MNEMONICS = ("HGMMA", "HMMA")

_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                    torch.int64: "i64"}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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


def representative_inputs(facts: KernelFacts) -> AttentionProblem:
    """LLaMA-like inputs with ``facts`` on the ``meta`` device (no memory, no GPU): 32 kv heads (8 with GQA,
    for 32 query heads), S = 512 (or 4 packed sequences of up to 512 tokens sharing one ``cu_seqlens``, or with
    ``facts.shared_offsets`` False up to 512 queries over up to 1024 keys with offsets of their own), the prefix
    of ``facts.block_p``, and ``seqused_k`` when ``facts.seqused``."""
    heads_q, heads_kv = 32, (8 if facts.grouped else 32)
    d = facts.head_dim
    meta = dict(device="meta", dtype=facts.dtype)
    offsets = dict(device="meta", dtype=torch.int32)
    p = 0 if not facts.has_prefix else (10 if facts.block_p == 16 else facts.block_p)
    if facts.varlen and facts.shared_offsets:
        q, kv = torch.empty(2048, heads_q, d, **meta), torch.empty(2048, heads_kv, d, **meta)
        cu = torch.empty(5, **offsets)
        lengths = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=512, max_seqlen_k=512, shares_offsets=True)
    elif facts.varlen:
        q, kv = torch.empty(2048, heads_q, d, **meta), torch.empty(4096, heads_kv, d, **meta)
        lengths = dict(cu_seqlens_q=torch.empty(5, **offsets), cu_seqlens_k=torch.empty(5, **offsets),
                       max_seqlen_q=512, max_seqlen_k=1024)
    else:
        q, kv = torch.empty(4, 512, heads_q, d, **meta), torch.empty(4, 512, heads_kv, d, **meta)
        lengths = {}
    prefix = torch.empty(1, p, heads_kv, d, **meta)
    return AttentionProblem(q=q, k=kv, v=torch.empty_like(kv), prefix_k=prefix, prefix_v=torch.empty_like(prefix),
                            gate=torch.empty(1, heads_q, device="meta", dtype=torch.float32), causal=facts.causal,
                            softmax_scale=d ** -0.5, gate_tanh=facts.gate_tanh,
                            seqused_k=torch.empty(4, **offsets) if facts.seqused else None, **lengths)


def launch_arguments(kernel: str, inp: AttentionProblem, capability: int) -> dict:
    """The arguments a real launch of ``kernel`` would get for ``inp`` (built by the launchers' own code), its
    outputs and buffers allocated like ``inp`` (on ``meta`` for :func:`representative_inputs`)."""
    layout = Layout.of(inp)
    lse = torch.empty(inp.lse_shape(), device="meta", dtype=torch.float32)
    out = torch.empty(inp.q.shape, device="meta", dtype=inp.dtype)
    if kernel == "forward":
        args = forward_arguments(inp, layout, out, lse, torch.empty_like(lse))
    else:
        buf = BackwardBuffers(inp, layout, out, lse, torch.empty_like(lse), torch.empty_like(out))
        build = {"backward_preprocess": preprocess_arguments, "backward_dkdv": dkdv_arguments,
                 "backward_dq": dq_arguments}[kernel]
        args = build(inp, layout, buf)
    args["ARCH"] = capability
    return args


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


def compile_kernel(kernel: str, fn, config: triton.Config, inp: AttentionProblem, target):
    """``triton.compile`` of ``fn`` (the ``@triton.jit`` function of ``kernel``) in ``config`` for the launch
    ``inp`` would make, for ``target`` (a ``GPUTarget``). Returns Triton's compiled kernel (``asm["cubin"]``,
    ``asm["ttgir"]``, ``metadata``)."""
    if interpreting():
        raise RuntimeError("the kernels cannot be compiled under TRITON_INTERPRET=1 (they are interpreted Python "
                           "functions): run `python -m fastadapter.kernels.report` without it")
    from triton.compiler import ASTSource
    signature, constexprs, attrs = _signature(fn, launch_arguments(kernel, inp, target.arch), config)
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                   "enable_fp_fusion": True})


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


def config_key(config: triton.Config) -> tuple:
    """A hashable, picklable key of ``config`` (for caches and worker processes)."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def config_from_key(key: tuple) -> triton.Config:
    """The configuration of :func:`config_key` ``key``."""
    kwargs, warps, stages = key
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def compile_row(kernel: str, fn, config_key: tuple, capability: int, facts: KernelFacts) -> dict:
    """What the compiler made of ``fn`` (the ``@triton.jit`` function of ``kernel``) in the configuration of
    ``config_key`` (:func:`config_key`) on :func:`representative_inputs` of ``facts``, for ``sm_<capability>``,
    read from the cubin: one row of the compile matrix (without ``launches``). Cached per key."""
    from triton.backends.compiler import GPUTarget
    config = config_from_key(config_key)
    compiled = compile_kernel(kernel, fn, config, representative_inputs(facts), GPUTarget("cuda", capability, 32))
    cubin = compiled.asm["cubin"]
    usage = _resource_usage(cubin)
    return dict(kernel=kernel, config=config_name(config), arch=f"sm_{capability}",
                dtype=DTYPE_NAMES[facts.dtype], head_dim=facts.head_dim, registers=usage["registers"],
                # ptxas places spilled registers in the thread's stack frame, in local memory.
                spill_bytes=usage["stack"] + usage["local"],
                shared_bytes=compiled.metadata.shared + usage["static_shared"],
                shared_limit=SHARED_MEMORY_PER_BLOCK[capability], cubin=cubin,
                tensor_cores=usage["tensor_cores"], local_memory_instructions=usage["local_memory_instructions"],
                i32_tensor_products=i32_tensor_products(compiled.asm["ttir"]))


def i32_tensor_products(ttir: str) -> int:
    """How many element-wise 32-bit integer products of tensors a kernel's Triton IR computes.

    Every tensor product in these kernels is a row offset (``row · stride``), which must be 64-bit: a 32-bit one
    wraps past 2^31 elements (long sequences, views into fused qkv rows). 0 means every such product is i64.
    """
    return len(re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]+xi32>", ttir))


def check_capability(capability: int) -> None:
    """Refuse an architecture whose shared memory per block is not in :data:`.configs.SHARED_MEMORY_PER_BLOCK`."""
    if capability not in SHARED_MEMORY_PER_BLOCK:
        raise ValueError(f"no shared-memory budget known for sm_{capability}; known: "
                         f"{sorted(f'sm_{c}' for c in SHARED_MEMORY_PER_BLOCK)}")


def resources_ahead_of_time(kernel: str, fn, config: triton.Config, facts: KernelFacts,
                            capability: int) -> Resources:
    """Registers, spills and shared memory of ``fn`` (the ``@triton.jit`` function of ``kernel``) in ``config``
    compiled for ``sm_<capability>`` (no GPU)."""
    check_capability(capability)
    row = compile_row(kernel, fn, config_key(config), capability, facts)
    return Resources(registers=row["registers"], spill_bytes=row["spill_bytes"], shared_bytes=row["shared_bytes"],
                     shared_limit=row["shared_limit"])


def resources_on_device(kernel: str, fn, config: triton.Config, facts: KernelFacts, device_index: int) -> Resources:
    """The same, read from the compiled kernel object loaded on CUDA device ``device_index``."""
    from triton.runtime.errors import OutOfResources
    with torch.cuda.device(device_index):
        driver = triton.runtime.driver.active
        target = driver.get_current_target()
        compiled = compile_kernel(kernel, fn, config, representative_inputs(facts), target)
        limit = driver.utils.get_device_properties(device_index)["max_shared_mem"]
        try:
            compiled._init_handles()  # loads the module: registers and local memory as the driver reports them
        except OutOfResources:
            return Resources(registers=0, spill_bytes=0, shared_bytes=compiled.metadata.shared, shared_limit=limit)
        # n_spills is the local memory per thread (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES) in 4-byte words.
        return Resources(registers=compiled.n_regs, spill_bytes=4 * compiled.n_spills,
                         shared_bytes=compiled.metadata.shared, shared_limit=limit)
