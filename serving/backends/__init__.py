"""Inference backends behind one interface (see :mod:`serving.backends.base`)."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

from serving.backends.base import Backend, BackendError, BackendInputError, Chunk, SamplingParams

if TYPE_CHECKING:
    from configs.schema import ServeConfig

__all__ = ["Backend", "BackendError", "BackendInputError", "Chunk", "SamplingParams", "make_backend", "pick_kind"]


def gpu_present() -> bool:
    """True when nvidia-smi lists a GPU (what vLLM needs to run in GPU mode)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pick_kind(cfg: ServeConfig) -> str:
    """The concrete backend for ``cfg.backend`` (auto: vLLM with a GPU, else OpenVINO)."""
    if cfg.backend != "auto":
        return cfg.backend
    return "vllm" if gpu_present() else "openvino"


def make_backend(kind: str, cfg: ServeConfig, url: str | None = None, name: str = "model") -> Backend:
    """A fresh, unloaded backend of ``kind`` configured from ``cfg`` (``url``: a remote server for vllm)."""
    if kind == "openvino":
        from serving.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(cfg.device, cfg.cache_gb, cfg.max_num_seqs, cfg.num_threads, regroup_ms=cfg.regroup_ms,
                              prefix_caching=cfg.prefix_caching, precision=cfg.inference_precision)
    if kind == "vllm":
        from serving.backends.vllm import VLLMBackend

        return VLLMBackend(cfg, url=url or cfg.vllm_url, served_name=name)
    if kind == "hf":
        from serving.backends.hf import HFBackend

        return HFBackend()
    raise BackendError(f"unknown backend {kind!r}: expected openvino, vllm or hf")
