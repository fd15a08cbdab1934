"""The one way a single request fails: a `RequestError` carrying its HTTP status and a JSON body.

Shipped flat inside the archive next to `digit_handler.py` and imported as the top-level module
`digit_errors` (see `digit_handler.py` for why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

BAD_REQUEST = 400  # malformed: bad JSON, wrong shape, bad pixel values, truncated or corrupt image
PAYLOAD_TOO_LARGE = 413  # body or image over our limits
UNSUPPORTED_MEDIA_TYPE = 415  # neither an image Pillow can read, nor JSON, nor base64 of an image
INTERNAL_ERROR = 500  # reading this one request failed in a way the handler did not foresee: a fault of ours
SERVICE_UNAVAILABLE = 503  # the batch's time for explanations ran out before this request's: retry

# A reason phrase ends up in the HTTP status line, which Netty refuses to build when it holds CR/LF, so the
# phrase is cut to one short printable ASCII line; the full message travels in the JSON body.
MAX_PHRASE_CHARS = 200


class RequestError(Exception):
    """One request of a batch is unusable; the others go on.

    Args:
        code: HTTP status for this request (400, 413 or 415; 503 when its explanation ran out of time; 500 for a
            fault of the server's own).
        kind: short machine-readable name of the problem, e.g. "TruncatedImage".
        message: what is wrong and, where it helps, what to send instead.
    """

    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message

    def body(self) -> dict[str, int | str]:
        """The JSON body the client receives, shaped like TorchServe's own error bodies."""
        return {"code": self.code, "type": self.kind, "message": self.message}

    def phrase(self) -> str:
        """The message as a safe HTTP reason phrase."""
        printable = "".join(c if " " <= c <= "~" else " " for c in self.message)
        return printable[:MAX_PHRASE_CHARS]


def bad_request(kind: str, message: str) -> RequestError:
    return RequestError(BAD_REQUEST, kind, message)


def too_large(kind: str, message: str) -> RequestError:
    return RequestError(PAYLOAD_TOO_LARGE, kind, message)


def unsupported(kind: str, message: str) -> RequestError:
    return RequestError(UNSUPPORTED_MEDIA_TYPE, kind, message)


def unavailable(kind: str, message: str) -> RequestError:
    return RequestError(SERVICE_UNAVAILABLE, kind, message)


@contextlib.contextmanager
def prefixed(what: str) -> Iterator[None]:
    """Prefixes the message of a RequestError raised inside with `what` (which part of a request failed)."""
    try:
        yield
    except RequestError as err:
        raise RequestError(err.code, err.kind, f"{what}: {err.message}") from None


def unexpected(err: Exception) -> RequestError:
    """This request's own answer when reading it raised something unforeseen; a MemoryError is a 413."""
    detail = f"{type(err).__name__}: {ascii(str(err))[1:-1]}"[:300]  # ascii(): no lone surrogate gets out
    if isinstance(err, MemoryError):
        return RequestError(PAYLOAD_TOO_LARGE, "TooLarge", f"reading this request ran out of memory ({detail})")
    return RequestError(
        INTERNAL_ERROR,
        "InternalError",
        f"the server failed while reading this request ({detail}); the other requests of its batch were "
        "answered; please report this",
    )
