"""The MLflow pyfunc flavour of a registered lmforge model: generation with its OpenVINO IR.

``mlflow.pyfunc.load_model("models:/lmforge-assistant@champion").predict(...)`` accepts a list of
user messages, a DataFrame with a ``prompt`` column, or a list of chat-message lists, and returns
the greedy completions.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

OPENVINO_ARTIFACT = "openvino"


class LmforgeChatModel(mlflow.pyfunc.PythonModel):
    """Chat generation with ``openvino_genai.LLMPipeline`` over the logged OpenVINO IR."""

    def load_context(self, context) -> None:
        import openvino_genai

        self._pipeline = openvino_genai.LLMPipeline(context.artifacts[OPENVINO_ARTIFACT], "CPU")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate them
        import openvino_genai

        params = params or {}
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = int(params.get("max_new_tokens", 64))
        config.do_sample = False
        config.apply_chat_template = False  # prompts are rendered by _as_prompt below
        return [self._pipeline.generate(self._as_prompt(item), config) for item in _rows(model_input)]

    def _as_prompt(self, item: Any) -> str:
        # A chat (list of messages) is rendered with the model's own template; plain text is
        # treated as one user message, which is how the model was fine-tuned.
        messages = item if isinstance(item, list) else [{"role": "user", "content": str(item)}]
        tokenizer = self._pipeline.get_tokenizer()
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _rows(model_input: Any) -> list[Any]:
    if hasattr(model_input, "columns"):  # pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)
