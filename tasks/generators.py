"""Generators: the model under test as ``prompts -> completions``.

:data:`Generator` is the one interface evaluation (and anything else that needs outputs) depends
on. :func:`hf_generator` serves Hugging Face weights (+ optional PEFT adapter) with fixed greedy
decoding; an OpenVINO generator belongs here too and only has to be a callable of the same shape
(``completion_nll`` is optional: it is what perplexity needs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Generator = Callable[[list[str]], list[str]]
"""Prompts (chat template already applied) -> completions (assistant text only)."""


class HFGenerator:
    """Greedy batched generation and reference scoring with a Hugging Face causal LM.

    Prompts are tokenised without special tokens (the chat template already put them in), left
    padded, and decoding stops at the tokenizer's eos or the chat template's end-of-turn token.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, batch_size: int = 8, max_length: int = 2048):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_length = max_length
        self.stop_ids = stop_token_ids(tokenizer)
        self.end_of_turn_id = self.stop_ids[0]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_of_turn_id

    def __call__(self, prompts: list[str]) -> list[str]:
        """Greedy completions for ``prompts`` (assistant text, special tokens stripped)."""
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[start : start + self.batch_size]))
        return out

    def _generate_batch(self, prompts: list[str]) -> list[str]:
        import torch
        from transformers import GenerationConfig

        keep = max(1, self.max_length - self.max_new_tokens)
        encoded = [self._encode(p)[-keep:] for p in prompts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            generated = self.model.generate(input_ids=input_ids.to(self.model.device),
                                            attention_mask=attention.to(self.model.device), generation_config=config)
        texts = []
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    def completion_nll(self, prompts: list[str], completions: list[str]) -> list[tuple[float, int]]:
        """Summed NLL (nats) and token count of each completion + end-of-turn given its prompt."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        results: list[tuple[float, int]] = []
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
                logits = self.model(input_ids=ids.to(self.model.device),
                                    attention_mask=attention.to(self.model.device)).logits.float().cpu()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            shifted = labels[:, 1:]
            mask = shifted != -100
            token_lp = logprobs.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            for row in range(len(pairs)):
                results.append((float(-token_lp[row].sum()), int(mask[row].sum())))
        return results

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


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


def hf_generator(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int = 2048,
    merge_adapter: bool = True,
    device: str = "cpu",
) -> HFGenerator:
    """Load an imported model (and optionally a PEFT adapter on top) as an :class:`HFGenerator`.

    Args:
        model_dir: Hugging Face model directory (e.g. ``<home>/models/smollm2-135m``).
        adapter_dir: PEFT adapter directory; its tokenizer is used when it ships one.
        max_new_tokens: greedy decoding length limit.
        batch_size: prompts per ``generate`` call.
        max_length: longest sequence fed to the model; prompts are cut from the left.
        merge_adapter: fold the LoRA weights into the base weights (faster, same outputs up to
            float rounding); False keeps the PEFT wrapper.
        device: torch device to generate on (``cuda:0``, ``cpu``).
    """
    from tasks.models import load_model, load_tokenizer

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
    if device != "cpu":
        model = model.to(device)
    return HFGenerator(model, load_tokenizer(tokenizer_dir), max_new_tokens, batch_size, max_length)


