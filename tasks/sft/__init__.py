"""Supervised (Q)LoRA fine-tuning on PyTorch Lightning.

Modules: :mod:`.data` (tokenisation with assistant-only labels, bucketing/packing, the
LightningDataModule), :mod:`.qlora` (NF4 double-quant base + PEFT LoRA), :mod:`.module` (the
LightningModule), :mod:`.checkpoints` (checksummed checkpoints, SIGTERM), :mod:`.train` (one run,
in-process or as ``python -m tasks.sft.train``), :mod:`.tracking` (MLflow), :mod:`.run` (Prefect
tasks). The flow is :mod:`flows.finetune`.
"""
