"""Quantize and export: merged HF weights, OpenVINO IR (INT8/INT4/full-INT8 PTQ, FQ_LORA QAT), base IR + adapter.

Modules: :mod:`.validate` (adapter checks before any work), :mod:`.merge` (PEFT merge, adapter copies),
:mod:`.export` (optimum-intel export and PTQ), :mod:`.qat` (NNCF QAT, base IR for runtime LoRA),
:mod:`.report` (probe, evaluation, selection by paired intervals, markdown + chart),
:mod:`.steps` (the stage as plain steps + Prefect tasks), :mod:`.variants` (atomic variant dirs).
Heavy engines (openvino, nncf, optimum) are imported inside the functions that use them.

Nothing is imported here: evaluation imports ``export``/``merge``/``validate`` for its OpenVINO engine, and
an eager import of the whole package would make every stage's code hash (tasks/code_hash.py) depend on
the quantize stage's files.
"""
