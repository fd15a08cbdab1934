"""`digits predict`: sends files to a running TorchServe, finding the URL and the token itself."""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import requests

from .server import ServeError, read_state, read_token

T = TypeVar("T")


@dataclass
class Prediction:
    file: str
    status: int
    label: int | None = None
    confidence: float | None = None
    error: str | None = None


def content_type(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def send(name: str, payload: bytes, content: str, url: str, model: str, token: str, timeout: float = 30) -> Prediction:
    """One POST to /predictions/MODEL; a refusal comes back as the status and the server's message."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content}
    response = requests.post(f"{url}/predictions/{model}", data=payload, headers=headers, timeout=timeout)
    body = answer_body(response)
    if response.status_code != 200:
        return Prediction(name, response.status_code, error=refusal(body))
    return Prediction(name, 200, body["label"], body["confidence"])


def answer_body(response: requests.Response) -> dict:
    """The answer's JSON object, or `{"message": ...}` with the start of its text when it is not JSON (a
    proxy's or the frontend's own error page)."""
    try:
        return response.json()
    except ValueError:
        return {"message": response.text.strip()[:200]}


def refusal(body: dict) -> str:
    """What a refused request's answer says: the server's message, else the whole body."""
    return body.get("message", str(body))


def predict_file(path: Path, url: str, model: str, token: str, timeout: float = 30) -> Prediction:
    return send(str(path), Path(path).read_bytes(), content_type(path), url, model, token, timeout)


def _unreachable(url: str) -> ServeError:
    return ServeError(f"cannot reach {url}; is TorchServe running? (`digits serve`)")


def resolve_endpoint(run_dir: Path, url: str | None, token: str | None) -> tuple[str, str]:
    """The URL and token from flags, else from the run folder of `digits serve`."""
    state = read_state(run_dir)
    if url is None:
        if state is None:
            raise ServeError(f"no server started from {run_dir}; run `digits serve` or pass --url")
        url = state.inference_url
    return url.rstrip("/"), token or read_token(run_dir)


def each_file(files: list[Path], run_dir: Path, url: str | None, token: str | None, send: Callable[..., T]) -> list[T]:
    """`send(path, url, token)` for each file, in order, once all exist and the server is found."""
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)}")
    url, token = resolve_endpoint(run_dir, url, token)
    try:
        return [send(Path(f), url, token) for f in files]
    except requests.ConnectionError:
        raise _unreachable(url) from None


def predict_files(
    files: list[Path], model: str, run_dir: Path, url: str | None = None, token: str | None = None
) -> list[Prediction]:
    return each_file(files, run_dir, url, token, lambda path, url, token: predict_file(path, url, model, token))


def classify_many(
    payloads: list[bytes], url: str, model: str, token: str, concurrency: int = 8, content: str = "image/png"
) -> list[Prediction]:
    """Sends every payload concurrently (a thread per connection) and returns the answers in order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int) -> Prediction:
        return send(str(index), payloads[index], content, url, model, token, timeout=60)

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, range(len(payloads))))
    except requests.ConnectionError:
        raise _unreachable(url) from None
