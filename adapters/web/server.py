"""uvicorn around the web pages: started in a thread of its own (in `serve`, inside the web
process; in tests, beside the filter), stopped gracefully."""

from __future__ import annotations

import threading

import uvicorn

from sourceauth.adapters.web.app import web_app
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)


class WebServer:
    """The web pages for one engine on host:port."""

    def __init__(
        self,
        engine: SourceAuth,
        *,
        host: str,
        port: int,
        base_url: str,
        requests_per_minute: int,
        operator: tuple[str, str] | None = None,
    ) -> None:
        app = web_app(
            engine, base_url=base_url, requests_per_minute=requests_per_minute, operator=operator
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=True,  # X-Forwarded-For from a reverse proxy on this host
            forwarded_allow_ips="127.0.0.1,::1",
        )
        self.server = uvicorn.Server(config)
        self.listen = f"{host}:{port}"
        self.thread = threading.Thread(target=self.server.run, name="sourceauth-web", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):  # bounded: until uvicorn listens or gives up
            if self.server.started or not self.thread.is_alive():
                break
            deadline.wait(0.02)
        if not self.server.started:
            raise OSError(f"web pages could not listen on {self.listen}")
        log.info("web_started", listen=self.listen)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        log.info("web_stopped", listen=self.listen)
