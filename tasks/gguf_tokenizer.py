"""Build a Hugging Face tokenizer straight from GGUF metadata (GPT-2 style byte-level BPE).

transformers 5.5 converts SmolLM2's GGUF tokenizer through its CodeLlama path: it adds five
fill-in-the-middle tokens the model has no embeddings for, prepends a BOS to every text, and marks
``<|im_start|>`` as EOS; saved and reloaded it even decodes to raw byte symbols. Reading the
vocabulary, merges and special ids from the GGUF ourselves gives the tokenizer the model was
trained with, which saves and reloads unchanged.
"""

from __future__ import annotations

from pathlib import Path

CONTROL_TOKEN = 3  # gguf TokenType.CONTROL


def tokenizer_from_gguf(path: Path):
    """A ``PreTrainedTokenizerFast`` equivalent to the model's original tokenizer.

    Raises:
        ValueError: the GGUF holds a tokenizer type other than byte-level BPE.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(str(path)).fields

    def value(key: str, default=None):
        return fields[key].contents() if key in fields else default

    if value("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer type {value('tokenizer.ggml.model')!r} is not supported (need gpt2 BPE)")
    tokens: list[str] = value("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges")]
    types: list[int] = value("tokenizer.ggml.token_type", [])

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM's pre-tokeniser ("smollm" in llama.cpp): digits one by one, then GPT-2's byte-level regex.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    def special(key: str) -> str | None:
        index = value(key)
        return tokens[index] if index is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=[t for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN][3:],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = value("tokenizer.chat_template")
    return tokenizer
