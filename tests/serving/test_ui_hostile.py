"""The page server of `digits ui` against hostile clients, over real sockets, next to a real TorchServe.

Malformed framing gets a 400 (or 411, 431, 501) naming the problem and the connection closes; slow clients are
cut at their deadline (the test waits for the server to close the socket, then checks when it did); the
connection bound holds, with a clear 503 past it; good requests sent beside the hostile ones are answered, and
the time each took is recorded (`record_property`, and printed with -s). No client's mistake prints a traceback.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import requests
from digits.serving.http11 import Limits
from digits.serving.ui import CSP, TorchServeLink, make_server
from PIL import Image
from serving_helpers import wait_for

HEAD_S = 1.0  # the test servers' deadlines: short, so that the tests waiting on them are short
BODY_S = 1.0
LATE_S = 5.0  # how much later than its deadline the server may close a connection on a busy machine
LIMITS = Limits(head_s=HEAD_S, body_s=BODY_S, linger_s=0.5)  # the default bound: 32 connections


@contextmanager
def page_server(link: TorchServeLink, limits: Limits = LIMITS) -> Iterator[int]:
    server = make_server(0, link, limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def port(server) -> Iterator[int]:
    """A page server with short deadlines, next to the session's TorchServe."""
    with page_server(TorchServeLink(server.run_dir)) as port:
        yield port


@pytest.fixture(autouse=True)
def no_traceback(capfd) -> Iterator[None]:
    """What the page server's threads print lands on this process's stderr: a client's mistake prints none."""
    yield
    assert "Traceback" not in capfd.readouterr().err


# ---- raw HTTP --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: the connection closed without an answer
    headers: http.client.HTTPMessage | None
    body: bytes

    def error(self) -> str:
        return json.loads(self.body)["error"]


class Client:
    """One connection, written raw and read answer by answer (one buffer, so pipelined answers are kept)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> Answer:
        try:
            line = self.file.readline()
            if not line:
                return Answer(None, None, b"")
            headers = http.client.parse_headers(self.file)
            return Answer(int(line.split()[1]), headers, self.file.read(int(headers.get("Content-Length", 0))))
        except ConnectionResetError:
            return Answer(None, None, b"")

    def closed_by_server(self, within: float) -> bool:
        """Whether the server closes the connection (the read reaches its end) within `within` seconds."""
        self.sock.settimeout(within)
        try:
            self.file.read()
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass  # closed all the same
        return True

    def still_open(self) -> bool:
        """Whether the server has not closed it yet (without waiting)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        finally:
            self.sock.setblocking(True)


def exchange(port: int, data: bytes) -> tuple[Answer, bool]:
    """Sends `data` on a new connection; the answer, and whether the server then closed the connection."""
    with Client(port) as client:
        client.send(data)
        answer = client.answer()
        return answer, client.closed_by_server(HEAD_S + LATE_S)


def digit_png(mnist, index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mnist.test_images[index], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# ---- malformed requests ----------------------------------------------------------------------------------

GET = "GET /api/models HTTP/1.1\r\nHost: {host}\r\n"
POST = "POST /api/classify?model=cnn HTTP/1.1\r\nHost: {host}\r\n"

# name: (head without its final CRLF, body, status, words in the error)
MALFORMED = {
    "content-length-superscript-two": (POST + "Content-Length: \u00b2\r\n", b"x", 400, "bad Content-Length"),
    "content-length-5000-digits": (POST + "Content-Length: " + "9" * 5000 + "\r\n", b"x", 400, "bad Content-Length"),
    "content-length-negative": (POST + "Content-Length: -1\r\n", b"x", 400, "bad Content-Length"),
    "content-length-plus-sign": (POST + "Content-Length: +1\r\n", b"x", 400, "bad Content-Length"),
    "content-length-hex": (POST + "Content-Length: 0x1\r\n", b"x", 400, "bad Content-Length"),
    "content-length-arabic-digit": (POST + "Content-Length: \u0661\r\n", b"x", 400, "bad Content-Length"),
    "content-length-conflicting": (
        POST + "Content-Length: 1\r\nContent-Length: 2\r\n",
        b"xx",
        400,
        "conflicting Content-Length",
    ),
    "content-length-list": (POST + "Content-Length: 1, 2\r\n", b"xx", 400, "conflicting Content-Length"),
    "host-twice": (GET + "Host: attacker.example\r\n", b"", 400, "multiple Host"),
    "host-twice-the-same": (GET + "Host: {host}\r\n", b"", 400, "multiple Host"),
    "host-missing": ("GET /api/models HTTP/1.1\r\n", b"", 400, "Host"),
    "host-as-a-list": ("GET / HTTP/1.1\r\nHost: {host}, attacker.example\r\n", b"", 400, "not a host name in Host"),
    "host-with-userinfo": ("GET / HTTP/1.1\r\nHost: attacker.example@{host}\r\n", b"", 400, "not a host name"),
    "absolute-form-another-host": (
        "GET http://attacker.example/api/models HTTP/1.1\r\nHost: {host}\r\n",
        b"",
        400,
        "the request's target names 'attacker.example'",
    ),
    "absolute-form-another-port": (
        "GET http://127.0.0.1:1/api/models HTTP/1.1\r\nHost: {host}\r\n",
        b"",
        400,
        "the request's target names '127.0.0.1:1'",
    ),
    "asterisk-form": ("OPTIONS * HTTP/1.1\r\nHost: {host}\r\n", b"", 400, "not a request target"),
    "authority-form": ("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n", b"", 400, "not a request target"),
    "chunked-and-content-length": (
        POST + "Transfer-Encoding: chunked\r\nContent-Length: 8\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding and Content-Length together",
    ),
    "content-length-and-chunked-uppercase": (
        POST + "Content-Length: 8\r\nTransfer-Encoding: CHUNKED\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding and Content-Length together",
    ),
    "chunked-without-length": (
        POST + "Transfer-Encoding: chunked\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
        411,
        "the image must come with a Content-Length",
    ),
    "transfer-encoding-gzip": (POST + "Transfer-Encoding: gzip\r\n", b"", 501, "Transfer-Encoding"),
    "transfer-encoding-twice": (
        POST + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
        501,
        "multiple Transfer-Encoding",
    ),
    "nul-in-a-header": (GET + "X-Note: a\x00b\r\n", b"", 400, "illegal header line: b'X-Note: a\\x00b'"),
    "bare-cr-in-a-header": (GET + "X-Note: a\rb\r\n", b"", 400, "illegal header line"),
    "space-before-colon": (GET + "Host : attacker.example\r\n", b"", 400, "illegal header line"),
    "request-line-with-extra-words": ("GET / HTTP/1.1 please\r\nHost: {host}\r\n", b"", 400, "illegal request line"),
    "http-2-request-line": ("GET / HTTP/2.0\r\nHost: {host}\r\n", b"", 505, "HTTP/2.0 is not served here"),
    "http-0-9-request-line": ("GET /\r\n", b"", 400, "illegal request line"),
    "head-too-large-at-once": (GET + "X-Pad: " + "a" * 40_000 + "\r\n", b"", 431, "the most this server takes"),
    "head-too-large-in-pieces": (GET + "X-Pad: " + "a" * 200_000 + "\r\n", b"", 431, "the most this server takes"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_request_gets_its_own_status_naming_the_problem_and_the_connection_closes(port, name):
    head, body, status, words = MALFORMED[name]
    data = (head + "\r\n").format(host=f"127.0.0.1:{port}").encode() + body
    answer, closed = exchange(port, data)
    assert answer.status == status, answer.body
    assert words in answer.error()
    assert answer.headers["Content-Security-Policy"] == CSP
    assert answer.headers["Connection"] == "close" and closed, "the server kept a connection it cannot trust"


def oip_requests_logged(server) -> int:
    log = (server.run_dir / "logs" / "access_log.log").read_text(errors="replace")
    return log.count("/v2/models/cnn/infer")


def test_nothing_of_a_malformed_request_reaches_torchserve(port, server, mnist):
    # the chunk framing of a TE + CL request used to reach TorchServe as the image; now no request of the
    # corpus does: after a good one, TorchServe's access log holds exactly one more inference
    before = oip_requests_logged(server)
    for head, body, _, _ in MALFORMED.values():
        exchange(port, (head + "\r\n").format(host=f"127.0.0.1:{port}").encode() + body)
    good = requests.post(f"http://127.0.0.1:{port}/api/classify?model=cnn", data=digit_png(mnist, 0), timeout=30)
    assert good.status_code == 200
    wait_for(lambda: oip_requests_logged(server) > before, 30, "the good request in TorchServe's access log")
    assert oip_requests_logged(server) == before + 1


# ---- slow clients ----------------------------------------------------------------------------------------


def trickle(client: Client, data: bytes, every: float = 0.05) -> None:
    """Sends `data` a byte at a time (a slowloris), on a thread, until it is all sent or the server closes."""

    def run() -> None:
        try:
            for byte in data:
                client.send(bytes([byte]))
                time.sleep(every)
        except OSError:
            pass  # the server closed it: what the test waits for

    threading.Thread(target=run, daemon=True).start()


def head_of(port: int, more: str = "") -> bytes:
    return f"POST /api/classify?model=cnn HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{more}".encode()


@dataclass(frozen=True)
class Slow:
    act: Callable[[Client], None]  # what the client does on its connection, then nothing more
    deadline: float  # the deadline that must cut it
    answers: tuple[int, ...]  # what it gets before the server closes


SLOW = {
    "idle-connection": Slow(lambda c: None, HEAD_S, ()),
    "unfinished-head": Slow(lambda c: c.send(head_of(c.port)), HEAD_S, (408,)),
    "head-trickled-a-byte-at-a-time": Slow(
        lambda c: trickle(c, head_of(c.port, "X-Pad: " + "a" * 10_000)), HEAD_S, (408,)
    ),
    "half-sent-body": Slow(
        lambda c: c.send(head_of(c.port, "Content-Length: 100\r\n\r\n") + b"\x89PNG"), BODY_S, (408,)
    ),
    "body-trickled-a-byte-at-a-time": Slow(
        lambda c: (c.send(head_of(c.port, "Content-Length: 100000\r\n\r\n")), trickle(c, b"\0" * 100_000)),
        BODY_S,
        (408,),
    ),
    # asked for its body (100 Continue), it never sends it
    "expect-100-continue-then-no-body": Slow(
        lambda c: c.send(head_of(c.port, "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")), BODY_S, (100, 408)
    ),
}


@pytest.mark.parametrize("name", SLOW)
def test_a_slow_client_is_closed_at_its_deadline(port, name):
    slow = SLOW[name]
    with Client(port) as client:
        start = time.monotonic()
        slow.act(client)
        answers = [client.answer() for _ in slow.answers]
        assert client.closed_by_server(slow.deadline + LATE_S), f"still open {slow.deadline + LATE_S} s later"
        took = time.monotonic() - start
    assert slow.deadline * 0.9 <= took <= slow.deadline + LATE_S, took
    assert [answer.status for answer in answers] == list(slow.answers)
    if answers:
        assert answers[-1].error().endswith("did not arrive within 1 s")


def test_an_idle_keep_alive_connection_is_closed_after_the_head_deadline(port):
    with Client(port) as client:
        client.send(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert client.answer().status == 200
        start = time.monotonic()
        assert client.closed_by_server(HEAD_S + LATE_S)
        assert HEAD_S * 0.9 <= time.monotonic() - start <= HEAD_S + LATE_S


# ---- what a good client does still works -----------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(port):
    host = f"127.0.0.1:{port}"
    with Client(port) as client:
        client.send(
            f"GET /style.css HTTP/1.1\r\nHost: {host}\r\n\r\nGET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        first, second = client.answer(), client.answer()
    assert (first.status, first.headers["Content-Type"]) == (200, "text/css; charset=utf-8")
    assert (second.status, second.error()) == (404, "no such page: /nope")


def test_a_client_that_expects_100_continue_gets_it_and_its_answer(port, mnist, expected_labels):
    image = digit_png(mnist, 0)
    with Client(port) as client:
        client.send(head_of(port, f"Content-Length: {len(image)}\r\nExpect: 100-continue\r\n\r\n"))
        assert client.answer().status == 100
        client.send(image)
        answer = client.answer()
    assert answer.status == 200
    assert json.loads(answer.body)["label"] == expected_labels["cnn"][0]


def test_an_absolute_form_target_naming_this_server_is_served(port):
    # RFC 9112 3.2.2: a server must accept the absolute form; only one naming another authority is refused
    answer, _ = exchange(
        port, f"GET HTTP://127.0.0.1:{port}/style.css HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    )
    assert (answer.status, answer.headers["Content-Type"]) == (200, "text/css; charset=utf-8")


def test_http_1_0_is_answered_and_closed(port):
    answer, closed = exchange(port, f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert answer.status == 200 and closed


def test_a_refused_request_keeps_the_connection_once_its_body_is_read(port):
    # a refusal reads the body it declared (up to drain_bytes), so the next request on the connection is sound
    host = f"127.0.0.1:{port}"
    with Client(port) as client:
        client.send(f"POST /nope HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nGET /".encode())
        assert client.answer().status == 404
        client.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert client.answer().status == 200


# ---- good requests beside hostile ones -------------------------------------------------------------------


def hostile_load(
    port: int, stop: threading.Event, failures: list[str], answered: list[tuple[str, float]]
) -> list[threading.Thread]:
    """Threads that attack until `stop`: the malformed corpus in turn (each answer's time in `answered`), and
    slow clients one after another: 5 connections at once on the client's side, a few more on the server's
    while its threads see the closes (the bound of 32 leaves room for the good requests)."""

    def malformed() -> None:
        while not stop.is_set():
            for name, (head, body, status, _) in MALFORMED.items():
                start = time.monotonic()
                answer, closed = exchange(port, (head + "\r\n").format(host=f"127.0.0.1:{port}").encode() + body)
                answered.append((name, time.monotonic() - start))  # till the close: the answer came before
                if (answer.status, closed) != (status, True):
                    failures.append(f"{name}: {answer.status}, closed {closed}")

    def slow(name: str) -> Callable[[], None]:
        def run() -> None:
            while not stop.is_set():
                with Client(port) as client:
                    SLOW[name].act(client)
                    if not client.closed_by_server(SLOW[name].deadline + LATE_S):
                        failures.append(f"{name}: still open")

        return run

    names = ("idle-connection", "head-trickled-a-byte-at-a-time", "half-sent-body", "body-trickled-a-byte-at-a-time")
    threads = [threading.Thread(target=work, daemon=True) for work in [malformed, *map(slow, names)]]
    for thread in threads:
        thread.start()
    return threads


def test_good_requests_beside_hostile_ones_are_answered(port, mnist, expected_labels, record_property):
    stop, failures, times = threading.Event(), [], []
    hostile: list[tuple[str, float]] = []
    threads = hostile_load(port, stop, failures, hostile)
    try:
        time.sleep(HEAD_S / 2)  # the slow clients are connected and waiting on their deadlines
        for index in range(10):
            start = time.monotonic()
            image = digit_png(mnist, index)
            response = requests.post(f"http://127.0.0.1:{port}/api/classify?model=cnn", data=image, timeout=30)
            times.append(("POST /api/classify", time.monotonic() - start))
            assert response.status_code == 200, response.text
            assert response.json()["label"] == expected_labels["cnn"][index]
            start = time.monotonic()
            response = requests.get(f"http://127.0.0.1:{port}/api/models", timeout=30)
            times.append(("GET /api/models", time.monotonic() - start))
            assert response.status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=2 * (HEAD_S + LATE_S))
    record_property("good_request_seconds", [(what, round(seconds, 3)) for what, seconds in times])
    what, slowest = max(times, key=lambda item: item[1])
    name, slowest_hostile = max(hostile, key=lambda item: item[1])
    record_property("slowest_malformed_request", (name, round(slowest_hostile, 3)))
    print(
        f"\n{len(times)} good requests beside hostile ones; the slowest: {what} {slowest:.3f} s; "
        f"{len(hostile)} malformed requests, the slowest answered and closed: {name} {slowest_hostile:.3f} s"
    )
    assert failures == []
    assert not any(thread.is_alive() for thread in threads), "a hostile connection was never closed"


# ---- the connection bound --------------------------------------------------------------------------------


def page_threads(port: int) -> int:
    return sum(thread.name == f"page-connection:{port}" for thread in threading.enumerate())


def test_past_the_connection_bound_a_request_is_refused_clearly_and_served_once_the_idle_close(tmp_path):
    limits = Limits(head_s=2.0, body_s=2.0, connections=4, linger_s=1.0)
    with page_server(TorchServeLink(tmp_path / "no-run"), limits) as port:
        idle = [Client(port) for _ in range(limits.connections)]
        flood = [Client(port) for _ in range(30)]  # past the bound: each is answered 503 at once
        for client in flood:
            answer = client.answer()
            assert answer.status == 503 and "4 connections are open, its limit" in answer.error()
        assert page_threads(port) <= limits.connections
        good, closed = exchange(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        if all(client.still_open() for client in idle):  # the bound still full: the good one is refused in words
            assert good.status == 503 and good.headers["Retry-After"] == "1" and closed
            assert good.headers["Content-Security-Policy"] == CSP
        else:  # a busy machine took longer than the idle deadline: the slots were free again
            assert good.status == 200
        for client in flood:
            assert client.closed_by_server(limits.linger_s + LATE_S)
        start = time.monotonic()
        for client in idle:
            assert client.closed_by_server(limits.head_s + LATE_S)
        assert time.monotonic() - start <= limits.head_s + LATE_S
        for client in idle + flood:
            client.close()
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        assert page_threads(port) <= limits.connections
