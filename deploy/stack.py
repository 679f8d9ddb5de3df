"""The production stack on one machine, from real parts, under supervisord (``lmforge stack up``).

PostgreSQL (one server: MLflow's store, Prefect's database, the gateways' keys/feedback/limits),
MLflow with its basic-auth app, a Prefect server (auth string) and a process worker, N gateway
replicas, nginx with a generated CA (the compose template), Prometheus (the compose files). Every
program is started in dependency order and waited for, so ``up`` returns a working stack or says
which program failed and where its log is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploy import postgres
from deploy.files import DEPLOY_DIR, NginxSite, write_nginx_conf, write_prometheus_dir
from deploy.programs import REPO, WORK_POOL, StackSpec, gateway_names

DATABASES = ("mlflow", "prefect", "lmforge")
APT_PACKAGES = {"nginx": "nginx", "prometheus": "prometheus"}
POSTGRES_BINARIES = ("initdb", "postgres")


class StackError(RuntimeError):
    """The stack cannot start (a missing tool, a program that failed); the message says what to do."""


class Stack:
    """One stack rooted at ``spec.root``: files, supervisord, and the programs' lifecycle."""

    def __init__(self, spec: StackSpec):
        self.spec = spec
        self.root = spec.root

    # ----------------------------------------------------------------- files
    @property
    def conf(self) -> Path:
        return self.root / "supervisord.conf"

    @property
    def pg_data(self) -> Path:
        return postgres.data_dir(self.root)

    def write(self) -> None:
        from deploy.certs import make_certs

        spec, ports = self.spec, self.spec.ports
        for sub in ("logs", "mlflow/artifacts", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if "postgres" in spec.ensure_secrets() and self.pg_data.exists():
            # Left by an earlier stack at this path whose secrets are gone: its password is unknowable.
            shutil.rmtree(self.pg_data)
        if not (spec.certs_dir / "server.crt").is_file():
            make_certs(spec.certs_dir)
        write_nginx_conf(self.root / "nginx", NginxSite(
            upstreams=[f"127.0.0.1:{p}" for p in ports.gateways], http_port=ports.http, https_port=ports.https,
            mlflow_upstream=f"127.0.0.1:{ports.mlflow}", mlflow_tls_port=ports.mlflow_tls,
            prefect_upstream=f"127.0.0.1:{ports.prefect}", prefect_tls_port=ports.prefect_tls), spec.certs_dir)
        write_prometheus_dir(self.root / "prometheus", [f"127.0.0.1:{p}" for p in ports.gateways])
        ini = (DEPLOY_DIR / "mlflow" / "basic_auth.ini").read_text()
        (self.root / "mlflow" / "basic_auth.ini").write_text(
            ini.replace("sqlite:////mlflow/basic_auth.db", f"sqlite:///{self.root / 'mlflow' / 'basic_auth.db'}"))
        spec.save()
        self.conf.write_text(self._supervisord_conf())

    def _supervisord_conf(self) -> str:
        root, spec = self.root, self.spec
        run_as = "user=postgres\n" if os.geteuid() == 0 else ""
        sections = [f"""[unix_http_server]
file={root}/supervisor.sock
chmod=0700

[supervisord]
logfile={root}/logs/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}/logs
{"user=root" if os.geteuid() == 0 else ""}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/supervisor.sock

[program:postgres]
command={" ".join(postgres.server_argv(self.pg_data, spec.ports.postgres))}
{run_as}priority=10
autostart=false
autorestart=true
stopsignal=INT
stopwaitsecs=30
stdout_logfile={root}/logs/postgres.log
redirect_stderr=true
"""]
        # Lower priority numbers start first and stop last: the edge goes down before what it fronts.
        priorities = {"mlflow": 20, "prefect-server": 20, "prefect-worker": 30, "nginx": 40, "prometheus": 40}
        for name in ["mlflow", "prefect-server", "prefect-worker", *gateway_names(spec), "nginx", "prometheus"]:
            sections.append(f"""[program:{name}]
command={sys.executable} -m deploy.launch {root} {name}
directory={root}
environment=PYTHONPATH="{REPO}"
priority={priorities.get(name, 30)}
autostart=false
autorestart={"true" if spec.autorestart else "false"}
startsecs=1
stopasgroup=true
killasgroup=true
stopwaitsecs=40
stdout_logfile={root}/logs/{name}.log
redirect_stderr=true
""")
        return "\n".join(sections)

    # ----------------------------------------------------------------- supervisord
    def ctl(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise StackError(f"supervisorctl {' '.join(args)}: {result.stdout}{result.stderr}".strip())
        return result.stdout

    def supervisor_running(self) -> bool:
        if not (self.root / "supervisor.sock").exists():
            return False
        result = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), "pid"],
                                capture_output=True, text=True)
        return result.returncode == 0 and result.stdout.strip().isdigit()

    def pid(self, name: str) -> int:
        return int(self.ctl("pid", name).strip())

    def start(self, *names: str) -> None:
        self.ctl("start", *names)

    def state(self, name: str) -> str:
        """supervisord's state of ``name`` (RUNNING, STARTING, BACKOFF, FATAL, EXITED, STOPPED...)."""
        out = self.ctl("status", name, check=False).split()
        return out[1] if len(out) > 1 else "UNKNOWN"

    def _dead(self, name: str):
        return lambda: self.state(name) in ("FATAL", "EXITED", "STOPPED", "BACKOFF")

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else "(no log)"

    # ----------------------------------------------------------------- lifecycle
    def up(self, timeout: float = 240.0) -> None:
        """Write the files, start supervisord and every program in order, waiting for each to answer."""
        ensure_tools()
        self.root.mkdir(parents=True, exist_ok=True)
        self.write()
        postgres.init_cluster(self.pg_data, self.spec.secret("postgres"))
        if not self.supervisor_running():
            subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)], check=True)
            _wait(self.supervisor_running, 30, "supervisord", lambda: self.log("supervisord"))
        else:
            self.ctl("reread")
            self.ctl("update")
        spec = self.spec
        self.start("postgres")
        _wait(lambda: postgres.ready(self._pg_dsn("postgres")), 60, "postgres", lambda: self.log("postgres"),
              self._dead("postgres"))
        postgres.create_databases(self._pg_dsn("postgres"), DATABASES)  # as deploy/postgres/init.sql
        self.start("mlflow", "prefect-server")
        _wait(lambda: _http_ok(f"{spec.mlflow_url}/health"), timeout, "mlflow", lambda: self.log("mlflow"),
              self._dead("mlflow"))
        _wait(lambda: _http_ok(f"{spec.prefect_api_url}/health"), timeout, "prefect-server",
              lambda: self.log("prefect-server"), self._dead("prefect-server"))
        self._mlflow_gateway_user()
        self._work_pool()
        self.start("prefect-worker", *gateway_names(spec), "nginx", "prometheus")
        for index, name in enumerate(gateway_names(spec)):
            _wait(lambda i=index: _http_ok(f"{spec.gateway_url(i)}/health/live"), timeout, name,
                  lambda n=name: self.log(n), self._dead(name))
        _wait(lambda: _http_ok(f"http://127.0.0.1:{spec.ports.prometheus}/-/ready"), 60, "prometheus",
              lambda: self.log("prometheus"))
        _wait(lambda: _http_ok(f"{spec.public_url}/health/live", verify=str(spec.certs_dir / "ca.crt")), 60, "nginx",
              lambda: self.log("nginx") + (self.root / "nginx" / "logs" / "error.log").read_text()[-2000:])

    def down(self) -> None:
        """Stop every program (edge first, PostgreSQL last) and supervisord."""
        pid_file = self.root / "supervisord.pid"
        if self.supervisor_running():
            pid = int(pid_file.read_text()) if pid_file.is_file() else None
            self.ctl("shutdown", check=False)
            # supervisord exits after its children: then PostgreSQL's lock file is free for the next `up`.
            # Four priority groups, each allowed stopwaitsecs (40 s) to drain: up to ~3 min on a busy host.
            _wait(lambda: pid is None or not _alive(pid), 300, "supervisord shutdown", lambda: self.log("supervisord"))

    # ----------------------------------------------------------------- setup steps
    def _pg_dsn(self, database: str) -> str:
        return self.spec.database_url(database).replace("postgresql+psycopg://", "postgresql://")

    def _mlflow_gateway_user(self) -> None:
        from deploy.mlflow_auth import ensure_user

        env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.spec.secret("mlflow_admin")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ensure_user(self.spec.mlflow_url, "gateway", self.spec.secret("mlflow_gateway"))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _work_pool(self) -> None:
        headers = {"Authorization": "Basic " + _b64(f"admin:{self.spec.secret('prefect_admin')}")}
        api = self.spec.prefect_api_url
        if httpx.get(f"{api}/work_pools/{WORK_POOL}", headers=headers, timeout=10).status_code == 404:
            response = httpx.post(f"{api}/work_pools/", headers=headers, timeout=10,
                                  json={"name": WORK_POOL, "type": "process"})
            if response.status_code not in (200, 201, 409):
                raise StackError(f"creating work pool {WORK_POOL!r} failed: {response.status_code} {response.text}")


def ensure_tools(install: bool = True) -> None:
    """nginx and Prometheus from Debian packages (installed when missing and allowed), PostgreSQL's binaries."""
    missing = [name for name in APT_PACKAGES if shutil.which(name) is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = [APT_PACKAGES[m] for m in missing]
        print(f"installing {' '.join(packages)}: apt-get update && apt-get install -y {' '.join(packages)}",
              file=sys.stderr)
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", *packages], check=True, stdout=subprocess.DEVNULL,
                       env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        missing = [name for name in APT_PACKAGES if shutil.which(name) is None]
    if missing:
        to_install = " ".join(APT_PACKAGES[m] for m in missing)
        raise StackError(f"missing {', '.join(missing)}: install with "
                         f"`sudo apt-get update && sudo apt-get install -y {to_install}`")
    absent = [b for b in POSTGRES_BINARIES if shutil.which(b) is None]
    if absent:
        raise StackError(f"PostgreSQL's {', '.join(absent)} not on PATH: install PostgreSQL 15 "
                         "(`apt-get install -y postgresql` and add /usr/lib/postgresql/15/bin to PATH)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise StackError("running as root needs `runuser` (util-linux) to start PostgreSQL as its own user")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _http_ok(url: str, verify: bool | str = True) -> bool:
    try:
        return httpx.get(url, timeout=3, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check, timeout: float, what: str, log=None, gave_up=None) -> None:
    """Poll ``check`` until true; fail after ``timeout`` or as soon as ``gave_up()`` (a dead program)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if gave_up is not None and gave_up():
            break
        time.sleep(0.5)
    detail = f"\n--- log tail ---\n{log()}" if log else ""
    raise StackError(f"{what} did not become ready within {timeout:.0f}s{detail}")
