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
Open Inference Protocol requests (`/v2/models/NAME/infer`) share the batch: see `digit_oip.py`.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

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
from digit_json import fast_json_available, take_over_decoding
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
    """Classifies handwritten digits with the archive's TorchScript, ONNX or .pt2 model, one forward pass a batch."""

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
        """TorchServe's entry point for a batch: read, one forward pass, answer each request.

        Replaces BaseHandler.handle, which switches to Captum explanations or a "describe" mode whenever
        request 0 of the batch carries an `explain` or `describe` header: a client's header would then fail
        the whole batch, as this handler has neither mode.
        """
        self.context = context
        times = StageTimes()
        with times.stage("DecodeTime"):
            # /predictions and OIP requests alike
            readings, oip = read_requests(data, context, self.meta, self.response_limit)
        with times.stage("PreprocessTime"):
            batch = assemble(readings, self.meta)
        with times.stage("InferenceTime"):
            batch = self.inference(batch)
        with times.stage("PostprocessTime"):
            answers = self.postprocess(batch, oip)
        stamp(context, batch.size, model_identity(context)[1], self.worker_token)
        times.count(batch.size, len(batch.rows), answer_counts(batch, oip))
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

    @timed
    def postprocess(self, batch: Batch, oip: OipBatch | None = None) -> list[bytes]:
        """One body per request, in request order, with a per-request status for the refused ones.

        Bodies go back as bytes: given a dict, TorchServe's worker would encode it with `json.dumps(indent=2)`,
        which bypasses the C encoder, a cost per request that cProfile of a worker under `digits bench http`
        shows.
        OIP requests (`oip`) get OIP answers (digit_oip.py), the others /predictions ones.
        """
        if oip is None or not oip.indices:
            answers = {}
            if batch.rows:
                answers = dict(zip(batch.rows, prediction_bodies(batch.probabilities, self.meta.labels), strict=True))
        else:
            answers = self.plain_answers(batch, oip)
        bodies = []
        for index in range(batch.size):
            error = batch.errors.get(index)
            if oip is not None and index in oip.indices:
                bodies.append(self.oip_answer(batch, oip, index, error))
            else:
                self.context.set_response_content_type(index, "application/json")
                bodies.append(answers[index] if error is None else json_body(refuse(self.context, index, error)))
            if len(bodies[index]) > self.response_limit:
                bodies[index] = self.oversized(batch, oip, index, len(bodies[index]))
        return bodies

    def oversized(self, batch: Batch, oip: OipBatch | None, index: int, size: int) -> bytes:
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
        if oip is not None and index in oip.indices:
            return self.oip_answer(batch, oip, index, error)
        return json_body(refuse(self.context, index, error))

    def plain_answers(self, batch: Batch, oip: OipBatch) -> dict[int, bytes]:
        """The /predictions bodies of a batch that mixes in OIP requests: request index -> body."""
        positions = [position for position, index in enumerate(batch.rows) if index not in oip.indices]
        if not positions:
            return {}
        bodies = prediction_bodies(batch.probabilities[positions], self.meta.labels)
        return {batch.rows[position]: body for position, body in zip(positions, bodies, strict=True)}

    def oip_answer(self, batch: Batch, oip: OipBatch, index: int, error: RequestError | None) -> bytes:
        """Request `index`'s OIP body, its status and content type set: the outputs, or `{"error": ...}`."""
        if error is not None:
            self.context.set_response_content_type(index, JSON_TYPE)
            self.context.set_response_status(code=error.code, phrase=error.phrase(), idx=index)
            return error_body(error)
        probabilities = batch.probabilities[oip.rows[index]].numpy()
        body, header_length = answer(oip.read[index], probabilities, self.meta.labels, model_identity(self.context))
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


def answer_counts(batch: Batch, oip: OipBatch) -> Counter[tuple[str, int, str]]:
    """The batch's answers by (protocol, HTTP status, error type), for the Answers metric."""
    counts: Counter[tuple[str, int, str]] = Counter()
    for index in range(batch.size):
        error = batch.errors.get(index)
        protocol = "oip" if index in oip.indices else "predictions"
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
