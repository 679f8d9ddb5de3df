"""Evaluation decodes as the gateway serves: for the same IR and prompts, the evaluation generator's
answers equal the gateway's (OpenAI completions, and the JSON-RPC task methods with their answer-format
constraint), so the promotion gate's numbers describe the traffic path."""

from __future__ import annotations

import httpx
import openai
import pytest

from configs.schema import EvaluateConfig, ServeConfig
from serving.app import build_app
from serving.routes.rpc import METHODS, task_messages
from tasks.evaluate import OpenVINOGenerator, evaluate_records
from tests.serving_helpers import running_gateway

TEXTS = {"sentiment": ["A wonderful, moving film.", "Dull and far too long."],
         "ner": ["Angela Merkel met Tim Cook in Paris.", "EU rejects German call to boycott British lamb."],
         "summarization": ["#Person1#: Are you coming tonight?\n#Person2#: Yes, at eight."]}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_ir_dir):
    cfg = ServeConfig(backend="openvino", watch=False, auth=False, cache_gb=1,
                      variants=[{"name": "champion", "model_uri": str(tiny_ir_dir), "weight": 1.0}])
    with running_gateway(build_app(cfg, tmp_path_factory.mktemp("parity-home"))) as base:
        yield base


def _prompt(tokenizer, task: str, text: str) -> str:
    return tokenizer.apply_chat_template(task_messages(task, text), tokenize=False, add_generation_prompt=True)


def test_evaluation_answers_equal_the_gateways(served, tiny_ir_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_ir_dir))
    generator = OpenVINOGenerator(tiny_ir_dir, batch_size=4)
    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    prompts = [_prompt(tokenizer, task, text) for task, texts in TEXTS.items() for text in texts]
    # The random tiny model often ends a templated turn at once; plain text prompts make it write.
    prompts += ["The weather today is", "Once upon a time", "Paris is the capital of"]
    evaluated = generator(prompts, 16)
    served_text = [client.completions.create(model="lmforge-assistant", prompt=p, max_tokens=16,
                                             temperature=0).choices[0].text for p in prompts]
    assert evaluated == [t.strip() for t in served_text]  # the decoding spec's strip policy
    assert len({t for t in evaluated if t}) > 1, "too few distinct answers: the comparison shows little"


def test_constrained_evaluation_equals_the_rpc_methods(served, tiny_ir_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_ir_dir))
    records = [{"id": f"{task}-{i}", "task": task, "prompt": _prompt(tokenizer, task, text), "label": None,
                "input": text}
               for task, texts in TEXTS.items() for i, text in enumerate(texts)]
    for record in records:  # labels only matter for scoring; give each task a well-formed one
        record["label"] = {"sentiment": "positive", "ner": [], "summarization": "x"}[record["task"]]
    result = evaluate_records(records, OpenVINOGenerator(tiny_ir_dir, batch_size=4),
                              EvaluateConfig(engine="openvino", constrained=True))
    method = {task: name for name, task in METHODS.items()}
    calls = [{"jsonrpc": "2.0", "method": method[r["task"]], "params": {"text": r["input"]}, "id": i}
             for i, r in enumerate(records)]
    answers = sorted(httpx.post(served + "/rpc", json=calls, timeout=120).json(), key=lambda a: a["id"])
    for row, answer in zip(result.table, answers, strict=True):
        assert row["output"] == answer["result"]["text"].strip(), (row["task"], row["output"], answer)
        assert row["format_ok"] == answer["result"]["format_ok"]
