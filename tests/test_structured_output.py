"""Structured output and honest OpenAI compatibility, through the real gateway and the tiny model on
OpenVINO (and the HF reference backend for its refusal), with the official ``openai`` client.

A random 2-layer model writes garbage when it decodes freely, so "the answer follows the constraint"
fails unless the engine really constrained it; each check also shows the free answer does not.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from configs.schema import ServeConfig
from configs.tasks import get_task
from serving.app import build_app
from tasks.parsing import answer_pattern, parse_completion
from tests.serving_helpers import running_gateway, taught_model

MODEL = "lmforge-assistant"
ASK = [{"role": "user", "content": "Reply in JSON with keys name and city for: Bob lives in Rome."}]
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "city": {"type": "string", "maxLength": 12}},
        "required": ["name", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_ir_dir):
    cfg = ServeConfig(backend="openvino", watch=False, auth=False, cache_gb=1,
                      variants=[{"name": "champion", "model_uri": str(tiny_ir_dir), "weight": 1.0}])
    app = build_app(cfg, tmp_path_factory.mktemp("so-home"))
    with running_gateway(app) as base:
        yield {"base": base, "app": app}


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway["base"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grammar(tiny_model_dir):
    """Whether a text is accepted (as a whole or as a prefix cut by max_tokens) by a JSON schema or regex:
    XGrammar's matcher over the tiny model's tokenizer, independent of the engine that decoded it."""
    import xgrammar
    from transformers import AutoTokenizer

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(
        AutoTokenizer.from_pretrained(str(tiny_model_dir))))

    def accepts(text: str, schema: dict | None = None, regex: str | None = None) -> bool:
        compiled = (compiler.compile_json_schema(json.dumps(schema)) if schema is not None
                    else compiler.compile_regex(regex))
        return xgrammar.GrammarMatcher(compiled).accept_string(text)

    return accepts


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the schema says additionalProperties: false
    name: str = Field(max_length=12)
    city: str = Field(max_length=12)


@pytest.fixture(scope="module")
def taught_client(tmp_path_factory, tiny_model_dir):
    """A gateway serving the tiny model taught to answer ASK with a JSON document that has one key too many
    (exported to IR): only a decoder held to the schema returns a valid Person."""
    from tasks.quantize.export import export_ir

    work = tmp_path_factory.mktemp("taught")
    model_dir = taught_model(tiny_model_dir, work / "hf", ASK, '{"name": "Bob", "city": "Rome", "zip": 1}')
    export_ir(model_dir, work / "ir")
    cfg = ServeConfig(backend="openvino", watch=False, auth=False, cache_gb=1,
                      variants=[{"name": "champion", "model_uri": str(work / "ir"), "weight": 1.0}])
    with running_gateway(build_app(cfg, work / "home")) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, **kwargs).choices[0]


# --------------------------------------------------------------------------- constraints honoured
def test_json_schema_response_format_constrains_the_answer(client, grammar):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": CITY, "strict": True}}
    constrained = _chat(client, response_format=fmt, max_tokens=48)
    free = _chat(client, max_tokens=48)
    text = constrained.message.content
    assert grammar(text, schema=CITY), text
    if constrained.finish_reason == "stop":  # finished: a complete, valid document
        import jsonschema

        jsonschema.validate(json.loads(text), CITY)
    assert not grammar(free.message.content, schema=CITY), "the free answer already fits: the test shows nothing"


def test_openai_parse_with_a_pydantic_model_and_a_streamed_schema_answer(taught_client):
    parsed = taught_client.beta.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                                       temperature=0, max_tokens=40)
    # A valid Person: the "zip" the model was taught is not allowed, so the decoder closed the object (the
    # tiny model's strings after that are its own; its first answer, the name, is what it learned).
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name == "Bob", parsed.choices[0].message.content
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}
    stream = taught_client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40,
                                                   response_format=fmt, stream=True)
    assert Person.model_validate_json("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    free = taught_client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40)
    assert '"zip"' in free.choices[0].message.content, "the free answer is already valid: the test shows nothing"


def test_json_object_mode(client, grammar):
    answer = _chat(client, response_format={"type": "json_object"}, max_tokens=24).message.content
    assert answer.lstrip().startswith("{") and grammar(answer, schema={"type": "object"}), answer


def test_vllm_choice_and_regex_extensions_stream_the_same_as_not(client):
    choices = ["yes", "no", "maybe so"]
    for extra, check in (({"choice": choices}, lambda t: t in choices),
                         ({"regex": r"[0-9]{3}-[A-Z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[A-Z]{2}", t))):
        body = {"structured_outputs": extra}
        whole = _chat(client, max_tokens=16, extra_body=body)
        assert check(whole.message.content) and whole.finish_reason == "stop", whole
        stream = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=16,
                                                extra_body=body, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.message.content
    completion = client.completions.create(model=MODEL, prompt="The answer is", temperature=0, max_tokens=8,
                                           extra_body={"structured_outputs": {"choice": choices}})
    assert completion.choices[0].text in choices


def test_rpc_label_and_entity_answers_follow_their_format(gateway):
    texts = ["A wonderful, moving film.", "Dull and far too long.", "Angela Merkel met Tim Cook in Paris.",
             "EU rejects German call to boycott British lamb."]

    def call(method):
        batch = [{"jsonrpc": "2.0", "method": method, "params": {"text": t}, "id": i} for i, t in enumerate(texts)]
        return [a["result"] for a in httpx.post(gateway["base"] + "/rpc", json=batch, timeout=120).json()]

    serve_cfg = gateway["app"].state.gateway.cfg
    sentiment = call("classify_sentiment")
    assert all(r["format_ok"] and r["label"] in get_task("sentiment").labels for r in sentiment), sentiment
    ner = call("extract_entities")
    line_or_none = answer_pattern("ner")
    for result in ner:  # a whole answer in the format, or one cut by max_tokens that is a prefix of one
        assert re.fullmatch(line_or_none, result["text"]) or result["finish_reason"] == "length", result
        assert parse_completion("ner", result["text"])[1] == result["format_ok"]
    serve_cfg.constrain_tasks = False
    try:
        free = call("classify_sentiment")
    finally:
        serve_cfg.constrain_tasks = True
    assert not all(r["format_ok"] for r in free), "the free answers already parse: the test shows nothing"


# --------------------------------------------------------------------------- refused, with the field named
UNSUPPORTED = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("logprobs", {"logprobs": True}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("logit_bias", {"logit_bias": {"42": 5}}),
    ("frobnicate", {"frobnicate": 1}),
    ("guided_choice", {"guided_choice": ["a", "b"]}),
]


@pytest.mark.parametrize("field,extra", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_a_field_the_gateway_does_not_honour_is_a_400_naming_it(client, field, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, max_tokens=2, extra_body=extra)
    assert caught.value.body["param"] == field and field in caught.value.body["message"]
    assert caught.value.body["code"] == "unsupported_parameter"


def test_no_op_values_and_harmless_fields_are_accepted(client):
    answer = _chat(client, max_tokens=2, logprobs=False, tools=[], presence_penalty=0, metadata={"team": "a"},
                   store=False, extra_body={"parallel_tool_calls": True, "response_format": {"type": "text"}})
    assert answer.finish_reason in ("stop", "length")


BAD_CONSTRAINTS = [
    ("schema XGrammar cannot compile", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 5, "maximum": 3}}}}, "response_format",
     "minimum greater than maximum"),
    ("not a JSON schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema", "valid JSON schema"),
    ("json_schema without schema", {"response_format": {"type": "json_schema"}}, "response_format", "required"),
    ("unknown format type", {"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ("broken regex", {"structured_outputs": {"regex": "(a|b"}}, "structured_outputs.regex", "regex"),
    ("regex XGrammar cannot use", {"structured_outputs": {"regex": "(?P<x>a)"}}, "structured_outputs",
     "not supported"),
    ("two constraints", {"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs",
     "exactly one"),
    ("both fields", {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "body",
     "not both"),
]


@pytest.mark.parametrize("name,extra,param,needle", BAD_CONSTRAINTS, ids=[b[0] for b in BAD_CONSTRAINTS])
def test_bad_constraints_are_400s_and_the_engine_keeps_serving(client, name, extra, param, needle):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, max_tokens=4, extra_body=extra)
    assert caught.value.body["param"] == param, caught.value.body
    assert needle.lower() in caught.value.body["message"].lower(), caught.value.body
    assert _chat(client, max_tokens=2).finish_reason in ("stop", "length")


def test_hf_backend_refuses_constraints_with_a_400(tmp_path, tiny_model_dir):
    cfg = ServeConfig(backend="hf", watch=False, auth=False,
                      variants=[{"name": "champion", "model_uri": str(tiny_model_dir), "weight": 1.0}])
    with running_gateway(build_app(cfg, tmp_path)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            _chat(client, max_tokens=4, response_format={"type": "json_object"})
        assert caught.value.body["param"] == "response_format" and "openvino or vllm" in caught.value.body["message"]
        assert _chat(client, max_tokens=2).finish_reason in ("stop", "length")
        rpc = httpx.post(base + "/rpc", json={"jsonrpc": "2.0", "method": "classify_sentiment",
                                              "params": {"text": "Great."}, "id": 1}, timeout=60).json()
        assert "result" in rpc, "without structured output the task methods decode freely instead of failing"


def test_evaluation_can_decode_as_the_rpc_methods_do(tiny_ir_dir):
    """evaluate.constrained: label and entity answers follow their format on the OpenVINO engine, as
    the gateway's JSON-RPC methods answer; the same generator decoding freely does not."""
    from configs.schema import EvaluateConfig
    from tasks.evaluate import OpenVINOGenerator, evaluate_records

    records = [{"id": f"s{i}", "task": "sentiment", "prompt": f"<|im_start|>user\nReview {i}: fine.<|im_end|>\n"
                "<|im_start|>assistant\n", "label": "positive"} for i in range(4)]
    records += [{"id": f"n{i}", "task": "ner", "prompt": f"<|im_start|>user\nText {i}: Bob in Rome.<|im_end|>\n"
                 "<|im_start|>assistant\n", "label": [{"text": "Bob", "type": "PER"}]} for i in range(4)]
    generator = OpenVINOGenerator(tiny_ir_dir, batch_size=8)
    free = evaluate_records(records, generator, EvaluateConfig(engine="openvino", max_new_tokens=24))
    shaped = evaluate_records(records, generator, EvaluateConfig(engine="openvino", max_new_tokens=24,
                                                                 constrained=True))
    assert shaped.metrics["format_compliance_sentiment"] == 1.0 > free.metrics["format_compliance_sentiment"]
    line = r"- [^\n()]+ \((person|organization|location|other)\)"
    for output in (row["output"] for row in shaped.table if row["task"] == "ner"):
        *whole, last = output.split("\n")  # the last line may be cut by max_new_tokens
        assert output == "none" or (all(re.fullmatch(line, w) for w in whole) and last.startswith("- ")), output
    with pytest.raises(ValueError, match="openvino"):
        EvaluateConfig(engine="hf", constrained=True)
