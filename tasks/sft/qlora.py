"""Build the trainable model: a (4-bit NF4 double-quantised) base with PEFT LoRA adapters.

bitsandbytes 0.50 quantises and runs NF4 ``Linear4bit`` layers on CPU (it dequantises per matmul
when the optional ``kernels`` package is absent, which is slower than fp32 but keeps the frozen
weights at ~0.5 byte/parameter). Embeddings, norms and the (tied) LM head stay in full precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

from configs.schema import SFTConfig
from tasks.runtime import torch_device

log = logging.getLogger(__name__)


class SFTModelError(ValueError):
    """A model/adapter configuration that cannot be built, naming the field at fault."""


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (``q_proj``, ``down_proj``, ...)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}
        if is_linear and name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model, targets: list[str]) -> None:
    """Fail clearly when ``sft.target_modules`` names a layer the model does not have."""
    if not targets:
        raise SFTModelError("sft.target_modules is empty: name at least one linear layer, e.g. q_proj")
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise SFTModelError(
            f"sft.target_modules: unknown module(s) {', '.join(map(repr, unknown))} for "
            f"{type(model).__name__}; linear layers available: {', '.join(available)}"
        )


def load_base(model_dir: Path, method: str, device: str = "cpu", compute_dtype: str = "float32"):
    """Load the frozen base model: NF4 + double quantisation for 'qlora' (quantised on ``device``),
    fp32 for 'lora' (the trainer moves it).

    ``compute_dtype`` is what the NF4 weights are dequantised to for each matmul ('bfloat16' where
    bf16 is native, see :func:`tasks.runtime.bf16_fast`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SFTModelError(f"{model_dir}: not a Hugging Face model directory (no config.json); "
                            f"run `lmforge models import` first")
    kwargs: dict = {"dtype": torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            # The LM head is tied to the embeddings; quantising it would untie and duplicate it.
            llm_int8_skip_modules=["lm_head"],
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.config.use_cache = False  # no KV cache while training
    return model


def build_peft_model(model_dir: Path, cfg: SFTConfig, gradient_checkpointing: bool = False,
                     compute_dtype: str = "float32"):
    """Base model (quantised or not) with fresh LoRA adapters; only the adapters are trainable.

    Args:
        model_dir: imported base model directory.
        cfg: the ``sft`` config section (method, LoRA shape, targets).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        compute_dtype: dtype of the NF4 base's matmuls.

    Raises:
        SFTModelError: missing model directory or unknown target modules.
    """
    from peft import LoraConfig, get_peft_model

    base = load_base(model_dir, cfg.method, torch_device(cfg.accelerator), compute_dtype)
    check_target_modules(base, cfg.target_modules)
    for param in base.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%s: %s trainable of %s parameters (%.2f%%)", cfg.method, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return model


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, when it declares one."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)
