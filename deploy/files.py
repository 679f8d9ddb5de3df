"""The deploy/ files rendered for one host: the nginx template and Prometheus's directory.

compose.yaml and the loopback stack (deploy/stack.py) use the same template and the same
Prometheus files; only the values differ (service names and fixed ports vs. loopback ports).
"""

from __future__ import annotations

import json
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
NGINX_TEMPLATE = DEPLOY_DIR / "nginx" / "lmforge.conf.template"
PROMETHEUS_DIR = DEPLOY_DIR / "prometheus"


@dataclass(frozen=True)
class NginxSite:
    """Values of the nginx template's ``${LMFORGE_*}`` placeholders."""

    upstreams: list[str]
    http_port: int
    https_port: int
    mlflow_upstream: str
    mlflow_tls_port: int
    prefect_upstream: str
    prefect_tls_port: int
    server_name: str = "localhost"

    def values(self) -> dict[str, str]:
        # One failure takes a replica out for 10 s; nginx then tries it again with live traffic.
        servers = " ".join(f"server {u} max_fails=1 fail_timeout=10s;" for u in self.upstreams)
        return {"LMFORGE_UPSTREAM_SERVERS": servers, "LMFORGE_HTTP_PORT": str(self.http_port),
                "LMFORGE_HTTPS_PORT": str(self.https_port), "LMFORGE_SERVER_NAME": self.server_name,
                "LMFORGE_MLFLOW_UPSTREAM": self.mlflow_upstream, "LMFORGE_MLFLOW_TLS_PORT": str(self.mlflow_tls_port),
                "LMFORGE_PREFECT_UPSTREAM": self.prefect_upstream,
                "LMFORGE_PREFECT_TLS_PORT": str(self.prefect_tls_port)}


def render_nginx(values: dict[str, str], template: Path = NGINX_TEMPLATE) -> str:
    """The template with ``${LMFORGE_*}`` filled in (nginx's own ``$vars`` untouched), as envsubst does."""
    text = string.Template(template.read_text()).safe_substitute(values)
    missing = sorted(set(re.findall(r"\$\{(LMFORGE_\w+)\}", text)))
    if missing:
        raise ValueError(f"{template}: no value for {', '.join(missing)}")
    return text


def write_nginx_conf(conf_dir: Path, site: NginxSite, certs_dir: Path) -> Path:
    """A self-contained nginx configuration in ``conf_dir`` (run as ``nginx -p conf_dir -c nginx.conf``)."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "logs").mkdir(exist_ok=True)
    (conf_dir / "lmforge.conf").write_text(render_nginx(site.values()))
    certs_link = conf_dir / "certs"
    if certs_link.is_symlink() or certs_link.exists():
        certs_link.unlink()
    certs_link.symlink_to(Path(certs_dir).resolve())
    main = conf_dir / "nginx.conf"
    # What the nginx image's own nginx.conf provides around conf.d/, with every path inside conf_dir.
    main.write_text(f"""daemon off;
worker_processes 2;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {conf_dir}/logs/access.log;
    client_body_temp_path {conf_dir}/client_body;
    proxy_temp_path {conf_dir}/proxy;
    fastcgi_temp_path {conf_dir}/fastcgi;
    uwsgi_temp_path {conf_dir}/uwsgi;
    scgi_temp_path {conf_dir}/scgi;
    default_type application/octet-stream;
    include lmforge.conf;
}}
""")
    return main


def write_prometheus_dir(out: Path, targets: list[str], labels: dict[str, str] | None = None) -> Path:
    """Prometheus's config and rules copied into ``out`` with ``targets/gateways.json`` listing ``targets``."""
    (out / "targets").mkdir(parents=True, exist_ok=True)
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copyfile(PROMETHEUS_DIR / name, out / name)
    sd = [{"targets": targets, "labels": labels or {"deployment": "loopback"}}]
    tmp = out / "targets" / "gateways.json.tmp"
    tmp.write_text(json.dumps(sd, indent=2))
    tmp.replace(out / "targets" / "gateways.json")  # file_sd reloads on change: never let it see half a file
    return out / "prometheus.yml"
