"""Instruction templates: turn a cleaned record into chat messages, a prompt and a completion.

The assistant content is the task's answer format (:func:`tasks.parsing.format_target`: a label
word, ``TYPE: text`` entity lines, or the text itself), so outputs parse back into the structured
label exactly. Which paraphrased instruction a record gets is a
stable function of the seed and the record id.
"""

from __future__ import annotations

from typing import Any

from configs.tasks import TemplateConfig
from tasks.data.records import stable_unit
from tasks.parsing import format_target


def completion_for(task: str, label: Any) -> str:
    """The assistant content for a structured label."""
    return format_target(task, label)


def render(
    record_id: str, task: str, text: str, label: Any, template: TemplateConfig, tokenizer, seed: int = 0
) -> dict[str, Any]:
    """Render one example with the model's chat template.

    Args:
        record_id: stable id; picks the paraphrase together with ``seed``.
        task: the record's task.
        text: cleaned input text.
        label: structured label.
        template: the task's system message and paraphrased instructions.
        tokenizer: a tokenizer with a chat template (``apply_chat_template``).
        seed: curation seed.

    Returns:
        ``messages`` (system, user, assistant), ``prompt`` (system + user with the generation
        prompt), ``completion`` (assistant content), ``template`` (paraphrase index).
    """
    index = int(stable_unit("template", seed, record_id) * len(template.instructions))
    # str.replace, not str.format: instructions may contain JSON braces.
    user = template.instructions[index].replace("{input}", text)
    completion = completion_for(task, label)
    messages = [
        {"role": "system", "content": template.system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": completion},
    ]
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    return {"messages": messages, "prompt": prompt, "completion": completion, "template": index}


def count_tokens(tokenizer, prompt: str, completion: str) -> int:
    """Tokens of prompt + completion + one end-of-turn token, as a trainer would see them."""
    ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    return len(ids) + 1
