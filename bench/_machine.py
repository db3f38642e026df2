"""What a benchmark ran on: the CPU's model and the vector instructions that decide a forward pass's speed."""
from __future__ import annotations

import os
import platform

#: instruction-set flags (``/proc/cpuinfo``) that change which kernels torch and OpenVINO pick
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """``{"model", "isa", "cores"}`` of this machine (model and flags from ``/proc/cpuinfo`` where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count()}
