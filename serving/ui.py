"""`digits ui`: one page to draw a digit on and watch the served models answer, next to a running `digits serve`.

The page's own server (the standard library's ThreadingHTTPServer: its four files and two JSON routes,
one user, loopback only, so no web framework) serves the files in `static/` and forwards each drawing to
TorchServe with the key it reads from the run folder. The browser never holds a key: it talks only to this
server, which binds 127.0.0.1, answers only requests addressed to a loopback name (a DNS-rebinding page
cannot read the answers), refuses cross-site POSTs, caps what it forwards at MAX_IMAGE_BYTES and sends a
Content-Security-Policy that admits nothing but its own files.

Routes: `GET /` (and the page's files), `GET /api/models` (the served models and whether each has a worker
ready), `POST /api/classify?model=NAME` (body: the image's bytes) answering
`{"model", "label", "probabilities", "framed", "torchserve_ms"}` or `{"error"}` with a 4xx/5xx status; with
`&why=1` the answer adds `"why": {"label", "method", "attributions"}` (the page's why view).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

from .server import ServeError, read_state, read_token, refresh_token

STATIC = Path(__file__).resolve().with_name("static")
PAGES = {  # URL path -> (file in STATIC, content type); nothing else on disk is reachable
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
MAX_IMAGE_BYTES = 2 * 1024 * 1024  # the pad sends a few KiB, a photo of a digit fits; TorchServe takes 10 MiB
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) a refused body up to this, so the browser sees the 413
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # TorchServe's model names; no '/' or '..'
LOOPBACK_NAMES = ("127.0.0.1", "localhost")  # it listens on 127.0.0.1 only
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
REFUSED_KEY = "InvalidKeyException"  # TorchServe's answer to a wrong or expired key (status 400)
TIMEOUT_S = 30
RENEWING = threading.Lock()  # one key renewal at a time, for all the page server's threads
OIP_OUTPUTS = ("probabilities", "label", "framed")
ATTRIBUTIONS = "attributions"  # the OIP output of the why view: each framed pixel's share of the answer
WHY_VALUES = {"": False, "0": False, "1": True}  # ?why=: the query parameter that asks for it


class Refusal(Exception):
    """A request the page server answers with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TorchServeLink:
    """Where TorchServe is and its keys: read from the run folder on every request, so a restarted
    `digits serve` (new keys, new ports) is picked up without restarting the page."""

    run_dir: Path
    url: str | None = None  # inference URL; default: the one in the run folder's server.json

    def base_url(self, api: str) -> str:
        if api == "inference" and self.url:
            return self.url.rstrip("/")
        state = read_state(self.run_dir)
        if state is None:
            raise Refusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"TorchServe is not running from {self.run_dir} (no server.json there): start it with `digits serve`",
            )
        return state.inference_url if api == "inference" else state.management_url

    def key(self, api: str) -> str:
        try:
            return read_token(self.run_dir, api)
        except (ServeError, KeyError, ValueError) as err:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE, f"TorchServe is not running: {err}") from None

    def request(self, api: str, method: str, path: str, **kwargs) -> requests.Response:
        """One request to TorchServe's `api` (inference, management) with its key; when TorchServe refuses
        the key (keys expire after 60 minutes), asks it for a new one and tries once more."""
        url, key = self.base_url(api) + path, self.key(api)
        response = self._send(method, url, key, **kwargs)
        if response.status_code == HTTPStatus.BAD_REQUEST and REFUSED_KEY in response.text:
            response = self._send(method, url, self._renew(api, key), **kwargs)
        return response

    def _renew(self, api: str, refused: str) -> str:
        """A key TorchServe should take: the key file's, when another request renewed it meanwhile (each new
        key voids the last, so two requests must not both renew), else a new one from TorchServe."""
        with RENEWING:
            current = self.key(api)
            if current != refused:
                return current
            try:
                return refresh_token(self.run_dir, api)
            except ServeError as err:
                raise Refusal(HTTPStatus.BAD_GATEWAY, f"TorchServe refused its {api} key: {err}") from None

    @staticmethod
    def _send(method: str, url: str, key: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        try:
            return requests.request(method, url, headers=headers, timeout=TIMEOUT_S, **kwargs)
        except requests.ConnectionError:
            raise Refusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"TorchServe is not running at {url.split('/', 3)[2]} (connection refused): "
                "start it with `digits serve`",
            ) from None
        except requests.Timeout:
            raise Refusal(HTTPStatus.GATEWAY_TIMEOUT, f"TorchServe did not answer within {TIMEOUT_S} s") from None


def list_models(link: TorchServeLink) -> list[dict]:
    """The served models, each `{"name", "ready"}` (ready: at least one worker READY), by name."""
    names = sorted(m["modelName"] for m in _management_json(link, "/models")["models"])
    return [{"name": name, "ready": _has_ready_worker(link, name)} for name in names]


def _has_ready_worker(link: TorchServeLink, name: str) -> bool:
    described = _management_json(link, f"/models/{name}")  # a list: one entry per version
    return any(w.get("status") == "READY" for version in described for w in version.get("workers", []))


def _management_json(link: TorchServeLink, path: str):
    response = link.request("management", "GET", path)
    if response.status_code != HTTPStatus.OK:
        raise Refusal(HTTPStatus.BAD_GATEWAY, f"TorchServe's management API answered {_reason(response)}")
    return response.json()


def classify(link: TorchServeLink, model: str, image: bytes, why: bool = False) -> dict:
    """Sends one image to `model` and returns what the page shows (with `why`, the explanation too);
    TorchServe's refusals become Refusal."""
    start = time.perf_counter()
    answer = ask_oip(link, model, image, why)
    answer["torchserve_ms"] = round((time.perf_counter() - start) * 1000, 1)
    return {"model": model, **answer}


def ask_oip(link: TorchServeLink, model: str, image: bytes, why: bool = False) -> dict:
    """The Open Inference Protocol: the image as one BYTES element (base64 in JSON, as OIP says), asking for
    the outputs `probabilities`, `label` and `framed` (the 28x28 image the model saw, white on black) and,
    with `why`, `attributions` (the model's default method, for the predicted label)."""
    wanted = (*OIP_OUTPUTS, ATTRIBUTIONS) if why else OIP_OUTPUTS
    request = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}],
        "outputs": [{"name": name} for name in wanted],
    }
    response = link.request("inference", "POST", f"/v2/models/{model}/infer", json=request)
    if response.status_code != HTTPStatus.OK:
        raise Refusal(response.status_code, _refusal_message(model, response))
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise Refusal(HTTPStatus.BAD_GATEWAY, f"model {model} answered without the output(s) {', '.join(missing)}")
    label = list(_flat(outputs["label"]["data"]))[0]
    answer = {
        "label": label,
        "probabilities": list(_flat(outputs["probabilities"]["data"])),
        "framed": _rows(outputs["framed"]),  # (H, W) uint8
    }
    if why:
        answer["why"] = explanation(outputs[ATTRIBUTIONS], label)
    return answer


def explanation(output: dict, label) -> dict:
    """The page's why view from the `attributions` output: the label explained (the predicted one: the page
    names no target), the method, and the (H, W) map."""
    parameters = output.get("parameters") or {}
    return {"label": label, "method": parameters.get("method", "the model's default"), "attributions": _rows(output)}


def _rows(output: dict) -> list[list]:
    """An OIP output of shape [1, H, W] as H rows of W values."""
    width = output["shape"][-1]
    values = list(_flat(output["data"]))
    return [values[row : row + width] for row in range(0, len(values), width)]


def wants_why(query: str) -> bool:
    """The query parameter `why`: 1 asks for the explanation too, 0 or none does not."""
    value = parse_qs(query, keep_blank_values=True).get("why", [""])[-1]
    if value not in WHY_VALUES:
        raise Refusal(HTTPStatus.BAD_REQUEST, f"why must be 1 or 0, not {value[:20]!r}")
    return WHY_VALUES[value]


def _flat(data):
    """OIP's `data` may come flat or nested by the shape."""
    for value in data:
        if isinstance(value, list):
            yield from _flat(value)
        else:
            yield value


def _refusal_message(model: str, response: requests.Response) -> str:
    if response.status_code == HTTPStatus.NOT_FOUND:
        return f"model {model} is not served by this TorchServe"
    if response.status_code == HTTPStatus.SERVICE_UNAVAILABLE:
        return f"model {model} is not ready: {_message(response)}"
    if response.status_code < 500:
        return f"TorchServe refused the image: {_message(response)}"
    return f"TorchServe failed on model {model}: {_reason(response)}"


def _message(response: requests.Response) -> str:
    """The message in TorchServe's JSON error ({"code", "type", "message"}; OIP: {"error"}), else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or HTTPStatus(response.status_code).phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(body)[:300]


def _reason(response: requests.Response) -> str:
    return f"{response.status_code}: {_message(response)}"


def host_name(header: str) -> str:
    """The name in a Host header: '127.0.0.1' of '127.0.0.1:8000', '[::1]' of '[::1]:8000'."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


class PageHandler(BaseHTTPRequestHandler):
    """The page's files and its two JSON routes; `link` is set on the subclass `make_server` builds."""

    link: TorchServeLink
    server_version = "digits-ui"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._addressed_to_loopback():
            return
        path = urlsplit(self.path).path
        if path in PAGES:
            name, content_type = PAGES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), content_type)
        elif path == "/api/models":
            self._answer(lambda: {"models": list_models(self.link)})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._addressed_to_loopback() or not self._same_origin():
            return
        url = urlsplit(self.path)
        if url.path != "/api/classify":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such route: {url.path}"})
            return
        self._answer(lambda: classify(self.link, self._model(url.query), self._read_image(), wants_why(url.query)))

    def _answer(self, work) -> None:
        try:
            self._send_json(HTTPStatus.OK, work())
        except Refusal as err:
            self._send_json(err.status, {"error": str(err)})

    def _model(self, query: str) -> str:
        model = parse_qs(query).get("model", [""])[0]
        if not MODEL_NAME.fullmatch(model):
            raise Refusal(HTTPStatus.BAD_REQUEST, f"not a model name: {model!r}")
        return model

    def _read_image(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Refusal(HTTPStatus.LENGTH_REQUIRED, "the image must come with a Content-Length")
        size = int(length)
        if size > MAX_IMAGE_BYTES:
            self._drain(size)
            raise Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the image is {size / 2**20:.1f} MiB; this page forwards at most {MAX_IMAGE_BYTES / 2**20:.0f} MiB",
            )
        if size == 0:
            raise Refusal(HTTPStatus.BAD_REQUEST, "the image is empty")
        return self.rfile.read(size)

    def _drain(self, size: int) -> None:
        """Reads a refused body (up to DRAIN_LIMIT) so that the browser gets the 413 rather than a reset."""
        if size > DRAIN_LIMIT:
            self.close_connection = True
            return
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 16))
            if not chunk:
                break
            size -= len(chunk)

    def _addressed_to_loopback(self) -> bool:
        host = host_name(self.headers.get("Host") or "")
        if host in LOOPBACK_NAMES:
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": f"this page answers only on loopback names, not {host!r}"})
        return False

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None or origin == f"http://{self.headers.get('Host')}":
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": f"cross-site request from {origin} refused"})
        return False

    def _send_json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # one line per request on stderr is noise next to a drawing page; errors reach the page


def make_server(port: int, link: TorchServeLink) -> ThreadingHTTPServer:
    """The page server on 127.0.0.1:`port` (0: any free port); `serve_forever()` runs it."""
    handler = type("BoundPageHandler", (PageHandler,), {"link": link})
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise ServeError(f"cannot listen on 127.0.0.1:{port}: {err.strerror}; pass --port with a free port") from None
