"""Generators: the model under test as ``(prompts, max_new_tokens) -> completions``, one decoding spec.

:data:`Generator` is the one interface evaluation (and anything else that needs outputs) depends
on. Both engines decode the same way (:class:`DecodingSpec`): greedy, prompts taken verbatim (the
chat template is already applied, so no extra BOS), stopping at the chat template's end-of-turn
token or eos, special tokens dropped and whitespace stripped. The gateway serves with the same
rules, and a test ties evaluation output to gateway output for the same IR.

* :class:`OpenVINOGenerator`: an OpenVINO IR (optionally with a LoRA adapter applied at runtime)
  on ``openvino_genai.ContinuousBatchingPipeline``: the engine that serves, and on a CPU 5-10x
  faster than Hugging Face ``generate``; the default evaluation engine on CPUs.
* :class:`HFGenerator`: Hugging Face weights (+ PEFT adapter) on any torch device; it can also
  score reference completions (perplexity).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

Generator = Callable[..., list[str]]
"""(prompts with the chat template applied, max new tokens) -> completions (assistant text only).
Generators that can constrain decoding also take ``pattern=`` (a regex every answer must match)."""


@dataclasses.dataclass(frozen=True)
class DecodingSpec:
    """How every engine decodes for evaluation and serving (greedy unless a request asks otherwise)."""

    stop_ids: tuple[int, ...]
    """Token ids that end an answer: the chat template's end-of-turn first, then eos."""

    @classmethod
    def for_tokenizer(cls, tokenizer) -> DecodingSpec:
        """The spec for a Hugging Face tokenizer with a chat template."""
        return cls(tuple(stop_token_ids(tokenizer)))

    @staticmethod
    def clean(text: str) -> str:
        """The strip policy applied to every decoded answer."""
        return text.strip()


def precision_properties(precision: str) -> dict[str, str]:
    """OpenVINO compile properties for an inference precision ('auto' = none: the plugin decides, which
    is bf16 on CPUs with AVX512-BF16/AMX, so greedy answers can differ from fp32 torch near a tie)."""
    return {} if precision == "auto" else {"INFERENCE_PRECISION_HINT": precision}


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the chat template's end-of-turn first, then eos.

    The end-of-turn marker is read off the template itself (what it writes right after the
    assistant's content), because some converted tokenizers carry a wrong ``eos_token``.
    """
    ids: list[int] = []
    marker = "\x00LMFORGE\x00"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        tail = rendered.split(marker, 1)[1].strip().split()[0] if marker in rendered else ""
    except Exception:  # noqa: BLE001 - no or unusable template: fall back to eos below
        tail = ""
    if tail:
        token_id = tokenizer.convert_tokens_to_ids(tail)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    eos = tokenizer.eos_token_id
    for extra in eos if isinstance(eos, list) else [eos]:
        if extra is not None and extra not in ids:
            ids.append(extra)
    if not ids:
        raise ValueError("tokenizer has neither a chat-template end-of-turn token nor an eos token")
    return ids


# --------------------------------------------------------------------------- OpenVINO
class OpenVINOGenerator:
    """Greedy generation on an OpenVINO IR with ``ContinuousBatchingPipeline``.

    Args:
        ir_dir: IR directory (openvino_model.xml + tokenizer IR + HF tokenizer files).
        adapter: LoRA safetensors in openvino_genai's layout (scale folded into B, see
            :func:`tasks.quantize.merge.write_genai_adapter`), applied at runtime; None = none.
        batch_size: prompts handed to the pipeline at once (it schedules them together).
        cache_gb: KV-cache size.
        device: OpenVINO device.
        precision: OpenVINO inference precision ('auto' = the plugin's default; 'f32' matches fp32 torch).
    """

    @classmethod
    def for_evaluation(cls, ir_dir: Path, cfg, adapter: Path | None = None) -> OpenVINOGenerator:
        """The generator an ``evaluate`` section describes (batch size, KV cache, inference precision)."""
        return cls(ir_dir, adapter, cfg.batch_size, cfg.cache_gb, precision=cfg.inference_precision)

    def __init__(self, ir_dir: Path, adapter: Path | None = None, batch_size: int = 32, cache_gb: float = 1.0,
                 device: str = "CPU", precision: str = "auto"):
        import openvino_genai as og
        from transformers import AutoTokenizer

        self.ir_dir = Path(ir_dir)
        self.batch_size = batch_size
        scheduler = og.SchedulerConfig()
        scheduler.cache_size = max(1, round(cache_gb))
        self._adapters = og.AdapterConfig(og.Adapter(str(adapter))) if adapter else None
        properties: dict = {"adapters": self._adapters} if self._adapters else {}
        properties.update(precision_properties(precision))
        self._pipe = og.ContinuousBatchingPipeline(str(self.ir_dir), scheduler, device, properties)
        self._tokenizer = self._pipe.get_tokenizer()
        self.decoding = DecodingSpec.for_tokenizer(AutoTokenizer.from_pretrained(str(self.ir_dir)))

    def config(self, max_new_tokens: int, pattern: str | None = None):
        """The greedy ``GenerationConfig`` of the decoding spec, constrained to ``pattern`` when given (the
        XGrammar regex constraint the gateway applies to the JSON-RPC label and entity tasks)."""
        import openvino_genai as og

        config = og.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
        config.stop_token_ids = set(self.decoding.stop_ids)
        if self._adapters:
            config.adapters = self._adapters
        if pattern:
            config.structured_output_config = og.StructuredOutputConfig(regex=pattern)
        return config

    def __call__(self, prompts: list[str], max_new_tokens: int = 64, pattern: str | None = None) -> list[str]:
        config = self.config(max_new_tokens, pattern)
        outputs: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            # Prompts already carry the chat template: encode them verbatim, no extra BOS or template.
            inputs = [self._tokenizer.encode(p, add_special_tokens=False).input_ids for p in chunk]
            results = self._pipe.generate(inputs, [config] * len(chunk))
            outputs.extend(self.decoding.clean(self._tokenizer.decode(r.m_generation_ids[0], skip_special_tokens=True))
                           for r in results)
        return outputs


# --------------------------------------------------------------------------- Hugging Face
class HFGenerator:
    """Greedy batched generation and reference scoring with a Hugging Face causal LM.

    Prompts are tokenised without special tokens (the chat template already put them in) and left
    padded; decoding follows :class:`DecodingSpec`.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.decoding = DecodingSpec.for_tokenizer(tokenizer)
        self.stop_ids = list(self.decoding.stop_ids)
        self.end_of_turn_id = self.stop_ids[0]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_of_turn_id

    def __call__(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy completions for ``prompts`` (assistant text, special tokens stripped)."""
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[start : start + self.batch_size], max_new_tokens))
        return out

    def _generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        import torch
        from transformers import GenerationConfig

        keep = max(1, self.max_length - max_new_tokens)
        encoded = [self._encode(p)[-keep:] for p in prompts]
        width = max(len(ids) for ids in encoded)
        device = self.model.device
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            generated = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        texts = []
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            texts.append(self.decoding.clean(self.tokenizer.decode(row[:cut], skip_special_tokens=True)))
        return texts

    def completion_nll(self, prompts: list[str], completions: list[str]) -> list[tuple[float, int]]:
        """Summed NLL (nats) and token count of each completion + end-of-turn given its prompt."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        results: list[tuple[float, int]] = []
        device = self.model.device
        for start in range(0, len(prompts), self.batch_size):
            pairs = []
            for prompt, completion in zip(
                prompts[start : start + self.batch_size], completions[start : start + self.batch_size], strict=True
            ):
                target = self._encode(completion)[: self.max_length - 1] + [self.end_of_turn_id]
                context = self._encode(prompt)[-max(1, self.max_length - len(target)) :]
                pairs.append((context, target))
            width = max(len(c) + len(t) for c, t in pairs)
            ids = torch.full((len(pairs), width), self.pad_id)
            attention = torch.zeros((len(pairs), width), dtype=torch.long)
            labels = torch.full((len(pairs), width), -100)
            for row, (context, target) in enumerate(pairs):
                seq = context + target
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
                labels[row, len(context) : len(seq)] = torch.tensor(target)
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            shifted = labels[:, 1:]
            mask = shifted != -100
            token_lp = logprobs.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            for row in range(len(pairs)):
                results.append((float(-token_lp[row].sum()), int(mask[row].sum())))
        return results

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_generator(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    merge_adapter: bool = True,
    device: str = "auto",
) -> HFGenerator:
    """Load an imported model (and optionally a PEFT adapter on top) as an :class:`HFGenerator`.

    Args:
        model_dir: Hugging Face model directory (e.g. ``<home>/models/smollm2-135m``).
        adapter_dir: PEFT adapter directory; its tokenizer is used when it ships one.
        batch_size: prompts per ``generate`` call.
        max_length: longest sequence fed to the model; prompts are cut from the left.
        merge_adapter: fold the LoRA weights into the base weights (faster, same outputs up to
            float rounding); False keeps the PEFT wrapper.
        device: torch device (``cuda:0``, ``cpu``) or ``auto`` (a GPU when torch sees one).
    """
    from tasks.models import load_model, load_tokenizer
    from tasks.runtime import torch_device

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    model = load_model(model_dir)
    tokenizer_dir = model_dir
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        if merge_adapter:
            # Same function (to float rounding) without the per-layer LoRA matmuls: ~25% faster decoding.
            model = model.merge_and_unload()
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer_dir = adapter_dir
    model = model.to(torch_device(device))
    return HFGenerator(model, load_tokenizer(tokenizer_dir), batch_size, max_length)
