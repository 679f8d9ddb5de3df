"""OpenVINO IR export (optimum-intel) and post-training quantisation of the IR (NNCF through optimum).

The fp32 IR is exported once from the merged model; every PTQ variant is derived from that IR, so a
run with three PTQ variants pays for one PyTorch trace, not three. Each IR directory also gets the
tokenizer/detokenizer IR (openvino_tokenizers) that ``openvino_genai`` needs to accept text.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from configs.schema import QuantizeConfig
from tasks.quantize.merge import copy_tokenizer_files

log = logging.getLogger(__name__)

TOKENIZER_IR = (
    "openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin",
)
MODEL_SIDE_FILES = ("config.json", "generation_config.json")
PTQ_VARIANTS = ("int8", "int4", "int8_full")


class ExportError(RuntimeError):
    """An export step that failed, with the variant and the reason."""


def export_ir(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Export a HF causal LM directory to a stateful fp32 OpenVINO IR with tokenizer/detokenizer IR.

    optimum's ``main_export(convert_tokenizer=True)`` converts the tokenizer itself but only logs a
    warning when that fails; :func:`ensure_tokenizer_ir` turns a missing tokenizer IR into an error.
    """
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # dtype fp32 keeps the reference precise (the default would store fp16 weights for large models).
    main_export(
        str(model_dir), output=str(out_dir), task="text-generation-with-past", convert_tokenizer=True,
        ov_config=OVConfig(dtype="fp32"), local_files_only=True,
    )
    copy_tokenizer_files(model_dir, out_dir)
    ensure_tokenizer_ir(model_dir, out_dir)
    return {"weight_format": "fp32", "source": str(model_dir)}


def ensure_tokenizer_ir(tokenizer_dir: Path, out_dir: Path) -> None:
    """Make sure ``out_dir`` has openvino_tokenizer/detokenizer IR, converting from ``tokenizer_dir`` if needed."""
    out_dir = Path(out_dir)
    if all((out_dir / name).is_file() for name in TOKENIZER_IR):
        return
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        # Decoder-only generation pads on the left; openvino_genai expects the converted tokenizer that way.
        tokenizer.padding_side = "left"
        ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
    except Exception as err:  # noqa: BLE001 - any conversion failure means no text interface for genai
        raise ExportError(f"could not convert the tokenizer in {tokenizer_dir} to OpenVINO IR: {err}") from err
    ov.save_model(ov_tokenizer, str(out_dir / "openvino_tokenizer.xml"))
    ov.save_model(ov_detokenizer, str(out_dir / "openvino_detokenizer.xml"))


def copy_runtime_files(src_ir: Path, dst: Path) -> None:
    """Copy tokenizer IR, HF tokenizer files and model configs from one IR dir into another."""
    for name in (*TOKENIZER_IR, *MODEL_SIDE_FILES):
        if (Path(src_ir) / name).is_file():
            shutil.copy2(Path(src_ir) / name, Path(dst) / name)
    copy_tokenizer_files(src_ir, dst)


def quantization_config(variant: str, cfg: QuantizeConfig, calibration: list[str] | None, tokenizer_dir: Path):
    """The optimum-intel quantisation config for one PTQ variant.

    int8: per-channel asymmetric weight-only (data-free). int4: group-wise, AWQ + scale estimation
    on ``calibration`` texts when given (data-free AWQ otherwise). int8_full: weights and
    activations, calibrated (requires texts).
    """
    from optimum.intel import OVQuantizationConfig, OVWeightQuantizationConfig

    if variant == "int8":
        head = logits_weight_nodes(tokenizer_dir) if cfg.int8_head_group_size else []
        # The logits weight is left to group_quantize_logits_weight: NNCF allows INT8 only per channel.
        return OVWeightQuantizationConfig(bits=8, sym=False, ignored_scope={"names": head} if head else None)
    if variant == "int4":
        data = list(calibration or []) or None
        return OVWeightQuantizationConfig(
            bits=4, sym=cfg.int4_sym, group_size=cfg.int4_group_size, ratio=cfg.int4_ratio,
            quant_method="awq" if cfg.awq else "default",
            scale_estimation=bool(cfg.scale_estimation and data),
            dataset=data, tokenizer=str(tokenizer_dir) if data else None,
            num_samples=min(cfg.calibration_samples, len(data)) if data else None,
            # Layers whose width is not a multiple of the group size fall back to INT8 instead of failing.
            group_size_fallback="adjust",
        )
    if variant == "int8_full":
        if not calibration:
            raise ExportError("int8_full needs calibration texts (activation ranges are measured on them)")
        return OVQuantizationConfig(
            bits=8, dataset=list(calibration), tokenizer=str(tokenizer_dir),
            num_samples=min(cfg.calibration_samples, len(calibration)),
        )
    raise ExportError(f"unknown PTQ variant {variant!r}; expected one of {', '.join(PTQ_VARIANTS)}")


def quantize_ir(
    fp32_ir: Path, out_dir: Path, variant: str, cfg: QuantizeConfig, calibration: list[str] | None = None
) -> dict[str, Any]:
    """Write the PTQ ``variant`` of the fp32 IR in ``fp32_ir`` to ``out_dir``.

    Returns:
        Facts for variant.json (method, group size, calibration sample count, weight element types).
    """
    from optimum.intel import OVModelForCausalLM

    qconfig = quantization_config(variant, cfg, calibration, fp32_ir)
    try:
        model = OVModelForCausalLM.from_pretrained(str(fp32_ir), quantization_config=qconfig, compile=False)
        model.save_pretrained(str(out_dir))
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - NNCF/optimum raise many types; report which variant failed
        raise ExportError(f"{variant}: quantisation failed: {type(err).__name__}: {err}") from err
    copy_runtime_files(fp32_ir, out_dir)
    facts: dict[str, Any] = {"method": "ptq"}
    if variant == "int8" and cfg.int8_head_group_size:
        used = group_quantize_logits_weight(Path(out_dir), cfg.int8_head_group_size)
        if used:
            facts["logits_weight_group_size"] = used
    facts["weight_types"] = weight_element_types(Path(out_dir))
    if variant == "int4":
        facts |= {"group_size": cfg.int4_group_size, "ratio": cfg.int4_ratio, "sym": cfg.int4_sym,
                  "awq": cfg.awq, "scale_estimation": bool(cfg.scale_estimation and calibration)}
    if variant in ("int4", "int8_full"):
        facts["calibration_samples"] = min(cfg.calibration_samples, len(calibration or []))
    return facts


def logits_weight_nodes(ir_dir: Path) -> list[str]:
    """Names of the nodes that read the weight producing the logits: the LM head MatMul feeding the
    ``logits`` output and every Gather (the token embedding) that reads the same weight when it is tied
    or a constant of the same shape when it is not. Empty when the IR has no ``logits`` output."""
    import openvino as ov

    return list(_logits_weights(ov.Core().read_model(str(Path(ir_dir) / "openvino_model.xml"))))


def _logits_weights(model) -> dict[str, Any]:
    """``{reader node name: the Constant it reads}`` for the LM head MatMul and the matching Gathers."""
    logits = next((out for out in model.outputs if "logits" in out.get_names()), None)
    if logits is None:
        return {}
    head = logits.get_node().input_value(0).get_node()
    while head.get_type_name() != "MatMul" and head.get_input_size():
        head = head.input_value(0).get_node()
    weight = _constant_source(head.input_value(1).get_node()) if head.get_type_name() == "MatMul" else None
    if weight is None:
        return {}
    readers = {head.get_friendly_name(): weight}
    for op in model.get_ops():
        if op.get_type_name() == "Gather":
            data = _constant_source(op.input_value(0).get_node())
            if data is not None and list(data.get_output_shape(0)) == list(weight.get_output_shape(0)):
                readers[op.get_friendly_name()] = data
    return readers


def _constant_source(node):
    """The Constant behind ``node`` through element-type Converts, or None."""
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def group_quantize_logits_weight(ir_dir: Path, group_size: int) -> int | None:
    """Quantise the float weight(s) behind the logits to INT8, asymmetric, per group of ``group_size``
    along the hidden dimension, and rewrite the IR in place (new files, then rename). Returns the group
    size used (the largest divisor of the hidden size not above ``group_size``), or None when the IR has
    no ``logits`` output to trace (then NNCF quantised every weight per channel and nothing changes).

    Why: NNCF quantises INT8 weights per output channel only. For most layers that loses nothing
    measurable, but the tied embedding / LM head writes the logits directly, and per-channel INT8 of
    it cost SmolLM2 ~0.5 ROUGE-L point on the validation summaries (fp32 head: -0.03; docs/BENCHMARKS.md).
    Groups of 64 add ~1 MB of f16 scales and keep the weight 1 byte per parameter; the decompression
    (Convert, Subtract zero point, Multiply scale, Reshape) is the pattern NNCF writes for INT4 groups;
    the CPU plugin keeps the weight compressed (probe RSS 552 MB vs 548 MB for all-per-channel INT8).
    """
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    ir_dir = Path(ir_dir)
    model = ov.Core().read_model(str(ir_dir / "openvino_model.xml"))
    readers = _logits_weights(model)
    if not readers:
        log.warning("%s: no 'logits' output to trace; the LM head stays INT8 per channel", ir_dir)
        return None
    # One entry per weight (tied: the MatMul and the Gather read the same one); NNCF left these in float.
    constants = {c.get_friendly_name(): c for c in readers.values() if c.get_output_element_type(0).is_real()}
    if not constants:
        raise ExportError(f"{ir_dir}: no float weight behind the logits to quantise group-wise")
    used = group_size
    for constant in constants.values():
        weight = constant.get_data().astype(np.float32)
        rows, hidden = weight.shape
        used = max(d for d in range(1, min(group_size, hidden) + 1) if hidden % d == 0)
        groups = weight.reshape(rows, hidden // used, used)
        # The range includes 0 so the zero point is a code; an all-zero group gets scale 1.
        low = np.minimum(groups.min(-1, keepdims=True), 0)
        high = np.maximum(groups.max(-1, keepdims=True), 0)
        exact = np.where(high > low, (high - low) / 255.0, 1.0)
        # f16 scale rounded up, so the whole range still fits in 255 steps (codes are never clipped).
        scale = exact.astype(np.float16)
        scale = np.where(scale.astype(np.float32) < exact, np.nextafter(scale, np.float16(np.inf)), scale)
        step = scale.astype(np.float32)
        zero = np.round(-low / step)
        codes = np.clip(np.round(groups / step + zero), 0, 255).astype(np.uint8)
        restored = ops.convert(ops.constant(codes), "f16")
        restored = ops.subtract(restored, ops.convert(ops.constant(zero.astype(np.uint8)), "f16"))
        restored = ops.multiply(restored, ops.constant(scale))
        restored = ops.reshape(restored, ops.constant(np.array([rows, hidden], dtype=np.int64)), False)
        restored = ops.convert(restored, constant.get_output_element_type(0))
        for target in list(constant.output(0).get_target_inputs()):
            target.replace_source_output(restored.output(0))
    staged = ir_dir / ".grouped-openvino_model.xml"
    ov.save_model(model, str(staged), compress_to_fp16=False)
    del model  # release the mmapped .bin before it is replaced
    staged.with_suffix(".bin").replace(ir_dir / "openvino_model.bin")
    staged.replace(ir_dir / "openvino_model.xml")
    return used


def weight_element_types(ir_dir: Path) -> dict[str, int]:
    """Count of weight-sized constants per element type (e.g. {'u4': 28, 'f32': 3}) in an IR."""
    import openvino as ov

    counts: dict[str, int] = {}
    model = ov.Core().read_model(str(Path(ir_dir) / "openvino_model.xml"))
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = list(op.get_output_shape(0))
        # Weights are the large >=2-D constants; scales, zero points and index tables are skipped.
        if len(shape) >= 2 and math.prod(shape) >= 1024 and shape[-1] > 1:
            name = op.get_output_element_type(0).get_type_name()
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
