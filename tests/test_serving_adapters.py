"""Per-request LoRA adapters the vLLM way, on the tiny model's OpenVINO engine: load/unload with vLLM's
request shape (admin keys, allowed roots only), /v1/models listing them, and a request's ``model``
naming an adapter, through the official ``openai`` client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from configs.schema import ServeConfig
from serving.app import build_app
from serving.auth import KeyStore
from tests.serving_helpers import running_gateway, tiny_lora

MODEL = "lmforge-assistant"
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_ir_dir, tiny_model_dir):
    work = tmp_path_factory.mktemp("adapters")
    home = work / "home"
    loras = {name: tiny_lora(tiny_model_dir, home / "adapters" / f"{name}.safetensors", seed=seed)
             for name, seed in (("default", 1), ("a", 2), ("b", 3))}
    outside = tiny_lora(tiny_model_dir, work / "elsewhere" / "c.safetensors", seed=4)
    store = KeyStore(home / "serving" / "keys.sqlite")
    keys = {"admin": store.add("ops", admin=True)[0], "user": store.add("user")[0]}
    # A variant loaded with an adapter has a LoRA-enabled engine, which takes more adapters at runtime.
    cfg = ServeConfig(backend="openvino", watch=False, cache_gb=1,
                      variants=[{"name": "champion", "model_uri": str(tiny_ir_dir), "adapter": str(loras["default"])}])
    with running_gateway(build_app(cfg, home)) as base:
        yield {"base": base, "keys": keys, "loras": loras, "outside": outside}


def _admin(gateway, path, body, key="admin"):
    return httpx.post(gateway["base"] + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {gateway['keys'][key]}"})


def _greedy(client, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text


def test_adapters_load_list_select_by_model_and_unload(gateway):
    client = openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["user"], max_retries=0)
    refused = _admin(gateway, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(gateway["loras"]["a"])},
                     key="user")
    assert refused.status_code in (401, 403), "loading adapters is for admin keys"
    for name, file in (("alpha", gateway["loras"]["a"]), ("beta", gateway["loras"]["b"])):
        loaded = _admin(gateway, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(file)})
        assert loaded.status_code == 200, loaded.text
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["alpha"]["parent"] == MODEL and cards["alpha"]["root"] == str(gateway["loras"]["a"].resolve())
    assert {"default", "alpha", "beta"} <= set(cards["champion"]["adapters"]), "the variant lists its adapters"
    served, alpha, beta = _greedy(client, MODEL), _greedy(client, "alpha"), _greedy(client, "beta")
    assert len({served, alpha, beta}) == 3, "each adapter answers with its own weights"

    async def together() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["user"],
                                          max_retries=0)
        calls = [async_client.completions.create(model=m, prompt=PROMPT, max_tokens=10, temperature=0)
                 for m in ("alpha", "beta", "alpha", "beta", MODEL)]
        return [r.choices[0].text for r in await asyncio.gather(*calls)]

    assert asyncio.run(together()) == [alpha, beta, alpha, beta, served], "concurrent adapters keep their own outputs"

    unloaded = _admin(gateway, "/v1/unload_lora_adapter", {"lora_name": "alpha"})
    assert unloaded.status_code == 200
    with pytest.raises(openai.NotFoundError):
        _greedy(client, "alpha")
    assert _admin(gateway, "/v1/unload_lora_adapter", {"lora_name": "alpha"}).status_code == 404
    assert _greedy(client, "beta") == beta


def test_adapter_paths_outside_the_allowed_roots_are_refused(gateway):
    outside = _admin(gateway, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(gateway["outside"])})
    assert outside.status_code == 403 and outside.json()["error"]["param"] == "lora_path", outside.text
    escape = str(gateway["loras"]["a"].parent / ".." / ".." / "elsewhere" / "c.safetensors")
    assert _admin(gateway, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": escape}).status_code == 403
    taken = _admin(gateway, "/v1/load_lora_adapter", {"lora_name": "champion", "lora_path": str(gateway["loras"]["a"])})
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    admin_api = _admin(gateway, "/admin/variants/champion", {"adapter": str(gateway["outside"])})
    assert admin_api.status_code == 403 and admin_api.json()["error"]["param"] == "adapter"
