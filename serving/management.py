"""TorchServe 0.12.0's management API, as `digits rollout` uses it: register, describe, set-default, unregister.

What the frontend does (org.pytorch.serve.http.api.rest.ManagementRequestHandler, wlm.ModelManager,
wlm.WorkLoadManager, wlm.ModelVersionedRefs at v0.12.0):
- `POST /models?url=FILE.mar&model_name=NAME` registers a version beside the others (the first version of a
  name becomes its default; later ones do not). A bare file name is looked up in the model store and nothing
  is written there. With `synchronous=true` it would answer once the workers loaded, but it waits for them on
  the Netty event-loop thread that holds the management connection, which the inference connections share
  (one group of child event loops serves every HTTP connector): the inference connections on that thread
  would stall for the whole load. So digits registers with `synchronous=false` (202 at once) and watches
  the workers itself (`wait_loaded`): READY in the description when loaded; a worker that fails or dies while
  loading is retried by TorchServe for ever, and `rollout.LoadWatch` sees that in the logs.
- `PUT /models/NAME/VERSION/set-default` switches where `/predictions/NAME` (and OIP's
  `/v2/models/NAME/infer`) go: requests already queued for the old version stay in its queue.
- `DELETE /models/NAME/VERSION` refuses the default version while others exist, and otherwise stops the
  version's workers at once: its batch in flight is answered 500 "Worker scaled down" and requests still in
  its queue are never answered. Hence `drain` before it.
- `GET /models/NAME/all` describes each version: workers (pid, status READY once loaded) and
  `jobQueueStatus.pendingRequests`, the requests queued and not yet taken by a worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from ..contract import WORKER_HEADER  # the handler's per-worker token on every answer (handlers/digit_handler.py)
from .server import PROBE_DIGIT


class ManagementError(RuntimeError):
    """TorchServe refused or failed a management call; the message quotes its answer."""


@dataclass(frozen=True)
class VersionState:
    """One registered version, as TorchServe describes it."""

    version: str
    url: str  # the archive's file name in the store (what it was registered with)
    workers: tuple[dict, ...]
    pending: int  # requests queued for this version, not yet taken by a worker

    @property
    def ready(self) -> bool:
        return bool(self.workers) and all(worker.get("status") == "READY" for worker in self.workers)


@dataclass(frozen=True)
class Management:
    """The management API of one TorchServe, with its management key, and its inference API for probes."""

    url: str
    token: str
    inference_url: str
    inference_token: str
    timeout: float = 30

    def _call(self, method: str, path: str, timeout: float | None = None, **params) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return requests.request(
            method, f"{self.url}{path}", params=params or None, headers=headers, timeout=timeout or self.timeout
        )

    def versions(self, model: str) -> dict[str, VersionState]:
        """version -> state for every registered version of `model`; empty when TorchServe has no such model."""
        response = self._call("GET", f"/models/{model}/all")
        if response.status_code == 404:
            return {}
        _check(response, f"describing {model}")
        return {
            entry["modelVersion"]: VersionState(
                entry["modelVersion"],
                entry.get("modelUrl") or "",
                tuple(entry.get("workers") or ()),
                int((entry.get("jobQueueStatus") or {}).get("pendingRequests") or 0),
            )
            for entry in response.json()
        }

    def default_version(self, model: str) -> str | None:
        """The version `/predictions/MODEL` goes to, or None when TorchServe serves no such model."""
        response = self._call("GET", f"/models/{model}")
        if response.status_code == 404:
            return None
        _check(response, f"describing {model}")
        return response.json()[0]["modelVersion"]

    def register(self, model: str, file_name: str) -> None:
        """Registers the store's `file_name` as a version of `model`; its workers start loading (`wait_loaded`)."""
        response = self._call(
            "POST", "/models", url=file_name, model_name=model, synchronous="false", initial_workers=1
        )
        _check(response, f"registering {file_name}")

    def wait_loaded(self, model: str, version: str, timeout: float, failure: Callable[[], str | None]) -> None:
        """Returns once every worker of `version` is READY; raises when `failure()` names one or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.versions(model).get(version)
            if state is not None and state.ready:
                return
            reason = failure()
            if reason:
                raise ManagementError(reason)
            time.sleep(0.2)
        raise ManagementError(f"{model} {version}'s workers did not load within {timeout:.0f} s")

    def set_default(self, model: str, version: str) -> None:
        _check(self._call("PUT", f"/models/{model}/{version}/set-default"), f"making {model} {version} the default")

    def unregister(self, model: str, version: str, timeout: float = 120) -> None:
        response = self._call("DELETE", f"/models/{model}/{version}", timeout=timeout)
        if response.status_code != 404:  # already gone is what was wanted
            _check(response, f"unregistering {model} {version}")

    def predict(self, model: str, version: str, timeout: float = 30) -> requests.Response:
        """One probe digit to `/predictions/MODEL/VERSION`."""
        headers = {"Authorization": f"Bearer {self.inference_token}"}
        url = f"{self.inference_url}/predictions/{model}/{version}"
        return requests.post(url, json=PROBE_DIGIT, headers=headers, timeout=timeout)

    def wait_answering(self, model: str, version: str, timeout: float) -> None:
        """Returns once `/predictions/MODEL/VERSION` answers a probe digit 200."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                response = self.predict(model, version)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text.strip()[:200]}"
            except requests.RequestException as err:
                last = str(err)
            time.sleep(0.2)
        raise ManagementError(f"{model} {version} did not answer within {timeout:.0f} s (last: {last})")

    def drain(self, model: str, version: str, timeout: float) -> None:
        """Returns once nothing sent to `version` before now is queued or in a worker's batch.

        Each worker takes its next batch from the version's one FIFO queue only after answering its current
        one. So once every worker of the version has answered a probe sent after this call began, and the
        queue is empty, every request that reached the version before is answered. Which worker answered a
        probe shows in the handler's `Digits-Worker` header.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.versions(model).get(version)
            if state is None or not state.workers:
                return  # nothing left to drain
            if self._every_worker_answers(model, version, len(state.workers), deadline):
                after = self.versions(model).get(version)
                if after is None or (after.pending == 0 and _pids(after) == _pids(state)):
                    return
        raise ManagementError(f"{model} {version} still had requests in flight after {timeout:.0f} s")

    def _every_worker_answers(self, model: str, version: str, workers: int, deadline: float) -> bool:
        seen: set[str] = set()
        while len(seen) < workers and time.monotonic() < deadline:
            response = self.predict(model, version, timeout=max(1.0, deadline - time.monotonic()))
            if response.status_code == 200:
                # an archive whose handler predates the header: with one worker, any answer proves it
                seen.add(response.headers.get(WORKER_HEADER) or f"answer {len(seen)}")
        return len(seen) >= workers


def _pids(state: VersionState) -> set:
    return {worker.get("pid") for worker in state.workers}


def _check(response: requests.Response, doing: str) -> None:
    if not 200 <= response.status_code < 300:
        raise ManagementError(f"TorchServe refused {doing}: {response.status_code} {_message(response)}")


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
        return str(body.get("message") or body.get("status") or body)[:300]
    except (ValueError, AttributeError):
        return response.text.strip()[:300]
