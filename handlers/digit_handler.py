"""The TorchServe handler of the digits archives: `DigitHandler`, the one class of this module.

An archive ships this file as its handler and, as extra files, every sibling module `digit_*.py` of this
folder (`digits archive` takes them all), plus `digits_meta.json`.
TorchServe 0.12.0 unpacks them side by side into the model dir, starts the worker with that dir as its
working directory and on its PYTHONPATH (the frontend's `EnvironmentUtils.getEnvString` and
`WorkerLifeCycle.startWorkerPython`), and imports the handler by bare module name
(`ts/model_loader.py`, `_load_handler_file`: `importlib.import_module("digit_handler")`). So the siblings
are imported here as top-level modules, and carry a `digit_` prefix so they cannot shadow, or be shadowed
by, installed packages on that path. TorchServe takes the handler module's only class as the service
(`_get_class_entry_point`), so any other class lives in a sibling. Nothing here may import `digits`,
`training`, `export` or `serving`: an archive must serve where only TorchServe and its runtimes exist.

Requests and answers: see `digit_inputs.py` for what a request may hold. Each readable request gets
`{"label": 7, "confidence": 0.998, "probabilities": [ten floats]}`; each unreadable one gets its own
4xx status and `{"code", "type", "message"}` body, and the rest of the batch is answered normally.
Open Inference Protocol requests (`/v2/models/NAME/infer`) share the batch: see `digit_oip.py`; so do KServe
v1 requests (`digit_kserve.py`). /explanations requests, OIP requests for the output `attributions` and
KServe's explain routes also get their explanations (`digit_explanations.py`, `digit_explain.py`).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from digit_batch import (
    Batch,
    assemble,
    json_body,
    prediction_bodies,
    to_probabilities,
)
from digit_contract import (
    HANDLER_SECTION,
    RESPONSE_LIMIT_KEY,
    THREADS_KEY,
    TORCHSERVE_MAX_RESPONSE,
    VERSION_HEADER,
    WORKER_HEADER,
)
from digit_errors import RequestError, too_large
from digit_explanations import (
    Deadline,
    Explanation,
    Job,
    explain_jobs,
    explain_seconds,
    explanation_body,
    oip_parameters,
)
from digit_json import fast_json_available, take_over_decoding
from digit_kserve import V1Request
from digit_kserve import explanations_body as v1_explanations
from digit_kserve import predictions_body as v1_predictions
from digit_metrics import StageTimes
from digit_model import (
    ModelLoadError,
    check_predictor,
    choose_device,
    find_model_file,
    keep_fp32_exact,
    load_predictor,
    read_metadata,
    verify_sha256,
)
from digit_oip import (
    BINARY_TYPE,
    JSON_TYPE,
    OipBatch,
    answer,
    error_body,
    model_identity,
    read_requests,
)
from digit_png import fast_png_available
from ts.handler_utils.timer import timed
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)


class DigitHandler(BaseHandler):
    """Classifies handwritten digits with the archive's TorchScript, ONNX or .pt2 model, one forward pass a batch,
    and explains the answers it is asked to."""

    def initialize(self, context: Any) -> None:
        """Loads the model the archive's metadata vouches for, on the device TorchServe assigned.

        Raises:
            ModelLoadError: metadata missing or invalid, model file missing, digest mismatch, wrong outputs.
        """
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest
        self.device = choose_device(properties.get("gpu_id"))
        keep_fp32_exact()  # the import of BaseHandler switched Ampere+ GPUs to TF32
        # JSON bodies reach the handler as bytes, parsed once where needed (digit_json.py); TorchServe's worker
        # no longer parses them, nor logs a traceback for each one that does not parse
        take_over_decoding()
        self.meta = read_metadata(model_dir)
        set_threads(context.model_yaml_config)  # before loading: onnxruntime sizes its pool from torch's count
        self.response_limit = response_limit(context.model_yaml_config)
        model_path = find_model_file(model_dir, self.manifest, self.meta)
        verify_sha256(model_path, self.meta.sha256)
        self.model_pt_path = str(model_path)
        self.model = load_predictor(model_path, self.device)
        check_predictor(self.model, self.meta)
        # which worker answered, for `digits rollout`'s drain; random, so that it tells a client nothing else
        self.worker_token = secrets.token_hex(8)
        self.explain_seconds = explain_seconds(context.model_yaml_config)
        self.initialized = True
        logger.info(
            "digits handler: serving %s (%s, test accuracy %s) on %s; PNG decoding: %s; JSON parsing: %s",
            self.meta.model or model_path.stem,
            self.meta.format,
            self.meta.test_accuracy,
            self.device,
            "libspng for plain 8-bit PNGs" if fast_png_available() else "Pillow only (pyspng is not installed)",
            "msgspec, json where it refuses" if fast_json_available() else "json only (msgspec is not installed)",
        )

    def handle(self, data: list[Any], context: Any) -> list[bytes]:
        """TorchServe's entry point for a batch: read, one forward pass, explain what was asked, answer each.

        Replaces BaseHandler.handle, which switches to Captum explanations or a "describe" mode whenever
        request 0 of the batch carries an `explain` or `describe` header: the whole batch would then be
        explained or described. Here each request says for itself (digit_oip.route, digit_explanations.py).
        """
        self.context = context
        deadline = Deadline(self.explain_seconds)  # from the start of the batch: decoding counts
        times = StageTimes()
        with times.stage("DecodeTime"):
            readings, kserve = read_requests(data, context, self.meta, self.response_limit)  # every protocol alike
        with times.stage("PreprocessTime"):
            batch = assemble(readings, self.meta)
        with times.stage("InferenceTime"):
            batch = self.inference(batch)
        explained: dict[int, Explanation | RequestError] = {}
        if kserve.asks:  # no explanation work unless a request asks for one
            with times.stage("ExplainTime"):
                explained = self.explain_batch(batch, kserve, deadline)
        with times.stage("PostprocessTime"):
            answers = self.postprocess(batch, kserve, explained, readings.digits)
        stamp(context, batch.size, model_identity(context)[1], self.worker_token)
        times.count(batch.size, len(batch.rows), answer_counts(batch, kserve, explained))
        # the split, so that the next bottleneck shows (digit_metrics.py). No HandlerTime beside it, as
        # BaseHandler.handle would add, and no log line a batch: TorchServe's own PredictionTime already times
        # the whole call and names every request of the batch, and each line is work for the frontend
        times.report(context)
        return answers

    @timed
    def inference(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """One forward pass over the readable digits of the batch (none when all were refused)."""
        if not batch.rows:
            return batch
        return batch.with_probabilities(to_probabilities(self.model(batch.digits)))

    def explain_batch(
        self, batch: Batch, kserve: OipBatch, deadline: Deadline
    ) -> dict[int, Explanation | RequestError]:
        """The explanations the batch's readable requests ask for, each request's own or its own error."""
        positions = row_positions(batch, kserve)
        jobs = {}
        for index, ask in kserve.asks.items():
            if index in batch.errors:
                continue
            rows = positions[index]
            jobs[index] = Job(ask, batch.digits[rows], batch.probabilities[rows].argmax(dim=1).numpy())
        return explain_jobs(jobs, self.model, self.meta, deadline)

    @timed
    def postprocess(
        self,
        batch: Batch,
        kserve: OipBatch | None = None,
        explained: dict[int, Explanation | RequestError] | None = None,
        framed: list[np.ndarray] | None = None,
    ) -> list[bytes]:
        """One body per request, in request order, with a per-request status for the refused ones.

        Bodies go back as bytes: given a dict, TorchServe's worker would encode it with `json.dumps(indent=2)`,
        which bypasses the C encoder, a cost per request that cProfile of a worker under `digits bench http`
        shows.
        OIP requests get OIP answers (digit_oip.py), KServe v1 ones v1 answers (digit_kserve.py), the others
        /predictions ones, with the explanation beside the prediction when one was asked (`explained`; the
        digits as framed, `framed`, go into it).
        """
        kserve = kserve or OipBatch(frozenset(), {}, {})
        explained = explained or {}
        if not kserve.indices and not explained:
            answers = {}
            if batch.rows:
                answers = dict(zip(batch.rows, prediction_bodies(batch.probabilities, self.meta.labels), strict=True))
        else:
            answers = self.plain_answers(batch, kserve, explained, framed or [])
        bodies = []
        for index in range(batch.size):
            error = batch.errors.get(index)
            result = explained.get(index)
            if error is None and isinstance(result, RequestError):
                error = result
            if index in kserve.indices:
                bodies.append(self.kserve_answer(batch, kserve, index, error, result))
            else:
                self.context.set_response_content_type(index, "application/json")
                bodies.append(answers[index] if error is None else json_body(refuse(self.context, index, error)))
            if len(bodies[index]) > self.response_limit:
                bodies[index] = self.oversized(batch, kserve, index, len(bodies[index]))
        return bodies

    def oversized(self, batch: Batch, kserve: OipBatch, index: int, size: int) -> bytes:
        """Request `index`'s 413 in place of a body TorchServe's frontend would drop with the worker and its
        batch: the last guard, behind the bounds each protocol checks before building (`check_answer_size`)."""
        logger.error(
            "request %d: a %d-byte answer, over max_response_size %d, replaced", index, size, self.response_limit
        )
        error = too_large(
            "AnswerTooLarge", f"the answer took {size:,} bytes, over the {self.response_limit:,} TorchServe carries"
        )
        batch.errors[index] = error
        self.context.get_response_headers(index).pop("Inference-Header-Content-Length", None)  # a JSON body now
        if index in kserve.indices:
            return self.kserve_answer(batch, kserve, index, error, None)
        return json_body(refuse(self.context, index, error))

    def plain_answers(
        self, batch: Batch, kserve: OipBatch, explained: dict[int, Explanation | RequestError], framed: list
    ) -> dict[int, bytes]:
        """The /predictions and /explanations bodies of a batch that mixes in other protocols or explanations:
        request index -> body."""
        positions = [position for position, index in enumerate(batch.rows) if index not in kserve.indices]
        if not positions:
            return {}
        bodies = prediction_bodies(batch.probabilities[positions], self.meta.labels)
        answers = {}
        for position, body in zip(positions, bodies, strict=True):
            index = batch.rows[position]
            result = explained.get(index)
            if isinstance(result, Explanation):
                body = explanation_body(body, result, 0, framed[position], self.meta.labels, self.identity())
            answers[index] = body
        return answers

    def identity(self) -> tuple[str, str]:
        return model_identity(self.context)

    def kserve_answer(
        self,
        batch: Batch,
        kserve: OipBatch,
        index: int,
        error: RequestError | None,
        result: Explanation | RequestError | None,
    ) -> bytes:
        """Request `index`'s OIP or KServe v1 body, its status and content type set; `{"error": ...}` if refused."""
        if error is not None:
            self.context.set_response_content_type(index, JSON_TYPE)
            self.context.set_response_status(code=error.code, phrase=error.phrase(), idx=index)
            return error_body(error)
        probabilities = batch.probabilities[kserve.rows[index]].numpy()
        request = kserve.read[index]
        if isinstance(request, V1Request):
            self.context.set_response_content_type(index, JSON_TYPE)
            if result is None:
                return v1_predictions(probabilities, self.meta.labels)
            predictions = prediction_bodies(batch.probabilities[kserve.rows[index]], self.meta.labels)
            framed = request.digits
            return v1_explanations(
                [
                    explanation_body(body, result, position, framed[position], self.meta.labels, self.identity())
                    for position, body in enumerate(predictions)
                ]
            )
        attributions = None if result is None else (result.maps, oip_parameters(result, request.ask, self.meta.labels))
        body, header_length = answer(request, probabilities, self.meta.labels, self.identity(), attributions)
        if header_length is None:
            self.context.set_response_content_type(index, JSON_TYPE)
        else:
            self.context.set_response_content_type(index, BINARY_TYPE)
            self.context.set_response_header(index, "Inference-Header-Content-Length", str(header_length))
        return body


def stamp(context: Any, size: int, version: str, worker: str) -> None:
    """Puts the archive's version and the worker's token on every answer of the batch (digit_contract.py)."""
    for index in range(size):
        context.set_response_header(index, VERSION_HEADER, version)
        context.set_response_header(index, WORKER_HEADER, worker)


def row_positions(batch: Batch, kserve: OipBatch) -> dict[int, slice]:
    """Request index -> its rows in the batch's digits (a /predictions request has one row)."""
    positions = {index: slice(position, position + 1) for position, index in enumerate(batch.rows)}
    positions.update(kserve.rows)
    return positions


def answer_counts(
    batch: Batch, kserve: OipBatch, explained: dict[int, Explanation | RequestError]
) -> Counter[tuple[str, int, str]]:
    """The batch's answers by (protocol, HTTP status, error type), for the Answers metric; an explanation's
    refusal is its request's answer."""
    counts: Counter[tuple[str, int, str]] = Counter()
    for index in range(batch.size):
        error = batch.errors.get(index)
        if error is None and isinstance(explained.get(index), RequestError):
            error = explained[index]
        protocol = kserve.protocols.get(index, "predictions")
        counts[(protocol, 200, "OK") if error is None else (protocol, error.code, error.kind)] += 1
    return counts


def set_threads(model_yaml_config: dict | None) -> None:
    """Intra-op threads of this worker, from model-config.yaml's `handler: {threads: N}` (the archive step's
    --threads); without it, torch's default (OMP_NUM_THREADS, else every core) stays."""
    threads = ((model_yaml_config or {}).get(HANDLER_SECTION) or {}).get(THREADS_KEY)
    if threads is None:
        return
    if type(threads) is not int or threads < 1:
        raise ModelLoadError(f"model-config.yaml handler.threads is {threads!r}, expected a positive integer")
    torch.set_num_threads(threads)
    logger.info("digits handler: %d intra-op thread(s) per worker", threads)


def response_limit(model_yaml_config: dict | None) -> int:
    """The largest answer body this worker may build: model-config.yaml's `handler: {max_response_size: B}`,
    the value `digits serve` writes into TorchServe's config.properties, else TorchServe's own default."""
    value = ((model_yaml_config or {}).get(HANDLER_SECTION) or {}).get(RESPONSE_LIMIT_KEY, TORCHSERVE_MAX_RESPONSE)
    if type(value) is not int or value < 1:
        raise ModelLoadError(
            f"model-config.yaml handler.{RESPONSE_LIMIT_KEY} is {value!r}, expected a positive integer"
        )
    return value


def refuse(context: Any, index: int, error: RequestError) -> dict[str, Any]:
    """Sets request `index`'s HTTP status (TorchServe sends each request of a batch its own) and returns its body."""
    context.set_response_status(code=error.code, phrase=error.phrase(), idx=index)
    return error.body()
