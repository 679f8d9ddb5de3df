"""What each process of the loopback stack runs: argv and environment, from the stack's spec and secrets.

supervisord starts every program except PostgreSQL through ``python -m deploy.launch ROOT NAME``, which
calls :func:`program` and execs the result: passwords go from the 0600 files in ``ROOT/secrets`` into
that one process's environment, never into supervisord.conf, a command line (``ps`` shows those) or YAML.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET_NAMES = ("postgres", "mlflow_admin", "mlflow_gateway", "mlflow_flask", "prefect_admin")
DB_USER = "lmforge"
WORK_POOL = "lmforge"


@dataclass(frozen=True)
class StackPorts:
    """Loopback ports of every listener."""

    postgres: int
    mlflow: int
    prefect: int
    gateways: tuple[int, ...]
    http: int
    https: int
    mlflow_tls: int
    prefect_tls: int
    prometheus: int

    @classmethod
    def defaults(cls, replicas: int) -> StackPorts:
        """Fixed, memorable ports (clear of the embedded defaults 5000, 4200, 8000)."""
        return cls(postgres=15432, mlflow=15000, prefect=14200, gateways=tuple(18101 + i for i in range(replicas)),
                   http=18080, https=18443, mlflow_tls=15443, prefect_tls=14443, prometheus=19090)

    @classmethod
    def free(cls, replicas: int) -> StackPorts:
        """Ports the kernel says are free now (tests run beside other stacks)."""
        socks = []
        for _ in range(8 + replicas):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        ports = [s.getsockname()[1] for s in socks]
        for sock in socks:
            sock.close()
        return cls(ports[0], ports[1], ports[2], tuple(ports[8:]), *ports[3:8])


@dataclass
class StackSpec:
    """Everything that defines one stack; saved as ``ROOT/stack.json`` (no secrets in it)."""

    root: Path
    ports: StackPorts
    config: str = "pipeline"
    overrides: list[str] = field(default_factory=list)
    autorestart: bool = True
    scheduler_loop_s: float = 10.0
    worker_query_s: float = 5.0

    @property
    def replicas(self) -> int:
        return len(self.ports.gateways)

    def save(self) -> None:
        data = dataclasses.asdict(self) | {"root": str(self.root)}
        tmp = self.root / "stack.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.root / "stack.json")

    @classmethod
    def load(cls, root: Path) -> StackSpec:
        data = json.loads((Path(root) / "stack.json").read_text())
        ports = data.pop("ports")
        ports["gateways"] = tuple(ports["gateways"])
        return cls(**(data | {"root": Path(data["root"]), "ports": StackPorts(**ports)}))

    # ----------------------------------------------------------------- locations
    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def certs_dir(self) -> Path:
        return self.root / "certs"

    @property
    def home(self) -> Path:
        """LMFORGE_HOME of scheduled pipeline runs (the worker's)."""
        return self.root / "home"

    def secret(self, name: str) -> str:
        return (self.secrets_dir / f"{name}.txt").read_text().strip()

    def ensure_secrets(self) -> list[str]:
        """Random passwords, one 0600 file each, created once; returns the names created now."""
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        created = []
        for name in SECRET_NAMES:
            path = self.secrets_dir / f"{name}.txt"
            if not path.is_file():
                path.touch(mode=0o600)
                path.write_text(secrets.token_urlsafe(24) + "\n")
                created.append(name)
        return created

    # ----------------------------------------------------------------- URLs clients use
    def database_url(self, database: str = "lmforge", driver: str = "psycopg") -> str:
        return (f"postgresql+{driver}://{DB_USER}:{self.secret('postgres')}@127.0.0.1:{self.ports.postgres}"
                f"/{database}")

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.mlflow}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.prefect}/api"

    @property
    def public_url(self) -> str:
        return f"https://localhost:{self.ports.https}"

    def gateway_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports.gateways[index]}"

    def admin_env(self) -> dict[str, str]:
        """Environment of an operator shell: the registry as its admin, Prefect, the shared key store."""
        return {"PREFECT_API_URL": self.prefect_api_url,
                "PREFECT_API_AUTH_STRING": f"admin:{self.secret('prefect_admin')}",
                "MLFLOW_TRACKING_URI": self.mlflow_url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.secret("mlflow_admin"),
                "LMFORGE_DATABASE_URL": self.database_url(),
                "LMFORGE_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def gateway_names(spec: StackSpec) -> list[str]:
    return [f"gateway-{i + 1}" for i in range(spec.replicas)]


def program(spec: StackSpec, name: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of program ``name``."""
    py, ports = sys.executable, spec.ports
    if name == "mlflow":
        argv = [py, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                "--port", str(ports.mlflow), "--workers", "1", "--serve-artifacts",
                "--artifacts-destination", str(spec.root / "mlflow" / "artifacts")]
        return argv, {"MLFLOW_BACKEND_STORE_URI": spec.database_url("mlflow"),
                      "MLFLOW_AUTH_CONFIG_PATH": str(spec.root / "mlflow" / "basic_auth.ini"),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": spec.secret("mlflow_admin"),
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": spec.secret("mlflow_flask")}  # CSRF tokens of the auth UI
    if name == "prefect-server":
        argv = [py, "-m", "deploy.prefect_server", "server", "start", "--host", "127.0.0.1",
                "--port", str(ports.prefect)]
        return argv, {"PREFECT_HOME": str(spec.root / "prefect"),
                      "PREFECT_API_DATABASE_CONNECTION_URL": spec.database_url("prefect", driver="asyncpg"),
                      "PREFECT_SERVER_API_AUTH_STRING": f"admin:{spec.secret('prefect_admin')}",
                      "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(spec.scheduler_loop_s),
                      "PREFECT_UI_API_URL": f"https://localhost:{ports.prefect_tls}/api",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if name == "prefect-worker":
        argv = [py, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"]
        env = spec.admin_env() | {"PREFECT_HOME": str(spec.root / "prefect-worker"),
                                  "PREFECT_WORKER_QUERY_SECONDS": str(spec.worker_query_s)}
        return argv, env
    if name.startswith("gateway-"):
        index = int(name.removeprefix("gateway-")) - 1
        argv = [py, "-m", "flows.cli", "serve", "-c", spec.config, *spec.overrides, "serve.host=127.0.0.1",
                f"serve.port={ports.gateways[index]}", f"registry.tracking_uri={spec.mlflow_url}",
                f"home={spec.root / name}"]
        # The gateways only read the registry: a READ-only MLflow user, not the admin.
        return argv, {"MLFLOW_TRACKING_USERNAME": "gateway", "MLFLOW_TRACKING_PASSWORD": spec.secret("mlflow_gateway"),
                      "LMFORGE_DATABASE_URL": spec.database_url()}
    if name == "nginx":
        return ["nginx", "-p", str(spec.root / "nginx"), "-c", str(spec.root / "nginx" / "nginx.conf")], {}
    if name == "prometheus":
        prom = spec.root / "prometheus"
        return ["prometheus", f"--config.file={prom / 'prometheus.yml'}", f"--storage.tsdb.path={prom / 'data'}",
                f"--web.listen-address=127.0.0.1:{ports.prometheus}"], {}
    raise KeyError(f"no program {name!r}")
