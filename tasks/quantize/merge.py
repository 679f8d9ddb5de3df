"""Merge a LoRA adapter into its base and write the HF-format variants (merged weights, adapter copies)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.quantize.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterInfo, read_adapter_config

log = logging.getLogger(__name__)

# Tokenizer and chat-template files travel with every exported model so each directory is self-contained.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "float16") -> dict[str, Any]:
    """Merge ``adapter_dir`` into ``base_dir`` with PEFT and save safetensors + tokenizer in ``out_dir``.

    The merge itself runs in float32 (merging in half precision loses the small LoRA deltas); the
    result is cast to ``dtype`` before saving. Before anything is written, the merged model's logits
    are checked against base + adapter on a probe input: a merge that changes the function fails here
    instead of surfacing as lost accuracy after export.

    Returns:
        Facts for variant.json: dtype, parameter count, max |merged - base| weight change, max |logit| gap.

    Raises:
        ValueError: merged and unmerged logits disagree beyond float rounding.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    reference = {k: v.detach().clone() for k, v in base.state_dict().items() if k.endswith(".weight")}
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    probe = torch.arange(3, 3 + min(64, base.config.vocab_size - 3)).unsqueeze(0)
    with torch.inference_mode():
        unmerged_logits = peft_model(input_ids=probe).logits
    model = peft_model.merge_and_unload()
    with torch.inference_mode():
        merged_logits = model(input_ids=probe).logits
    logit_gap = float((merged_logits - unmerged_logits).abs().max())
    scale = float(unmerged_logits.abs().max()) or 1.0
    if logit_gap > 1e-3 * scale:
        raise ValueError(f"merging {adapter_dir} into {base_dir} changed the logits by up to {logit_gap:.4g} "
                         f"(|logits| up to {scale:.3g}): the merge is not faithful")
    merged = model.state_dict()
    delta = max(float((merged[k] - reference[k]).abs().max()) for k in reference if k in merged)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(str(out_dir), safe_serialization=True)
    copy_tokenizer_files(base_dir, out_dir)
    return {"dtype": dtype, "param_count": sum(p.numel() for p in model.parameters()), "max_weight_delta": delta,
            "max_logit_gap": logit_gap}


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the HF tokenizer/chat-template files present in ``src`` to ``dst``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def copy_adapter(adapter_dir: Path, out_dir: Path) -> None:
    """Copy the PEFT adapter as is (config + safetensors), the form vLLM's runtime LoRA loads."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(Path(adapter_dir) / name, Path(out_dir) / name)


def write_genai_adapter(info: AdapterInfo, out_file: Path) -> dict[str, Any]:
    """Write the adapter with PEFT's per-module scale folded into lora_B, for ``openvino_genai.Adapter``.

    openvino_genai reads only the safetensors and applies ``B @ A`` times the AdapterConfig alpha
    (default 1), while PEFT applies ``lora_alpha / r`` (or per-module patterns, or rsLoRA). Folding
    the scale into B makes the default alpha of 1.0 reproduce the merged model exactly.

    Raises:
        ValueError: the adapter has non-LoRA tensors (e.g. modules_to_save) that runtime LoRA cannot apply.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if info.extra_tensors:
        raise ValueError(
            f"adapter {info.path} carries non-LoRA tensors ({', '.join(info.extra_tensors[:3])}...); "
            "openvino_genai runtime LoRA cannot apply them: use the merged variants"
        )
    config = read_adapter_config(info.path)
    tensors = load_file(str(Path(info.path) / ADAPTER_WEIGHTS))
    scales: dict[str, float] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if ".lora_B" in key or ".lora_embedding_B" in key:
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            scale = info.scaling(module, config)
            scales[module] = scale
            tensor = tensor.float() * scale
        out[key] = tensor.float().contiguous()
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_file))
    distinct = sorted(set(scales.values()))
    return {"lora_scale_folded": distinct[0] if len(distinct) == 1 else distinct, "lora_modules": len(scales)}
