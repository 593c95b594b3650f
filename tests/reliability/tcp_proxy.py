"""A TCP proxy between one client and a server, for cutting a worker off from Redis: `pause()`
stops relaying in both directions but keeps every socket open (a half-open connection, as when a
host or a link vanishes); `resume()` relays again."""

from __future__ import annotations

import selectors
import socket
import threading


class TcpProxy:
    """Listens on a free loopback port and relays each connection to ``target``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._relaying = threading.Event()
        self._relaying.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        """Stops relaying (new connections are accepted but see nothing either)."""
        self._relaying.clear()

    def resume(self) -> None:
        self._relaying.set()

    def close(self) -> None:
        self._closed.set()
        self._relaying.set()
        with self._lock:
            for s in [self._listener, *self._sockets]:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._closed.is_set():
                self._relaying.wait()
                for key, _ in sel.select(timeout=0.2):
                    if not self._relaying.is_set():
                        break  # paused meanwhile: what was read waits in the kernel's buffers
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
