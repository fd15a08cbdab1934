"""JSON bodies in the worker: which ones the handler parses itself, and a fast parser that answers as json does.

TorchServe 0.12.0's worker parses every parameter sent as `application/json` with `json.loads` before the
handler sees it, and decodes `text/*` ones to str (ts/protocol/otf_message_handler.py, `_retrieve_input_data`),
unless the environment variable TS_DECODE_INPUT_REQUEST is "false", which it reads again for every parameter.
For an OIP request of 64 digits that parse was the largest cost of the JSON path after the model itself
(`py-spy record` on a worker under `digits bench http --oip 64 --encoding json`), and its objects were then
parsed a second time into numbers by numpy. So the handler turns the worker's decoding off when it loads
(`take_over_decoding`) and decides per request:
  - requests that came through a KServe route (`/v2/models/NAME/infer`, ...) keep their raw bytes: the OIP
    reader parses the JSON part with `loads` (and the binary extension's bytes are never fed to a JSON parser);
  - every other request gets exactly the decoding the worker would have done (`decoded_as_worker`), so that
    /predictions reads what it always read.

`loads` parses with msgspec where it is installed: it returns the same Python values as `json.loads` for
every document that both accept (integers of any size included; tests/handlers/test_handler_json.py pins it),
in a fraction of the time. What msgspec refuses (NaN, Infinity, numbers past a double's range, lone UTF-16
surrogates, a byte-order mark, malformed text, nesting past its depth limit) goes to `json.loads`, which
accepts what it accepted before and otherwise raises its own error, so that no answer and no error message
changes. Without msgspec, everything goes to `json.loads`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

try:
    import msgspec
except ImportError:  # a serving environment without it parses with the standard library (the handler logs which)
    msgspec = None

DECODE_SWITCH = "TS_DECODE_INPUT_REQUEST"  # read by TorchServe's worker for each parameter it receives
JSON_TYPE = "application/json"
_DECODER = msgspec.json.Decoder() if msgspec is not None else None


def fast_json_available() -> bool:
    return _DECODER is not None


def loads(text: bytes) -> Any:
    """JSON text parsed as `json.loads(text)` parses it (see the module's docstring).

    Raises:
        ValueError: text `json.loads` does not take either (its JSONDecodeError or UnicodeDecodeError).
        RecursionError: nesting deeper than `json.loads` follows.
    """
    if _DECODER is not None:
        try:
            return _DECODER.decode(text)
        except (msgspec.DecodeError, RecursionError):
            pass  # json decides: it takes some of these texts (NaN, ...) and names what is wrong with the rest
    return json.loads(text)


def take_over_decoding() -> None:
    """Makes TorchServe's worker hand every parameter over as the bytes received (this process only)."""
    os.environ[DECODE_SWITCH] = "false"


def decoded_as_worker(row: Any, types: Mapping[str, str]) -> Any:
    """A request's parameters decoded as TorchServe's worker decodes them when its decoding is on.

    Args:
        row: one element of the batch: parameter name -> value (bytes as received, or already decoded).
        types: parameter name -> the Content-Type the frontend gave it (`parameter_types`).
    """
    if not isinstance(row, Mapping):
        return row
    return {name: decoded_value(value, types.get(name, "")) for name, value in row.items()}


def decoded_value(value: Any, content_type: str) -> Any:
    """One parameter as `_retrieve_input_data` leaves it: parsed JSON, text, or the bytes when that fails."""
    if not isinstance(value, (bytes, bytearray)):
        return value  # already decoded (the worker's decoding was on)
    try:
        if content_type == JSON_TYPE:
            return json.loads(value.decode("utf-8"))
        if content_type.startswith("text"):
            return value.decode("utf-8")
    except Exception:  # noqa: BLE001 - the worker forwards the bytes on any failure, and so does this
        return value
    return value


def parameter_types(properties: Mapping[str, Any]) -> dict[str, str]:
    """Parameter name -> its Content-Type, from a request's properties (ts/service.py keeps one
    `{"content-type": ...}` dict per parameter beside the HTTP headers, which are strings)."""
    return {
        str(name): str(value.get("content-type") or "")
        for name, value in properties.items()
        if isinstance(value, Mapping)
    }
