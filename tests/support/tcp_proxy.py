"""A loopback TCP proxy that can freeze: a database server that stops answering (a hung host,
a network partition) without touching the real server other tests share."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class FreezableProxy:
    """Forwards 127.0.0.1:port to upstream; `freeze()` stops forwarding in both directions
    (connections stay open, nothing arrives), `close()` drops everything."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.flowing = threading.Event()
        self.flowing.set()
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = [self.listener]
        self.thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    def __enter__(self) -> FreezableProxy:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop every connection and stop listening: the server is gone."""
        self.stopping.set()
        self.flowing.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self.thread.ident is not None:
            self.thread.join(5)

    def freeze(self) -> None:
        self.flowing.clear()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                sink.close()
                return
            while not self.flowing.wait(0.2):  # frozen: hold the bytes, like a hung network
                if self.stopping.is_set():
                    return
            try:
                sink.sendall(data)
            except OSError:
                return
