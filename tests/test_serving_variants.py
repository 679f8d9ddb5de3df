"""Variants on a real MLflow registry: engine sharing between aliases, stable A/B assignment without
a user, a missing challenger alias, and promotions the gates did not pass."""

from __future__ import annotations

import httpx
import openai
from mlflow import MlflowClient

from configs.schema import ServeConfig
from serving.app import build_app
from serving.auth import KeyStore
from serving.router import ABRouter
from tests.serving_helpers import register_versions, running_gateway, wait_for

HELLO = [{"role": "user", "content": "Say hello."}]
MODEL = "lmforge-assistant"
CHAMPION_URI, CHALLENGER_URI = f"models:/{MODEL}@champion", f"models:/{MODEL}@challenger"


def _ab_config(**overrides) -> ServeConfig:
    return ServeConfig(backend="openvino", cache_gb=1, poll_interval_s=0.2,
                       variants=[{"name": "champion", "model_uri": CHAMPION_URI, "weight": 0.5},
                                 {"name": "challenger", "model_uri": CHALLENGER_URI, "weight": 0.5}], **overrides)


def _engines(app) -> dict[str, object]:
    return {name: slot.ref for name, slot in app.state.gateway.pool.slots.items()}


def test_aliases_on_one_version_share_one_engine(tmp_path, mlflow_uri, tiny_ir_dir):
    """champion and challenger on v1: one engine process serves both. The challenger moving to v2 gets
    its own engine; moving back re-binds it to the champion's and releases v2's."""
    v1, v2 = register_versions(mlflow_uri, tiny_ir_dir, tmp_path / "artifacts")
    registry = MlflowClient(mlflow_uri, mlflow_uri)
    registry.set_registered_model_alias(MODEL, "champion", v1)
    registry.set_registered_model_alias(MODEL, "challenger", v1)
    app = build_app(_ab_config(auth=False), tmp_path / "home", tracking_uri=mlflow_uri)
    with running_gateway(app) as base:
        engines = _engines(app)
        assert engines["champion"] is engines["challenger"], "two engines for one registry version"
        variants = httpx.get(base + "/admin/variants").json()["variants"]
        assert len({v["engine"]["engine_pid"] for v in variants}) == 1
        assert variants[0]["engine"]["variants"] == ["challenger", "champion"]
        # Both variants answer, from the one engine (pinned: auth is off).
        for name in ("champion", "challenger"):
            r = httpx.post(base + "/v1/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-lmforge-variant"] == name

        shared = engines["champion"]
        registry.set_registered_model_alias(MODEL, "challenger", v2)
        wait_for(lambda: app.state.gateway.pool.slots["challenger"].ref.version == v2, timeout=60)
        engines = _engines(app)
        assert engines["champion"] is shared and engines["challenger"] is not shared
        own = engines["challenger"]
        assert own.backend.info()["engine_pid"] != shared.backend.info()["engine_pid"]

        registry.set_registered_model_alias(MODEL, "challenger", v1)
        wait_for(lambda: app.state.gateway.pool.slots["challenger"].ref is shared, timeout=60)
        wait_for(lambda: own.backend.released, timeout=30)  # nobody uses v2's engine: its process is gone
        assert not shared.backend.released and shared.variants == {"champion", "challenger"}
        swap = httpx.get(base + "/admin/variants").json()["variants"][1]["swaps"][-1]
        assert swap["shared"] and swap["load_s"] == 0 and swap["engine_variants"] == ["challenger", "champion"]


def test_requests_without_a_user_stay_on_their_callers_variant(tmp_path, mlflow_uri, tiny_ir_dir):
    """At 50/50, requests without a user are assigned by API key: each key's requests all land on the
    variant its key id hashes to (a per-request coin flip would split them)."""
    (v1,) = register_versions(mlflow_uri, tiny_ir_dir, tmp_path / "artifacts", count=1)
    registry = MlflowClient(mlflow_uri, mlflow_uri)
    for alias in ("champion", "challenger"):
        registry.set_registered_model_alias(MODEL, alias, v1)
    home = tmp_path / "home"
    store = KeyStore(home / "serving" / "keys.sqlite")
    keys = [store.add(f"client-{i}", rate_per_minute=10**6, burst=10**6) for i in range(4)]
    app = build_app(_ab_config(auth=True), home, tracking_uri=mlflow_uri)
    router = ABRouter([("champion", 0.5), ("challenger", 0.5)])
    with running_gateway(app) as base:
        for secret, record in keys:
            client = openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0)
            seen = [client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=1)
                    .headers["x-lmforge-variant"] for _ in range(12)]
            assert seen == [router.assign(f"key:{record.key_id}")] * 12, seen
        # A user still decides for itself.
        client = openai.OpenAI(base_url=base + "/v1", api_key=keys[0][0], max_retries=0)
        for user in ("ann", "bob", "cyd", "dan"):
            got = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=1, user=user)
            assert got.headers["x-lmforge-variant"] == router.assign(user)


def test_without_auth_the_client_address_decides(tmp_path, mlflow_uri, tiny_ir_dir):
    (v1,) = register_versions(mlflow_uri, tiny_ir_dir, tmp_path / "artifacts", count=1)
    registry = MlflowClient(mlflow_uri, mlflow_uri)
    for alias in ("champion", "challenger"):
        registry.set_registered_model_alias(MODEL, alias, v1)
    app = build_app(_ab_config(auth=False), tmp_path / "home", tracking_uri=mlflow_uri)
    expected = ABRouter([("champion", 0.5), ("challenger", 0.5)]).assign("addr:127.0.0.1")
    with running_gateway(app) as base:
        with httpx.Client(base_url=base, timeout=60) as http:
            seen = {http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
                    .headers["x-lmforge-variant"] for _ in range(12)}
    assert seen == {expected}


def test_ready_with_the_champion_alone_when_the_challenger_alias_does_not_exist(tmp_path, mlflow_uri, tiny_ir_dir):
    """A first registration sets only champion: the gateway is ready, says the challenger is absent and
    why, sends everyone to the champion, and picks the challenger up once its alias is set."""
    (v1,) = register_versions(mlflow_uri, tiny_ir_dir, tmp_path / "artifacts", count=1)
    registry = MlflowClient(mlflow_uri, mlflow_uri)
    registry.set_registered_model_alias(MODEL, "champion", v1)
    app = build_app(_ab_config(auth=False), tmp_path / "home", tracking_uri=mlflow_uri)
    with running_gateway(app, require_ready=False) as base:
        wait_for(lambda: app.state.gateway.pool.slots["champion"].ready, timeout=60)
        ready = httpx.get(base + "/health/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["variants"] == {"champion": "ready", "challenger": "absent"}
        assert "models:/lmforge-assistant@challenger does not exist" in body["details"]["challenger"]
        assert "champion" not in body["details"]
        users = ("ann", "bob", "cyd", "dan", "eve", "fay")
        assert "challenger" in {ABRouter([("champion", 0.5), ("challenger", 0.5)]).assign(u) for u in users}
        for user in users:
            r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                           "user": user})
            assert r.status_code == 200 and r.headers["x-lmforge-variant"] == "champion"

        registry.set_registered_model_alias(MODEL, "challenger", v1)
        wait_for(lambda: app.state.gateway.pool.slots["challenger"].ready, timeout=60)
        body = httpx.get(base + "/health/ready").json()
        assert body["variants"] == {"champion": "ready", "challenger": "ready"} and body["details"] == {}


def _metric(base: str, line_prefix: str) -> float | None:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return None


def test_gateway_refuses_versions_the_gates_did_not_pass_until_forced(tmp_path, mlflow_uri, tiny_ir_dir):
    """A reviewer points champion at a gate-failed version, then at a never-gated one (as in the MLflow
    UI): the gateway keeps serving v1 and says why (health details, metric); once `lmforge promote
    --force` tags the version, the gateway serves it."""
    from configs.schema import FORCE_PROMOTE_TAG, RegistryConfig
    from tasks.registry import promote
    from tasks.tracking import use_mlflow

    artifacts = tmp_path / "artifacts"
    (v1,) = register_versions(mlflow_uri, tiny_ir_dir, artifacts, count=1)
    (failed,) = register_versions(mlflow_uri, tiny_ir_dir, artifacts, count=1, gate_status="failed")
    (ungated,) = register_versions(mlflow_uri, tiny_ir_dir, artifacts, count=1, gate_status=None)
    registry = MlflowClient(mlflow_uri, mlflow_uri)
    registry.set_model_version_tag(MODEL, failed, "gate_reasons", '["format_compliance 0.400 < 0.9"]')
    registry.set_registered_model_alias(MODEL, "champion", v1)
    cfg = ServeConfig(backend="openvino", cache_gb=1, poll_interval_s=0.2, auth=False,
                      variants=[{"name": "champion", "model_uri": CHAMPION_URI}])
    app = build_app(cfg, tmp_path / "home", tracking_uri=mlflow_uri)
    refused = 'lmforge_refused_version{variant="champion"}'

    def served_version(base: str) -> str:
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.headers["x-lmforge-version"]

    with running_gateway(app) as base:
        assert served_version(base) == v1
        for version, why in ((failed, "gate_status=failed (format_compliance 0.400 < 0.9)"),
                             (ungated, "never gated")):
            registry.set_registered_model_alias(MODEL, "champion", version)
            wait_for(lambda version=version: _metric(base, refused) == float(version), timeout=30)
            assert served_version(base) == v1
            ready = httpx.get(base + "/health/ready")
            assert ready.status_code == 200 and ready.json()["variants"] == {"champion": "ready"}
            detail = ready.json()["details"]["champion"]
            assert f"refused models:/{MODEL}/{version}" in detail and why in detail, detail
            assert f"still serving version {v1}" in detail and f"lmforge promote {version} --force" in detail
        assert _metric(base, 'lmforge_promotions_refused_total{variant="champion"}') == 2.0

        use_mlflow(mlflow_uri, "serving-test")
        promote(RegistryConfig(model_name=MODEL), ungated, force=True)
        assert registry.get_model_version(MODEL, ungated).tags[FORCE_PROMOTE_TAG] == "true"
        wait_for(lambda: app.state.gateway.pool.slots["champion"].ref.version == ungated, timeout=60)
        assert served_version(base) == ungated and _metric(base, refused) == 0.0
        assert httpx.get(base + "/health/ready").json()["details"] == {}
        assert FORCE_PROMOTE_TAG not in registry.get_model_version(MODEL, v1).tags, "v1 passed: never force-tagged"


def test_a_refused_version_at_startup_is_not_served(tmp_path, mlflow_uri, tiny_ir_dir):
    """Nothing to keep serving: the variant is 'refused' and not in rotation; the challenger serves."""
    artifacts = tmp_path / "artifacts"
    (good,) = register_versions(mlflow_uri, tiny_ir_dir, artifacts, count=1)
    (bad,) = register_versions(mlflow_uri, tiny_ir_dir, artifacts, count=1, gate_status="failed")
    registry = MlflowClient(mlflow_uri, mlflow_uri)
    registry.set_registered_model_alias(MODEL, "champion", bad)
    registry.set_registered_model_alias(MODEL, "challenger", good)
    app = build_app(_ab_config(auth=False), tmp_path / "home", tracking_uri=mlflow_uri)
    with running_gateway(app) as base:
        body = httpx.get(base + "/health/ready").json()
        assert body["variants"] == {"champion": "refused", "challenger": "ready"}
        assert f"refused models:/{MODEL}/{bad}" in body["details"]["champion"]
        for user in ("ann", "bob", "cyd", "dan"):
            r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                           "user": user})
            assert r.headers["x-lmforge-variant"] == "challenger" and r.headers["x-lmforge-version"] == good
