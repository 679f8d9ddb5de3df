"""Quantisation-aware training with NNCF's absorbable LoRA (FQ_LORA), and the base IR for runtime LoRA.

QAT recipe (after NNCF's ``distillation_qat_with_lora`` example): ``nncf.compress_weights(...,
compression_format=CompressionFormat.FQ_LORA)`` inserts a fake quantiser with a small LoRA into
every INT4 (or INT8) weight; only those adapters and the quantiser scales are trained, either to
match the fp32 model's logits (distillation) or on the answer tokens (task loss). Stripping then
folds the LoRA into the quantised weights, so the exported IR is a plain INT4 model with no extra
inference cost.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from configs.schema import QuantizeConfig
from tasks.quantize.export import copy_runtime_files, export_ir, quantize_ir, weight_element_types
from tasks.quantize.merge import write_genai_adapter
from tasks.quantize.validate import ADAPTER_CONFIG, AdapterInfo

log = logging.getLogger(__name__)

GENAI_ADAPTER_DIR = "adapter"
GENAI_ADAPTER_FILE = "adapter_model.safetensors"



STALE_BUILD_S = 600


def prepare_nncf_extension_build() -> None:
    """Make NNCF's first-use C++ build of its CPU quantisation extension safe on a small, busy machine.

    * The build takes minutes on 2 busy cores; NNCF gives up after 60 s and fails the run: wait 20 min.
    * A build that was killed leaves its ``lock`` file, and every later run waits on it until the
      timeout: a lock in a directory where nothing changed for 10 minutes is stale and removed.
    * torch writes its include and library paths, as this interpreter sees them (symlinks not
      resolved), into the build's ``build.ninja``. Worktrees that symlink one venv at different paths
      all shared ``~/.cache/torch_extensions/py311_cpu`` yet disagreed there, so every QAT run from
      another worktree rebuilt the extension (~2 min) and overwrote the others' build: each torch
      path gets its own build root, ``~/.cache/torch_extensions/lmforge-<hash of the torch path>``.
    A user's own NNCF_EXTENSION_LOAD_TIMEOUT and TORCH_EXTENSIONS_DIR win.
    """
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "1200")
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        torch_path = os.path.dirname(os.path.abspath(torch.__file__))  # the prefix torch puts in build.ninja
        key = hashlib.sha256(f"{torch_path}|{torch.__version__}".encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(get_default_build_root()) / f"lmforge-{key}")
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    for lock in root.glob("**/lock"):
        try:
            newest = max(p.stat().st_mtime for p in lock.parent.iterdir())
        except (OSError, ValueError):
            continue
        if time.time() - newest > STALE_BUILD_S:
            log.warning("removing stale torch extension build lock %s (nothing built there for %d min)",
                        lock, STALE_BUILD_S // 60)
            lock.unlink(missing_ok=True)

def run_qat(
    model_dir: Path,
    out_dir: Path,
    cfg: QuantizeConfig,
    samples: list[tuple[str, str]],
    bits: int = 4,
    tokenizer_ir_from: Path | None = None,
) -> dict[str, Any]:
    """Train fake-quantised weights with absorbable LoRA on ``samples`` and export the stripped IR.

    Args:
        model_dir: fp32 HF model to compress (the merged model).
        out_dir: existing empty directory for the IR.
        cfg: the quantize section (steps, learning rate, loss, group size, LoRA rank).
        samples: (prompt, completion) pairs from the curated training split.
        bits: 4 (group-wise, cfg.int4_group_size) or 8 (per-channel).
        tokenizer_ir_from: an IR dir whose tokenizer IR/configs are copied (saves a conversion).

    Returns:
        Facts for variant.json: steps, first/last loss, trainable parameter count, weight types.
    """
    prepare_nncf_extension_build()
    import nncf
    import torch
    from nncf.parameters import CompressionFormat, CompressWeightsMode
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters
    from optimum.exporters.openvino.convert import export_from_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not samples:
        raise ValueError("QAT needs training samples (prompt, completion); got none")
    if bits not in (4, 8):
        raise ValueError(f"QAT bits must be 4 or 8, got {bits}")
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batches = _batches(tokenizer, samples, cfg)
    student = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    teacher = None
    if cfg.qat_loss == "distill":
        teacher = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    example = {"input_ids": batches[0]["input_ids"][:1, :8]}
    if bits == 4:
        mode = CompressWeightsMode.INT4_SYM if cfg.int4_sym else CompressWeightsMode.INT4_ASYM
        extra = {"group_size": cfg.int4_group_size, "ratio": cfg.int4_ratio}
    else:
        mode, extra = CompressWeightsMode.INT8_ASYM, {}
    student = nncf.compress_weights(
        student, mode=mode, dataset=nncf.Dataset([example]), compression_format=CompressionFormat.FQ_LORA,
        advanced_parameters=AdvancedCompressionParameters(lora_adapter_rank=cfg.qat_lora_rank), **extra,
    )
    groups, trainable = _trainable_groups(student, bits, cfg.qat_learning_rate)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    # NNCF wraps its fake-quantise kernels in torch.compile; "force_eager" skips that compilation.
    with torch.compiler.set_stance("default" if cfg.qat_compile else "force_eager"):
        losses = _train(student, teacher, batches, optimizer, cfg.qat_steps, cfg.qat_loss)
        del teacher
        student.eval()
        with torch.no_grad():
            _strip_to_dequantize(student, example)
            started = time.perf_counter()
            export_from_model(student, str(out_dir), task="text-generation-with-past", device="cpu")
    if tokenizer_ir_from is not None:
        copy_runtime_files(tokenizer_ir_from, out_dir)
    else:
        from tasks.quantize.export import ensure_tokenizer_ir

        ensure_tokenizer_ir(model_dir, out_dir)
    return {
        "method": f"qat-fq_lora-{cfg.qat_loss}", "bits": bits, "steps": cfg.qat_steps,
        "loss_first": losses[0], "loss_last": losses[-1], "loss_curve": losses, "trainable_params": trainable,
        "lora_rank": cfg.qat_lora_rank, "group_size": cfg.int4_group_size if bits == 4 else None,
        "train_samples": len(samples), "export_seconds": round(time.perf_counter() - started, 1),
        "weight_types": weight_element_types(Path(out_dir)),
    }


def export_base_ir(base_dir: Path, adapter: AdapterInfo, out_dir: Path, cfg: QuantizeConfig) -> dict[str, Any]:
    """IR of the un-merged base (fp32 or INT8 weights) plus the adapter for ``openvino_genai.Adapter``.

    The adapter is written to ``out_dir/adapter/adapter_model.safetensors`` with PEFT's LoRA scale
    folded in, so ``LLMPipeline(out_dir, adapters=AdapterConfig(Adapter(path)))`` with the default
    alpha of 1.0 reproduces the merged model.
    """
    out_dir = Path(out_dir)
    facts: dict[str, Any] = {"weight_format": cfg.base_ir_weight_format, "base": str(base_dir)}
    if cfg.base_ir_weight_format == "fp32":
        export_ir(base_dir, out_dir)
    else:
        scratch = out_dir / ".fp32"
        export_ir(base_dir, scratch)
        facts |= quantize_ir(scratch, out_dir, "int8", cfg)
        shutil.rmtree(scratch)
    adapter_out = out_dir / GENAI_ADAPTER_DIR
    facts |= write_genai_adapter(adapter, adapter_out / GENAI_ADAPTER_FILE)
    shutil.copy2(adapter.path / ADAPTER_CONFIG, adapter_out / ADAPTER_CONFIG)
    facts["adapter_file"] = f"{GENAI_ADAPTER_DIR}/{GENAI_ADAPTER_FILE}"
    return facts


# --------------------------------------------------------------------------- training
def _batches(tokenizer, samples: list[tuple[str, str]], cfg: QuantizeConfig) -> list[dict]:
    """Tokenised, right-padded batches; labels are -100 outside the completion (used by the task loss)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    rows = []
    for prompt, completion in samples:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[: cfg.qat_max_seq_len]
        labels = ([-100] * len(prompt_ids) + answer_ids)[: cfg.qat_max_seq_len]
        if len(ids) >= 2:
            rows.append((ids, labels))
    if not rows:
        raise ValueError("every QAT sample tokenised to fewer than 2 tokens")
    random.Random(cfg.seed).shuffle(rows)
    batches = []
    for start in range(0, len(rows), cfg.qat_batch_size):
        chunk = rows[start : start + cfg.qat_batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (ids, lab) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def _trainable_groups(model, bits: int, lr: float) -> tuple[list[dict], int]:
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import AsymmetricLoraQuantizer, SymmetricLoraQuantizer

    model.requires_grad_(False)
    adapters: list[Any] = []
    scales: list[Any] = []
    for _, module in get_hook_storage(model).named_hooks():
        if isinstance(module, (AsymmetricLoraQuantizer, SymmetricLoraQuantizer)) and module.num_bits == bits:
            module.enable_gradients()
            lora = module.get_adapters()
            adapters.extend(lora.values())
            scales.extend(p for name, p in module.get_trainable_params().items() if name not in lora)
    if not adapters:
        raise RuntimeError(f"NNCF inserted no {bits}-bit LoRA quantisers; nothing to train")
    count = sum(p.numel() for p in adapters + scales)
    # Scales move the quantisation grid itself, so they get a smaller step than the adapters (NNCF's recipe).
    return [{"params": adapters, "lr": lr}, {"params": scales, "lr": lr / 10}], count


def _train(student, teacher, batches: list[dict], optimizer, steps: int, loss_kind: str) -> list[float]:
    import torch
    import torch.nn.functional as F

    student.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if loss_kind == "distill":
            with torch.no_grad():
                target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            keep = batch["attention_mask"].bool()
            loss = F.kl_div(
                F.log_softmax(logits[keep], dim=-1), F.log_softmax(target[keep], dim=-1),
                log_target=True, reduction="batchmean",
            )
        else:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
            )
        if not torch.isfinite(loss):
            raise RuntimeError(f"QAT loss became {loss.item()} at step {step}; lower quantize.qat_learning_rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 6))
        log.info("qat step %d/%d loss %.5f", step + 1, steps, losses[-1])
    return losses


# --------------------------------------------------------------------------- strip
def _strip_to_dequantize(model, example_input: dict) -> None:
    """Fold fake quantisers (with their LoRA) into low-bit weights + decompressors, in place.

    ``nncf.strip(strip_format=DQ)`` does this, but NNCF 3.4 imports torchao at module level for it;
    torchao is not installed here, so without it the same transformation is done below with NNCF's
    own quantiser and decompressor classes.
    """
    if importlib.util.find_spec("torchao") is not None:
        import nncf
        from nncf.parameters import StripFormat

        nncf.strip(model, do_copy=False, strip_format=StripFormat.DQ, example_input=example_input)
        return
    import torch
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.model_graph_manager import get_module_by_name, split_const_name
    from nncf.torch.quantization import layers as q

    storage = get_hook_storage(model)
    for hook_name, quantizer in list(storage.named_hooks()):
        if not isinstance(quantizer, (q.AsymmetricQuantizer, q.SymmetricQuantizer)):
            continue
        _, op_name, _ = decode_hook_name(hook_name)
        module_name, attr = split_const_name(op_name)
        weight = getattr(get_module_by_name(module_name, model), attr)
        qdq = quantizer.quantize(weight)  # includes the absorbed LoRA correction
        if hasattr(quantizer, "_lspec"):
            qdq = qdq.reshape(quantizer._lspec.weight_shape)
        qdq = qdq.to(torch.float32)
        eps = torch.finfo(torch.float32).eps
        if isinstance(quantizer, q.AsymmetricQuantizer):
            from nncf.torch.quantization.quantize_functions import TuneRange

            lo, hi = quantizer.level_low, quantizer.level_high
            span = abs(quantizer.input_range) + quantizer.eps
            low, span = TuneRange.apply(quantizer.input_low, span, quantizer.levels)
            scale = _nonzero(span.to(torch.float32) / hi, eps)
            zero = torch.clip(lo - torch.round(low.to(torch.float32) / scale), lo, hi)
            codes = torch.clip(torch.round(qdq / scale + zero), lo, hi).to(torch.uint8)
            zero = zero.to(torch.uint8)
            if quantizer.num_bits == 8:
                decompressor = q.INT8AsymmetricWeightsDecompressor(
                    scale=scale, zero_point=zero, result_dtype=weight.dtype
                )
            else:
                decompressor = q.INT4AsymmetricWeightsDecompressor(
                    scale=scale, zero_point=zero, compressed_weight_shape=codes.shape,
                    result_shape=weight.shape, result_dtype=weight.dtype,
                )
        else:
            scale = _nonzero(quantizer.scale.to(torch.float32) / abs(quantizer.level_low), eps)
            codes = torch.clip(torch.round(qdq / scale), quantizer.level_low, quantizer.level_high).to(torch.int8)
            if quantizer.num_bits == 8:
                decompressor = q.INT8SymmetricWeightsDecompressor(scale=scale, result_dtype=weight.dtype)
            else:
                decompressor = q.INT4SymmetricWeightsDecompressor(
                    scale=scale, compressed_weight_shape=codes.shape, result_shape=weight.shape,
                    result_dtype=weight.dtype,
                )
        weight.requires_grad = False
        weight.data = decompressor.pack_weight(codes)
        storage.set_submodule(hook_name, decompressor)


def _nonzero(scale, eps: float):
    import torch

    return torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)
