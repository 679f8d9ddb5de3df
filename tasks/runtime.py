"""Process-level settings the training and evaluation stages share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def torch_device(choice: str = "auto") -> str:
    """The torch device a config asks for: ``cpu``; ``gpu``/``cuda`` = this process's GPU
    (``cuda:<LOCAL_RANK>``, so each DDP rank gets its own); ``auto`` = a GPU when torch sees one."""
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        import torch

        if not torch.cuda.is_available():
            return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None = leave as is), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bf16_fast(device: str | None = None) -> bool:
    """Whether bfloat16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    Without them torch emulates bf16 on the CPU, ~50x slower than fp32 (measured on an AVX2-only
    EPYC: 0.8 vs 42.7 GFLOP/s per thread), so bf16 is only chosen where it is native.
    """
    import torch

    device = device or torch_device()
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads share a core's matmul units)."""
    import os

    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    try:
        siblings = {line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("core id")}
        packages = {line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("physical id")}
        cores = max(1, len(siblings) * max(1, len(packages)))
        return max(1, min(logical, cores))
    except OSError:
        return max(1, logical)
