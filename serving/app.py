"""The FastAPI application: ``build_app(cfg)`` wires the gateway, routers and error handlers;
``serve(...)`` runs it under uvicorn with a graceful drain on SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from configs.schema import ServeConfig
from serving.errors import install_handlers
from serving.metrics import ResponseCounter
from serving.routes import admin, feedback, health, openai, rpc
from serving.service import Gateway

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)


def build_app(cfg: ServeConfig, home: Path, tracking_uri: str | None = None,
              templates: dict[str, Any] | None = None, kind: str | None = None) -> FastAPI:
    """The gateway app. Variants load in the lifespan startup; readiness turns green when all are loaded.

    Args:
        cfg: the ``serve`` config section.
        home: lmforge state dir (keys, feedback DB and downloaded models live under ``<home>/serving``).
        tracking_uri: MLflow tracking/registry URI for ``models:/`` variants.
        templates: per-task instruction templates (``data.templates``) for the JSON-RPC methods.
        kind: backend override (``openvino``, ``vllm``, ``hf``); None = ``cfg.backend`` (auto-resolved).
    """
    gateway = Gateway(cfg, home, tracking_uri, templates, kind)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="lmforge gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(ResponseCounter, metrics=gateway.metrics)
    install_handlers(app)
    for module in (openai, rpc, feedback, admin, health):
        app.include_router(module.router)
    return app


def serve(cfg: ServeConfig, home: Path, tracking_uri: str | None = None, templates: dict[str, Any] | None = None,
          kind: str | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT; then stop taking requests, let in-flight ones finish
    (up to ``drain_timeout_s``), release the engines and exit."""
    import uvicorn

    app = build_app(cfg, home, tracking_uri, templates, kind)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=cfg.drain_timeout_s,  # type: ignore[arg-type]  # seconds, float ok
                            lifespan="on")
    server = _draining_server(config, app.state.gateway)
    # uvicorn drains on SIGTERM, then re-raises it to the previous handler: a drained stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()


def _draining_server(config, gateway: Gateway) -> uvicorn.Server:
    """uvicorn.Server that flips readiness to 503 the moment a shutdown signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # noqa: D401 - uvicorn hook
            gateway.draining = True
            log.info("signal %s: draining (readiness now 503, in-flight requests finish)", sig)
            super().handle_exit(sig, frame)

    return Server(config)
