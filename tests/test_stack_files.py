"""The loopback stack's generated files, without starting it: secrets stay out of supervisord.conf and
command lines, every program is supervised, and the rendered nginx config passes `nginx -t`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from deploy.programs import SECRET_NAMES, StackPorts, StackSpec, gateway_names, program
from deploy.stack import Stack


@pytest.fixture()
def written(tmp_path):
    spec = StackSpec(root=tmp_path / "stack", ports=StackPorts.free(3), config="tiny", overrides=["serve.watch=false"])
    spec.root.mkdir()
    stack = Stack(spec)
    stack.write()
    return stack


def test_secrets_reach_only_each_programs_environment(written):
    spec = written.spec
    conf = written.conf.read_text()
    secrets = {name: spec.secret(name) for name in SECRET_NAMES}
    assert len(set(secrets.values())) == len(SECRET_NAMES) and all(len(v) >= 24 for v in secrets.values())
    for name in SECRET_NAMES:
        mode = (spec.secrets_dir / f"{name}.txt").stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert secrets[name] not in conf
        assert secrets[name] not in (spec.root / "stack.json").read_text()
    names = ["mlflow", "prefect-server", "prefect-worker", *gateway_names(spec), "nginx", "prometheus"]
    assert gateway_names(spec) == ["gateway-1", "gateway-2", "gateway-3"]
    for name in ["postgres", *names]:
        assert f"[program:{name}]" in conf
    for name in names:
        argv, env = program(spec, name)
        assert not any(value in " ".join(argv) for value in secrets.values()), name
    _, gateway_env = program(spec, "gateway-2")
    assert secrets["postgres"] in gateway_env["LMFORGE_DATABASE_URL"]
    assert gateway_env["MLFLOW_TRACKING_USERNAME"] == "gateway"  # the replicas only read the registry
    assert secrets["mlflow_admin"] not in gateway_env.values()
    argv, _ = program(spec, "gateway-2")
    assert f"serve.port={spec.ports.gateways[1]}" in argv and "serve.watch=false" in argv
    _, mlflow_env = program(spec, "mlflow")
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets["mlflow_admin"]
    _, prefect_env = program(spec, "prefect-server")
    assert prefect_env["PREFECT_SERVER_API_AUTH_STRING"] == f"admin:{secrets['prefect_admin']}"


def test_a_rewrite_keeps_secrets_and_the_spec_round_trips(written):
    spec = written.spec
    before = spec.secret("postgres")
    written.write()
    assert spec.secret("postgres") == before
    assert StackSpec.load(spec.root) == spec


def test_the_rendered_nginx_config_is_valid(written):
    if not shutil.which("nginx"):
        pytest.skip("nginx not installed")
    root = written.root / "nginx"
    text = (root / "lmforge.conf").read_text()
    for port in written.spec.ports.gateways:
        assert f"server 127.0.0.1:{port} " in text
    result = subprocess.run(["nginx", "-t", "-p", str(root), "-c", str(root / "nginx.conf")], capture_output=True,
                            text=True, env=os.environ)
    assert result.returncode == 0, result.stderr
