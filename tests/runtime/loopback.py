"""Loopback helpers for the hostile-client tests: clients with addresses of their own, and
clients that stop reading.

On loopback every client connects from 127.0.0.1, so per-address caps cannot tell them apart.
:class:`FromAddress` is a TCP forwarder: a client that connects to ``forwarder.address`` reaches
the server from ``source`` (any 127.x.y.z works on Linux), as a client on another host would.
``hold()`` stops relaying the server's bytes to the client: to the server, a client that stops
reading (HTTP/2 flow control then blocks its writes).
"""

from __future__ import annotations

import socket
import threading


class FromAddress:
    """Forward ``127.0.0.1:<self.port>`` to ``target`` (``host:port``) from ``source``."""

    def __init__(self, target: str, source: str = "127.0.0.2") -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.source = source
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()  # set: the server's bytes flow to the clients
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self) -> None:
        """Stop passing the server's bytes on (the client seems to read nothing)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        for s in [self._listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> FromAddress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket()
            upstream.bind((self.source, 0))
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                if from_server:
                    self._open.wait()
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
