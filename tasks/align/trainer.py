"""One alignment run: the SFT adapter -> GRPO stage after stage -> the aligned adapter.

:func:`train_stages` is the plain function (tests and the Prefect task call it). Each stage builds
a fresh policy from the adapter the previous stage wrote (the SFT adapter for the first), so a
stage's KL reference is the policy it started from, and every stage's adapter stays on disk::

    <out_dir>/stages/<i>-<name>/adapter/     adapter after stage i (+ tokenizer)
    <out_dir>/stages/<i>-<name>/history.json TRL's per-step logs and the reward weights per step
    <out_dir>/adapter/                       the final adapter (a copy of the last stage's)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from configs.schema import AlignConfig, AlignStageConfig
from tasks.align.data import prompt_rows, rows_needed, stage_tasks
from tasks.files import atomic_write_text, swap_into_place
from tasks.rewards import WeightSchedule, build_reward_funcs
from tasks.runtime import torch_device
from tasks.tracking import is_metric

log = logging.getLogger(__name__)

MetricSink = Callable[[int, dict[str, float]], None]
"""Receives (global step, metrics) once per optimiser step, e.g. an MLflow logger."""


class AlignModelError(ValueError):
    """The base model or the adapter to continue from cannot be loaded."""


# --------------------------------------------------------------------------- policy
def load_policy(model_dir: Path, adapter_dir: Path, method: str, device: str = "cpu"):
    """The base (NF4 4-bit for ``qlora``, quantised on ``device``; fp32 for ``lora``) with ``adapter_dir``
    as the trainable adapter.

    Raises:
        AlignModelError: missing model or adapter directory.
    """
    from peft import PeftModel

    from tasks.sft.qlora import SFTModelError, load_base

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AlignModelError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        base = load_base(Path(model_dir), method, device)
    except SFTModelError as err:
        raise AlignModelError(str(err)) from None
    for param in base.parameters():
        param.requires_grad_(False)
    policy = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log.info("policy: %s base + adapter %s (%s trainable parameters)", method, adapter_dir, f"{trainable:,}")
    return policy


def adapter_tensors(policy, adapter: str = "default") -> dict[str, Any]:
    """Detached copies of the LoRA weights of ``adapter`` (to check that training moved them)."""
    marker = f".{adapter}."
    return {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" in name and marker in name}


def _restore_fp32_adapters(policy) -> None:
    # TRL casts trainable LoRA weights of a quantised model to bf16 (the QLoRA paper's GPU recipe). On
    # CPU that is slower, and at alignment learning rates (~1e-6) most Adam updates are smaller than
    # half a bf16 ulp, so the adapter would silently not move; keep them (and the ref copy) in fp32.
    import torch

    for name, param in policy.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()


# --------------------------------------------------------------------------- trainer config
def grpo_args(cfg: AlignConfig, stage: AlignStageConfig, out_dir: Path):
    """TRL ``GRPOConfig`` for ``stage`` from the ``align`` section.

    TRL counts completions: each optimiser step samples ``num_generations`` completions for
    ``batch_size`` prompts in one generation batch, then runs forward/backward over them in
    micro-batches of :func:`micro_batch` completions (``per_device_train_batch_size``), accumulating
    gradients (``gradient_accumulation_steps``; TRL generates once per accumulated step).
    """
    from trl import GRPOConfig

    completions = cfg.batch_size * cfg.num_generations
    micro = micro_batch(cfg)
    return GRPOConfig(
        output_dir=str(out_dir),
        max_steps=stage.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro,
        num_generations=cfg.num_generations,
        num_iterations=cfg.num_iterations,
        beta=cfg.kl_beta,
        epsilon=cfg.clip_epsilon,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        scale_rewards=cfg.scale_rewards,
        reward_weights=[float(w) for w in stage.reward_weights.values()],
        # The trainer's own KV cache is off for training forwards; sampling needs it on.
        generation_kwargs={"use_cache": True},
        disable_dropout=True,  # dropout would make the policy and reference log-probs disagree by noise
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.bf16,
        fp16=False,
        use_cpu=torch_device(cfg.accelerator) == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=False,  # a step bar with the reward and loss: a stage takes minutes on CPU
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
    )


def micro_batch(cfg: AlignConfig) -> int:
    """Completions per forward/backward pass: ``micro_batch_size``, or the largest divisor <= 4."""
    completions = cfg.batch_size * cfg.num_generations
    if cfg.micro_batch_size is not None:
        return cfg.micro_batch_size
    return max(d for d in range(1, min(4, completions) + 1) if completions % d == 0)


# --------------------------------------------------------------------------- callback
def _trainer_callback_class():
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        """Per step: apply the weight schedule to the trainer, hand TRL's logs to the metric sink."""

        def __init__(self, schedule: WeightSchedule, stage_index: int, stage_name: str, step_offset: int,
                     sink: MetricSink | None):
            self.schedule, self.stage_index, self.stage_name = schedule, stage_index, stage_name
            self.step_offset, self.sink = step_offset, sink
            self.trainer = None  # set after the trainer exists (callbacks are built before it)
            self.weight_history: list[dict[str, Any]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if self.trainer is not None:
                self.schedule.apply_to(self.trainer)
            self.weight_history.append({"step": state.global_step, "weights": self.current_weights(),
                                        "running": dict(self.schedule.running)})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.sink is None or not logs:
                return
            final = "train_runtime" in logs  # the end-of-training summary, not a step
            metrics: dict[str, float] = {}
            for key, value in logs.items():
                if is_metric(value):
                    metrics[f"{self.stage_name}/{key}" if final else key] = float(value)
            if not final:
                metrics["stage"] = float(self.stage_index)
                metrics.update({f"weight/{k}": v for k, v in self.current_weights().items()})
            self.sink(self.step_offset + state.global_step, metrics)

        def current_weights(self) -> dict[str, float]:
            if self.trainer is None:
                return self.schedule.weights()
            values = self.trainer.reward_weights.tolist()
            return dict(zip(self.trainer.reward_func_names, values, strict=True))

    return StageCallback


# --------------------------------------------------------------------------- stages
def run_stage(
    model_dir: Path,
    adapter_in: Path,
    adapter_out: Path,
    rows: Sequence[dict[str, str]],
    cfg: AlignConfig,
    stage: AlignStageConfig,
    method: str,
    *,
    stage_index: int = 0,
    judge=None,
    sink: MetricSink | None = None,
    step_offset: int = 0,
) -> dict[str, Any]:
    """Train one stage with GRPO and write its adapter atomically to ``adapter_out``.

    Args:
        model_dir: imported base model directory.
        adapter_in: adapter to continue from (trainable; also the KL reference when ``kl_beta > 0``).
        adapter_out: where the stage's adapter (and tokenizer) go.
        rows: GRPO rows (:func:`tasks.align.data.prompt_rows`).
        cfg: the ``align`` section.
        stage: this stage (steps, reward weights).
        method: ``qlora`` (4-bit NF4 base) or ``lora`` (fp32 base).
        stage_index: position of the stage (logged with every step).
        judge: judge for the ``judge`` reward; None = the rule-based instruction score.
        sink: receives per-step metrics at ``step_offset + step``.
        step_offset: steps of the earlier stages, so metrics form one series.

    Returns:
        ``{"name", "steps", "seconds", "adapter_dir", "weights_final", "history", "weight_history"}``.
    """
    from trl import GRPOTrainer

    from tasks.models import load_tokenizer

    if not rows:
        raise ValueError(f"stage {stage.name!r}: no prompts to train on")
    from datasets import Dataset

    tokenizer_dir = adapter_in if (Path(adapter_in) / "tokenizer_config.json").is_file() else model_dir
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    schedule = WeightSchedule.from_config(stage, cfg)
    funcs = build_reward_funcs(list(stage.reward_weights), cfg, judge=judge, schedule=schedule)
    callback = _trainer_callback_class()(schedule, stage_index, stage.name, step_offset, sink)
    policy = load_policy(model_dir, adapter_in, method, torch_device(cfg.accelerator))
    work = Path(adapter_out).parent / "trainer"
    trainer = GRPOTrainer(
        model=policy, reward_funcs=funcs, args=grpo_args(cfg, stage, work),
        train_dataset=Dataset.from_list(list(rows)), processing_class=tokenizer, callbacks=[callback],
    )
    callback.trainer = trainer
    _restore_fp32_adapters(trainer.model)
    started = time.perf_counter()
    log.info("stage %d %r: %d steps, %d prompts, rewards %s", stage_index, stage.name, stage.max_steps,
             len(rows), stage.reward_weights)
    trainer.train()
    seconds = time.perf_counter() - started
    save_adapter(trainer.model, tokenizer, Path(adapter_out))
    shutil.rmtree(work, ignore_errors=True)
    return {
        "name": stage.name, "steps": trainer.state.global_step, "seconds": round(seconds, 2),
        "adapter_dir": str(adapter_out), "weights_final": callback.current_weights(),
        "history": trainer.state.log_history, "weight_history": callback.weight_history,
    }


def train_stages(
    model_dir: Path,
    sft_adapter: Path,
    records: Sequence[dict[str, Any]],
    cfg: AlignConfig,
    out_dir: Path,
    method: str,
    *,
    judge=None,
    sink: MetricSink | None = None,
) -> dict[str, Any]:
    """Run every stage of ``cfg.stages`` in order, each from the previous stage's adapter.

    Args:
        model_dir: imported base model directory.
        sft_adapter: the SFT adapter the first stage starts from.
        records: curated training records (all tasks; each stage takes its own).
        cfg: the ``align`` section.
        out_dir: the run directory (layout in the module docstring).
        method: ``qlora`` or ``lora`` (how the base is loaded; should match the SFT run).
        judge: judge for the ``judge`` reward; None = the rule-based score.
        sink: per-step metric receiver (global step across stages).

    Returns:
        ``{"adapter_dir", "stages": [per-stage summaries], "steps", "seconds"}``; the summaries
        (with TRL's log history) are also written to ``<out_dir>/stages/<i>-<name>/history.json``.
    """
    records = list(records)
    out_dir = Path(out_dir)
    adapter = Path(sft_adapter)
    summaries: list[dict[str, Any]] = []
    offset = 0
    started = time.perf_counter()
    for index, stage in enumerate(cfg.stages):
        tasks = stage_tasks(stage)
        rows = prompt_rows(records, tasks, limit=rows_needed(stage, cfg.batch_size), seed=cfg.seed + index)
        stage_dir = out_dir / "stages" / f"{index}-{stage.name}"
        summary = run_stage(model_dir, adapter, stage_dir / "adapter", rows, cfg, stage, method,
                            stage_index=index, judge=judge, sink=sink, step_offset=offset)
        summary["tasks"] = tasks
        summary["n_prompts"] = len(rows)
        atomic_write_text(stage_dir / "history.json", json.dumps(summary, indent=1, default=str))
        summaries.append(summary)
        offset += summary["steps"]
        adapter = Path(summary["adapter_dir"])
    final = out_dir / "adapter"
    _copy_dir_atomic(adapter, final)
    return {"adapter_dir": str(final), "stages": summaries, "steps": offset,
            "seconds": round(time.perf_counter() - started, 2)}


# --------------------------------------------------------------------------- files
def save_adapter(policy, tokenizer, target: Path) -> None:
    """Write the trained ``default`` adapter (not TRL's frozen ``ref`` copy) + tokenizer atomically."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(tmp), selected_adapters=["default"])
    tokenizer.save_pretrained(str(tmp))
    swap_into_place(tmp, target)


def _copy_dir_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    swap_into_place(tmp, target)
