"""The dashboard's HTTP side: the page, ``/api/state``, the ``/api/stream`` of server-sent events,
and ``/api/control`` (inference's live settings, read and changed through its control endpoint).

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

``POST /api/control`` is the one request that changes anything, and a loopback dashboard asks
no token, so it must not be reachable from a foreign web page (CSRF, :func:`post_refusal`): it
needs ``Content-Type: application/json`` (which a cross-origin page cannot send without a CORS
preflight, and we never approve one), an ``Origin``, when the browser sends one, equal to the
page's own (``Host``), and without a token a loopback ``Host`` (a foreign name that resolves to
127.0.0.1, DNS rebinding, would otherwise be "same origin"). The body is parsed strictly
(:func:`parse_control_body`); inference judges the values. :class:`ControlLink` is the one REQ
socket all HTTP threads share, one request at a time.
"""
from __future__ import annotations

import collections
import hmac
import http.server
import json
import mimetypes
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import zmq

from common.config import is_loopback
from common.control import ControlClient, ControlError, ControlReply, ControlRequest, request_from_map

__all__ = ["STATIC", "Hub", "FullState", "DashboardServer", "ControlLink", "authorized", "post_refusal",
           "parse_control_body", "BadRequest", "MAX_CONTROL_BODY"]

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 10.0        # a comment line this often keeps idle streams (and proxies) open
FULL_STATE_WAIT_S = 3.0   # how long /api/state waits for the loop thread before 503
MAX_CONTROL_BODY = 4096   # a control request is a few keys; anything bigger is not one
CONTROL_TIMEOUT_MS = 2000 # inference answers between chunks (~13 ms); 2 s means it is not there


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


class ControlLink:
    """The dashboard's one REQ socket to inference's control endpoint, shared by the HTTP threads.

    A REQ socket is not thread-safe and carries one request at a time, so a lock serialises
    them (a request waits for the one before it, at most about one timeout). ``connect()`` makes
    the client on first use; after a timeout or an unreadable reply the client is handed to
    ``discard()`` and the next request connects afresh, so a lost reply can never pair with a
    later request.
    """

    def __init__(self, connect: Callable[[], ControlClient], discard: Callable[[ControlClient], None] | None = None,
                 timeout_ms: int = CONTROL_TIMEOUT_MS):
        self._connect = connect
        self._discard = discard or (lambda c: c.socket.close(0))
        self.timeout_ms = timeout_ms
        self._client: ControlClient | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.requests = self.failures = 0

    def request(self, req: ControlRequest) -> ControlReply:
        """``req``'s reply; :class:`ControlError` (one line) when inference does not answer."""
        # Waiting behind another request that itself times out must not look like a hang.
        if not self._lock.acquire(timeout=2 * self.timeout_ms / 1000 + 1):
            raise ControlError("the dashboard's control link is busy with other requests; try again")
        try:
            if self._closed:
                raise ControlError("the dashboard is stopping")
            self.requests += 1
            if self._client is None:
                try:
                    self._client = self._connect()
                except Exception as exc:  # noqa: BLE001 - BusError, SecurityError, ...: one line for the page
                    self.failures += 1
                    raise ControlError(f"cannot connect to the control endpoint ({exc})") from None
            try:
                return self._client.request(req, self.timeout_ms)
            except (ControlError, zmq.ZMQError, OverflowError, TypeError, ValueError) as exc:
                self.failures += 1
                self._drop()
                if isinstance(exc, ControlError):
                    raise
                raise ControlError(f"{type(exc).__name__}: {exc}") from None
        finally:
            self._lock.release()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                self._discard(client)
            except Exception:  # noqa: BLE001 - closing a socket must not turn into a 500
                pass

    def close(self) -> None:
        """Close the socket (waits for a request in flight, at most about one timeout)."""
        got = self._lock.acquire(timeout=self.timeout_ms / 1000 + 1)
        try:
            self._closed = True
            self._drop()
        finally:
            if got:
                self._lock.release()


class BadRequest(ValueError):
    """A control body that is not a control request: HTTP ``status`` (400, or 413 for a body
    too big), one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _host_name(host: str) -> str:
    """The name in a ``Host`` header: ``name``, ``name:port``, ``[v6]:port``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _loopback_name(name: str) -> bool:
    # Browsers map every *.localhost to loopback themselves (RFC 6761), whatever DNS says.
    return is_loopback(name) or name.endswith(".localhost")


def post_refusal(headers, token: str) -> str | None:
    """Why a ``POST /api/control`` with these headers may not be served (HTTP 403), or ``None``.

    The rules stop a foreign web page from changing anything (see the module docstring):
    JSON only (no "simple" cross-origin request), an ``Origin`` equal to the page's own
    (``http(s)://`` + ``Host``), and, with no token to prove anything, a loopback ``Host``."""
    if _media_type(headers.get("Content-Type")) != "application/json":
        return "POST /api/control needs Content-Type: application/json"
    host = (headers.get("Host") or "").strip()
    if not host:
        return "POST /api/control needs a Host header"
    origin = headers.get("Origin")
    if origin is not None:
        parts = urllib.parse.urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
            return f"Origin {origin.strip()[:100]!r} is not this dashboard's ({host[:100]}): cross-site request refused"
    if not token and not _loopback_name(_host_name(host)):
        return f"Host {host[:100]!r} is not a loopback name (this dashboard has no token): request refused"
    return None


def _no_constant(name: str):
    raise BadRequest(f"body: {name} is not a number JSON allows")


def parse_control_body(body: bytes) -> ControlRequest:
    """The request a ``POST /api/control`` body asks for; :class:`BadRequest` (one line) if it
    is not one: ``{"cmd": "set", "values": {KEY: bool|number|string}}`` or ``{"cmd": "voice",
    "checkpoint": str, "config": str (optional)}``. Whether the values are allowed is
    inference's to say (HTTP 200 with ``ok: false``)."""
    try:
        m = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except BadRequest:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"body: not JSON ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(m).__name__}")
    cmd = m.get("cmd")
    fields = {"set": {"cmd", "values"}, "voice": {"cmd", "checkpoint", "config"}}.get(cmd, set())
    extra = set(m) - fields
    if fields and extra:
        raise BadRequest(f"{sorted(extra)[0][:40]}: not a field of a {cmd} request")
    if m.get("config") == "":
        m["config"] = None
    try:
        return request_from_map(m, "body", ("set", "voice"))
    except ControlError as exc:
        raise BadRequest(f"{exc} (GET /api/control reads)" if not fields else str(exc)) from None


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
        if path == "/api/control":
            # One request answers both: the state and the voices to pick from.
            return self._control(ControlRequest("voices"))
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        return self._send(404, b"404 Not Found\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        if not authorized(self.server.token, url.query, self.headers):
            self.server.unauthorized += 1
            self.close_connection = True  # its body, if any, stays unread
            return self._send(401, b"401 Unauthorized: this dashboard needs its token (?token=...)\n",
                              "text/plain; charset=utf-8", extra={"WWW-Authenticate": "Bearer"})
        if url.path != "/api/control":
            self.close_connection = True
            return self._send(404, b"404 Not Found\n", "text/plain; charset=utf-8")
        refusal = post_refusal(self.headers, self.server.token)
        if refusal is not None:
            self.server.refused += 1
            self.close_connection = True
            return self._error(403, refusal)
        try:
            req = parse_control_body(self._body())
        except BadRequest as exc:
            return self._error(exc.status, str(exc))
        self._control(req)

    def _body(self) -> bytes:
        """The request body, at most :data:`MAX_CONTROL_BODY` bytes; :class:`BadRequest` else.
        Whatever is not read closes the connection (it cannot be resynchronised)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("body: send it with a Content-Length (no Transfer-Encoding)")
        length = self.headers.get("Content-Length", "")
        if not length.strip().isdigit():
            self.close_connection = True
            raise BadRequest("body: a Content-Length is needed")
        n = int(length)
        if n > MAX_CONTROL_BODY:
            self.close_connection = True
            raise BadRequest(f"body: more than {MAX_CONTROL_BODY} bytes", 413)
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise BadRequest("body: shorter than its Content-Length")
        return body

    def _control(self, req: ControlRequest) -> None:
        """Forward ``req`` to inference: its reply as JSON (200, ``ok`` false for a refused
        change); 502 when it does not answer."""
        link = self.server.control
        if link is None:
            return self._error(503, "this dashboard has no control link")
        try:
            reply = link.request(req)
            body = json.dumps({"ok": reply.ok, "error": reply.error, "state": reply.state},
                              separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except ControlError as exc:
            return self._error(502, f"inference did not answer: {exc}")
        except (TypeError, ValueError):  # a state JSON cannot carry (NaN, bytes): not ours to crash on
            return self._error(502, "inference replied with a state that is not JSON")
        self._send(200, body, "application/json")

    def _error(self, status: int, message: str) -> None:
        """An API error: ``{"ok": false, "error": "one line"}``."""
        line = " ".join(str(message).split())[:500]
        self._send(status, json.dumps({"ok": False, "error": line}).encode() + b"\n", "application/json")

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
    """The HTTP server: ``hub`` for streams, ``full_state`` for documents, ``token`` for auth,
    ``control`` for ``/api/control`` (``None``: answered 503)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, token: str, hub: Hub, full_state: FullState,
                 control: ControlLink | None = None):
        self.address_family = _family(host)
        self.token = token
        self.hub = hub
        self.full_state = full_state
        self.control = control
        self.unauthorized = self.refused = 0
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
        if self.control is not None:
            self.control.close()


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def encode_update(n: int, doc: dict) -> bytes:
    """One server-sent event: ``update``, id ``n``, the JSON on one data line."""
    return b"event: update\nid: %d\ndata: %s\n\n" % (n, json.dumps(doc, separators=(",", ":"),
                                                                  allow_nan=False).encode())
