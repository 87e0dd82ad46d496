"""What a speed figure was measured on: the CPU, the kernel path salr dispatched to, threads, torch
and the dtype. Recorded beside every tokens/s so an AVX2 run is not read as an AVX-512 one."""

from __future__ import annotations

import platform
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's "model name" on Linux, else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def speed_context(dtype: torch.dtype | None) -> dict[str, Any]:
    """The facts a decode tokens/s depends on, as one JSON-ready dict (dtype None = fp32)."""
    import salr

    return {"cpu_path": salr.cpu_isa(), "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": str(dtype or torch.float32).removeprefix("torch.")}


def speed_context_line(context: dict[str, Any]) -> str:
    """One line for a report: 'bf16 on Intel Xeon ... (salr CPU path avx512), 2 threads, torch 2.x'."""
    return (f"{context['dtype']} on {context['cpu_model']} (salr CPU path {context['cpu_path']}), "
            f"{context['threads']} threads, torch {context['torch']}")
