"""`digits ui`: one page to draw a digit on and watch the served models answer, next to a running `digits serve`.

The page's own server (`http11.PageServer`: h11 parses, with deadlines and a bound on connections) serves
the files in `static/` and forwards each drawing to TorchServe with the key it reads from the run folder. The
browser never holds a key: it talks only to this server, which binds 127.0.0.1, answers only requests
addressed to a loopback name (a DNS-rebinding page cannot read the answers), refuses cross-site POSTs, caps
what it forwards at MAX_IMAGE_BYTES and sends a Content-Security-Policy that admits nothing but its own files.

Routes: `GET /` (and the page's files, PAGES), and the JSON API (API): `GET /api/models` (the served models
and whether each has a worker ready), `POST /api/classify?model=NAME` (body: the image's bytes) answering
`{"model", "label", "probabilities", "framed", "torchserve_ms"}`, and with `&why=1` also
`"why": {"label", "method", "attributions"}` (the page's why view); any refusal is `{"error"}` with a 4xx/5xx.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

import requests

from ..contract import OIP_DEFAULT_OUTPUTS
from .http11 import Limits, PageServer, Refusal, Request, Response, Route, Site, json_response
from .server import ServeError, read_state, read_token, refresh_token

STATIC = Path(__file__).resolve().with_name("static")
PAGES = {  # URL path -> (file in STATIC, content type); nothing else on disk is reachable
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
MAX_IMAGE_BYTES = 2 * 1024 * 1024  # the pad sends a few KiB, a photo of a digit fits; TorchServe takes 10 MiB
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # TorchServe's model names; no '/' or '..'
LOOPBACK_NAMES = ("127.0.0.1", "localhost")  # it listens on 127.0.0.1 only
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
REFUSED_KEY = "InvalidKeyException"  # TorchServe's answer to a wrong or expired key (status 400)
TIMEOUT_S = 30
RENEWING = threading.Lock()  # one key renewal at a time, for all the page server's threads
# The contract's OIP outputs the page asks for: the default ones and `framed` with every answer, and the why
# view's `attributions` (each framed pixel's share of the answer) while it is open
FRAMED, ATTRIBUTIONS = "framed", "attributions"  # names in the contract's OIP_OUTPUTS (a test pins them)
OIP_OUTPUTS = (*OIP_DEFAULT_OUTPUTS, FRAMED)
WHY_VALUES = {"": False, "0": False, "1": True}  # ?why=: the query parameter that asks for it


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
        "framed": _rows(outputs[FRAMED]),  # (H, W) uint8
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


# ---- the page's routes -----------------------------------------------------------------------------------


def models_answer(link: TorchServeLink, request: Request) -> dict:
    return {"models": list_models(link)}


def classify_answer(link: TorchServeLink, request: Request) -> dict:
    if not request.body:
        raise Refusal(HTTPStatus.BAD_REQUEST, "the image is empty")
    return classify(link, model_name(request.query), request.body, wants_why(request.query))


def model_name(query: str) -> str:
    model = parse_qs(query).get("model", [""])[0]
    if not MODEL_NAME.fullmatch(model):
        raise Refusal(HTTPStatus.BAD_REQUEST, f"not a model name: {model!r}")
    return model


@dataclass(frozen=True)
class ApiRoute:
    """A JSON route: `answer(link, request)` returns what is sent as JSON (200) or raises Refusal."""

    answer: Callable[[TorchServeLink, Request], dict]
    max_body: int = 0  # bytes of body it takes (0: none)
    body_name: str = "body"  # what the body is, in the words of a 411 or 413


API = {  # (method, path) -> route; a new view of the page adds its line here
    ("GET", "/api/models"): ApiRoute(models_answer),
    ("POST", "/api/classify"): ApiRoute(classify_answer, max_body=MAX_IMAGE_BYTES, body_name="image"),
}


def routes(link: TorchServeLink) -> dict[tuple[str, str], Route]:
    """The page's files and its API, bound to `link`."""
    table = {("GET", path): Route(partial(page_file, *file)) for path, file in PAGES.items()}
    for key, api in API.items():
        table[key] = Route(partial(json_answer, api.answer, link), api.max_body, api.body_name)
    return table


def page_file(name: str, content_type: str, request: Request) -> Response:
    return Response(HTTPStatus.OK, (STATIC / name).read_bytes(), content_type)


def json_answer(answer: Callable[[TorchServeLink, Request], dict], link: TorchServeLink, request: Request) -> Response:
    return json_response(HTTPStatus.OK, answer(link, request))


# ---- guards: who may ask -------------------------------------------------------------------------------


def addressed_to_loopback(request: Request) -> None:
    """Refuses a request addressed to another name: a DNS-rebinding page reaches 127.0.0.1 under its own."""
    host = host_name(request.host)
    if host not in LOOPBACK_NAMES:
        raise Refusal(HTTPStatus.FORBIDDEN, f"this page answers only on loopback names, not {host!r}")


def same_origin(request: Request) -> None:
    """Refuses a POST (any method but GET and HEAD) that another site's page sends (browsers name that page in
    Origin); a route added later is covered without a word of its own."""
    origin = request.headers.get("origin")
    if request.method not in ("GET", "HEAD") and origin is not None and origin != f"http://{request.host}":
        raise Refusal(HTTPStatus.FORBIDDEN, f"cross-site request from {origin} refused")


HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


def make_server(port: int, link: TorchServeLink, limits: Limits | None = None) -> PageServer:
    """The page server on 127.0.0.1:`port` (0: any free port); `serve_forever()` runs it."""
    site = Site(routes(link), (addressed_to_loopback, same_origin), HEADERS, limits or Limits())
    try:
        return PageServer(("127.0.0.1", port), site)
    except OSError as err:
        raise ServeError(f"cannot listen on 127.0.0.1:{port}: {err.strerror}; pass --port with a free port") from None
