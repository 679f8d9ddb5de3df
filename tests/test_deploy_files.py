"""deploy/ checked statically (Docker cannot run here): compose and the Dockerfile refer to files that
exist and to commands that exist, nginx and Prometheus accept their configs, and the alert rules and
the dashboard only name metrics the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
# Made by the operator before `docker compose up` (certificates, .env), never committed.
GENERATED = DEPLOY / "local"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def test_compose_parses_and_has_the_whole_stack():
    services = _services()
    for name in ("postgres", "mlflow", "prefect-server", "prefect-worker", "gateway-1", "gateway-2", "nginx",
                 "prometheus", "grafana", "gateway-gpu"):
        assert name in services, name
    assert services["gateway-gpu"]["profiles"] == ["gpu"]
    assert "--app-name" in services["mlflow"]["command"] and "basic-auth" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert services["prefect-worker"]["command"][:4] == ["worker", "start", "--pool", "lmforge"]


def test_every_file_compose_and_dockerfile_refer_to_exists():
    for name, service in _services().items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), (name, build)
            targets = re.findall(r"^FROM \S+ AS (\w+)", (context / build["dockerfile"]).read_text(), re.M)
            assert build["target"] in targets, (name, build["target"], targets)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                if GENERATED in path.parents:
                    continue
                assert path.exists(), f"{name}: volume source {source} does not exist"
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile: COPY {source} does not exist"
    assert (REPO / ".dockerignore").is_file()


def test_no_password_is_written_in_compose():
    for name, service in _services().items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if any(word in key for word in ("PASSWORD", "AUTH_STRING", "DATABASE_URL", "CONNECTION_URL", "SECRET")):
                assert "${" in str(value), f"{name}.{key} must come from the environment, not the file"


def _lmforge_commands() -> list[list[str]]:
    """Every argv the image runs with the `lmforge` entry point: the Dockerfile's CMDs and compose commands."""
    docker = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["lmforge"\]', docker, re.M)
    argvs = [json.loads(m) for m in re.findall(r"^CMD (\[.*\])$", docker, re.M)]
    for service in _services().values():
        if service.get("image", "").startswith("lmforge") and "entrypoint" not in service and "command" in service:
            argvs.append(service["command"])
    return argvs


def test_the_image_entry_commands_are_real_cli_commands():
    from flows.cli import app

    argvs = _lmforge_commands()
    assert len(argvs) >= 5
    runner = CliRunner()
    for argv in argvs:
        result = runner.invoke(app, [*argv, "--help"])
        assert result.exit_code == 0, (argv, result.output)
        assert "Usage" in result.output


def test_mlflow_and_prefect_entry_commands_exist():
    services = _services()
    mlflow_help = subprocess.run([str(REPO / ".venv/bin/mlflow"), "server", "--help"], capture_output=True,
                                 text=True, check=True).stdout
    for flag in [a for a in services["mlflow"]["command"] if a.startswith("--")]:
        assert flag in mlflow_help, flag
    prefect = services["prefect-server"]
    assert prefect["entrypoint"] == ["python", "-m", "deploy.prefect_server"]
    prefect_help = subprocess.run([str(REPO / ".venv/bin/python"), *prefect["entrypoint"][1:], *prefect["command"][:2],
                                   "--help"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "--host" in prefect_help and "--port" in prefect_help
    assert "basic-auth" in subprocess.run(
        [str(REPO / ".venv/bin/python"), "-c", "from importlib.metadata import entry_points;"
         "print([e.name for e in entry_points(group='mlflow.app')])"], capture_output=True, text=True).stdout


def test_nginx_accepts_the_rendered_template(tmp_path):
    from deploy.certs import make_certs
    from deploy.files import NginxSite, write_nginx_conf

    if not shutil.which("nginx"):
        pytest.skip("nginx not installed (apt-get install -y nginx; `lmforge stack up` installs it)")
    certs = make_certs(tmp_path / "certs")
    site = NginxSite(["127.0.0.1:8101", "127.0.0.1:8102"], 18080, 18443, "127.0.0.1:5000", 15443,
                     "127.0.0.1:4200", 14443)
    conf = write_nginx_conf(tmp_path / "nginx", site, certs.cert.parent)
    text = (conf.parent / "lmforge.conf").read_text()
    assert "server 127.0.0.1:8102 max_fails=1" in text and not re.search(r"\$\{LMFORGE_\w+\}", text)
    assert "$host" in text  # nginx's own variables survive the substitution
    result = subprocess.run(["nginx", "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_nginx_template_refuses_a_missing_value():
    from deploy.files import render_nginx

    with pytest.raises(ValueError, match="LMFORGE_HTTPS_PORT"):
        render_nginx({"LMFORGE_UPSTREAM_SERVERS": "server a:1;"})


def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    from deploy.files import write_prometheus_dir

    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    config = write_prometheus_dir(tmp_path / "prom", ["127.0.0.1:8101"])
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _exported_metric_names() -> set[str]:
    """Every series name the gateway's /metrics can show (counters get _total, histograms _bucket/...)."""
    from serving.metrics import Metrics

    names = {"up"}
    for metric in Metrics().registry.collect():
        if metric.type == "counter":
            names |= {metric.name + "_total", metric.name + "_created"}
        elif metric.type == "histogram":
            names |= {metric.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(metric.name)
    return names


def test_alerts_and_dashboard_name_only_exported_metrics():
    exported = _exported_metric_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lmforge.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b(lmforge_\w+|up)\b(?=[{\[\s)]|$)", expr)}
    assert {"lmforge_requests_total", "lmforge_latency_seconds_bucket", "lmforge_queue_depth", "up"} <= used
    assert used <= exported, used - exported
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"GatewayReplicaDown", "GatewayHighErrorRate", "GatewayHighP95Latency", "GatewayQueueSaturated"} <= alerts
