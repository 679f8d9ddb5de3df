"""Quantize and export: merged HF weights, OpenVINO IR (INT8/INT4/full-INT8 PTQ, FQ_LORA QAT), base IR + adapter.

Modules: :mod:`.validate` (adapter checks before any work), :mod:`.merge` (PEFT merge, adapter copies),
:mod:`.export` (optimum-intel export and PTQ), :mod:`.qat` (NNCF QAT, base IR for runtime LoRA),
:mod:`.report` (probe, evaluation, selection by paired intervals, markdown + chart),
:mod:`.steps` (the stage as plain steps + Prefect tasks), :mod:`.variants` (atomic variant dirs).
Heavy engines (openvino, nncf, optimum) are imported inside the functions that use them.
"""

from tasks.quantize.report import select_variant
from tasks.quantize.steps import ExportPlan, build_variant, measure_variant, plan_export, write_report
from tasks.quantize.validate import AdapterError, AdapterInfo, validate_adapter

__all__ = [
    "AdapterError", "AdapterInfo", "ExportPlan", "build_variant", "measure_variant",
    "plan_export", "select_variant", "validate_adapter", "write_report",
]
