"""The no-op handler: TorchServe's own cost per request, with nothing to compute.

`digits bench http` serves it beside the model, archived with the same batch settings, as the ceiling a
handler can reach on this machine: frontend, queueing, batching, the worker protocol, and nothing else.
It reads no request and loads no model, so its archive holds only this file and the model config.
Shipped alone: the digits archives leave it out (see `serving.archive.handler_files`).
"""

from __future__ import annotations

from typing import Any

ANSWER = {"label": 0}  # a tiny JSON body, so the answers cost what a small prediction costs to send


def handle(data: list[Any] | None, context: Any) -> list[dict[str, int]] | None:
    """TorchServe's function entry point; it is called once with `data=None` when the worker starts."""
    if data is None:
        return None
    return [ANSWER] * len(data)
