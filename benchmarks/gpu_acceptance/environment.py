"""Stage 0, ``environment``: the Triton backend can run here and matches the fp32 reference."""
from __future__ import annotations

from ..op_providers import OpProvider, check_provider, fastadapter_triton
from .common import Deadline, Settings, device_peaks, log


def stage_environment(cfg: Settings, deadline: Deadline, out: dict) -> None:
    from fastadapter.backends import get_backend
    backend = get_backend("triton")
    out["triton_unavailable"] = backend.unavailable_reason()
    flops, bandwidth = device_peaks(cfg.device)
    out.update(peak_bf16_tflops=flops and flops / 1e12, peak_hbm_tb_s=bandwidth and bandwidth / 1e12)
    if out["triton_unavailable"]:
        raise RuntimeError(f"the triton backend cannot run here: {out['triton_unavailable']}")
    triton = OpProvider("fastadapter-triton", fastadapter_triton, "zero_init_attention(backend='triton')",
                        lambda *_: None)
    # --smoke: the forward only (the interpreted backward takes seconds; the op tests check gradients).
    checked = "forward" if cfg.smoke else "forward and every gradient"
    out["triton_check"] = (check_provider(triton, cfg.device, dtype=cfg.dtype, check_grads=not cfg.smoke)
                           or f"matches the fp32 reference ({checked})")
    log(f"  triton backend vs the fp32 reference: {out['triton_check']}")

