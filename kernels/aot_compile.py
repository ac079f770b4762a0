"""Compiling the kernels for real GPUs and reading what the compiler made of them: registers, spills, shared
memory. Used by the launch plan (:mod:`.configs`) and by the compile report.

Two ways to measure one (kernel, configuration, :class:`~.configs.KernelFacts`):

* :func:`resources_on_device` (run time, a CUDA device): ``triton.compile`` for the device's target, then the
  compiled kernel object's ``n_regs``, ``n_spills`` and ``metadata.shared`` once loaded on the device, against
  the device's opt-in shared memory per block;
* :func:`resources_ahead_of_time` (no GPU): ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
  and the cubin read with the tools inside the triton wheel: ``cuobjdump --dump-resource-usage`` (registers,
  stack, local and static shared memory) and ``cuobjdump -sass`` (tensor-core ``HMMA``/``HGMMA``, ``LDL``/``STL``
  local-memory traffic), against :data:`~.configs.SHARED_MEMORY_PER_BLOCK`.

The launch arguments are built by the launchers' own host code on ``meta`` tensors of representative inputs
(:func:`representative_inputs`: LLaMA-like sizes, so the specialisation of pointers and integers, aligned or
divisible by 16, is the one a real launch gets).

:func:`compile_matrix` compiles every candidate of every kernel for a grid of architectures, dtypes and head
dims and says which configurations the backend may launch and which combinations it declines (why): the
facts ``tests/kernels/test_kernels_compile.py`` checks and ``python -m fastadapter.kernels.report --json FILE`` saves.
Compiles run in parallel worker processes; Triton's own on-disk cache makes a second run fast.

Compilation needs ``@triton.jit`` functions; under ``TRITON_INTERPRET=1`` (the tests) the kernels are
interpreted Python functions instead, so the matrix is then produced by a child process with the interpreter
off (``python -m fastadapter.kernels.report``).
"""
from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable, Optional

import torch
import triton

from . import configs as _configs
from ._interpreter import interpreting
from .configs import KernelFacts, Resources, config_name
from .layout import Layout
from .problem import AttentionProblem

TENSOR_CORE_MNEMONICS = ("HGMMA", "HMMA")
#: The grid of the compile matrix: every architecture the backend is checked for, dtypes, head dims.
MATRIX_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
MATRIX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MATRIX_HEAD_DIMS = (64, 80, 128, 256)
#: LLaMA-7B attention: 32 heads of 128, the paper's prompt of 10 tokens, bf16 (the README's table).
LLAMA_7B = KernelFacts(dtype=torch.bfloat16, head_dim=128)

_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                    torch.int64: "i64"}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


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


def _launch_arguments(kernel: str, inp: AttentionProblem, capability: int) -> dict:
    """The arguments a real launch of ``kernel`` would get for ``inp`` (built by the launchers' own code)."""
    from .backward import BackwardBuffers, dkdv_arguments, dq_arguments, preprocess_arguments
    from .forward import forward_arguments
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


def compile_kernel(kernel: str, config: triton.Config, inp: AttentionProblem, target):
    """``triton.compile`` of ``kernel`` in ``config`` for the launch ``inp`` would make, for ``target``
    (a ``GPUTarget``). Returns Triton's compiled kernel (``asm["cubin"]``, ``asm["ttgir"]``, ``metadata``)."""
    if interpreting():
        raise RuntimeError("the kernels cannot be compiled under TRITON_INTERPRET=1 (they are interpreted Python "
                           "functions): run `python -m fastadapter.kernels.report` without it")
    from triton.compiler import ASTSource
    fn = _jit_function(kernel)
    signature, constexprs, attrs = _signature(fn, _launch_arguments(kernel, inp, target.arch), config)
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


def _config_key(config: triton.Config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _config_from_key(key: tuple) -> triton.Config:
    kwargs, warps, stages = key
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _compile_row(kernel: str, config_key: tuple, capability: int, facts: KernelFacts) -> dict:
    from triton.backends.compiler import GPUTarget
    config = _config_from_key(config_key)
    compiled = compile_kernel(kernel, config, representative_inputs(facts), GPUTarget("cuda", capability, 32))
    cubin = compiled.asm["cubin"]
    usage = _resource_usage(cubin)
    return dict(kernel=kernel, config=config_name(config), arch=f"sm_{capability}",
                dtype=DTYPE_NAMES[facts.dtype], head_dim=facts.head_dim, registers=usage["registers"],
                # ptxas places spilled registers in the thread's stack frame, in local memory.
                spill_bytes=usage["stack"] + usage["local"],
                shared_bytes=compiled.metadata.shared + usage["static_shared"],
                shared_limit=_configs.SHARED_MEMORY_PER_BLOCK[capability], cubin=cubin,
                tensor_cores=usage["tensor_cores"], local_memory_instructions=usage["local_memory_instructions"],
                i32_tensor_products=i32_tensor_products(compiled.asm["ttir"]))


def i32_tensor_products(ttir: str) -> int:
    """How many element-wise 32-bit integer products of tensors a kernel's Triton IR computes.

    Every tensor product in these kernels is a row offset (``row · stride``), which must be 64-bit: a 32-bit one
    wraps past 2^31 elements (long sequences, views into fused qkv rows). 0 means every such product is i64.
    """
    return len(re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]+xi32>", ttir))


def _check_capability(capability: int) -> None:
    if capability not in _configs.SHARED_MEMORY_PER_BLOCK:
        raise ValueError(f"no shared-memory budget known for sm_{capability}; known: "
                         f"{sorted(f'sm_{c}' for c in _configs.SHARED_MEMORY_PER_BLOCK)}")


def resources_ahead_of_time(kernel: str, config: triton.Config, facts: KernelFacts, capability: int) -> Resources:
    """Registers, spills and shared memory of ``kernel`` in ``config`` compiled for ``sm_<capability>`` (no GPU)."""
    _check_capability(capability)
    row = _compile_row(kernel, _config_key(config), capability, facts)
    return Resources(registers=row["registers"], spill_bytes=row["spill_bytes"], shared_bytes=row["shared_bytes"],
                     shared_limit=row["shared_limit"])


def resources_on_device(kernel: str, config: triton.Config, facts: KernelFacts, device_index: int) -> Resources:
    """The same, read from the compiled kernel object loaded on CUDA device ``device_index``."""
    from triton.runtime.errors import OutOfResources
    with torch.cuda.device(device_index):
        driver = triton.runtime.driver.active
        target = driver.get_current_target()
        compiled = compile_kernel(kernel, config, representative_inputs(facts), target)
        limit = driver.utils.get_device_properties(device_index)["max_shared_mem"]
        try:
            compiled._init_handles()  # loads the module: registers and local memory as the driver reports them
        except OutOfResources:
            return Resources(registers=0, spill_bytes=0, shared_bytes=compiled.metadata.shared, shared_limit=limit)
        # n_spills is the local memory per thread (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES) in 4-byte words.
        return Resources(registers=compiled.n_regs, spill_bytes=4 * compiled.n_spills,
                         shared_bytes=compiled.metadata.shared, shared_limit=limit)


# -- the compile matrix ------------------------------------------------------------------------------------------

def _matrix_task(task: tuple) -> dict:
    kernel, config_key, capability, facts = task
    return _compile_row(kernel, config_key, capability, facts)


def _matrix_in_process(archs: tuple[str, ...], dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...],
                       workers: int) -> list[dict]:
    combos = [(parse_arch(a), dt, d) for a in archs for dt in dtypes for d in head_dims]
    tasks, declined = [], []
    for cc, dtype, head_dim in combos:
        _check_capability(cc)
        facts = KernelFacts(dtype=dtype, head_dim=head_dim)
        reason = _configs.target_reason(dtype, cc)
        for kernel in _configs.KERNELS:
            if reason:
                declined.append(dict(kernel=kernel, config=None, arch=f"sm_{cc}", dtype=DTYPE_NAMES[dtype],
                                     head_dim=head_dim, declined=reason))
                continue
            for config in _configs.candidates(kernel, facts.block_d, interpreter=False, capability=cc):
                tasks.append((kernel, _config_key(config), cc, facts))
    if workers > 1 and len(tasks) > 1:
        # Workers start from a clean interpreter (spawn) and inherit this process's environment (no interpreter).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            compiled = list(pool.map(_matrix_task, tasks, chunksize=1))
    else:
        compiled = [_matrix_task(t) for t in tasks]
    rows = []
    by_combo: dict[tuple, list[dict]] = {}
    for task, row in zip(tasks, compiled):
        kernel, _, cc, facts = task
        row = dict(row)
        resources = Resources(row["registers"], row["spill_bytes"], row["shared_bytes"], row["shared_limit"])
        row["launches"] = resources.fits
        if not resources.fits:
            row["rejected"] = resources.why_not()
        by_combo.setdefault((kernel, cc, facts), []).append(row)
        rows.append(row)
    for (kernel, cc, facts), combo_rows in by_combo.items():
        if not any(r["launches"] for r in combo_rows):
            rows.append(dict(kernel=kernel, config=None, arch=f"sm_{cc}", dtype=DTYPE_NAMES[facts.dtype],
                             head_dim=facts.head_dim,
                             declined=f"no {kernel} configuration fits sm_{cc} (dtype {facts.dtype}, head_dim "
                                      f"{facts.head_dim}): " + "; ".join(f"{r['config']}: {r['rejected']}"
                                                                           for r in combo_rows)))
    return rows + declined


def _jsonable(rows: list[dict], cubins: bool) -> list[dict]:
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "cubin" or cubins}
        if cubins and "cubin" in row:
            row["cubin"] = base64.b64encode(row["cubin"]).decode("ascii")
        out.append(row)
    return out


def _matrix_in_child(archs, dtypes, head_dims, workers: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "matrix.json")
        command = [sys.executable, "-m", "fastadapter.kernels.report", "--matrix", "--cubins", "--json", path,
                   "--archs", *archs, "--dtypes", *(DTYPE_NAMES[d] for d in dtypes),
                   "--head-dims", *(str(d) for d in head_dims), "--workers", str(workers)]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"the compile matrix child process failed:\n{result.stderr[-4000:]}")
        with open(path) as handle:
            rows = json.load(handle)
    for row in rows:
        if "cubin" in row:
            row["cubin"] = base64.b64decode(row["cubin"])
    return rows


def default_workers() -> int:
    """Worker processes for the matrix: one per CPU core (``FASTADAPTER_COMPILE_WORKERS`` overrides)."""
    return max(1, int(os.environ.get("FASTADAPTER_COMPILE_WORKERS", 0)) or os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _matrix(archs: tuple[str, ...], dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...],
            workers: int) -> tuple[dict, ...]:
    if interpreting():
        return tuple(_matrix_in_child(archs, dtypes, head_dims, workers))
    return tuple(_matrix_in_process(archs, dtypes, head_dims, workers))


def compile_matrix(archs: Iterable[str] = MATRIX_ARCHS, dtypes: Iterable[torch.dtype] = MATRIX_DTYPES,
                   head_dims: Iterable[int] = MATRIX_HEAD_DIMS, workers: Optional[int] = None) -> list[dict]:
    """Compile every candidate configuration of every kernel for each (arch, dtype, head dim).

    Returns one row per compiled (kernel, configuration, arch, dtype, head_dim) with ``registers`` (per thread),
    ``spill_bytes`` (stack + local memory per thread: 0 means no spills), ``shared_bytes`` (per block),
    ``shared_limit`` (the arch's), ``launches`` (the backend may launch it: no spills, fits) or ``rejected``
    (why not), ``tensor_cores`` (the tensor-core instruction families in the SASS), ``local_memory_instructions``
    and ``cubin``; plus one row with ``config`` None and ``declined`` (the backend's reason) per (kernel, arch,
    dtype, head_dim) for which nothing may launch. Representative inputs: :func:`representative_inputs` of
    ``KernelFacts(dtype, head_dim)`` (P = 10, causal, batched, tanh gate, one query head per kv head).
    """
    archs = tuple(archs)
    for arch in archs:
        _check_capability(parse_arch(arch))
    return [dict(r) for r in _matrix(archs, tuple(dtypes), tuple(head_dims), workers or default_workers())]


def compile_report(archs: Iterable[str] = ("sm_80", "sm_90")) -> list[dict]:
    """The configurations the backend may launch at LLaMA-7B shapes (bf16, D = 128, P = 10), per arch: the
    rows of :func:`compile_matrix` that launch, each with ``seqlens`` (the S values of the README's table)."""
    return llama7b_rows(compile_matrix(archs, (LLAMA_7B.dtype,), (LLAMA_7B.head_dim,)))


def llama7b_rows(rows: list[dict]) -> list[dict]:
    """The rows of a compile matrix that may launch at LLaMA-7B shapes (bf16, D = 128), with ``seqlens``."""
    kept = [dict(r) for r in rows if r.get("launches") and r["dtype"] == DTYPE_NAMES[LLAMA_7B.dtype]
            and r["head_dim"] == LLAMA_7B.head_dim]
    for row in kept:
        row["seqlens"] = (512, 2048)
    return kept


# -- the compile-time branches the matrix does not take ----------------------------------------------------------

#: Input families compiled by :func:`compile_code_paths`, beyond the matrix's (batched, causal, P = 10, tanh).
CODE_PATHS = {
    "varlen-fp16-D72-P0-full-GQA": KernelFacts(dtype=torch.float16, head_dim=72, has_prefix=False, varlen=True,
                                               causal=False, grouped=True, shared_offsets=True),
    "varlen-seqused-bf16-D80-GQA": KernelFacts(dtype=torch.bfloat16, head_dim=80, varlen=True, grouped=True,
                                               seqused=True),
    "seqused-fp16-D128": KernelFacts(dtype=torch.float16, head_dim=128, seqused=True),
    "bf16-D64-P64-raw-gate": KernelFacts(dtype=torch.bfloat16, head_dim=64, block_p=64, gate_tanh=False),
}


def _code_paths_in_process(capability: int) -> list[dict]:
    rows = []
    for name, facts in CODE_PATHS.items():
        for kernel in _configs.KERNELS:
            config = _configs.candidates(kernel, facts.block_d, interpreter=False)[0]
            row = dict(_compile_row(kernel, _config_key(config), capability, facts))
            row["code_path"] = name
            rows.append(row)
    return rows


def compile_code_paths(arch: str = "sm_80") -> list[dict]:
    """Compile every kernel, in its first configuration, for the inputs of :data:`CODE_PATHS` (varlen with shared
    and with separate key offsets, ``seqused_k`` dense and varlen, fp16, a padded head dim, no prefix, no mask, GQA, the 64-slot
    prefix, raw gate), so that a kernel change only the
    interpreter accepts is caught without a GPU. Rows as :func:`compile_matrix` with ``code_path``."""
    capability = parse_arch(arch)
    _check_capability(capability)
    if not interpreting():
        return _code_paths_in_process(capability)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "paths.json")
        result = subprocess.run([sys.executable, "-m", "fastadapter.kernels.report", "--code-paths", "--cubins",
                                 "--json", path, "--archs", arch], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"the code-path compile child process failed:\n{result.stderr[-4000:]}")
        with open(path) as handle:
            rows = json.load(handle)
    for row in rows:
        row["cubin"] = base64.b64decode(row["cubin"])
    return rows


def write_json(rows: list[dict], path: str, cubins: bool = False) -> None:
    """Save ``rows`` as JSON (cubins base64-encoded when ``cubins``, else left out)."""
    with open(path, "w") as handle:
        json.dump(_jsonable(rows, cubins), handle, indent=1)
        handle.write("\n")


def dtype_of(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``."""
    if name not in _DTYPES_BY_NAME:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES_BY_NAME)}, got {name!r}")
    return _DTYPES_BY_NAME[name]
