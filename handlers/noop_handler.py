"""The no-op handler: TorchServe's own cost per request, with nothing to compute.

`digits bench http` serves it beside the model, archived with the same batch settings, as the ceiling a
handler can reach on this machine: frontend, queueing, batching, the worker protocol, and nothing else.
It reads no request and loads no model, so its archive holds only this file and the model config.
Shipped alone: the digits archives leave it out (see `serving.archive.handler_files`).

It answers the way the digits handler does, so that the ceiling pays what the model pays per answer and no
more: a prediction-shaped body of the same length, pre-encoded as compact JSON bytes, with its content type
set per request. Given dicts, TorchServe's worker would encode them with `json.dumps(indent=2)` in Python,
a cost the digits handler avoids, and the ratio model / no-op would be flattered.
"""

from __future__ import annotations

import os
from typing import Any

# A typical answer of the digits handler: each number to 7 significant digits, as `digit_batch` writes them
_PROBABILITIES = (2.5e-09, 1.234567e-07, 3.456789e-06, 0.0001234567, 4.567891e-08, 5.678912e-09, 6.789123e-10,
                  0.9998765, 7.891234e-06, 8.912345e-05)  # fmt: skip
_NUMBERS = ",".join(f"{p:.7g}" for p in _PROBABILITIES)
ANSWER = f'{{"label":7,"confidence":{max(_PROBABILITIES):.7g},"probabilities":[{_NUMBERS}]}}'.encode()


def handle(data: list[Any] | None, context: Any) -> list[bytes] | None:
    """TorchServe's function entry point; it is called once with `data=None` when the worker starts."""
    if data is None:
        # and it receives them as the digits handler does: TorchServe's worker hands bodies over unparsed
        # (digit_json.take_over_decoding), rather than json.loads-ing each JSON body for nothing
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        return None
    for index in range(len(data)):
        context.set_response_content_type(index, "application/json")
    return [ANSWER] * len(data)
