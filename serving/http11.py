"""A small, strict HTTP/1.1 server for the drawing page: h11 parses, this module bounds what a client can hold.

h11 (python-hyper's sans-I/O HTTP/1.1 parser, the one under httpx and uvicorn) refuses what RFC 9112 says to
refuse: a malformed or conflicting Content-Length, a missing or repeated Host, bad characters, folded or
oversized headers. This module adds what no parser can know, and what the servers we tried do not do (docs/ui.md
says which attack each let through):

- framing: `Transfer-Encoding` together with `Content-Length` is refused (RFC 9112 6.3 names it a smuggling
  attempt), as is an absolute-form target naming another host than `Host`, or a `Host` that is no host name;
- time: a request's head must arrive within `Limits.head_s` of the connection's start or of the previous
  answer (a slowloris that trickles a byte a second gains nothing), its body within `Limits.body_s`;
- connections: at most `Limits.connections` at once, one thread each; past them each new connection is
  answered 503 at once, and one more thread reads and drops what it sends until it closes (at most
  `Limits.linger_s`; at most `Limits.refusals` of them at a time, past which they are closed unanswered).

Every refusal is a JSON `{"error": ...}` naming the problem; a client's mistake never prints a traceback. The
server knows nothing of the page: `Route`s, guards and the headers to send come from its caller (ui.py).
"""

from __future__ import annotations

import json
import queue
import re
import selectors
import socket
import socketserver
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from urllib.parse import urlsplit

import h11

RECEIVE_BYTES = 64 * 1024
# A host name, an IPv4 address or a bracketed IPv6 address, and an optional port (RFC 9110 7.2, without the
# sub-delimiters no loopback name uses): anything else in Host is a 400.
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(:[0-9]{0,5})?")


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server; the defaults suit one person's browser on loopback."""

    head_s: float = 10.0  # a request's line and headers, from the connection's start or the previous answer
    body_s: float = 10.0  # its body, from the end of its head; also the bound on sending one answer
    connections: int = 32  # served at once, a thread each (a browser opens 6 per host)
    refusals: int = 256  # past `connections`: answered 503 and held until they close (one thread for all)
    head_bytes: int = 32 * 1024  # request line and headers (431 past it); localhost cookies of other apps count
    drain_bytes: int = 64 * 1024 * 1024  # a refused body is read and dropped up to this, so the client gets
    # the answer rather than a reset; past it the connection is answered and closed
    linger_s: float = 2.0  # after an answer that closes the connection, how long its unread input is dropped


class Refusal(Exception):
    """A request answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = tuple(headers)


@dataclass(frozen=True)
class Request:
    """One request as a route sees it; `body` is empty until the route's body has been read."""

    method: str
    path: str
    query: str
    host: str  # the Host header ("" for an HTTP/1.0 request without one)
    headers: Mapping[str, str]  # lower-case names; a repeated field's values joined by ", " (Host cannot repeat)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, value: object, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json", tuple(headers))


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


@dataclass(frozen=True)
class Route:
    """What answers one method and path; `max_body` is the most bytes of body it takes (0: none)."""

    answer: Callable[[Request], Response]
    max_body: int = 0
    body_name: str = "body"  # in the words of a 411 or 413: "the image is 2.1 MiB; ..."


@dataclass(frozen=True)
class Site:
    """Everything the server answers: `routes` by (method, path), `guards` that may refuse a request from its
    head (each raises Refusal), and `headers` sent with every answer, refusals included."""

    routes: Mapping[tuple[str, str], Route]
    guards: tuple[Callable[[Request], None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    limits: Limits = field(default_factory=Limits)


class ClientGone(Exception):
    """The client closed the connection: nothing more to answer."""


class PageServer(socketserver.TCPServer):
    """Listens on `address` and serves `site`, a thread per connection within `site.limits`."""

    allow_reuse_address = True  # a restarted `digits ui` may take its port back from TIME_WAIT sockets
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], site: Site) -> None:
        self.site = site
        self._slots = threading.BoundedSemaphore(site.limits.connections)
        self._busy = Refuser(site)
        super().__init__(address, None)
        self._busy.start()  # after the bind: a port already taken leaves no thread behind

    def server_close(self) -> None:
        super().server_close()
        self._busy.stop()

    def process_request(self, sock: socket.socket, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy.refuse(sock)
            return

        def serve() -> None:
            try:
                Connection(sock, self.site).serve()
            finally:
                self.shutdown_request(sock)
                self._slots.release()

        threading.Thread(target=serve, name=f"page-connection:{self.server_address[1]}", daemon=True).start()


class Refuser:
    """Answers each connection past the bound with a 503 at once, then (on one thread for all) reads and drops
    what it sends until it closes, at most `linger_s`: closed with unread input, a connection is reset, and
    the client could lose the answer."""

    def __init__(self, site: Site) -> None:
        self.limits = site.limits
        self.answer = _serialised(
            error_response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the page server is busy: {site.limits.connections} connections are open, its limit; try again",
                [("Retry-After", "1")],
            ),
            site.headers,
        )
        self._arrivals: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._held = 0  # sockets queued or held; the acceptor and the refuser's thread both count
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._drop_input, name="page-refuser", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def refuse(self, sock: socket.socket) -> None:
        """Called by the acceptor: never blocks (the answer fits a new connection's empty send buffer)."""
        try:
            sock.setblocking(False)
            sock.send(self.answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self._lock:
            if self._held >= self.limits.refusals:
                sock.close()  # past both bounds: the answer is sent; a reset may yet overtake it
                return
            self._held += 1
        self._arrivals.put(sock)

    def _drop_input(self) -> None:
        selector = selectors.DefaultSelector()
        deadlines: dict[socket.socket, float] = {}
        while not self._stopped.is_set():
            while not self._arrivals.empty():
                sock = self._arrivals.get()
                selector.register(sock, selectors.EVENT_READ)
                deadlines[sock] = time.monotonic() + self.limits.linger_s
            for key, _ in selector.select(timeout=0.1):  # 0.1 s: how soon a new arrival is watched
                if not _drop_some(key.fileobj):
                    deadlines[key.fileobj] = 0.0
            now = time.monotonic()
            for sock in [sock for sock, deadline in deadlines.items() if deadline <= now]:
                selector.unregister(sock)
                sock.close()
                del deadlines[sock]
                with self._lock:
                    self._held -= 1
        for sock in deadlines:
            sock.close()
        selector.close()


def _drop_some(sock: socket.socket) -> bool:
    """Reads and drops what `sock` has; False once the client has closed (or reset) it."""
    try:
        return bool(sock.recv(RECEIVE_BYTES))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _serialised(response: Response, site_headers: Iterable[tuple[str, str]]) -> bytes:
    """`response` as bytes on the wire, with the site's headers and `Connection: close`."""
    writer = h11.Connection(h11.SERVER)  # h11 lets a server answer before any request (as 400s do)
    head = h11.Response(
        status_code=response.status,
        headers=[*_headers(response, site_headers), ("Connection", "close")],
        reason=HTTPStatus(response.status).phrase.encode(),
    )
    return writer.send(head) + writer.send(h11.Data(data=response.body)) + writer.send(h11.EndOfMessage())


def _headers(response: Response, site_headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        ("Server", "digits-ui"),
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *site_headers,
        *response.headers,
    ]


class Connection:
    """One client connection: requests read by h11 within their deadlines, answered in order."""

    def __init__(self, sock: socket.socket, site: Site) -> None:
        self.sock = sock
        self.site = site
        self.limits = site.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=site.limits.head_bytes)
        self._head_only = False  # answering a HEAD request: headers without the body

    def serve(self) -> None:
        """Answers requests until the client closes, a deadline passes, or an answer must close."""
        try:
            while self._serve_one():
                self.h11.start_next_cycle()
        except (ClientGone, h11.RemoteProtocolError, OSError):
            pass  # a reset, a closed or a silent client, or one that broke off its body: nobody to answer

    def _serve_one(self) -> bool:
        """Reads and answers one request; True when the connection can carry the next one."""
        self._head_only = False
        try:
            head = self._read_head(time.monotonic() + self.limits.head_s)
        except h11.RemoteProtocolError as err:
            status = err.error_status_hint if err.error_status_hint >= 400 else HTTPStatus.BAD_REQUEST
            words = f"malformed request: {_parser_words(err)}"
            if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:  # h11's words: "Receive buffer too long"
                words = f"the request's head is over {self.limits.head_bytes:,} bytes, the most this server takes"
            self._close_with(error_response(status, words))
            return False
        except TimeoutError:
            if self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]:
                return False  # an idle keep-alive connection: closed without a word, as HTTP allows
            self._close_with(
                error_response(HTTPStatus.REQUEST_TIMEOUT, self._late("request's head", self.limits.head_s))
            )
            return False
        self._head_only = head.method == b"HEAD"
        try:
            request = self._request(head)
        except Refusal as refusal:  # a head no client should send: answered, and the connection closed
            self._close_with(error_response(refusal.status, str(refusal)))
            return False
        length = _body_length(head)
        try:
            route = self._route(request)
        except Refusal as refusal:
            return self._refuse(refusal, length)
        return self._answer(request, route, length)

    def _read_head(self, deadline: float) -> h11.Request:
        event = self._next_event(deadline)
        if isinstance(event, h11.ConnectionClosed):
            raise ClientGone
        assert isinstance(event, h11.Request), event  # h11 yields a Request first, or raises
        return event

    def _next_event(self, deadline: float):
        """h11's next event, reading from the socket until `deadline` (TimeoutError past it)."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            self.h11.receive_data(self.sock.recv(RECEIVE_BYTES))  # b"": the client closed its side

    def _request(self, head: h11.Request) -> Request:
        """The request as routes see it, refused (Refusal) when its framing, target or host is not plain."""
        self._check_framing(head)
        headers = _joined(head.headers)
        host = headers.get("host", "")
        if host and not HOST.fullmatch(host):
            raise Refusal(HTTPStatus.BAD_REQUEST, f"not a host name in Host: {_short(host)!r}")
        path, query = _origin_form(head.target.decode("ascii"), host)
        return Request(head.method.decode("ascii"), path, query, host, headers)

    def _check_framing(self, head: h11.Request) -> None:
        """Refuses what h11 lets through: other HTTP versions, a head over the bound, TE with CL."""
        if head.http_version not in (b"1.1", b"1.0"):  # h11 reads any "HTTP/d.d"
            raise Refusal(
                HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                f"HTTP/{head.http_version.decode()} is not served here: HTTP/1.1 or HTTP/1.0",
            )
        size = len(head.target) + sum(len(name) + len(value) + 4 for name, value in head.headers)
        if size > self.limits.head_bytes:  # h11 bounds only a head still incomplete when its buffer fills
            raise Refusal(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request's head is {size:,} bytes; {self.limits.head_bytes:,} are the most this server takes",
            )
        names = {name for name, _ in head.headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            raise Refusal(
                HTTPStatus.BAD_REQUEST,
                "Transfer-Encoding and Content-Length together: the body's length is ambiguous (RFC 9112 6.3)",
            )

    def _route(self, request: Request) -> Route:
        """The route that answers `request`, once the guards let it through (Refusal otherwise)."""
        for guard in self.site.guards:
            guard(request)
        method = "GET" if request.method == "HEAD" else request.method  # HEAD: GET's answer without its body
        route = self.site.routes.get((method, request.path))
        if route is not None:
            return route
        allowed = sorted(method for method, path in self.site.routes if path == request.path)
        allowed += ["HEAD"] if "GET" in allowed else []
        if allowed:
            raise Refusal(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{request.path} answers {', '.join(allowed)}, not {request.method}",
                [("Allow", ", ".join(allowed))],
            )
        raise Refusal(HTTPStatus.NOT_FOUND, f"no such page: {request.path}")

    def _answer(self, request: Request, route: Route, length: int | None) -> bool:
        try:
            body = self._read_body(route, length)
        except TimeoutError:
            self._close_with(error_response(HTTPStatus.REQUEST_TIMEOUT, self._late("body", self.limits.body_s)))
            return False
        except Refusal as refusal:
            return self._refuse(refusal, length)
        try:
            response = route.answer(replace(request, body=body))
        except Refusal as refusal:
            response = error_response(refusal.status, str(refusal), refusal.headers)
        except Exception as err:  # the page server's own fault: its traceback is worth reading
            traceback.print_exc()
            response = error_response(HTTPStatus.INTERNAL_SERVER_ERROR, f"the page server failed: {err!r}")
        return self._send(response)

    def _read_body(self, route: Route, size: int | None) -> bytes:
        """The body, within `route.max_body` and the body's deadline; Refusal when it cannot be taken."""
        if size is None:  # chunked: its length is known only at its end
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, f"the {route.body_name} must come with a Content-Length")
        if size > route.max_body:
            if route.max_body == 0:
                raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "this route takes no body")
            raise Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the {route.body_name} is {size / 2**20:.1f} MiB; "
                f"this page forwards at most {route.max_body / 2**20:.0f} MiB",
            )
        return self._body(time.monotonic() + self.limits.body_s)

    def _body(self, deadline: float, keep: bool = True) -> bytes:
        """The body's bytes (dropped unless `keep`) until its end; asks for it if the client awaits a 100."""
        if self.h11.they_are_waiting_for_100_continue:
            self._sendall(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks = []
        while True:
            event = self._next_event(deadline)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone
            if keep:
                chunks.append(bytes(event.data))

    def _refuse(self, refusal: Refusal, length: int | None) -> bool:
        """Answers a refusal. A body of known length (up to drain_bytes) that the client is sending is read and
        dropped first, so that the client reads the answer and may go on; otherwise the connection closes."""
        response = error_response(refusal.status, str(refusal), refusal.headers)
        waiting = self.h11.they_are_waiting_for_100_continue and length  # it sends nothing unless asked
        if length is not None and length <= self.limits.drain_bytes and not waiting:
            try:
                self._body(time.monotonic() + self.limits.body_s, keep=False)
            except TimeoutError:
                self._close_with(response)
                return False
            return self._send(response)
        self._close_with(response)
        return False

    def _send(self, response: Response, close: bool = False) -> bool:
        """Sends `response`; True when the connection can carry another request."""
        headers = _headers(response, self.site.headers)
        if close:
            headers.append(("Connection", "close"))
        reason = HTTPStatus(response.status).phrase.encode()
        data = self.h11.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if not self._head_only:
            data += self.h11.send(h11.Data(data=response.body))
        self._sendall(data + self.h11.send(h11.EndOfMessage()))
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def _sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.limits.body_s)  # a client that reads nothing holds the thread no longer
        self.sock.sendall(data)

    def _close_with(self, response: Response) -> None:
        """Sends `response` and closes, first reading what the client still sends for a moment (a close with
        unread input resets the connection, and the client could lose the answer)."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._send(response, close=True)
            except h11.LocalProtocolError:
                pass  # h11 sees no answer owed in this state (the client closed first): none is sent
        self.sock.shutdown(socket.SHUT_WR)
        deadline, dropped = time.monotonic() + self.limits.linger_s, 0
        while dropped <= self.limits.drain_bytes and (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(RECEIVE_BYTES)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            dropped += len(chunk)

    @staticmethod
    def _late(what: str, seconds: float) -> str:
        return f"the {what} did not arrive within {seconds:g} s"


def _joined(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header fields by lower-case name; a repeated field's values joined by ", " (RFC 9110 5.3)."""
    headers: dict[str, str] = {}
    for name, value in fields:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _body_length(head: h11.Request) -> int | None:
    """The body's declared length: 0 without Content-Length or Transfer-Encoding, None when chunked."""
    headers = dict(head.headers)  # h11 refused a repeated Transfer-Encoding or two different Content-Lengths
    if b"transfer-encoding" in headers:
        return None
    return int(headers.get(b"content-length", b"0"))  # h11 let through only ASCII digits, at most 20


def _origin_form(target: str, host: str) -> tuple[str, str]:
    """The path and query of a request target; an absolute-form target must name the Host's own authority."""
    if target.startswith("/"):
        path, _, query = target.partition("?")  # not urlsplit: "//evil.example/x" is a path here
        return path, query
    split = urlsplit(target)
    if split.scheme.lower() == "http" and split.netloc and split.netloc.lower() == host.lower():
        return split.path or "/", split.query
    if split.scheme and split.netloc:
        raise Refusal(
            HTTPStatus.BAD_REQUEST,
            f"the request's target names {_short(split.netloc)!r} but its Host is {_short(host)!r}",
        )
    raise Refusal(HTTPStatus.BAD_REQUEST, f"not a request target this server takes: {_short(target)!r}")


def _parser_words(err: h11.RemoteProtocolError) -> str:
    """h11's reason, without the bytearray(...) around the line it quotes."""
    return _short(re.sub(r"bytearray\((b'.*'|b\".*\")\)", r"\1", str(err)))


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
