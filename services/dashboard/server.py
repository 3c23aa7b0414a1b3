"""The dashboard's HTTP side: the page, ``/api/state`` and the ``/api/stream`` of server-sent events.

Python's threading HTTP server, one thread per request; nothing here touches the dashboard's
state. The service's loop thread hands over bytes only:

* :meth:`Hub.broadcast` puts an update into every stream client's bounded queue (the oldest is
  dropped when a browser does not keep up: it sees the update number skip and fetches the state
  again), and never waits for a socket;
* ``/api/state`` asks the loop thread for the whole document (:class:`FullState`), which builds
  it with its next update (within one update interval) and wakes the waiting request.

Auth (:func:`authorized`): with a token set, every request must carry it as ``?token=`` or in
the ``Authorization: Bearer`` / ``X-LLVC-Token`` header, or gets 401 and nothing else. Every
asset is served from the package folder ``static/``; no path outside it can be named.
"""
from __future__ import annotations

import collections
import hmac
import http.server
import json
import mimetypes
import threading
import urllib.parse
from pathlib import Path

__all__ = ["STATIC", "Hub", "FullState", "DashboardServer", "authorized"]

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 10.0        # a comment line this often keeps idle streams (and proxies) open
FULL_STATE_WAIT_S = 3.0   # how long /api/state waits for the loop thread before 503


class _Client:
    """One stream's bounded queue of encoded updates."""

    def __init__(self, queue_len: int):
        self.queue: collections.deque[bytes] = collections.deque(maxlen=queue_len)
        self.wake = threading.Event()
        self.dropped = 0

    def put(self, data: bytes) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(data)  # deque(maxlen) drops the oldest; append is atomic
        self.wake.set()


class Hub:
    """Stream clients; the loop thread broadcasts, each request thread drains its own queue."""

    def __init__(self, max_clients: int, queue_len: int):
        self.max_clients = max_clients
        self.queue_len = queue_len
        self.closed = False
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()  # guards the set only, held for a copy or one change

    def join(self) -> _Client | None:
        """A new client, or ``None`` when :attr:`max_clients` are connected."""
        with self._lock:
            if len(self._clients) >= self.max_clients:
                return None
            c = _Client(self.queue_len)
            self._clients.add(c)
            return c

    def leave(self, c: _Client) -> None:
        with self._lock:
            self._clients.discard(c)

    @property
    def count(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    def dropped(self) -> int:
        """Updates dropped for slow clients still connected."""
        with self._lock:
            return sum(c.dropped for c in self._clients)

    def broadcast(self, data: bytes) -> None:
        """Queue ``data`` for every client (never waits for one)."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.put(data)

    def close(self) -> None:
        """End every stream (their threads notice within a moment)."""
        self.closed = True
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.wake.set()


class FullState:
    """``/api/state`` documents, made by the loop thread on request."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted = False
        self._doc: tuple[int, bytes] | None = None  # (generation, JSON)
        self._generation = 0

    @property
    def wanted(self) -> bool:
        """Whether a request waits for a document (read by the loop thread, without a lock)."""
        return self._wanted

    def offer(self, data: bytes) -> None:
        """The loop thread's document for whoever waits."""
        with self._cond:
            self._generation += 1
            self._doc = (self._generation, data)
            self._wanted = False
            self._cond.notify_all()

    def get(self, timeout: float = FULL_STATE_WAIT_S) -> bytes | None:
        """A document made after this call began, or ``None`` if none came within ``timeout``."""
        with self._cond:
            after = self._generation
            self._wanted = True
            if not self._cond.wait_for(lambda: self._generation > after, timeout):
                return None
            return self._doc[1]


def authorized(token: str, query: str, headers) -> bool:
    """Whether a request may be served: no token set, or it carries the token."""
    if not token:
        return True
    given = urllib.parse.parse_qs(query).get("token", [""])[0]
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        given = given or auth[7:].strip()
    given = given or headers.get("X-LLVC-Token", "")
    return hmac.compare_digest(given.encode(), token.encode())


class _Handler(http.server.BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown the service's log; errors are counted instead

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        if not authorized(self.server.token, url.query, self.headers):
            self.server.unauthorized += 1
            return self._send(401, b"401 Unauthorized: this dashboard needs its token (?token=...)\n",
                              "text/plain; charset=utf-8", extra={"WWW-Authenticate": "Bearer"})
        path = url.path
        if path in ("/", "/index.html"):
            return self._file(STATIC / "index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/api/state":
            data = self.server.full_state.get()
            if data is None:
                return self._send(503, b'{"error": "the dashboard is busy; try again"}\n', "application/json")
            return self._send(200, data, "application/json")
        if path == "/api/stream":
            return self._stream()
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        return self._send(404, b"404 Not Found\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _static(self, rel: str) -> None:
        target = (STATIC / urllib.parse.unquote(rel)).resolve()
        if not target.is_relative_to(STATIC) or not target.is_file():
            return self._send(404, b"404 Not Found\n", "text/plain; charset=utf-8")
        self._file(target)

    def _file(self, path: Path) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
            ctype += "; charset=utf-8"
        self._send(200, path.read_bytes(), ctype)

    def _stream(self) -> None:
        hub = self.server.hub
        client = hub.join()
        if client is None:
            return self._send(503, b"503: too many dashboard streams open\n", "text/plain; charset=utf-8")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "keep-alive")
            self.end_headers()
            self.wfile.write(b"retry: 1000\n\n")
            self.wfile.flush()
            while not hub.closed:
                if not client.wake.wait(KEEPALIVE_S):
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                client.wake.clear()
                while client.queue and not hub.closed:
                    self.wfile.write(client.queue.popleft())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass  # the browser went away: nothing to tell anyone
        finally:
            hub.leave(client)
            self.close_connection = True


class DashboardServer(http.server.ThreadingHTTPServer):
    """The HTTP server: ``hub`` for streams, ``full_state`` for documents, ``token`` for auth."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, token: str, hub: Hub, full_state: FullState):
        self.address_family = _family(host)
        self.token = token
        self.hub = hub
        self.full_state = full_state
        self.unauthorized = 0
        super().__init__((host, port), _Handler)

    def start(self) -> threading.Thread:
        """Serve in a daemon thread."""
        t = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard-http",
                             daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Stop serving and close the listening socket (streams end within a moment)."""
        self.hub.close()
        self.shutdown()
        self.server_close()


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def encode_update(n: int, doc: dict) -> bytes:
    """One server-sent event: ``update``, id ``n``, the JSON on one data line."""
    return b"event: update\nid: %d\ndata: %s\n\n" % (n, json.dumps(doc, separators=(",", ":"),
                                                                  allow_nan=False).encode())
