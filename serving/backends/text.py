"""The OpenVINO gateway's text side: chat template, token counts and detokenising, without OpenVINO.

The engine process owns OpenVINO (its pipeline tokenizes the prompts it is given). The gateway only
renders chat templates, counts prompt tokens and turns streamed token ids into text. Loading the
OpenVINO tokenizer for that cost the gateway ~90 MiB (the runtime, its CPU plugin and two compiled
tokenizer models) per served IR, next to an engine that already has them. So the gateway uses the
IR directory's ``tokenizer.json`` (HF ``tokenizers``) and its chat template (Jinja, rendered as
``transformers`` does) when they agree with the engine's OpenVINO tokenizer on a probe the engine
computes at load (:func:`openvino_reference`): chats with and without a system turn, an encoding of
text with multi-byte characters, special tokens and odd whitespace, and the decoding of every window
of up to 6 of its ids plus random ids (as the incremental decoder uses it). If anything differs, or
the files are missing, :func:`text_codec` falls back to the OpenVINO tokenizer in the gateway, as
before. Decoding with ``tokenizers`` is also ~2 us per call instead of ~150 us of an OpenVINO
detokenizer inference.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

PROBE_TEXT = ("Héllo wörld: naïve café, 日本語 and emoji 🙂🚀.\n\tTabs, \"quotes\", code `x = [1, 2]`;  double  spaces "
              "<|im_start|>user\nHi<|im_end|> 3.14159 -- The quick brown fox jumps over the lazy dog!")
PROBE_CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You label sentiment."}, {"role": "user", "content": PROBE_TEXT}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  Summarise:\n\nA: hi\nB: bye  "}],
]
_WINDOW = 6
_RANDOM_WINDOWS = 32


class TextCodec(Protocol):
    kind: str

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def count_tokens(self, prompt: str) -> int: ...

    def decode(self, ids: list[int]) -> str: ...


def openvino_reference(tokenizer: Any, model_dir: Path) -> dict[str, Any]:
    """What the OpenVINO tokenizer makes of the probe (run in the engine process, which has it)."""
    ids = [int(i) for i in tokenizer.encode(PROBE_TEXT, add_special_tokens=False).input_ids.data[0]]
    windows = [ids[i:j] for i in range(len(ids)) for j in range(i + 1, min(len(ids), i + _WINDOW) + 1)]
    rng = random.Random(0)
    vocab = _vocab_size(model_dir) or max(ids) + 1
    windows += [[rng.randrange(vocab) for _ in range(4)] for _ in range(_RANDOM_WINDOWS)] + [ids]
    return {"chats": [tokenizer.apply_chat_template(chat, add_generation_prompt=True) for chat in PROBE_CHATS],
            "ids": ids, "decoded": [[w, tokenizer.decode(w, skip_special_tokens=True)] for w in windows]}


class HFText:
    """``tokenizers`` + the chat template from the IR directory (``chat_template.jinja`` or
    ``tokenizer_config.json``), rendered in Jinja's sandbox like ``transformers`` does."""

    kind = "tokenizers"

    def __init__(self, model_dir: Path):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_file = model_dir / "chat_template.jinja"
        source = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if not isinstance(source, str):
            raise ValueError("no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        self.special = {key: _token_text(config.get(key)) for key in names}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def mismatch(self, reference: dict[str, Any]) -> str | None:
        """Why this codec differs from the engine's tokenizer on the probe, or None when it agrees."""
        for chat, expected in zip(PROBE_CHATS, reference["chats"], strict=True):
            if self.render_chat(chat) != expected:
                return f"chat template renders {len(chat)} message(s) differently"
        if self.tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids != reference["ids"]:
            return "encodes the probe text differently"
        for window, expected in reference["decoded"]:
            if self.decode(window) != expected:
                return f"decodes {window} differently"
        return None


class OpenVINOText:
    """The OpenVINO tokenizer in the gateway (the fallback; loads the runtime here too)."""

    kind = "openvino"

    def __init__(self, model_dir: Path):
        import openvino_genai as ov_genai

        self.tokenizer = ov_genai.Tokenizer(str(model_dir))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def count_tokens(self, prompt: str) -> int:
        return int(self.tokenizer.encode(prompt, add_special_tokens=False).input_ids.get_shape()[1])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def text_codec(model_dir: Path, reference: dict[str, Any] | None) -> TextCodec:
    """:class:`HFText` when it agrees with the engine's ``reference``, else :class:`OpenVINOText`."""
    if reference is not None and (model_dir / "tokenizer.json").is_file():
        try:
            codec = HFText(model_dir)
            why = codec.mismatch(reference)
        except Exception as err:  # noqa: BLE001 - any failure means: use the tokenizer the engine uses
            why = f"{type(err).__name__}: {err}"
        if why is None:
            return codec
        log.info("%s: tokenizer.json/chat template not used (%s); the OpenVINO tokenizer serves text", model_dir, why)
    return OpenVINOText(model_dir)


def _vocab_size(model_dir: Path) -> int | None:
    # The tokenizer's own vocabulary list is unusable here: get_vocab_vector() fails on byte-level tokens.
    try:
        size = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""
